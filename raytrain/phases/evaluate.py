"""`evaluate`: the metrics (and gates) of an earlier phase's weights (or a checkpoint) on a dataset.

Runs in Ray Train workers like `train` (the eval set is split across workers and the sums reduced), with
no optimizer and no train data; its checkpoint holds the scored weights, so a later phase may load them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from raytrain.checkpoints import STATE_FILE, load_into, load_weights
from raytrain.config.schema import EvaluatePhaseConfig, InitFromConfig, PipelineConfig
from raytrain.data.stream import build_transforms
from raytrain.losses import LOSSES
from raytrain.metrics import METRICS
from raytrain.phases.base import PhaseContext, PhaseKind, Produces, register_kind
from raytrain.phases.train import PhaseRunner, autocast_dtype, unwrap

if TYPE_CHECKING:
    from raytrain.plan import PhasePlan


class EvaluateRunner(PhaseRunner):
    """One evaluate phase on one worker: init_from's weights, no optimizer, no train data."""

    def setup_kind(self, model: torch.nn.Module) -> None:
        import ray.train
        import ray.train.torch

        phase, init = self.phase, self.cfg["init"]
        load_into(model, load_weights(init["path"]), InitFromConfig(**init["rules"]), init["path"])
        self.model = ray.train.torch.prepare_model(model.to(self.device), parallel_strategy=None)
        self.amp = autocast_dtype(phase.precision, self.device)
        self.loss_fns = {name: (LOSSES.get(name), w) for name, w in phase.losses.items()}
        self.metric_fns = [METRICS.get(m) for m in phase.metrics]
        self.eval_shard = self.dataset_shard("eval")
        self.eval_audio = self.cfg.get("audio", {}).get("eval")
        self._eval_cache = None
        self.eval_transforms = build_transforms([t.model_dump() for t in phase.eval_transforms],
                                                int(self.cfg["sample_rate"] or 0), self.pipe.seed + 1)

    def run(self) -> None:
        """Score once, then report the metrics with a checkpoint of the scored weights (the pipeline's
        summary and hand-off read phases' checkpoints)."""
        import ray.train

        self.setup()
        metrics = self.evaluate()
        self._emit("eval", step=0, metrics=metrics)
        metric, mode = self.phase.best
        value = metrics.get(metric)
        report = {**metrics, "step": 0, "skipped_steps": 0,
                  "score": value if value is not None else (-1e30 if mode == "max" else 1e30)}
        if self.rank != 0:
            ray.train.report(report)
            return
        state = {"model": unwrap(self.model).state_dict(), "step": 0, "skipped": 0, "metrics": report}
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / STATE_FILE)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))


class EvaluateKind(PhaseKind):
    name = "evaluate"
    config = EvaluatePhaseConfig

    def produces(self, pipe: PipelineConfig, phase: Any) -> Produces:
        return Produces(weights=True)  # the scored weights, unchanged

    def plan_lines(self, pipe: PipelineConfig, plan: PhasePlan) -> list[str]:
        from raytrain.plan import fmt_count, phase_figures

        ph, f = plan.phase, phase_figures(pipe, plan)
        return [f"    params   {fmt_count(plan.n_trainable + plan.n_frozen)} (scored, not trained)",
                f"    metrics  {', '.join(ph.metrics) or '-'}"
                + (f"; losses {', '.join(f'{k} x{v:g}' for k, v in ph.losses.items())}" if ph.losses else ""),
                f"    batch    {f.batch_size} x {f.num_workers} workers"]

    def worker(self, config: dict[str, Any]) -> EvaluateRunner:
        return EvaluateRunner(config)

    def run(self, ctx: PhaseContext) -> None:
        from raytrain.phases.ray_train import fit

        fit(ctx, self)


register_kind(EvaluateKind)
