"""`raytrain tune`: a Ray Tune sweep over one phase of a pipeline.

The phases before the swept one run once (`<sweep>/base/`, a normal run folder); every trial
starts from their checkpoints. A trial is a Tune function that builds and fits the phase's
own `TorchTrainer` (Train V2, with `TuneReportCallback`), so multi-worker trials and
`max_failures` restarts work inside a sweep; each evaluation reaches Tune, where ASHA may stop
the trial. Each trial is a run folder `<sweep>/trials/<trial_id>/` and a nested MLflow run under
the sweep's. At the end: a table of trials sorted by the metric, a plot of the metric against
each swept parameter, `best.yaml` (the pipeline with the best values), and with
`--then-continue` the later phases run from the best trial's checkpoint as one pipeline run.

Sweep folder: `runs/<pipeline>/sweeps/<timestamp>/` holding `sweep.yaml`, `sweep.json`
(status, trials, best), `base/`, `trials/`, `tune/` (Ray Tune's own state, for `--resume`),
`trials.txt`, `sweep.png`, `best.yaml`. With `storage:` (a bucket or a folder every node shares),
Tune's state, the base run and every trial's checkpoints, weights and summary.json live under
`<storage>/<pipeline>/sweeps/<timestamp>/` instead, so a trial that ran on another node is read from
there; the local folder keeps the driver's copies.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from datasets_prep.faults import pause_point
from datasets_prep.storage import join, list_dirs, write_bytes
from raytrain.checkpoints import atomic_write_text
from raytrain.config.loader import ConfigError, load_config, set_values, with_values
from raytrain.config.schema import PipelineConfig
from raytrain.config.sweep import SweepConfig
from raytrain.data.datasets import resolve
from raytrain.jobs import job_paths
from raytrain.pipeline import PipelineError, PipelineRunner, resolve_paths
from raytrain.runs import PhaseEntry, RunSummary, summary_at, write_summary
from raytrain.tracking import Tracker, tracking_uri

SWEEP_FILE = "sweep.json"
TRIAL_CPU = 0.01  # what a trial's own function reserves: it only drives the phase's TorchTrainer


# ---- checks ------------------------------------------------------------------------------------------
def _phase_index(pipe: PipelineConfig, part: str) -> int | None:
    names = [p.name for p in pipe.phases]
    if part in names:
        return names.index(part)
    return int(part) % len(names) if part.lstrip("-").isdigit() else None


def check_sweep(pipe: PipelineConfig, sweep: SweepConfig) -> None:
    """Everything that can be checked before Ray starts: the phase, the metric, the scheduler's
    rungs, and each parameter's path and values through the pipeline's own models."""
    names = [p.name for p in pipe.phases]
    if sweep.phase not in names:
        raise ConfigError(f"sweep phase: no phase named {sweep.phase!r}; phases: {names}")
    idx = names.index(sweep.phase)
    try:
        phase = pipe.trained_phase(sweep.phase)
    except KeyError as exc:
        raise ConfigError(f"sweep phase: {exc.args[0]}; sweep a phase that trains (train, distill)") from None
    if sweep.metric.startswith("eval/") and not phase.eval:
        raise ConfigError(f"sweep metric {sweep.metric}: phase {sweep.phase!r} has no eval dataset; give it "
                          "`eval:` or sweep a train/ metric")
    if sweep.scheduler.name == "asha":
        grace = sweep.scheduler.grace_period
        rungs = asha_rungs(sweep, phase.max_steps)
        off = [r for r in rungs if r % phase.eval_every]
        if not rungs:
            raise ConfigError(f"sweep scheduler.grace_period {grace} is not below the phase's max_steps "
                              f"{phase.max_steps}: ASHA would never compare trials")
        if off:
            raise ConfigError(f"sweep scheduler: ASHA compares trials at steps {[int(r) for r in rungs]}, but "
                              f"phase {sweep.phase!r} evaluates every {phase.eval_every} steps; pick a "
                              "grace_period and an integer reduction_factor whose rungs are multiples of it")
    for path, dist in sweep.params.items():
        parts = path.split(".")
        if parts[0] == "phases" and len(parts) > 1:
            i = _phase_index(pipe, parts[1])
            if i is not None and i < idx:
                raise ConfigError(f"sweep params.{path}: phase {names[i]!r} runs once before the swept phase "
                                  f"{sweep.phase!r}; sweep a path of {sweep.phase!r} or a later phase")
        for value in dist.examples():
            with_values(pipe, {path: value}, source=f"sweep params.{path}")


def asha_rungs(sweep: SweepConfig, max_steps: int) -> list[int]:
    """The steps at which ASHA compares trials: grace_period times powers of reduction_factor, below the
    phase's last step."""
    rf, grace = sweep.scheduler.reduction_factor, sweep.scheduler.grace_period
    return [int(grace * rf ** k) for k in range(64) if grace * rf ** k < max_steps]


def asha_scheduler(sweep: SweepConfig, max_steps: int) -> Any:
    """Ray Tune's ASHA with the rungs of `asha_rungs`. ASHA's own rungs go up to max_t: one at the phase's
    last step saves nothing, yet it would end a trial that ran every step before its phase wrote its weights
    (a trial that ran all its steps, recorded as stopped early). So max_t is the step before the last."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="eval_step", max_t=max_steps - 1, grace_period=sweep.scheduler.grace_period,
                         reduction_factor=sweep.scheduler.reduction_factor, stop_last_trials=False)


# ---- one trial ---------------------------------------------------------------------------------------
# A trial logs its model but registers none: each would add a registry version, the newest being whichever
# trial ended last. The sweep registers its best finished trial's model (`Sweep.register_best`).
TRIAL_TRACKING: dict[str, Any] = {"tracking.register_as": None}


class Trial:
    """The Tune function of a sweep: one run folder, one `TorchTrainer` of the swept phase."""

    def __init__(self, raw: dict[str, Any], phase: str, base: dict[str, Any], sweep_dir: str,
                 parent_run_id: str | None, scaling: dict[str, Any], mlflow_uri: str,
                 storage: str | None = None) -> None:
        self.raw, self.phase, self.base, self.sweep_dir = raw, phase, base, sweep_dir
        self.parent_run_id, self.scaling, self.mlflow_uri = parent_run_id, scaling, mlflow_uri
        self.storage = storage  # the sweep's folder in `storage:`, when the pipeline has one

    def __call__(self, config: dict[str, Any]) -> None:
        import ray.tune
        from ray.tune.integration.ray_train import TuneReportCallback

        trial_id = ray.tune.get_context().get_trial_id()
        # The trial logs to MLflow from a Tune actor whose working directory is not the driver's: the
        # driver's resolved URI, never a relative sqlite path.
        os.environ["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        values = dict(config["values"])
        pipe = with_values(load_config(raw=self.raw), {**values, f"phases.{self.phase}.scaling": self.scaling,
                                                       **TRIAL_TRACKING})
        run_dir = Path(self.sweep_dir) / "trials" / trial_id
        storage_dir = join(self.storage, "trials", trial_id) if self.storage else None
        done = summary_at(storage_dir or run_dir)
        if done is not None and done.entry(self.phase).status in ("finished", "gate_failed"):
            return  # finished before the sweep was interrupted (Tune had not recorded it yet): not run again
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / "starts.log").open("a") as f:  # one line per start of training
            f.write(f"{time.time():.3f}\n")
        pause_point("trial", len(list(run_dir.parent.glob("*/starts.log"))), Path(self.sweep_dir))
        runner = PipelineRunner(pipe, run_dir=run_dir, progress=False, report_evals=True,
                                train_callbacks=[TuneReportCallback()], storage_dir=storage_dir)
        runner.summary.phases.update({k: PhaseEntry.model_validate(v) for k, v in self.base.items()
                                      if k not in runner.summary.phases})
        runner.summary.mlflow_run_id, runner.summary.trial = self.parent_run_id, {"id": trial_id, "values": values}
        runner.save_summary()
        try:
            runner.run_phase(pipe.phase(self.phase), run_name=f"trial {trial_id}")
        except PipelineError as exc:  # a gate: the trial's metrics reached Tune; record, don't fail
            if runner.summary.entry(self.phase).status != "gate_failed":
                raise
            print(exc)
        status = runner.summary.entry(self.phase).status
        runner.summary.status = status if status in ("finished", "gate_failed", "failed") else "partial"
        runner.save_summary()


def run_trial(config: dict[str, Any], trial: Trial) -> None:
    trial(config)


def trial_scaling(pipe: PipelineConfig, sweep: SweepConfig, total_cpus: float) -> dict[str, Any]:
    """The swept phase's scaling in a trial: the sweep's `trial_scaling`, else the phase's, with CPUs and
    torch threads shared by the concurrent trials (leaving one CPU to Ray Data)."""
    base = sweep.trial_scaling or pipe.phase_scaling(pipe.phase(sweep.phase))
    out = base.model_dump()
    share = sweep.max_concurrent_trials * base.num_workers
    if out["cpus_per_worker"] is None and base.use_gpu is not True:
        free = total_cpus - 1 - TRIAL_CPU * sweep.max_concurrent_trials  # a whole CPU stays with Ray Data
        out["cpus_per_worker"] = max(0.25, min(1.0, round(free / share, 2)))
    if out["threads_per_worker"] is None:
        out["threads_per_worker"] = max(1, (os.cpu_count() or 1) // share)
    return out


# ---- the sweep -----------------------------------------------------------------------------------------
def _now() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def find_unfinished_sweep(root: Path) -> Path | None:
    if not root.is_dir():
        return None
    for d in sorted((p for p in root.iterdir() if (p / SWEEP_FILE).exists()), reverse=True):
        if json.loads((d / SWEEP_FILE).read_text()).get("status") != "finished":
            return d
    return None


def reuse_base(pipe: PipelineConfig, run_dir: Path, before: list[str]) -> dict[str, Any]:
    """The summary entries of `before` (the phases ahead of the swept one) from a finished run of the same
    pipeline (`raytrain tune --base-run`), so a sweep of a late phase does not train the early ones again. Each
    must have finished with the same phase config, model and datasets as this pipeline's; else a ConfigError
    naming the phase and what differs."""
    found, config = summary_at(run_dir), run_dir / "config.yaml"
    if found is None or not config.is_file():
        raise ConfigError(f"--base-run {run_dir}: not a run folder (it needs summary.json and config.yaml)")
    done = found.phases
    theirs = resolve_paths(load_config(config))
    for name in before:
        entry = done.get(name)
        if entry is None or entry.status != "finished":
            raise ConfigError(f"--base-run {run_dir}: phase {name!r} is "
                              f"{'missing' if entry is None else entry.status}, not finished; run it first")
        mine, other = pipe.phase(name), theirs.phase(name)
        for what, a, b in (("config", mine.model_dump(mode="json"), other.model_dump(mode="json")),
                           ("model", pipe.phase_model(mine).model_dump(mode="json"),
                            theirs.phase_model(other).model_dump(mode="json")),
                           ("datasets", {n: pipe.data[n].shards for n in _datasets_of(mine)},
                            {n: theirs.data[n].shards for n in _datasets_of(other) if n in theirs.data})):
            if a != b:
                keys = sorted(k for k in {*a, *b} if a.get(k) != b.get(k))
                raise ConfigError(f"--base-run {run_dir}: phase {name!r} ran otherwise ({what}: {', '.join(keys)} "
                                  "differ); run the sweep without --base-run, or give a run of this config")
    return {n: done[n].model_dump(mode="json") for n in before}


def _datasets_of(phase: Any) -> list[str]:
    from raytrain.phases.ray_train import train_names

    return sorted({*train_names(phase), *([phase.eval] if getattr(phase, "eval", None) else [])})


class Sweep:
    def __init__(self, pipe: PipelineConfig, sweep: SweepConfig, *, sweep_text: str | None = None,
                 resume: bool = False, sweep_dir: str | Path | None = None,
                 base_run: str | Path | None = None) -> None:
        check_sweep(pipe, sweep)
        self.base_run = Path(base_run).resolve() if base_run is not None else None
        self.original = pipe  # relative paths kept: best.yaml is the user's pipeline with the best values
        in_job, where = job_paths(pipe)  # a Ray job's relative paths: one-line errors, or $RAYTRAIN_RUNS_DIR
        if where:
            print(where)
        self.pipe, self.sweep = resolve_paths(in_job), sweep
        self.pipe._raw = self._resolved_raw()
        root = Path(self.pipe.runs_dir) / self.pipe.name / "sweeps"
        found = find_unfinished_sweep(root) if resume and sweep_dir is None else None
        self.dir = Path(sweep_dir) if sweep_dir else (found or root / _now())
        self.dir.mkdir(parents=True, exist_ok=True)
        # With `storage`: Tune's state, the base run and the trials live there (any node reads and writes them).
        self.storage = join(self.pipe.storage, self.pipe.name, "sweeps", self.dir.name) if self.pipe.storage else None
        state_file = self.dir / SWEEP_FILE
        self.state: dict[str, Any] = (json.loads(state_file.read_text()) if state_file.exists()
                                      else {"pipeline": self.pipe.name, "phase": sweep.phase, "status": "running"})
        atomic_write_text(self.dir / "sweep.yaml", sweep_text or yaml.safe_dump(sweep.model_dump(mode="json")))
        uri = tracking_uri(self.pipe.tracking.uri, Path(self.pipe.runs_dir))
        self.tracker = Tracker(uri, self.pipe.tracking.experiment or self.pipe.name, self.pipe.tracking.enabled)
        self.state["mlflow_uri"] = uri

    def _resolved_raw(self) -> dict[str, Any]:
        """The user's raw YAML with the absolute paths `resolve_paths` made (workers' cwd differs)."""
        raw = json.loads(json.dumps(self.original._raw or self.original.model_dump(mode="json")))
        for name, d in self.pipe.data.items():
            raw["data"][name]["shards"] = d.shards
        raw["runs_dir"] = self.pipe.runs_dir
        for phase in raw.get("phases", []):
            init = phase.get("init_from") if isinstance(phase, dict) else None
            if isinstance(init, dict) and init.get("path"):
                init["path"] = resolve(init["path"])
        return raw

    def _save(self) -> None:
        text = json.dumps(self.state, indent=2)
        atomic_write_text(self.dir / SWEEP_FILE, text)
        if self.storage:
            write_bytes(join(self.storage, SWEEP_FILE), text.encode())

    def trial_dir(self, trial_id: str) -> str:
        """Where a trial's summary.json is: the sweep's folder in `storage`, else the local sweep folder."""
        return join(self.storage, "trials", trial_id) if self.storage else str(self.dir / "trials" / trial_id)

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def run(self, then_continue: bool = False) -> dict[str, Any]:
        from raytrain.session import ray_init

        # Tune saves its experiment state at every step (default: at most every 10 s), so a sweep killed
        # right after a trial ended resumes knowing it ended and does not run it again.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
        ray_init()
        parent = self.tracker.start(f"sweep {self.sweep.phase}", {"sweep": self.sweep.model_dump(mode="json")},
                                    run_id=self.state.get("mlflow_run_id"))
        self.state.update(mlflow_run_id=parent, status="running")
        self._save()
        self.tracker.artifact(parent, self.dir / "sweep.yaml")
        status = "FINISHED"
        try:
            base = self._run_base(parent)
            grid = self._fit(base, parent)
            rows = self._collect(grid)
            self._report(rows, parent)
            if then_continue:
                self._continue(parent)
            self.state["status"] = "finished"
        except BaseException as exc:
            self.state.update(status="failed", error=str(exc)[:2000])
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            raise
        finally:
            self._save()
            self.tracker.artifact(parent, self.dir / SWEEP_FILE)
            self.tracker.end(parent, status)
        return self.state

    def _run_base(self, parent: str | None) -> dict[str, Any]:
        """The phases before the swept one, once; their summary entries go into every trial."""
        names = [p.name for p in self.pipe.phases]
        before = names[: names.index(self.sweep.phase)]
        if not before:
            return {}
        if self.base_run is not None:
            self.state["base"] = str(self.base_run)
            print(f"sweep {self.dir}: phases before {self.sweep.phase!r} ({', '.join(before)}) from {self.base_run}")
            return reuse_base(self.pipe, self.base_run, before)
        runner = PipelineRunner(self.pipe, run_dir=self.dir / "base", only=before, mlflow_parent=parent,
                                storage_dir=join(self.storage, "base") if self.storage else None)
        print(f"sweep {self.dir}: phases before {self.sweep.phase!r} ({', '.join(before)}) run once")
        summary = runner.run()
        self.state["base"] = str(runner.run_dir)
        return {n: summary["phases"][n] for n in before}

    def _fit(self, base: dict[str, Any], parent: str | None) -> Any:
        import ray
        from ray import tune
        from ray.tune.search.basic_variant import BasicVariantGenerator

        sw, phase = self.sweep, self.pipe.trained_phase(self.sweep.phase)
        scaling = trial_scaling(self.pipe, sw, ray.cluster_resources().get("CPU", 1))
        trial = Trial(self.pipe._raw or {}, sw.phase, base, str(self.dir), parent, scaling, self.state["mlflow_uri"],
                      self.storage)
        # The trial function only drives its own TorchTrainer, whose workers hold the CPUs.
        trainable = tune.with_resources(tune.with_parameters(run_trial, trial=trial), {"CPU": TRIAL_CPU})
        path = join(self.storage or str(self.dir), "tune")
        if tune.Tuner.can_restore(path):
            print(f"sweep: resuming {path} (finished trials are not run again)")
            return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                      resume_errored=True).fit()
        if sw.searcher.name == "optuna":
            try:
                from ray.tune.search.optuna import OptunaSearch
            except ImportError as exc:
                raise ConfigError("sweep searcher optuna needs the optuna package: pip install optuna") from exc
            search: Any = OptunaSearch(seed=sw.searcher.seed)
        else:
            search = BasicVariantGenerator(random_state=sw.searcher.seed,
                                           max_concurrent=sw.max_concurrent_trials)
        scheduler = asha_scheduler(sw, phase.max_steps) if sw.scheduler.name == "asha" else None
        tuner = tune.Tuner(
            trainable,
            param_space={"values": {p: d.tune_domain() for p, d in sw.params.items()}},
            tune_config=tune.TuneConfig(metric=sw.metric, mode=sw.mode, num_samples=sw.num_samples,
                                        max_concurrent_trials=sw.max_concurrent_trials, search_alg=search,
                                        scheduler=scheduler),
            run_config=tune.RunConfig(name="tune", storage_path=self.storage or str(self.dir), verbose=1),
        )
        return tuner.fit()

    def _collect(self, grid: Any) -> list[dict[str, Any]]:
        """One row per trial: values, status, steps reached, last metric, MLflow run, folder."""
        sw = self.sweep
        folders = {}
        trials = join(self.storage, "trials") if self.storage else str(self.dir / "trials")
        for name in list_dirs(trials):
            s = summary_at(self.trial_dir(name))
            if s is not None and s.trial is not None:
                folders[s.trial["id"]] = s
        rows = []
        for res in grid:
            tid = (res.metrics or {}).get("trial_id")
            summary = folders.get(tid) if tid else next(
                (s for s in folders.values() if s.trial and s.trial["values"] == res.config["values"]), None)
            df = res.metrics_dataframe
            history = (df[["eval_step", sw.metric]].dropna().values.tolist()
                       if df is not None and sw.metric in df and "eval_step" in df else [])
            entry = summary.phases.get(sw.phase) if summary is not None else None
            status: str = entry.status if entry is not None else "not started"
            tid = tid or (summary.trial or {}).get("id", "?") if summary is not None else tid or "?"
            if res.error is not None:
                status = "failed"
            elif status in ("running", "failed"):
                # Tune ended the trial without an error: the scheduler stopped it. Its phase was cut where
                # it stood ("running"), or its trainer saw its workers go first and recorded "failed".
                status = "stopped early"
                if summary is not None and entry is not None and entry.status != status:
                    entry.status, entry.error = "stopped early", None
                    local = self.dir / "trials" / tid  # the trial may have run on another node
                    local.mkdir(parents=True, exist_ok=True)
                    write_summary(local, summary, self.trial_dir(tid) if self.storage else None)
            rows.append({"trial": tid,
                         "values": res.config["values"], "status": status,
                         "steps": int(history[-1][0]) if history else 0,
                         "metric": float(history[-1][1]) if history else None, "history": history,
                         "mlflow_run_id": entry.mlflow_run_id if entry else None,
                         "mlflow_model_uri": entry.mlflow_model_uri if entry else None,
                         "dir": self.trial_dir(tid),
                         "error": str(res.error)[:500] if res.error else None})
        sign = -1 if sw.mode == "max" else 1
        rows.sort(key=lambda r: (r["metric"] is None, sign * (r["metric"] or 0.0)))
        return rows

    def _report(self, rows: list[dict[str, Any]], parent: str | None) -> None:
        sw = self.sweep
        for r in rows:  # MLflow: each trial's final status (a stopped trial's run was left open)
            if r["mlflow_run_id"] and self.tracker.enabled:
                self.tracker.client.set_tag(r["mlflow_run_id"], "raytrain.trial_status", r["status"])
                if r["status"] in ("stopped early", "failed"):
                    self.tracker.end(r["mlflow_run_id"], "KILLED" if r["status"] == "stopped early" else "FAILED")
        table = trials_table(rows, sw)
        print(table)
        for r in rows:
            if r["error"]:
                print(f"trial {r['trial']} failed: {r['error']} (its log: {self.dir / 'tune'})")
        atomic_write_text(self.dir / "trials.txt", table + "\n")
        best = rows[0] if rows and rows[0]["metric"] is not None else None
        finished = [r for r in rows if r["status"] == "finished"]
        self.state.update(trials=rows, best=best, best_finished=finished[0] if finished else None)
        if best is not None:
            atomic_write_text(self.dir / "best.yaml", best_yaml(self.original, best["values"]))
            self.tracker.metrics(parent, {f"best/{sw.metric}": best["metric"]}, best["steps"])
            print(f"best trial {best['trial']}: {sw.metric} = {best['metric']:.4g} with "
                  + ", ".join(f"{k}={_fmt(v)}" for k, v in best["values"].items()) + f"; {self.dir / 'best.yaml'}")
        plot_sweep(rows, sw, self.dir / "sweep.png")
        for name in ("trials.txt", "sweep.png", "best.yaml"):
            self.tracker.artifact(parent, self.dir / name)
        self.register_best()

    def register_best(self) -> dict[str, Any] | None:
        """When the swept phase is the pipeline's final train phase and `tracking.register_as` is set: register
        the best finished trial's logged model (once, also when a resumed sweep reports again); returns
        ``{"name", "version", "trial"}``. A sweep of an earlier phase leaves registering to the run that
        continues from it (`--then-continue`)."""
        name = self.pipe.tracking.register_as
        best = self.state.get("best_finished")
        if not (name and self.tracker.enabled and self.pipe.tracking.log_model
                and self.sweep.phase == self.pipe.final_train_phase()):
            return None
        done = self.state.get("registered_model")
        if done and best and done.get("trial") == best["trial"]:
            return dict(done)
        if best is None:
            print(f"sweep: no trial finished phase {self.sweep.phase!r}; nothing registered as {name!r}")
            return None
        uri = best.get("mlflow_model_uri")
        if not uri:
            print(f"sweep: the best finished trial {best['trial']} has no MLflow model (see its summary.json, "
                  f"mlflow_model_error); nothing registered as {name!r}")
            return None
        version = self.tracker.register(uri, name)
        self.state["registered_model"] = {"name": name, "version": version, "trial": best["trial"]}
        self._save()
        print(f"sweep: the best finished trial {best['trial']}'s model registered as {name!r}, version {version}")
        return dict(self.state["registered_model"])

    def _continue(self, parent: str | None) -> None:
        """The phases after the swept one, from the best finished trial, as one pipeline run."""
        best = self.state.get("best_finished")
        if best is None:
            raise PipelineError("--then-continue: no trial finished its phase; nothing to continue from")
        if best["trial"] != (self.state.get("best") or {}).get("trial"):
            print(f"note: the best trial by {self.sweep.metric} did not finish its phase; continuing from the best "
                  f"finished one, {best['trial']}")
        trial = summary_at(best["dir"])
        if trial is None:
            raise PipelineError(f"--then-continue: the best trial's summary.json is missing from {best['dir']}")
        cfg = with_values(self.pipe, best["values"], source=f"trial {best['trial']}")
        run_dir = Path(self.pipe.runs_dir) / self.pipe.name / _now()
        names = [p.name for p in cfg.phases]
        done = names[: names.index(self.sweep.phase) + 1]
        phases = {n: trial.phases[n].model_copy() for n in done}
        phases[self.sweep.phase].from_trial = best["trial"]
        summary = RunSummary(pipeline=cfg.name, run_id=run_dir.name, phases=phases,
                             sweep={"dir": str(self.dir), "trial": best["trial"], "values": best["values"],
                                    "metric": {self.sweep.metric: best["metric"]}})
        run_dir.mkdir(parents=True, exist_ok=True)
        write_summary(run_dir, summary)
        print(f"continuing with phases {names[len(done):]} from trial {best['trial']}: {run_dir}")
        runner = PipelineRunner(cfg, run_dir=run_dir, config_text=best_yaml(self.original, best["values"]),
                                mlflow_parent=parent)
        runner.run()
        self.state["continued"] = str(run_dir)


# ---- outputs -----------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def trials_table(rows: list[dict[str, Any]], sweep: SweepConfig) -> str:
    params = list(sweep.params)
    short = [p.split(".")[-1] if sum(q.split(".")[-1] == p.split(".")[-1] for q in params) == 1 else p
             for p in params]
    head = ["trial", *short, "status", "steps", sweep.metric]
    body = [[r["trial"], *(_fmt(r["values"].get(p)) for p in params), r["status"], str(r["steps"]),
             "-" if r["metric"] is None else f"{r['metric']:.4f}"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [head, *body]]
    return f"trials by {sweep.metric} ({sweep.mode}):\n" + "\n".join(lines)


def best_yaml(original: PipelineConfig, values: dict[str, Any]) -> str:
    """The user's pipeline YAML (paths as they wrote them) with the best values set."""
    raw = set_values(original._raw or original.model_dump(mode="json"), values)
    load_config(raw=raw)  # still valid, as every trial's config was
    head = "# the pipeline with the best trial's values: " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
    return head + "\n" + yaml.safe_dump(raw, sort_keys=False)


def plot_sweep(rows: list[dict[str, Any]], sweep: SweepConfig, path: Path) -> None:
    """One panel per swept parameter: the last metric of each trial (finished: filled, stopped: hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = list(sweep.params)
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.4), squeeze=False)
    scored = [r for r in rows if r["metric"] is not None]
    for ax, p in zip(axes[0], params, strict=True):
        dist = sweep.params[p]
        for r in scored:
            x = r["values"][p]
            done = r["status"] == "finished"
            ax.scatter([x], [r["metric"]], s=46, marker="o", facecolors="C0" if done else "none", edgecolors="C0")
        if scored:
            best = scored[0]
            ax.scatter([best["values"][p]], [best["metric"]], s=140, marker="*", color="C3", zorder=3,
                       label=f"best ({best['trial']})")
            ax.legend(fontsize=7, loc="best")
        if dist.log_scale:
            ax.set_xscale("log")
        ax.set_xlabel(p, fontsize=8)
        ax.set_ylabel(sweep.metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep of phase {sweep.phase}: {len(rows)} trials (hollow: stopped early by ASHA)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
