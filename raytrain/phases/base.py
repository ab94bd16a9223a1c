"""The phase-kind interface: what a kind declares and how the pipeline runs it.

A kind is a class registered by name in `PHASE_KINDS`, like models, losses and metrics. It declares

- `config`: its pydantic model (only its keys; `defaults:` merge into a phase only the keys it has);
- `needs(pipe, phase)`: the datasets it reads (by role) and the earlier phases whose weights it loads;
- `produces(pipe, phase)`: whether it writes weights, the datasets it writes (with their columns) and the
  files it exports, so `raytrain plan` and later phases know them before it runs;
- `check(pipe, phase, plan, where)`: its own pre-flight problems (beyond the shared ones);
- `plan_lines(pipe, plan)`: its rows in the `raytrain plan` table;
- `run(ctx)`: the work, filling `ctx.entry` (the phase's typed `PhaseEntry` in summary.json).

`pipeline.py`, `plan.py`, `tracking.py` and `tune.py` talk to kinds only through this interface.
Built-in kinds live in `raytrain/phases/<kind>.py` and are imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from raytrain.config.schema import PHASE_CONFIGS, PhaseBase, PipelineConfig
from raytrain.registry import Registry

if TYPE_CHECKING:
    from raytrain.plan import PhasePlan
    from raytrain.runs import PhaseEntry
    from raytrain.tracking import Tracker


class PipelineError(RuntimeError):
    """A phase failed or a gate was not met; the message says which and why."""


class GateFailed(PipelineError):
    """A phase's gate was not met: the pipeline stops after it (`--ignore-gates` runs on)."""


@dataclass(frozen=True)
class DatasetUse:
    role: str  # "train", "eval", "source" (a cache phase's input) ...
    name: str


@dataclass
class Needs:
    datasets: list[DatasetUse] = field(default_factory=list)
    weights: list[tuple[str, str]] = field(default_factory=list)  # (key, earlier phase) whose weights it loads


@dataclass
class Produces:
    weights: bool = False  # best/last model.pt a later phase can init_from
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {column: spec dict}
    files: list[str] = field(default_factory=list)  # labels of exported files


@dataclass
class PhaseContext:
    """What the pipeline hands a kind's `run`."""

    pipe: PipelineConfig
    phase: Any  # the kind's own config model
    run_dir: Path
    phase_dir: Path
    storage_dir: str | None
    tracker: Tracker
    run_id: str | None
    entry: PhaseEntry
    init: dict[str, Any] | None  # {"path": weights file, "rules": InitFromConfig as a dict}
    datasets: dict[str, tuple[str, str]]  # every dataset a phase can name -> (folder, cache mode)
    plan: PhasePlan
    save_summary: Callable[[], None]
    weights_of: Callable[[str, str], str]  # (phase, "best"|"last") -> weights path of a finished phase
    progress: bool | None = None
    train_callbacks: list[Any] = field(default_factory=list)
    report_evals: bool = False
    rebuild_cache: bool = False


class PhaseKind:
    """Base of every kind. Subclasses set `name` and `config` and override what they need."""

    name: ClassVar[str]
    config: ClassVar[type[PhaseBase]]

    def needs(self, pipe: PipelineConfig, phase: Any) -> Needs:
        """By default: the `eval` dataset, if the kind has one, and init_from's phase."""
        init = phase.init
        return Needs(datasets=[DatasetUse("eval", phase.eval)] if getattr(phase, "eval", None) else [],
                     weights=[("init_from", init.phase)] if init is not None and init.phase is not None else [])

    def produces(self, pipe: PipelineConfig, phase: Any) -> Produces:
        return Produces()

    def check(self, pipe: PipelineConfig, phase: Any, plan: PhasePlan, where: str) -> list[str]:
        return []

    def column_needs(self, pipe: PipelineConfig, phase: Any) -> dict[str, Any]:
        """{dataset role: `raytrain.data.columns.ColumnNeeds`}: the columns the phase's model, losses,
        metrics and transforms read from its datasets of that role."""
        from raytrain.needs import phase_needs

        return phase_needs(pipe.phase_model(phase), phase)

    def plan_lines(self, pipe: PipelineConfig, plan: PhasePlan) -> list[str]:
        return []

    def steps(self, phase: Any) -> int:
        """Optimizer steps the phase runs (0 for a kind that does not train): the progress bar's total."""
        return 0

    def run(self, ctx: PhaseContext) -> None:
        raise NotImplementedError


PHASE_KINDS: Registry[Callable[[], PhaseKind]] = Registry("phase kind")

_BUILTIN = {name: f"raytrain.phases.{name}" for name in PHASE_CONFIGS}


def phase_kind(name: str) -> PhaseKind:
    """The kind registered as `name` (a built-in's module is imported on first use)."""
    if name not in PHASE_KINDS.names() and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    return PHASE_KINDS.get(name)()


def register_kind(cls: type[PhaseKind]) -> type[PhaseKind]:
    PHASE_KINDS.register(cls.name)(cls)
    return cls
