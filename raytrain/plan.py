"""Pre-flight checks and the phase table of `raytrain plan` — no Ray, no workers.

Models are built on the `meta` device, so even a full-size config is checked in
seconds without allocating its weights.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raytrain.checkpoints import PatternError, check_patterns, frozen_names
from raytrain.config.loader import ConfigError
from raytrain.config.schema import PhaseConfig, PipelineConfig
from raytrain.data.datasets import dataset_info, resolve
from raytrain.data.transforms import TRANSFORMS
from raytrain.losses import LOSSES
from raytrain.metrics import METRICS
from raytrain.models import build_model
from raytrain.optim import lr_factor
from raytrain.registry import RegistryError


@dataclass
class PhasePlan:
    phase: PhaseConfig
    datasets: list[tuple[str, str, dict[str, Any] | None]] = field(default_factory=list)  # (role, name, manifest)
    init: str = "fresh init"
    n_trainable: int = 0
    n_frozen: int = 0
    sample_rate: int | None = None


@dataclass(frozen=True)
class PhaseFigures:
    """The numbers of one phase's entry in the plan table, as data (`format_plan` prints these)."""

    name: str
    kind: str
    batch_size: int  # per worker and micro-batch (an evaluate phase: its eval batch size)
    grad_accum: int
    num_workers: int
    effective_batch: int  # samples per optimizer step: batch_size x grad_accum x num_workers
    max_steps: int
    eval_every: int
    checkpoint_every: int
    n_trainable: int
    n_frozen: int


def phase_figures(pipe: PipelineConfig, plan: PhasePlan) -> PhaseFigures:
    ph = plan.phase
    workers = pipe.phase_scaling(ph).num_workers
    batch = (ph.eval_batch_size or ph.batch_size) if ph.kind == "evaluate" else ph.batch_size
    accum = 1 if ph.kind == "evaluate" else ph.grad_accum
    return PhaseFigures(ph.name, ph.kind, batch, accum, workers, batch * accum * workers, ph.max_steps,
                        ph.eval_every, ph.checkpoint_every, plan.n_trainable, plan.n_frozen)


def _where(phase: PhaseConfig, i: int) -> str:
    return f"phases[{i}]({phase.name})"


def _model_names(pipe: PipelineConfig, phase: PhaseConfig) -> dict[str, torch.Size]:
    mcfg = pipe.phase_model(phase)
    with torch.device("meta"):
        model = build_model(mcfg.name, dict(mcfg.args), mcfg.adapter)
    return {n: p.shape for n, p in model.named_parameters()}


def check_pipeline(pipe: PipelineConfig, *, require_data: bool = False) -> list[PhasePlan]:
    """All cross-field checks. Raises ConfigError listing every problem found."""
    problems: list[str] = []
    plans: list[PhasePlan] = []
    seen: list[str] = []
    for i, phase in enumerate(pipe.phases):
        where = _where(phase, i)
        plan = PhasePlan(phase)
        plans.append(plan)
        if phase.name in seen:
            problems.append(f"{where}.name: phase name {phase.name!r} is used twice")
        # datasets
        train_roles = [("train", s.name) for s in phase.train] if phase.kind == "train" else []
        roles = train_roles + ([("eval", phase.eval)] if phase.eval else [])
        for role, name in roles:
            if name not in pipe.data:
                close = difflib.get_close_matches(name, list(pipe.data), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                problems.append(f"{where}.{role}: dataset {name!r} is not under 'data'.{hint} "
                                f"Defined: {', '.join(pipe.data)}")
                continue
            path = resolve(pipe.data[name].shards)
            manifest = dataset_info(path)
            if manifest is None and require_data:
                problems.append(f"data.{name}.shards: {path} has no _manifest.json; prepare it first "
                                "(raytrain prep configs/prep/<name>.yaml)")
            plan.datasets.append((role, name, manifest))
        rates = {m["sample_rate"] for _, _, m in plan.datasets if m}
        mcfg = pipe.phase_model(phase)
        model_sr = mcfg.args.get("sample_rate")
        if len(rates) > 1:
            problems.append(f"{where}: datasets have different sample rates {sorted(rates)}; resample them "
                            "to one rate with raytrain prep")
        elif rates and model_sr and model_sr not in rates:
            problems.append(f"{where}: model sample_rate {model_sr} but the data is {rates.pop()} Hz; set "
                            "model.args.sample_rate or prepare the data at the model's rate")
        plan.sample_rate = model_sr or (next(iter(rates)) if rates else None)
        # registries
        for name in phase.losses:
            _check_name(LOSSES, name, f"{where}.losses", problems)
        for name in phase.metrics:
            _check_name(METRICS, name, f"{where}.metrics", problems)
        for t in [*phase.transforms, *phase.eval_transforms]:
            _check_name(TRANSFORMS, t.name, f"{where}.transforms", problems)
        for g in phase.gates:
            if not g.metric.startswith(("eval/", "train/")):
                problems.append(f"{where}.gates: metric {g.metric!r} should be 'eval/<name>' or 'train/<name>'")
            elif g.metric.startswith("eval/") and not phase.eval:
                problems.append(f"{where}.gates: {g.metric!r} needs an 'eval' dataset in this phase")
        # init_from
        init = phase.init
        if init is not None and init.phase is not None:
            if init.phase not in [p.name for p in pipe.phases]:
                problems.append(f"{where}.init_from: no phase named {init.phase!r}; earlier phases: {seen or 'none'}")
            elif init.phase not in seen:
                problems.append(f"{where}.init_from: phase {init.phase!r} runs after {phase.name!r}; "
                                "init_from must name an earlier phase")
            plan.init = f"phase {init.phase} ({init.checkpoint})"
        elif init is not None and init.path is not None:
            plan.init = init.path
            if "://" not in init.path and not Path(init.path).exists():
                problems.append(f"{where}.init_from.path: checkpoint {init.path} does not exist")
        # model, freeze patterns, param groups
        try:
            shapes = _model_names(pipe, phase)
            names = list(shapes)
            frozen = frozen_names(names, phase, where)
            for j, group in enumerate(phase.param_groups):
                check_patterns(names, group.patterns, f"{where}.param_groups[{j}].params")
            plan.n_frozen = sum(shapes[n].numel() for n in frozen)
            plan.n_trainable = sum(s.numel() for n, s in shapes.items() if n not in frozen)
            if plan.n_trainable == 0 and phase.kind == "train":
                problems.append(f"{where}: every parameter is frozen; nothing to train")
        except (PatternError, RegistryError, TypeError, ValueError) as exc:
            problems.append(str(exc) if str(exc).startswith(where) else f"{where}.model: {exc}")
        seen.append(phase.name)
    if problems:
        raise ConfigError("the pipeline has problems:\n" + "\n".join(f"  - {p}" for p in problems))
    return plans


def _check_name(registry: Any, name: str, where: str, problems: list[str]) -> None:
    try:
        registry.get(name)
    except RegistryError as exc:
        problems.append(f"{where}: {exc}")


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _schedule_text(phase: PhaseConfig) -> str:
    s = phase.schedule
    end = phase.optim.lr * lr_factor(phase.max_steps - 1, s, phase.max_steps)
    text = f"{phase.optim.name} lr {phase.optim.lr:g}"
    if s.warmup_steps:
        text += f", warmup {s.warmup_steps}"
    text += f", {s.decay}" + (f" -> {end:.2g}" if s.decay != "constant" else "")
    for g in phase.param_groups:
        text += f"; {g.params}: lr {g.lr or phase.optim.lr:g}"
    return text


def format_plan(pipe: PipelineConfig, plans: list[PhasePlan]) -> str:
    lines = [f"pipeline {pipe.name} (seed {pipe.seed}, {len(plans)} phases)", ""]
    for i, p in enumerate(plans):
        ph, f = p.phase, phase_figures(pipe, p)
        lines.append(f"[{i}] {ph.name}  ({ph.kind})")
        for role, name, m in p.datasets:
            weight = next((f" x{s.weight:g}" for s in ph.train if s.name == name and role == "train"), "")
            info = (f"{m['rows']:,} rows, {m['hours']:.2f} h, {m.get('num_speakers', '?')} speakers, "
                    f"{m['sample_rate']} Hz, {m['kind']}") if m else "NOT PREPARED (no _manifest.json)"
            lines.append(f"    {role:<8} {name}{weight}: {info}")
        lines.append(f"    init     {p.init}")
        if ph.kind == "evaluate":
            lines.append(f"    params   {_fmt_count(p.n_trainable + p.n_frozen)} (scored, not trained)")
            lines.append(f"    metrics  {', '.join(ph.metrics) or '-'}"
                         + (f"; losses {', '.join(f'{k} x{v:g}' for k, v in ph.losses.items())}" if ph.losses else ""))
            lines.append(f"    batch    {f.batch_size} x {f.num_workers} workers")
        else:
            lines.append(f"    params   {_fmt_count(p.n_trainable)} trainable, {_fmt_count(p.n_frozen)} frozen")
            lines.append(f"    losses   {', '.join(f'{k} x{v:g}' for k, v in ph.losses.items())}"
                         + (f"; metrics {', '.join(ph.metrics)}" if ph.metrics else ""))
            lines.append(f"    optim    {_schedule_text(ph)}")
            lines.append(f"    batch    {f.batch_size} x accum {f.grad_accum} x {f.num_workers} workers = "
                         f"{f.effective_batch}; {f.max_steps:,} steps; eval every {f.eval_every}, "
                         f"checkpoint every {f.checkpoint_every}")
        if ph.gates:
            lines.append("    gates    " + ", ".join(
                f"{g.metric} {'>=' + format(g.min, 'g') if g.min is not None else ''}"
                f"{' ' if g.min is not None and g.max is not None else ''}"
                f"{'<=' + format(g.max, 'g') if g.max is not None else ''}" for g in ph.gates))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
