"""MLflow: one parent run per pipeline run, one nested run per phase.

The driver logs what rank 0 reports (through the event queue), so workers never
talk to the tracking store. `MLFLOW_TRACKING_URI` wins over the config; the default
is a sqlite file beside the runs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

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
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)

    def start(self, name: str, params: dict[str, Any] | None = None, parent: str | None = None,
              run_id: str | None = None) -> str | None:
        """A new run (or re-open `run_id` when resuming)."""
        if not self.enabled:
            return None
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
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

    def artifact(self, run_id: str | None, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and run_id is not None and Path(path).exists():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def end(self, run_id: str | None, status: str = "FINISHED") -> None:
        if self.enabled and run_id is not None:
            self.client.set_terminated(run_id, status=status)
