"""Pre-flight checks and the phase table of `raytrain plan` — no Ray, no workers.

Models are built on the `meta` device, so even a full-size config is checked in
seconds without allocating its weights. Each phase's kind says what it reads and
writes (`PhaseKind.needs` / `produces`); the checks here are the same for every kind,
and a kind adds its own (`PhaseKind.check`) and its rows of the table (`plan_lines`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raytrain.config.loader import ConfigError
from raytrain.config.schema import PipelineConfig
from raytrain.data.datasets import dataset_info, resolve
from raytrain.data.transforms import TRANSFORMS
from raytrain.losses import LOSSES
from raytrain.metrics import METRICS
from raytrain.models import build_model
from raytrain.phases.base import PhaseKind, phase_kind
from raytrain.registry import RegistryError


@dataclass
class PhasePlan:
    phase: Any  # the phase's config (its kind's model)
    kind: PhaseKind | None = None
    datasets: list[tuple[str, str, dict[str, Any] | None]] = field(default_factory=list)  # (role, name, manifest)
    init: str = "fresh init"
    n_trainable: int = 0
    n_frozen: int = 0
    sample_rate: int | None = None
    shapes: dict[str, torch.Size] = field(default_factory=dict)  # parameter name -> shape (meta model)
    produced: dict[str, dict[str, Any]] = field(default_factory=dict)  # datasets it writes -> columns
    extra: dict[str, Any] = field(default_factory=dict)  # what a kind's check found, for its plan lines
    columns: dict[str, list[str] | None] = field(default_factory=dict)  # "train:<name>"/"eval"/... -> to read


@dataclass(frozen=True)
class PhaseFigures:
    """The numbers of one phase's entry in the plan table, as data (`format_plan` prints these)."""

    name: str
    kind: str
    batch_size: int  # per worker and micro-batch (a phase that does not train: its eval batch size)
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
    trains = ph.trains
    batch = getattr(ph, "batch_size", 0) if trains else getattr(ph, "scored_batch_size", getattr(ph, "batch_size", 0))
    accum = getattr(ph, "grad_accum", 1) if trains else 1
    return PhaseFigures(ph.name, ph.kind, batch, accum, workers, batch * accum * workers,
                        getattr(ph, "max_steps", 0), getattr(ph, "eval_every", 0), getattr(ph, "checkpoint_every", 0),
                        plan.n_trainable, plan.n_frozen)


def _where(phase: Any, i: int) -> str:
    return f"phases[{i}]({phase.name})"


def check_pipeline(pipe: PipelineConfig, *, require_data: bool = False) -> list[PhasePlan]:
    """All cross-field checks. Raises ConfigError listing every problem found."""
    problems: list[str] = []
    plans: list[PhasePlan] = []
    seen: list[str] = []
    weights_by: set[str] = set()  # earlier phases that write weights
    produced: dict[str, tuple[str, dict[str, Any]]] = {}  # dataset an earlier phase writes -> (phase, columns)
    for i, phase in enumerate(pipe.phases):
        where = _where(phase, i)
        kind = phase_kind(phase.kind)
        plan = PhasePlan(phase, kind)
        plans.append(plan)
        if phase.name in seen:
            problems.append(f"{where}.name: phase name {phase.name!r} is used twice")
        needs = kind.needs(pipe, phase)
        # datasets: `data:` entries, or what an earlier phase writes
        for use in needs.datasets:
            if use.name in produced:
                plan.datasets.append((use.role, use.name, None))
                continue
            if use.name not in pipe.data:
                known = [*pipe.data, *produced]
                later = [p.name for p in pipe.phases[i:] if use.name in phase_kind(p.kind).produces(pipe, p).datasets]
                if later:
                    problems.append(f"{where}.{use.role}: dataset {use.name!r} is written by phase {later[0]!r}, "
                                    f"which runs after {phase.name!r}; move that phase earlier")
                    continue
                close = difflib.get_close_matches(use.name, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                also = " nor written by an earlier phase" if produced else ""
                problems.append(f"{where}.{use.role}: dataset {use.name!r} is not under 'data'{also}.{hint} "
                                f"Defined: {', '.join(known)}")
                continue
            path = resolve(pipe.data[use.name].shards)
            manifest = dataset_info(path)
            if manifest is None and require_data:
                problems.append(f"data.{use.name}.shards: {path} has no _manifest.json; prepare it first "
                                "(raytrain prep configs/prep/<name>.yaml)")
            plan.datasets.append((use.role, use.name, manifest))
        problems.extend(_check_columns(kind, pipe, phase, plan, produced, where))
        rates = {m["sample_rate"] for _, _, m in plan.datasets if m and m.get("sample_rate")}
        for _, name, m in plan.datasets:  # a dataset an earlier phase writes: the rate its columns declare
            if m is None and name in produced:
                rates |= {int(c["sample_rate"]) for c in produced[name][1].values()
                          if isinstance(c, dict) and c.get("role") == "audio" and c.get("sample_rate")}
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
        for name in getattr(phase, "losses", {}):
            _check_name(LOSSES, name, f"{where}.losses", problems)
        for name in getattr(phase, "metrics", []):
            _check_name(METRICS, name, f"{where}.metrics", problems)
        for t in [*getattr(phase, "transforms", []), *getattr(phase, "eval_transforms", [])]:
            _check_name(TRANSFORMS, t.name, f"{where}.transforms", problems)
        for g in getattr(phase, "gates", []):
            if not g.metric.startswith(("eval/", "train/")):
                problems.append(f"{where}.gates: metric {g.metric!r} should be 'eval/<name>' or 'train/<name>'")
            elif g.metric.startswith("eval/") and not getattr(phase, "eval", None):
                problems.append(f"{where}.gates: {g.metric!r} needs an 'eval' dataset in this phase")
            for key, other in (("relative_to", g.relative_to), ("ratio_to", g.ratio_to)):
                if other is not None and other not in seen:
                    problems.append(f"{where}.gates: {key} {other!r} is not an earlier phase "
                                    f"(earlier phases: {', '.join(seen) or 'none'})")
        # weights it loads: init_from, a teacher, ...
        names = [p.name for p in pipe.phases]
        for key, source in needs.weights:
            if source not in names:
                problems.append(f"{where}.{key}: no phase named {source!r}; earlier phases: {seen or 'none'}")
            elif source not in seen:
                problems.append(f"{where}.{key}: phase {source!r} runs after {phase.name!r}; {key} must name an "
                                "earlier phase")
            elif source not in weights_by:
                problems.append(f"{where}.{key}: phase {source!r} writes no weights to load")
        init = phase.init
        if init is not None and init.phase is not None:
            plan.init = f"phase {init.phase} ({init.checkpoint})"
        elif init is not None and init.path is not None:
            plan.init = init.path
            if "://" not in init.path and not Path(init.path).exists():
                problems.append(f"{where}.init_from.path: checkpoint {init.path} does not exist")
        # the model (on `meta`), then the kind's own checks
        try:
            with torch.device("meta"):
                model = build_model(mcfg.name, dict(mcfg.args), mcfg.adapter)
                lora = getattr(phase, "lora", None)
                if lora is not None:
                    from raytrain.lora import add_lora

                    add_lora(model, lora, f"{where}.lora")
            plan.shapes = {n: p.shape for n, p in model.named_parameters()}
            plan.n_trainable = sum(s.numel() for s in plan.shapes.values())
        except (RegistryError, TypeError, ValueError) as exc:
            problems.append(str(exc) if str(exc).startswith(where) else f"{where}.model: {exc}")
        problems.extend(kind.check(pipe, phase, plan, where))
        out = kind.produces(pipe, phase)
        plan.produced = out.datasets
        for name, columns in out.datasets.items():
            produced[name] = (phase.name, columns)
        if out.weights:
            weights_by.add(phase.name)
        seen.append(phase.name)
    if problems:
        raise ConfigError("the pipeline has problems:\n" + "\n".join(f"  - {p}" for p in problems))
    return plans


def _check_columns(kind: PhaseKind, pipe: PipelineConfig, phase: Any, plan: PhasePlan,
                   produced: dict[str, tuple[str, dict[str, Any]]], where: str) -> list[str]:
    """Each dataset has the columns the phase reads from it (its manifest's, or those the earlier phase that
    writes it declares); records in `plan.columns` which columns to read."""
    from raytrain.data.columns import missing_columns

    problems: list[str] = []
    try:
        needs = kind.column_needs(pipe, phase)
    except RegistryError:  # an unknown model, loss, metric or transform: its own check names the key
        return []
    except (TypeError, ValueError) as exc:
        return [f"{where}: cannot tell which columns it reads: {exc}"]
    for role, name, manifest in plan.datasets:
        need = needs.get(role)
        if need is None:
            continue
        available: Any = manifest if manifest is not None else (list(produced[name][1]) if name in produced else None)
        if available is None:  # not prepared yet: `raytrain run` checks again
            continue
        for col in missing_columns(need, available):
            source = f"written by phase {produced[name][0]!r}" if name in produced else "its manifest"
            have = ", ".join(available if isinstance(available, list) else _column_names(available))
            problems.append(f"{where}.{role}: dataset {name!r} has no column {col!r} ({source} lists {have}), "
                            f"needed by {need.explain(col.split(' ')[0])}; read a dataset that has it, or "
                            "change what the phase reads")
        key = f"train:{name}" if role == "train" else role
        plan.columns[key] = need.to_read(manifest) if manifest is not None else None
    return problems


def _column_names(manifest: dict[str, Any]) -> list[str]:
    from datasets_prep.columns import manifest_columns

    return list(manifest_columns(manifest))


def _check_name(registry: Any, name: str, where: str, problems: list[str]) -> None:
    try:
        registry.get(name)
    except RegistryError as exc:
        problems.append(f"{where}: {exc}")


def fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _gate_text(g: Any) -> str:
    lo = f">={g.min:g}" if g.min is not None else ""
    hi = f"<={g.max:g}" if g.max is not None else ""
    rel = f" - {g.relative_to}'s" if g.relative_to else f" / {g.ratio_to}'s" if g.ratio_to else ""
    return f"{g.metric}{rel} {' '.join(x for x in (lo, hi) if x)}"


def format_plan(pipe: PipelineConfig, plans: list[PhasePlan]) -> str:
    lines = [f"pipeline {pipe.name} (seed {pipe.seed}, {len(plans)} phases)", ""]
    for i, p in enumerate(plans):
        ph = p.phase
        lines.append(f"[{i}] {ph.name}  ({ph.kind})")
        for role, name, m in p.datasets:
            weight = next((f" x{s.weight:g}" for s in getattr(ph, "train", []) if s.name == name and role == "train"),
                          "")
            if m:
                info = (f"{m['rows']:,} rows, {m['hours']:.2f} h, {m.get('num_speakers', '?')} speakers, "
                        f"{m['sample_rate']} Hz, {m['kind']}")
            elif any(name in q.produced for q in plans[:i]):
                info = "written by " + next(q.phase.name for q in plans[:i] if name in q.produced)
            else:
                info = "NOT PREPARED (no _manifest.json)"
            lines.append(f"    {role:<8} {name}{weight}: {info}")
        lines.append(f"    init     {p.init}")
        kind = p.kind or phase_kind(ph.kind)
        lines.extend(kind.plan_lines(pipe, p))
        if getattr(ph, "gates", None):
            lines.append("    gates    " + ", ".join(_gate_text(g) for g in ph.gates))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
