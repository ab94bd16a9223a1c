"""A pipeline run as a Ray Job (`ray job submit --working-dir . -- raytrain run ...`).

Ray unpacks the uploaded working directory into a temporary folder of its session
(`<ray temp>/session_.../runtime_resources/working_dir_files/_ray_pkg_<hash>`) and starts the job's
command there. Relative paths then resolve inside that folder: the data (which the runtime env rightly
leaves out of the upload) is not there, and a run folder or sqlite MLflow store written there vanishes
with the Ray session (and two jobs of the same code share it). `job_paths` turns both into one-line
errors that say what to do, and moves a relative `runs_dir` to `$RAYTRAIN_RUNS_DIR` when it is set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from raytrain.config.loader import ConfigError
from raytrain.config.schema import PipelineConfig

RUNS_DIR_ENV = "RAYTRAIN_RUNS_DIR"
# Set by Ray's job supervisor for a job's command: {"runtime_env": {"working_dir": "gcs://_ray_pkg_<hash>.zip"}}
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
PKG_PREFIX = "_ray_pkg_"  # ray._private.runtime_env.packaging.RAY_PKG_PREFIX
# `ray job submit` takes one of --runtime-env (the project's excludes) and --runtime-env-json: the variable goes on
# the command line, which Ray runs in a shell.
RUNS_DIR_FIX = (f"set {RUNS_DIR_ENV} to a folder that outlives the job (ray job submit ... -- {RUNS_DIR_ENV}="
                "/shared/runs raytrain run ..., or env_vars in the runtime env), or give an absolute "
                "-o runs_dir=/shared/runs, or set storage: (a bucket or shared folder)")


def uploaded_working_dir(cwd: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The temporary folder Ray unpacked an uploaded `working_dir` into, when `cwd` is in it (a Ray job's
    command, or a task or actor of a runtime env with a working_dir); else None. A `local://` working_dir (a
    folder already on the node) is not a temporary one."""
    here = Path(cwd if cwd is not None else os.getcwd())
    env = os.environ if environ is None else environ
    names: set[str] = set()
    try:
        uri = json.loads(env.get(JOB_CONFIG_ENV) or "{}").get("runtime_env", {}).get("working_dir") or ""
    except (ValueError, AttributeError):
        uri = ""
    if uri and not uri.startswith("local://"):
        names.add(uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zip"))
    for folder in (here, *here.parents):
        if folder.name in names or (folder.name.startswith(PKG_PREFIX) and folder.parent.name == "working_dir_files"):
            return folder
    return None


def _inside(path: str | Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def _local_store(uri: str, cwd: Path) -> Path | None:
    """The file or folder of a local MLflow store URI (sqlite or file store), resolved against `cwd`; None for
    a server or another remote store."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        return Path(path) if uri.startswith("sqlite:////") else cwd / path
    if uri.startswith("file:"):
        path = uri.removeprefix("file:").removeprefix("//")
        return cwd / path if not path.startswith("/") else Path(path)
    if "://" in uri:
        return None
    return cwd / uri  # a bare path: MLflow's file store


def used_datasets(pipe: PipelineConfig) -> list[str]:
    """The `data:` entries the pipeline's phases read, in the order of their first use."""
    from raytrain.phases.base import phase_kind

    out: list[str] = []
    for phase in pipe.phases:
        for use in phase_kind(phase.kind).needs(pipe, phase).datasets:
            if use.name in pipe.data and use.name not in out:
                out.append(use.name)
    return out


def job_paths(pipe: PipelineConfig, *, cwd: str | Path | None = None,
              environ: Mapping[str, str] | None = None) -> tuple[PipelineConfig, str | None]:
    """`pipe` as it may run here, and a line saying where its run goes (None outside a Ray job's uploaded
    working directory, where nothing changes). Inside one:

    - a dataset the phases read whose local path resolves into it and holds no `_manifest.json`: ConfigError
      naming the `data.<name>.shards` keys and the fixes;
    - a `runs_dir` that resolves into it: `$RAYTRAIN_RUNS_DIR` when that is set; else kept when `storage:` holds
      the run (a local copy), else ConfigError with the fix;
    - a local MLflow store (sqlite or file; the default one is `<runs_dir>/mlflow.db`) that would land in it:
      ConfigError with the fix."""
    from raytrain.data.datasets import dataset_info

    env = os.environ if environ is None else environ
    here = Path(cwd if cwd is not None else os.getcwd())
    job_dir = uploaded_working_dir(here, env)
    if job_dir is None:
        return pipe, None
    where = f"inside a Ray job, relative paths resolve in the job's uploaded copy of the code ({job_dir})"
    missing = [name for name in used_datasets(pipe)
               if "://" not in (shards := pipe.data[name].shards) and _inside(here / Path(shards).expanduser(), job_dir)
               and dataset_info(str(here / Path(shards).expanduser())) is None]
    if missing:
        keys = ", ".join(f"data.{n}.shards ({pipe.data[n].shards})" for n in missing)
        flags = " ".join(f"-o data.{n}.shards=/abs/path/{Path(pipe.data[n].shards).name}" for n in missing)
        raise ConfigError(f"{keys}: not found: {where}, which holds no data (the upload leaves data out). Prepare "
                          "the data into a bucket or a folder every node shares and point the shards there, or "
                          f"pass absolute paths: raytrain run <config> {flags}")
    runs_dir = here / Path(pipe.runs_dir).expanduser()
    note = None
    if _inside(runs_dir, job_dir):
        if env.get(RUNS_DIR_ENV):
            runs_dir = Path(env[RUNS_DIR_ENV]).expanduser().resolve()
            pipe = pipe.model_copy(update={"runs_dir": str(runs_dir)})
            note = f"Ray job: run folders and the default MLflow store go to {runs_dir} (${RUNS_DIR_ENV})"
        elif pipe.storage:
            note = (f"Ray job: the run is kept in storage {pipe.storage}; its local copy ({pipe.runs_dir}) is in "
                    f"the job's temporary working directory (set {RUNS_DIR_ENV} to keep one)")
        else:
            raise ConfigError(f"runs_dir ({pipe.runs_dir}): {where}, which goes with the Ray session, and the run "
                              f"folder (checkpoints, summary.json) with it. Fix: {RUNS_DIR_FIX}")
    uri = env.get("MLFLOW_TRACKING_URI") or pipe.tracking.uri
    store = _local_store(uri, here) if uri else runs_dir / "mlflow.db"
    if pipe.tracking.enabled and store is not None and _inside(store, job_dir):
        if uri:
            key = "MLFLOW_TRACKING_URI" if env.get("MLFLOW_TRACKING_URI") else "tracking.uri"
            fix = "an absolute path (sqlite:////shared/mlflow.db) or a tracking server (http://...)"
            what = f"{key} ({uri})"
        else:
            fix = f"set {RUNS_DIR_ENV} (the store goes under it) or tracking.uri"
            what = f"the default MLflow store ({pipe.runs_dir}/mlflow.db)"
        raise ConfigError(f"{what}: {where}, which goes with the Ray session, and the MLflow store with it. "
                          f"Fix: {fix}")
    return pipe, note
