"""A run folder's `summary.json`: one typed model, written and read here only.

`runs/<pipeline>/<run_id>/summary.json` says where a run stands: its status, its MLflow run, and
per phase its status, steps, metrics, gates, weights and what it produced (datasets, exported
files). The pipeline writes it after every change of state; `--resume`, sweeps, `raytrain infer`
and MLflow logging read it through `read_summary`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from datasets_prep.storage import download_file, exists, is_uri, join, list_dirs, read_bytes, write_bytes
from raytrain.checkpoints import atomic_write_text

SUMMARY_FILE = "summary.json"

PhaseStatus = Literal["pending", "running", "failed", "gate_failed", "finished", "stopped early"]


class _Model(BaseModel):
    # Unknown keys are kept (a summary written by a newer raytrain reads back whole).
    model_config = ConfigDict(extra="allow", validate_assignment=True)


class GateResult(_Model):
    metric: str
    value: float | None = Field(None, description="the phase's value (minus the reference's, if relative)")
    min: float | None = None
    max: float | None = None
    relative_to: str | None = None
    ratio_to: str | None = None
    reference: float | None = Field(None, description="relative_to's (ratio_to's) value of the metric")
    passed: bool

    @property
    def key(self) -> str:
        """`eval/secs`, or `eval/secs-phase2` for a gate relative to phase2 (`eval/mse/base` for a ratio)."""
        return self.metric + (f"-{self.relative_to}" if self.relative_to else f"/{self.ratio_to}" if self.ratio_to
                              else "")


class RegisteredModel(_Model):
    name: str
    version: str


class PhaseEntry(_Model):
    """One phase's record: the typed result of a phase kind's run."""

    status: PhaseStatus = "pending"
    kind: str | None = None
    dir: str | None = None
    mlflow_run_id: str | None = None
    error: str | None = None
    wall_s: float = 0.0
    steps: int | None = None
    skipped_steps: int | None = None
    final_metrics: dict[str, float] = Field(default_factory=dict)
    best_metric: dict[str, float | None] = Field(default_factory=dict)
    gates: list[GateResult] = Field(default_factory=list)
    gates_ignored: bool = Field(False, description="a gate was not met and --ignore-gates ran on")
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    best_checkpoint_uri: str | None = None
    last_checkpoint_uri: str | None = None
    datasets: dict[str, str] = Field(default_factory=dict, description="dataset name -> folder it wrote (cache)")
    files: dict[str, str] = Field(default_factory=dict, description="label -> file it wrote (export)")
    forward_passes: int | None = Field(None, description="model calls of a cache phase (0: reused)")
    mlflow_model_uri: str | None = None
    mlflow_registered_model: RegisteredModel | None = None
    mlflow_model_error: str | None = None
    from_trial: str | None = Field(None, description="a sweep's trial whose weights this phase's are")

    def checkpoint(self, which: Literal["best", "last"]) -> str | None:
        """Where this phase's weights are: in object storage when the run has `storage`, else the run folder."""
        return getattr(self, f"{which}_checkpoint_uri") or getattr(self, f"{which}_checkpoint")


class RunSummary(_Model):
    pipeline: str
    run_id: str
    status: Literal["running", "partial", "failed", "finished", "gate_failed"] = "running"
    error: str | None = None
    config: str | None = None
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    phases: dict[str, PhaseEntry] = Field(default_factory=dict)
    trial: dict[str, Any] | None = Field(None, description="a sweep trial's run: {id, values}")
    sweep: dict[str, Any] | None = Field(None, description="a run continued from a sweep: {dir, trial, values, metric}")

    def entry(self, name: str) -> PhaseEntry:
        """The phase's entry, created `pending` if absent."""
        if name not in self.phases:
            self.phases[name] = PhaseEntry()
        return self.phases[name]

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class SummaryError(ValueError):
    """A summary.json that is not one (cut short, edited by hand, another program's); one line naming it."""


def read_summary(path: str | Path) -> RunSummary:
    """A run's summary from its folder (or the summary.json itself); SummaryError when the file is not one
    (FileNotFoundError when there is none)."""
    p = Path(path)
    if p.is_dir():
        p = p / SUMMARY_FILE
    text = p.read_text()
    try:
        return RunSummary.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
        where = ".".join(map(str, first["loc"]))
        raise SummaryError(f"{p}: not a raytrain {SUMMARY_FILE} ({where + ': ' if where else ''}{first['msg']}); "
                           "the run folder is damaged: give another run, or run the pipeline again") from None


def summary_at(location: str | Path) -> RunSummary | None:
    """The summary of the run folder at `location`, a local folder or one in object storage (a trial of a
    sweep with `storage:`, which may have run on another node); None when it has none yet."""
    if not is_uri(location):
        p = Path(location) / SUMMARY_FILE
        return read_summary(p) if p.is_file() else None
    try:
        return RunSummary.model_validate_json(read_bytes(join(str(location), SUMMARY_FILE)))
    except FileNotFoundError:
        return None


def write_summary(run_dir: Path, summary: RunSummary, storage_dir: str | None = None) -> None:
    """Atomically, in the run folder and (a run with `storage`) in the storage."""
    text = json.dumps(summary.as_dict(), indent=2)
    atomic_write_text(run_dir / SUMMARY_FILE, text)
    if storage_dir:
        write_bytes(join(storage_dir, SUMMARY_FILE), text.encode())


def new_run_id(root: Path | None = None) -> str:
    """A timestamp; with `root`, one no folder under it has yet (a second run started in the same second
    gets `-2`, `-3`, ...), so two runs never share a folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if root is None:
        return stamp
    n, run_id = 1, stamp
    while (root / run_id).exists():
        n += 1
        run_id = f"{stamp}-{n}"
    return run_id


def find_resumable(runs_dir: Path, name: str) -> Path | None:
    """The newest run folder of this pipeline whose summary is not `finished`."""
    root = runs_dir / name
    if not root.is_dir():
        return None
    for run in sorted((p for p in root.iterdir() if (p / SUMMARY_FILE).exists()), reverse=True):
        if read_summary(run).status != "finished":
            return run
    return None


def fetch_resumable(storage: str, name: str, runs_dir: Path) -> Path | None:
    """The newest run of this pipeline in `storage` whose summary is not `finished`, copied into a local run
    folder (summary.json, config.yaml): `--resume` on a machine that has never seen the run."""
    base = join(storage, name)
    for run_id in sorted(list_dirs(base), reverse=True):
        try:
            summary = RunSummary.model_validate_json(read_bytes(join(base, run_id, SUMMARY_FILE)))
        except FileNotFoundError:
            continue
        if summary.status == "finished":
            continue
        local = runs_dir / name / run_id
        for f in ("config.yaml", SUMMARY_FILE):  # the summary last: it marks a complete copy
            if exists(join(base, run_id, f)):
                download_file(join(base, run_id, f), local / f)
        print(f"--resume: continuing run {run_id} from {join(base, run_id)}")
        return local
    return None


def summary_table(summary: RunSummary | dict[str, Any]) -> str:
    s = summary if isinstance(summary, RunSummary) else RunSummary.model_validate(summary)
    rows = [("phase", "status", "steps", "metrics", "output")]
    for name, e in s.phases.items():
        metrics = ", ".join(f"{k}={v:.3f}" for k, v in e.final_metrics.items())
        output = e.best_checkpoint or ", ".join(e.datasets.values()) or ", ".join(e.files.values()) or ""
        status = e.status + (" (gate ignored)" if e.gates_ignored else "")
        rows.append((name, status, "" if e.steps is None else str(e.steps), metrics, output))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(widths[i]) if i < 4 else c for i, c in enumerate(r)) for r in rows)
