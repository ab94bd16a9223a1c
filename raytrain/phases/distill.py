"""`distill`: a student learns from a frozen teacher.

The student is the phase's `model` (with its own `init_from`, `freeze`, optimizer and schedule, exactly as
in `train`); the teacher is an earlier phase's weights (`teacher: {phase: X}`) or a checkpoint file with its
model (`teacher: {path: ..., model: {...}}`), loaded on every worker, frozen and in eval mode for the whole
phase, never wrapped by DDP and never written to the phase's checkpoints or best/last weights. Each step the
teacher runs on the same batch under `no_grad`; a loss that takes a `teacher` argument
(`fn(outputs, batch, teacher)`) receives its outputs, one that takes `teacher_model` the frozen teacher
itself (distribution matching scores the student's samples with it), any other loss is the usual
`fn(outputs, batch)`.
Resume is exact as in train: the checkpoints hold the student, its optimizer, data position and RNG.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from raytrain.checkpoints import load_weights
from raytrain.config.schema import DistillPhaseConfig, ModelConfig, PipelineConfig
from raytrain.models import build_model
from raytrain.phases.base import PhaseContext, Produces, register_kind
from raytrain.phases.train import PhaseRunner, TrainKind

if TYPE_CHECKING:
    from raytrain.plan import PhasePlan


class DistillRunner(PhaseRunner):
    def setup_kind(self, model: torch.nn.Module) -> None:
        super().setup_kind(model)
        spec = self.cfg["teacher"]
        mcfg = ModelConfig.model_validate(spec["model"])
        teacher = build_model(mcfg.name, dict(mcfg.args), mcfg.adapter)
        teacher.load_state_dict(load_weights(spec["path"]))  # strict: a teacher is loaded whole
        teacher.requires_grad_(False)
        self.teacher = teacher.to(self.device).eval()

    def loss_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        self.teacher.eval()  # stays in eval mode whatever the student's mode
        with torch.no_grad(), self._autocast():
            out = self.teacher(batch)
        return {**super().loss_inputs(batch),
                "teacher": {k: v.float() if torch.is_floating_point(v) else v for k, v in out.items()},
                "teacher_model": self.teacher}


class DistillKind(TrainKind):
    """`distill`: train's keys plus `teacher`; losses may read the teacher's outputs."""

    name = "distill"
    config = DistillPhaseConfig

    def needs(self, pipe: PipelineConfig, phase: Any) -> Any:
        needs = super().needs(pipe, phase)
        if phase.teacher.phase is not None:
            needs.weights.append(("teacher", phase.teacher.phase))
        return needs

    def produces(self, pipe: PipelineConfig, phase: Any) -> Produces:
        return Produces(weights=True)  # the student's

    def check(self, pipe: PipelineConfig, phase: Any, plan: PhasePlan, where: str) -> list[str]:
        from pathlib import Path

        from raytrain.registry import RegistryError

        problems = super().check(pipe, phase, plan, where)
        t = phase.teacher
        if t.path is not None and "://" not in t.path and not Path(t.path).exists():
            problems.append(f"{where}.teacher.path: checkpoint {t.path} does not exist")
        mcfg = pipe.teacher_model(t)
        try:
            with torch.device("meta"):
                teacher = build_model(mcfg.name, dict(mcfg.args), mcfg.adapter)
            plan.extra["teacher_params"] = sum(p.numel() for p in teacher.parameters())
        except (RegistryError, TypeError, ValueError) as exc:
            problems.append(f"{where}.teacher.model: {exc}")
        return problems

    def plan_lines(self, pipe: PipelineConfig, plan: PhasePlan) -> list[str]:
        from raytrain.plan import fmt_count

        t = plan.phase.teacher
        source = f"phase {t.phase} ({t.checkpoint})" if t.phase else t.path
        n = int(plan.extra.get("teacher_params", 0))
        return [f"    teacher  {source}: {pipe.teacher_model(t).name}, {fmt_count(n)} params, frozen",
                *super().plan_lines(pipe, plan)]

    def worker(self, config: dict[str, Any]) -> DistillRunner:
        return DistillRunner(config)

    def run(self, ctx: PhaseContext) -> None:
        from raytrain.phases.ray_train import fit

        fit(ctx, self)


register_kind(DistillKind)
