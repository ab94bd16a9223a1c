"""MLflow: one parent run per pipeline run, one nested run per phase.

The driver logs what rank 0 reports (through the event queue), so workers never
talk to the tracking store. `MLFLOW_TRACKING_URI` wins over the config; the default
is a sqlite file beside the runs. A finished train phase's best weights are logged as
an MLflow pytorch model (`tracking.log_model`), the final one registered if
`tracking.register_as` names a registered model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raytrain.logs import quiet_logger

if TYPE_CHECKING:
    import torch

    from raytrain.config.schema import PhaseBase, PipelineConfig
    from raytrain.runs import PhaseEntry

log = logging.getLogger(__name__)


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{v.get('name', i)}."))
    else:
        out[prefix.rstrip(".")] = str(d)[:6000]
    return out


def tracking_uri(configured: str | None, runs_dir: Path) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
        return uri
    runs_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(runs_dir / 'mlflow.db').resolve()}"


class Tracker:
    """Thin MlflowClient wrapper with explicit run ids (no global active-run state)."""

    def __init__(self, uri: str, experiment: str, enabled: bool = True) -> None:
        self.uri, self.enabled = uri, enabled
        self.client: Any = None
        self.experiment_id: str | None = None
        if not enabled:
            return
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # MLflow 3 sends usage telemetry to its servers from a background thread (set up on import): a training
        # job has no business talking to hosts other than its tracking store. MLFLOW_DISABLE_TELEMETRY=false opts in.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        # A new sqlite store: MLflow logs "Creating initial MLflow database tables..." as it makes the store.
        with quiet_logger("mlflow.store.db.utils", logging.WARNING):
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(experiment)
        # A local sqlite store keeps its artifacts beside the database (MLflow's default is ./mlruns in
        # whatever folder the command runs from); a server decides for itself.
        where = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri() \
            if uri.startswith("sqlite:///") else None
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=where)

    def start(self, name: str, params: dict[str, Any] | None = None, parent: str | None = None,
              run_id: str | None = None) -> str | None:
        """A new run (or re-open `run_id` when resuming)."""
        if not self.enabled:
            return None
        if run_id:
            from mlflow.exceptions import MlflowException

            try:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            except MlflowException:  # a resumed run whose tracking store was lost (a new machine's sqlite)
                log.warning("MLflow run %s (%s) is not in %s; logging to a new run", run_id, name, self.uri)
        tags = {"mlflow.runName": name}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
        rid = run.info.run_id
        if params:
            from mlflow.entities import Param

            flat = [Param(k, v) for k, v in flatten(params).items()]
            for i in range(0, len(flat), 100):
                self.client.log_batch(rid, params=flat[i:i + 100])
        return str(rid)

    def metrics(self, run_id: str | None, values: dict[str, Any], step: int) -> None:
        if not self.enabled or run_id is None:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in values.items() if isinstance(v, int | float)]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def tags(self, run_id: str | None, values: dict[str, str]) -> None:
        if self.enabled and run_id is not None:
            for k, v in values.items():
                self.client.set_tag(run_id, k, v)

    def artifact(self, run_id: str | None, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and run_id is not None and Path(path).exists():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def end(self, run_id: str | None, status: str = "FINISHED") -> None:
        if self.enabled and run_id is not None:
            self.client.set_terminated(run_id, status=status)

    @contextmanager
    def _fluent_uri(self) -> Iterator[None]:
        """MLflow's model functions (`mlflow.pytorch.log_model`, `mlflow.register_model`) use the process-wide
        tracking URI; point it at this tracker's store for the call, then restore it and the environment."""
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        env = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            with _use_tracking_uri(self.uri):
                yield
        finally:  # restoring an unset URI also unsets MLFLOW_TRACKING_URI, which may have come from the user
            if env is not None:
                os.environ["MLFLOW_TRACKING_URI"] = env

    def log_model(self, run_id: str, model: torch.nn.Module, *, step: int = 0,
                  metadata: dict[str, Any] | None = None) -> str:
        """Log `model` (pytorch flavor, pickled) as a model of `run_id`; returns its URI (`models:/<id>`).

        The run's metrics at `step` are linked to the model. Requirements are pinned from the installed
        packages: no inference subprocess, no package index."""
        from importlib.metadata import PackageNotFoundError, version

        import mlflow.pytorch

        requirements = mlflow.pytorch.get_default_pip_requirements()
        try:
            requirements.append(f"torchaudio=={version('torchaudio')}")
        except PackageNotFoundError:
            pass
        # The logged model belongs to the run's experiment (log_model alone files it under the active experiment,
        # i.e. "Default", when no run is active).
        logged = self.client.create_logged_model(self.experiment_id, name="model", source_run_id=run_id)
        # Pickle, not `pt2` (torch.export needs an input example and every model's dynamic shapes): MLflow's
        # caution about unpickling, logged at every pickled save, is the one a user of `mlflow.pytorch.load_model`
        # takes for the runs of their own tracking store; it is not printed into every pipeline run.
        with self._fluent_uri(), quiet_logger("mlflow.pytorch"):
            info = mlflow.pytorch.log_model(model, name="model", model_id=logged.model_id, run_id=run_id, step=step,
                                            serialization_format="pickle", pip_requirements=requirements,
                                            metadata=metadata)
        return str(info.model_uri)

    def register(self, model_uri: str, name: str) -> str:
        """A new version of registered model `name` (created if needed) from a logged model; returns the version."""
        import mlflow

        with self._fluent_uri():
            version = mlflow.register_model(model_uri, name)
        return str(version.version)


def log_phase_model(tracker: Tracker, pipe: PipelineConfig, phase: PhaseBase, entry: PhaseEntry,
                    run_id: str | None) -> None:
    """Log a finished phase's best weights as an MLflow model when its kind trains weights, and register it
    when it is the pipeline's final such phase and `tracking.register_as` is set. Records `mlflow_model_uri`
    (and `mlflow_registered_model`) in the phase's summary entry. A failure does not fail the finished phase:
    it is recorded as `mlflow_model_error` and logged as a warning that says where the weights are."""
    entry.mlflow_model_uri = entry.mlflow_registered_model = entry.mlflow_model_error = None
    if not (tracker.enabled and pipe.tracking.log_model and run_id and phase.trains and entry.best_checkpoint):
        return
    import time

    from raytrain.infer import from_weights
    from raytrain.runs import RegisteredModel

    register_as = pipe.tracking.register_as if pipe.final_train_phase() == phase.name else None
    mcfg = pipe.phase_model(phase)
    what = "logged"
    try:
        t0 = time.time()
        model = from_weights(mcfg, entry.best_checkpoint)
        meta = {"raytrain": {"pipeline": pipe.name, "phase": phase.name, "model": mcfg.model_dump(mode="json"),
                             "weights": str(entry.best_checkpoint)}}
        entry.mlflow_model_uri = uri = tracker.log_model(run_id, model, step=int(entry.steps or 0), metadata=meta)
        if register_as:
            what = f"registered as {register_as!r}"
            entry.mlflow_registered_model = RegisteredModel(name=register_as,
                                                            version=tracker.register(uri, register_as))
        log.info("phase %s: MLflow model %s in %.1f s", phase.name, entry.mlflow_model_uri, time.time() - t0)
    except Exception as exc:
        entry.mlflow_model_error = f"{type(exc).__name__}: {exc}"[:2000]
        log.warning("phase %r finished, but its model could not be %s in MLflow (%s): %s. The phase's weights are "
                    "in %s (summary.json: mlflow_model_error); `raytrain infer` uses them as they are.",
                    phase.name, what, tracker.uri, entry.mlflow_model_error, entry.best_checkpoint)
