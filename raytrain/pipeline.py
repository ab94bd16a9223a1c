"""Runs a pipeline's phases in order: hand-off, gates, summary.json, resume.

Run folder: `runs/<pipeline>/<run_id>/` holding `config.yaml` (resolved),
`summary.json` (`raytrain.runs`), and per phase `<phase>/` with its config, what its kind
writes (Ray Train's checkpoints `ray/`, `best/model.pt`, `last/model.pt`, exported files) and
`load_report.{json,txt}`. Every phase runs through its kind (`raytrain.phases.base.PhaseKind`):
this module knows no kind by name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from datasets_prep.storage import join, upload_file
from raytrain.checkpoints import atomic_write_text
from raytrain.config.loader import ConfigError
from raytrain.config.schema import PipelineConfig
from raytrain.data.datasets import resolve
from raytrain.jobs import job_paths
from raytrain.phases.base import GateFailed, PhaseContext, PipelineError
from raytrain.plan import check_pipeline
from raytrain.preflight import preflight
from raytrain.runs import (
    GateResult,
    PhaseEntry,
    RunSummary,
    fetch_resumable,
    find_resumable,
    new_run_id,
    read_summary,
    summary_table,
    write_summary,
)
from raytrain.session import ray_init
from raytrain.tracking import Tracker, tracking_uri

log = logging.getLogger("raytrain")

__all__ = ["PipelineError", "PipelineRunner", "resolve_paths", "summary_table"]


def resolve_paths(pipe: PipelineConfig) -> PipelineConfig:
    """Absolute dataset folders: Train workers do not share the driver's working directory."""
    raw = pipe.model_dump(mode="json")
    for d in raw["data"].values():
        d["shards"] = resolve(d["shards"])
    raw["runs_dir"] = resolve(raw["runs_dir"])
    if raw.get("storage"):
        raw["storage"] = resolve(raw["storage"])
    for ph in raw["phases"]:
        for key in ("init_from", "teacher"):
            ref = ph.get(key)
            if isinstance(ref, dict) and ref.get("path"):
                ref["path"] = resolve(ref["path"])
        if ph.get("cache_dir"):
            ph["cache_dir"] = resolve(ph["cache_dir"])
    return PipelineConfig.model_validate(raw)


class PipelineRunner:
    def __init__(self, pipe: PipelineConfig, *, config_text: str | None = None, resume: bool = False,
                 only: list[str] | None = None, run_dir: str | Path | None = None, progress: bool | None = None,
                 train_callbacks: list[Any] | None = None, report_evals: bool = False,
                 mlflow_parent: str | None = None, rebuild_cache: bool = False, storage_dir: str | None = None,
                 ignore_gates: bool = False):
        pipe, where = job_paths(pipe)  # a Ray job's relative paths: one-line errors, or $RAYTRAIN_RUNS_DIR
        if where:
            print(where)
        self.pipe = resolve_paths(pipe)
        # its bucket and MLflow server answer, its datasets are prepared: one line each, before anything is
        # written and before Ray starts
        preflight(self.pipe)
        self.plans = {p.phase.name: p for p in check_pipeline(self.pipe, require_data=True)}
        if only:
            unknown = [n for n in only if n not in self.plans]
            if unknown:
                raise ConfigError(f"--phases: unknown phase(s) {unknown}; phases: {list(self.plans)}")
        self.only = only
        runs_dir = Path(self.pipe.runs_dir)
        found = find_resumable(runs_dir, self.pipe.name) if resume and run_dir is None else None
        if resume and run_dir is None and found is None and self.pipe.storage:
            found = fetch_resumable(self.pipe.storage, self.pipe.name, runs_dir)
        if resume and run_dir is None and found is None:
            log.warning("--resume: no unfinished run of %s under %s; starting a new run", self.pipe.name, runs_dir)
        # Absolute: Ray workers run in other folders and read checkpoints by these paths.
        root = runs_dir / self.pipe.name
        self.run_dir = (Path(run_dir) if run_dir else (found or root / new_run_id(root))).resolve()
        self.resumed = (self.run_dir / "summary.json").exists()
        self.summary = (read_summary(self.run_dir) if self.resumed
                        else RunSummary(pipeline=self.pipe.name, run_id=self.run_dir.name))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # With `storage`, the run's checkpoints, weights and summary live at <storage>/<pipeline>/<run_id>
        # (a sweep's base and trials: under the sweep's folder there, `storage_dir`).
        self.storage_dir = storage_dir or (join(self.pipe.storage, self.pipe.name, self.run_dir.name)
                                           if self.pipe.storage else None)
        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.pipe.model_dump(mode="json"),
                                                                       sort_keys=False))
        if self.storage_dir:
            upload_file(self.run_dir / "config.yaml", join(self.storage_dir, "config.yaml"))
        if config_text is not None and not (self.run_dir / "config.original.yaml").exists():
            atomic_write_text(self.run_dir / "config.original.yaml", config_text)
        uri = tracking_uri(self.pipe.tracking.uri, runs_dir)
        self.tracker = Tracker(uri, self.pipe.tracking.experiment or self.pipe.name, self.pipe.tracking.enabled)
        self.summary.mlflow_uri = uri
        self.progress = progress
        self.train_callbacks = train_callbacks or []  # Ray Train callbacks (a sweep's TuneReportCallback)
        self.report_evals = report_evals  # every evaluation is a ray.train.report (a sweep's scheduler)
        self.mlflow_parent = mlflow_parent  # the pipeline's MLflow run nests under this one (a sweep's)
        self.rebuild_cache = rebuild_cache
        self.ignore_gates = ignore_gates  # a gate not met is recorded and the pipeline goes on

    # ---- summary -----------------------------------------------------------------------------------
    def save_summary(self) -> None:
        write_summary(self.run_dir, self.summary, self.storage_dir)

    def _phase_entry(self, name: str) -> PhaseEntry:
        return self.summary.entry(name)

    # ---- hand-off ----------------------------------------------------------------------------------
    def weights_of(self, phase: str, which: str = "best") -> str:
        """Where a finished earlier phase's weights are (in object storage when the run has `storage`:
        workers on any node, and a resumed run on another machine, read them there)."""
        prev = self.summary.phases.get(phase)
        path = prev.checkpoint("last" if which == "last" else "best") if prev is not None else None
        if prev is None or prev.status != "finished" or not path:
            raise PipelineError(
                f"phase {phase!r} has no finished checkpoint in {self.run_dir}. Run that phase first "
                "(omit --phases, or add it) or use --resume.")
        return path

    def datasets(self) -> dict[str, tuple[str, str]]:
        """Every dataset a phase can name: `data:` entries and those earlier phases wrote."""
        out: dict[str, tuple[str, str]] = {n: (d.shards, str(d.cache)) for n, d in self.pipe.data.items()}
        for entry in self.summary.phases.values():
            if entry.status == "finished":
                out.update({name: (folder, "auto") for name, folder in entry.datasets.items()})
        return out

    def _init_source(self, phase: Any) -> dict[str, Any] | None:
        init = phase.init
        if init is None:
            return None
        try:
            path = self.weights_of(init.phase, init.checkpoint) if init.phase is not None else init.path
        except PipelineError as exc:
            raise PipelineError(f"phase {phase.name!r}: init_from {init.phase!r}: {exc}") from None
        return {"path": path, "rules": init.model_dump(mode="json")}

    def _load_report(self, phase: Any, init: dict[str, Any], phase_dir: Path, run_id: str | None) -> None:
        """Decide the hand-off on the driver (model built on `meta`), print and save the report."""
        from raytrain.checkpoints import hand_off_report

        for path in hand_off_report(self.pipe.phase_model(phase), init, phase_dir):
            self.tracker.artifact(run_id, path)

    # ---- one phase ---------------------------------------------------------------------------------
    def run_phase(self, phase: Any, run_name: str | None = None) -> PhaseEntry:
        plan = self.plans[phase.name]
        kind = plan.kind
        assert kind is not None
        entry = self._phase_entry(phase.name)
        phase_dir = self.run_dir / phase.name
        phase_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(phase_dir / "config.yaml", yaml.safe_dump(phase.model_dump(mode="json"), sort_keys=False))
        run_id = self.tracker.start(run_name or phase.name, {"phase": phase.model_dump(mode="json"),
                                                 "model": self.pipe.phase_model(phase).model_dump(mode="json")},
                                    parent=self.summary.mlflow_run_id, run_id=entry.mlflow_run_id)
        entry.status, entry.kind, entry.mlflow_run_id, entry.dir = "running", phase.kind, run_id, str(phase_dir)
        entry.error = None
        self.save_summary()
        self.tracker.artifact(run_id, phase_dir / "config.yaml")
        init = self._init_source(phase)
        if init and kind.produces(self.pipe, phase).weights:
            self._load_report(phase, init, phase_dir, run_id)
        ctx = PhaseContext(pipe=self.pipe, phase=phase, run_dir=self.run_dir, phase_dir=phase_dir,
                           storage_dir=self.storage_dir, tracker=self.tracker, run_id=run_id, entry=entry, init=init,
                           datasets=self.datasets(), plan=plan, save_summary=self.save_summary,
                           weights_of=self.weights_of, progress=self.progress, train_callbacks=self.train_callbacks,
                           report_evals=self.report_evals, rebuild_cache=self.rebuild_cache)
        try:
            kind.run(ctx)
        except Exception as exc:
            entry.status, entry.error = "failed", f"{type(exc).__name__}: {exc}"[:2000]
            self.save_summary()
            self.tracker.end(run_id, "FAILED")
            raise PipelineError(f"phase {phase.name!r} failed: {_root_cause(exc)}\n"
                                f"Fix it and continue with: raytrain run <config> --resume") from exc
        self._finish_phase(phase, entry, run_id)
        return entry

    def _finish_phase(self, phase: Any, entry: PhaseEntry, run_id: str | None) -> None:
        """Gates on the phase's final metrics, the model in MLflow, the phase's status."""
        entry.gates = [check_gate(g, entry.final_metrics, self.summary.phases.get(g.reference_phase)
                                  if g.reference_phase else None) for g in getattr(phase, "gates", [])]
        if entry.best_checkpoint:
            self.tracker.artifact(run_id, entry.best_checkpoint, "checkpoint")
        failed = [g for g in entry.gates if not g.passed]
        stop = bool(failed) and not self.ignore_gates
        if not stop:  # the model in MLflow's format (tracking.log_model); a failure warns, the phase stays done
            from raytrain.tracking import log_phase_model

            log_phase_model(self.tracker, self.pipe, phase, entry, run_id)
        entry.status = "gate_failed" if stop else "finished"
        entry.gates_ignored = bool(failed) and self.ignore_gates
        self.tracker.tags(run_id, {f"gate.{g.key}": gate_text(g) for g in entry.gates})
        self.save_summary()
        self.tracker.end(run_id, "FAILED" if stop else "FINISHED")
        if failed:
            text = "; ".join(gate_text(g) for g in failed)
            if not stop:
                print(f"phase {phase.name}: gate not met: {text} (--ignore-gates: going on)")
                return
            raise GateFailed(f"gate not met after phase {phase.name!r}: {text}. The pipeline stops here; "
                             "train longer (max_steps), adjust the phase, or relax the gate, then --resume.")

    def _gates_only_changed(self, phase: Any) -> bool:
        """True when a gate_failed phase's config is the one it ran with, but for its gates: `--resume` then
        re-checks the gates on the stored metrics instead of training again."""
        stored = self.run_dir / phase.name / "config.yaml"
        if not stored.is_file():
            return False
        before = yaml.safe_load(stored.read_text()) or {}
        now = phase.model_dump(mode="json")
        before.pop("gates", None)
        now.pop("gates", None)
        return bool(before == now)

    def _recheck_gates(self, phase: Any, entry: PhaseEntry) -> None:
        print(f"phase {phase.name}: gate_failed earlier; re-checking its gates on the stored metrics "
              "(no retraining)")
        run_id = self.tracker.start(phase.name, parent=self.summary.mlflow_run_id, run_id=entry.mlflow_run_id)
        entry.mlflow_run_id = run_id
        atomic_write_text(self.run_dir / phase.name / "config.yaml",
                          yaml.safe_dump(phase.model_dump(mode="json"), sort_keys=False))
        self._finish_phase(phase, entry, run_id)

    # ---- whole pipeline ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        ray_init()
        parent = self.tracker.start(self.pipe.name, self.pipe.model_dump(mode="json"), parent=self.mlflow_parent,
                                    run_id=self.summary.mlflow_run_id)
        self.summary.mlflow_run_id, self.summary.status = parent, "running"
        self.summary.config = str(self.run_dir / "config.yaml")
        self.save_summary()
        self.tracker.artifact(parent, self.run_dir / "config.yaml")
        status = "FINISHED"
        try:
            for phase in self.pipe.phases:
                entry = self._phase_entry(phase.name)
                if entry.status == "finished":
                    print(f"phase {phase.name}: finished earlier, skipped")
                    continue
                if self.only and phase.name not in self.only:
                    continue
                if entry.status == "gate_failed" and self._gates_only_changed(phase):
                    self._recheck_gates(phase, entry)
                    continue
                if entry.status in ("running", "failed", "gate_failed"):
                    print(f"phase {phase.name}: continuing from its last checkpoint")
                self.run_phase(phase)
            done = all(self._phase_entry(p.name).status == "finished" for p in self.pipe.phases)
            self.summary.status = "finished" if done else "partial"
        except BaseException as exc:
            self.summary.status = "gate_failed" if isinstance(exc, GateFailed) else "failed"
            self.summary.error = str(exc)[:2000]
            status = "FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED"
            raise
        finally:
            from raytrain.data.datasets import release_held

            release_held()  # the datasets its phases held in memory
            self.save_summary()
            self.tracker.artifact(parent, self.run_dir / "summary.json")
            self.tracker.end(parent, status)
        return self.summary.as_dict()


def check_gate(gate: Any, metrics: dict[str, float], reference: PhaseEntry | None = None) -> GateResult:
    """A gate against a phase's final metrics (a metric the phase did not report fails it); a relative gate
    against the difference from `reference`'s (its `relative_to` phase's entry), a ratio gate against the
    ratio to it (`ratio_to`; a reference of 0 fails it)."""
    value = metrics.get(gate.metric)
    ref = None
    ratio_to = getattr(gate, "ratio_to", None)
    if gate.relative_to is not None or ratio_to is not None:
        ref = (reference.final_metrics or {}).get(gate.metric) if reference is not None else None
        if value is None or ref is None:
            value = None
        else:
            value = value - ref if gate.relative_to is not None else value / ref if ref else None
    ok = value is not None and (gate.min is None or value >= gate.min) and (gate.max is None or value <= gate.max)
    return GateResult(metric=gate.metric, value=value, min=gate.min, max=gate.max, relative_to=gate.relative_to,
                      ratio_to=ratio_to, reference=ref, passed=ok)


def gate_text(g: GateResult) -> str:
    """`eval/secs = 0.712 (needs >= 0.75)`: the metric, its value and the threshold."""
    need = " and ".join(x for x in (f">= {g.min}" if g.min is not None else "",
                                    f"<= {g.max}" if g.max is not None else "") if x)
    value = "missing" if g.value is None else f"{g.value:.4g}"
    if g.relative_to is not None or g.ratio_to is not None:  # eval/secs - phase2's 0.79 = -0.12 (needs >= -0.03)
        ref = "missing" if g.reference is None else f"{g.reference:.4g}"
        op, other = ("-", g.relative_to) if g.relative_to is not None else ("/", g.ratio_to)
        return f"{g.metric} {op} {other}'s {ref} = {value} (needs {need})" + ("" if g.passed else " FAILED")
    return f"{g.metric} = {value} (needs {need})" + ("" if g.passed else " FAILED")


def _root_cause(exc: BaseException) -> str:
    """The innermost error of the first failed worker (Ray wraps worker errors several times)."""
    seen: BaseException = exc
    for _ in range(20):
        failures = getattr(seen, "worker_failures", None)
        if failures:
            seen = next(iter(failures.values()))
            continue
        inner = getattr(seen, "cause", None) or seen.__cause__
        if not isinstance(inner, BaseException) or inner is seen:
            break
        seen = inner
    lines = [ln for ln in str(seen).strip().splitlines() if ln.strip()]
    return f"{type(seen).__name__}: {lines[0] if lines else ''}"
