"""Runs a pipeline's phases in order on Ray Train: hand-off, gates, summary.json, resume.

Run folder: `runs/<pipeline>/<run_id>/` holding `config.yaml` (resolved),
`summary.json`, and per phase `<phase>/` with Ray Train's checkpoints (`ray/`),
`best/model.pt`, `last/model.pt` and `load_report.{json,txt}`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from datasets_prep.storage import download_file, exists, join, list_dirs, read_bytes, upload_file, write_bytes
from raytrain.checkpoints import (
    STATE_FILE,
    WEIGHTS_FILE,
    atomic_torch_save,
    atomic_write_text,
    load_data,
    plan_load,
)
from raytrain.config.loader import ConfigError
from raytrain.config.schema import PhaseConfig, PipelineConfig
from raytrain.data.datasets import resolve
from raytrain.plan import check_pipeline
from raytrain.progress import EventPump
from raytrain.tracking import Tracker, tracking_uri

log = logging.getLogger("raytrain")


class PipelineError(RuntimeError):
    """A phase failed or a gate was not met; the message says which and why."""


def _now() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def resolve_paths(pipe: PipelineConfig) -> PipelineConfig:
    """Absolute dataset folders: Train workers do not share the driver's working directory."""
    raw = pipe.model_dump(mode="json")
    for d in raw["data"].values():
        d["shards"] = resolve(d["shards"])
    raw["runs_dir"] = resolve(raw["runs_dir"])
    if raw.get("storage"):
        raw["storage"] = resolve(raw["storage"])
    for ph in raw["phases"]:
        init = ph.get("init_from")
        if isinstance(init, dict) and init.get("path"):
            init["path"] = resolve(init["path"])
    return PipelineConfig.model_validate(raw)


def find_resumable(runs_dir: Path, name: str) -> Path | None:
    """The newest run folder of this pipeline whose summary is not `finished`."""
    root = runs_dir / name
    if not root.is_dir():
        return None
    for run in sorted((p for p in root.iterdir() if (p / "summary.json").exists()), reverse=True):
        if json.loads((run / "summary.json").read_text()).get("status") != "finished":
            return run
    return None


def fetch_resumable(storage: str, name: str, runs_dir: Path) -> Path | None:
    """The newest run of this pipeline in `storage` whose summary is not `finished`, copied into a local run
    folder (summary.json, config.yaml): `--resume` on a machine that has never seen the run."""
    base = join(storage, name)
    for run_id in sorted(list_dirs(base), reverse=True):
        try:
            summary = json.loads(read_bytes(join(base, run_id, "summary.json")))
        except FileNotFoundError:
            continue
        if summary.get("status") == "finished":
            continue
        local = runs_dir / name / run_id
        for f in ("config.yaml", "summary.json"):  # the summary last: it marks a complete copy
            if exists(join(base, run_id, f)):
                download_file(join(base, run_id, f), local / f)
        print(f"--resume: continuing run {run_id} from {join(base, run_id)}")
        return local
    return None


def ray_init() -> None:
    """Start (or join) Ray. A local Ray that raytrain starts listens on loopback only."""
    import ray

    # Ray Train's controller sees that the workers finished (or failed) at its next poll of them, every 2 s
    # by default, and a phase's end takes several polls: ~6 s between the last step and `fit()` returning,
    # paid by every phase. A poll is one small RPC per worker; at 0.5 s a phase ends ~4 s sooner.
    # (Ray Train passes this variable on to the controller, also on a cluster raytrain joins.)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not os.environ.get("RAY_ADDRESS"):
        # A one-node Ray that raytrain starts has no node that can be drained or preempted, and each
        # idle Ray actor wakes up 100 times a second: leave Ray Train's preemption watcher out.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The dashboard (on 127.0.0.1) serves the State API that Ray Train's placement-group cleaner polls.
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=True, log_to_driver=True,
             logging_level=logging.WARNING, configure_logging=True)


def worker_resources(pipe: PipelineConfig, phase: PhaseConfig) -> tuple[bool, dict[str, float], int | None]:
    """(use_gpu, resources_per_worker, torch threads). Leaves CPU free for Ray Data: two workers
    that each reserve a whole CPU on a 2-CPU machine starve the read tasks and hang."""
    import ray

    sc = pipe.phase_scaling(phase)
    total = ray.cluster_resources()
    use_gpu = sc.use_gpu if isinstance(sc.use_gpu, bool) else total.get("GPU", 0) > 0
    if sc.cpus_per_worker is not None:
        cpus = sc.cpus_per_worker
    elif use_gpu:
        cpus = 1.0
    else:
        cpus = max(0.25, min(1.0, (total.get("CPU", 1) - 1) / sc.num_workers))
    threads = sc.threads_per_worker or max(1, (os.cpu_count() or 1) // sc.num_workers)
    return use_gpu, {"CPU": cpus}, threads


class PipelineRunner:
    def __init__(self, pipe: PipelineConfig, *, config_text: str | None = None, resume: bool = False,
                 only: list[str] | None = None, run_dir: str | Path | None = None, progress: bool | None = None,
                 train_callbacks: list[Any] | None = None, report_evals: bool = False,
                 mlflow_parent: str | None = None):
        self.pipe = resolve_paths(pipe)
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
        self.run_dir = (Path(run_dir) if run_dir else (found or runs_dir / self.pipe.name / _now())).resolve()
        self.resumed = (self.run_dir / "summary.json").exists()
        self.summary: dict[str, Any] = (json.loads((self.run_dir / "summary.json").read_text()) if self.resumed
                                        else {"pipeline": self.pipe.name, "run_id": self.run_dir.name,
                                              "status": "running", "phases": {}})
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # With `storage`, the run's checkpoints, weights and summary live at <storage>/<pipeline>/<run_id>.
        self.storage_dir = join(self.pipe.storage, self.pipe.name, self.run_dir.name) if self.pipe.storage else None
        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.pipe.model_dump(mode="json"),
                                                                       sort_keys=False))
        if self.storage_dir:
            upload_file(self.run_dir / "config.yaml", join(self.storage_dir, "config.yaml"))
        if config_text is not None and not (self.run_dir / "config.original.yaml").exists():
            atomic_write_text(self.run_dir / "config.original.yaml", config_text)
        uri = tracking_uri(self.pipe.tracking.uri, runs_dir)
        self.tracker = Tracker(uri, self.pipe.tracking.experiment or self.pipe.name, self.pipe.tracking.enabled)
        self.summary["mlflow_uri"] = uri
        self.progress = progress
        self.train_callbacks = train_callbacks or []  # Ray Train callbacks (a sweep's TuneReportCallback)
        self.report_evals = report_evals  # every evaluation is a ray.train.report (a sweep's scheduler)
        self.mlflow_parent = mlflow_parent  # the pipeline's MLflow run nests under this one (a sweep's)

    # ---- summary -----------------------------------------------------------------------------------
    def _save_summary(self) -> None:
        text = json.dumps(self.summary, indent=2)
        atomic_write_text(self.run_dir / "summary.json", text)
        if self.storage_dir:
            write_bytes(join(self.storage_dir, "summary.json"), text.encode())

    def _phase_entry(self, name: str) -> dict[str, Any]:
        return self.summary["phases"].setdefault(name, {"status": "pending"})

    # ---- hand-off ----------------------------------------------------------------------------------
    def _init_source(self, phase: PhaseConfig) -> dict[str, Any] | None:
        init = phase.init
        if init is None:
            return None
        if init.phase is not None:
            prev = self.summary["phases"].get(init.phase, {})
            # In object storage when the run has `storage`: workers on any node (and a resumed run on another
            # machine) can read it there.
            path = prev.get(f"{init.checkpoint}_checkpoint_uri") or prev.get(f"{init.checkpoint}_checkpoint")
            if prev.get("status") != "finished" or not path:
                raise PipelineError(
                    f"phase {phase.name!r}: init_from {init.phase!r} has no finished checkpoint in "
                    f"{self.run_dir}. Run that phase first (omit --phases, or add it) or use --resume.")
        else:
            path = init.path
        return {"path": path, "rules": init.model_dump(mode="json")}

    def _load_report(self, phase: PhaseConfig, init: dict[str, Any], phase_dir: Path, run_id: str | None) -> None:
        """Decide the hand-off on the driver (model built on `meta`), print and save the report."""
        from raytrain.checkpoints import load_weights
        from raytrain.config.schema import InitFromConfig
        from raytrain.models import build_model

        mcfg = self.pipe.phase_model(phase)
        with torch.device("meta"):
            model = build_model(mcfg.name, dict(mcfg.args), mcfg.adapter)
        ckpt = load_weights(init["path"])
        report, _ = plan_load({k: v.shape for k, v in ckpt.items()},
                              {k: v.shape for k, v in model.state_dict().items()},
                              InitFromConfig(**init["rules"]), init["path"])
        js, txt = report.save(phase_dir)
        lines = report.to_table().splitlines()
        print("\n".join(lines) if len(lines) < 40 else f"{lines[0]}\n  (full table: {txt})")
        self.tracker.artifact(run_id, js)
        self.tracker.artifact(run_id, txt)

    # ---- one phase ---------------------------------------------------------------------------------
    def run_phase(self, phase: PhaseConfig, run_name: str | None = None) -> dict[str, Any]:
        import ray.train
        from ray.train.torch import TorchTrainer

        from raytrain.data.datasets import phase_datasets
        from raytrain.phases import train_loop_per_worker

        entry = self._phase_entry(phase.name)
        phase_dir = self.run_dir / phase.name
        phase_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(phase_dir / "config.yaml", yaml.safe_dump(phase.model_dump(mode="json"), sort_keys=False))
        run_id = self.tracker.start(run_name or phase.name, {"phase": phase.model_dump(mode="json"),
                                                 "model": self.pipe.phase_model(phase).model_dump(mode="json")},
                                    parent=self.summary.get("mlflow_run_id"), run_id=entry.get("mlflow_run_id"))
        entry.update(status="running", mlflow_run_id=run_id, dir=str(phase_dir))
        self._save_summary()
        self.tracker.artifact(run_id, phase_dir / "config.yaml")
        init = self._init_source(phase)
        if init:
            self._load_report(phase, init, phase_dir, run_id)
        use_gpu, resources, threads = worker_resources(self.pipe, phase)
        sc = self.pipe.phase_scaling(phase)
        metric, mode = phase.best
        data: dict[str, tuple[str, str]] = {n: (d.shards, d.cache) for n, d in self.pipe.data.items()}
        pump = EventPump(phase.name, phase.max_steps, self.tracker, run_id, progress=self.progress)
        from ray.data import DataContext

        data_ctx = DataContext.get_current()
        data_ctx.enable_progress_bars = False  # rank 0's progress line says what matters
        data_ctx.print_on_execution_start = False
        exec_opts = data_ctx.execution_options
        exec_opts.preserve_order = True  # same batch order every run: exact mid-phase resume
        train_names = [s.name for s in phase.train] if phase.kind == "train" else []
        datasets, held, audio = phase_datasets(data, train_names, phase.eval, seed=self.pipe.seed)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"pipeline": self.pipe.model_dump(mode="json"), "phase": phase.name,
                               "phase_dir": str(phase_dir), "init": init, "events": pump.queue,
                               "threads": None if use_gpu else threads, "hold": held, "audio": audio,
                               "sample_rate": self.plans[phase.name].sample_rate,
                               "report_evals": self.report_evals},
            scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name="ray", storage_path=join(self.storage_dir, phase.name) if self.storage_dir
                else str(phase_dir.resolve()),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="score",
                                                             checkpoint_score_order=mode),
                failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
                callbacks=self.train_callbacks),
            datasets=datasets,
            # One worker reads each dataset whole: no split coordinator actor beside it.
            dataset_config=ray.train.DataConfig(datasets_to_split="all" if sc.num_workers > 1 else [],
                                                execution_options=exec_opts),
        )
        t0 = time.time()
        try:
            with pump:
                result = trainer.fit()
        except Exception as exc:
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
            self._save_summary()
            self.tracker.end(run_id, "FAILED")
            raise PipelineError(f"phase {phase.name!r} failed: {_root_cause(exc)}\n"
                                f"Fix it and continue with: raytrain run <config> --resume") from exc
        entry["wall_s"] = round(entry.get("wall_s", 0) + time.time() - t0, 1)
        self._finish_phase(phase, phase_dir, result, entry, run_id, metric, mode)
        return entry

    def _finish_phase(self, phase: PhaseConfig, phase_dir: Path, result: Any, entry: dict[str, Any],
                      run_id: str | None, metric: str, mode: str) -> None:
        last = result.checkpoint
        if last is None:
            raise PipelineError(f"phase {phase.name!r} finished without a checkpoint")
        best = last
        if result.best_checkpoints:
            pick = max if mode == "max" else min
            best = pick(result.best_checkpoints, key=lambda cm: cm[1].get("score", 0.0))[0]
        for label, ckpt in (("last", last), ("best", best)):
            with ckpt.as_directory() as d:
                state = load_data(Path(d) / STATE_FILE)
            atomic_torch_save(state["model"], phase_dir / label / WEIGHTS_FILE)
            entry[f"{label}_checkpoint"] = str(phase_dir / label / WEIGHTS_FILE)
            if self.storage_dir:
                uri = join(self.storage_dir, phase.name, label, WEIGHTS_FILE)
                upload_file(phase_dir / label / WEIGHTS_FILE, uri)
                entry[f"{label}_checkpoint_uri"] = uri
            if label == "last":
                final = state["metrics"]
                entry["steps"] = state["step"]
                entry["skipped_steps"] = state["skipped"]
        entry["final_metrics"] = {k: v for k, v in final.items() if "/" in k}
        entry["best_metric"] = {metric: state["metrics"].get(metric)} if metric else {}
        entry["gates"] = gates = []
        for g in phase.gates:
            value = entry["final_metrics"].get(g.metric)
            ok = value is not None and (g.min is None or value >= g.min) and (g.max is None or value <= g.max)
            gates.append({"metric": g.metric, "value": value, "min": g.min, "max": g.max, "passed": ok})
        self.tracker.artifact(run_id, entry["best_checkpoint"], "checkpoint")
        failed = [g for g in gates if not g["passed"]]
        if not failed:  # the model in MLflow's format (tracking.log_model); a failure warns, the phase stays done
            from raytrain.tracking import log_phase_model

            log_phase_model(self.tracker, self.pipe, phase, entry, run_id)
        entry["status"] = "gate_failed" if failed else "finished"
        self._save_summary()
        self.tracker.end(run_id, "FAILED" if failed else "FINISHED")
        if failed:
            text = "; ".join(f"{g['metric']} = {g['value']} (needs " +
                             " and ".join(x for x in (f">= {g['min']}" if g["min"] is not None else "",
                                                      f"<= {g['max']}" if g["max"] is not None else "") if x) + ")"
                             for g in failed)
            raise PipelineError(f"gate not met after phase {phase.name!r}: {text}. The pipeline stops here; "
                                "train longer (max_steps), adjust the phase, or relax the gate, then --resume.")

    # ---- whole pipeline ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        ray_init()
        parent = self.tracker.start(self.pipe.name, self.pipe.model_dump(mode="json"), parent=self.mlflow_parent,
                                    run_id=self.summary.get("mlflow_run_id"))
        self.summary.update(mlflow_run_id=parent, status="running", config=str(self.run_dir / "config.yaml"))
        self._save_summary()
        self.tracker.artifact(parent, self.run_dir / "config.yaml")
        status = "FINISHED"
        try:
            for phase in self.pipe.phases:
                entry = self._phase_entry(phase.name)
                if entry.get("status") == "finished":
                    print(f"phase {phase.name}: finished earlier, skipped")
                    continue
                if self.only and phase.name not in self.only:
                    entry.setdefault("status", "pending")
                    continue
                if entry.get("status") in ("running", "failed"):
                    print(f"phase {phase.name}: continuing from its last checkpoint")
                self.run_phase(phase)
            done = all(self._phase_entry(p.name).get("status") == "finished" for p in self.pipe.phases)
            self.summary["status"] = "finished" if done else "partial"
        except BaseException as exc:
            self.summary["status"] = "failed"
            self.summary["error"] = str(exc)[:2000]
            status = "FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED"
            raise
        finally:
            self._save_summary()
            self.tracker.artifact(parent, self.run_dir / "summary.json")
            self.tracker.end(parent, status)
        return self.summary


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


def summary_table(summary: dict[str, Any]) -> str:
    rows = [("phase", "status", "steps", "metrics", "checkpoint")]
    for name, e in summary["phases"].items():
        m = e.get("final_metrics", {})
        metrics = ", ".join(f"{k}={v:.3f}" for k, v in m.items() if isinstance(v, int | float))
        rows.append((name, e.get("status", ""), str(e.get("steps", "")), metrics, e.get("best_checkpoint", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(widths[i]) if i < 4 else c for i, c in enumerate(r)) for r in rows)

