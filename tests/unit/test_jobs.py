"""A pipeline run as a Ray Job: relative paths that resolve into the job's uploaded working directory (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from raytrain.config import ConfigError, load_config
from raytrain.jobs import RUNS_DIR_ENV, job_paths, uploaded_working_dir

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "configs/pipelines/separation_tiny.yaml"  # data: data/shards/espeak_sep_tiny/{train,dev}


def _job_dir(tmp_path: Path) -> Path:
    """Where Ray 2.60 unpacks a job's uploaded working_dir."""
    d = tmp_path / "ray" / "session_2026-01-01_00-00-00_1_1" / "runtime_resources" / "working_dir_files" / \
        "_ray_pkg_0123456789abcdef"
    d.mkdir(parents=True)
    return d


def _abs_data(tmp_path: Path) -> list[str]:
    return [f"data.train.shards={tmp_path / 'shared' / 'train'}", f"data.dev.shards={tmp_path / 'shared' / 'dev'}"]


def _one_line(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def test_the_uploaded_working_dir_is_found_from_the_folder_or_the_job_config(tmp_path: Path) -> None:
    job = _job_dir(tmp_path)
    assert uploaded_working_dir(job, {}) == job
    (job / "configs").mkdir()
    assert uploaded_working_dir(job / "configs", {}) == job  # a command that ran `cd configs` first
    assert uploaded_working_dir(tmp_path, {}) is None
    assert uploaded_working_dir(ROOT, {}) is None
    # Ray's job supervisor names the package in the job's config: found even if Ray moved its folders
    elsewhere = tmp_path / "pkgs" / "_ray_pkg_feedbeef"
    elsewhere.mkdir(parents=True)
    config = {"runtime_env": {"working_dir": "gcs://_ray_pkg_feedbeef.zip"}}
    assert uploaded_working_dir(elsewhere, {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(config)}) == elsewhere
    # a working_dir already on the node (local://) is the user's folder, not a temporary copy
    mine = tmp_path / "mine"
    mine.mkdir()
    local = {"runtime_env": {"working_dir": f"local://{mine}"}}
    assert uploaded_working_dir(mine, {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(local)}) is None
    assert uploaded_working_dir(mine, {"RAY_JOB_CONFIG_JSON_ENV_VAR": "not json"}) is None


def test_outside_a_job_nothing_changes(tmp_path: Path) -> None:
    pipe = load_config(PIPELINE)
    assert job_paths(pipe, cwd=tmp_path, environ={RUNS_DIR_ENV: str(tmp_path / "r")}) == (pipe, None)


def test_relative_data_in_a_job_names_the_keys_and_the_fixes(tmp_path: Path) -> None:
    job = _job_dir(tmp_path)
    with pytest.raises(ConfigError) as exc:
        job_paths(load_config(PIPELINE), cwd=job, environ={RUNS_DIR_ENV: str(tmp_path / "runs")})
    text = _one_line(exc)
    assert text.startswith("data.train.shards (data/shards/espeak_sep_tiny/train), "
                           "data.dev.shards (data/shards/espeak_sep_tiny/dev): not found: inside a Ray job"), text
    assert str(job) in text and "bucket or a folder every node shares" in text
    assert "-o data.train.shards=/abs/path/train -o data.dev.shards=/abs/path/dev" in text
    assert "_manifest.json; prepare it first" not in text
    # one relative dataset: only that one is named
    with pytest.raises(ConfigError) as exc:
        job_paths(load_config(PIPELINE, [_abs_data(tmp_path)[0]]), cwd=job, environ={RUNS_DIR_ENV: "/r"})
    assert _one_line(exc).startswith("data.dev.shards (data/shards/espeak_sep_tiny/dev): not found")


def test_relative_data_that_was_uploaded_or_is_unused_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import raytrain.data.datasets as datasets

    job = _job_dir(tmp_path)
    env = {RUNS_DIR_ENV: str(tmp_path / "runs")}
    unused = load_config(PIPELINE, [*_abs_data(tmp_path), "data.spare.shards=data/shards/spare"])
    assert job_paths(unused, cwd=job, environ=env)[0].data["spare"].shards == "data/shards/spare"
    # a runtime env that does upload the (small) data: a prepared folder is there
    prepared: dict[str, Any] = {"schema_version": 1}
    monkeypatch.setattr(datasets, "dataset_info", lambda path: prepared if str(path).startswith(str(job)) else None)
    job_paths(load_config(PIPELINE), cwd=job, environ=env)


def test_a_relative_runs_dir_in_a_job_goes_to_raytrain_runs_dir(tmp_path: Path) -> None:
    job = _job_dir(tmp_path)
    shared = tmp_path / "shared_runs"
    pipe, note = job_paths(load_config(PIPELINE, _abs_data(tmp_path)), cwd=job, environ={RUNS_DIR_ENV: str(shared)})
    assert pipe.runs_dir == str(shared)
    assert note is not None and str(shared) in note and RUNS_DIR_ENV in note
    # the default MLflow store follows runs_dir; an absolute runs_dir is the user's choice
    absolute = load_config(PIPELINE, [*_abs_data(tmp_path), f"runs_dir={tmp_path / 'mine'}"])
    assert job_paths(absolute, cwd=job, environ={RUNS_DIR_ENV: str(shared)}) == (absolute, None)


def test_a_relative_runs_dir_in_a_job_without_raytrain_runs_dir_is_refused(tmp_path: Path) -> None:
    job = _job_dir(tmp_path)
    with pytest.raises(ConfigError) as exc:
        job_paths(load_config(PIPELINE, _abs_data(tmp_path)), cwd=job, environ={})
    text = _one_line(exc)
    assert text.startswith("runs_dir (runs): inside a Ray job"), text
    assert "ray job submit ... -- RAYTRAIN_RUNS_DIR=/shared/runs raytrain run ..." in text
    assert "-o runs_dir=" in text and "storage:" in text


def test_storage_keeps_the_run_but_a_local_mlflow_store_in_the_job_is_refused(tmp_path: Path) -> None:
    job = _job_dir(tmp_path)
    stored = [*_abs_data(tmp_path), f"storage={tmp_path / 'bucket'}"]
    with pytest.raises(ConfigError) as exc:
        job_paths(load_config(PIPELINE, stored), cwd=job, environ={})
    text = _one_line(exc)
    assert text.startswith("the default MLflow store (runs/mlflow.db): inside a Ray job") and RUNS_DIR_ENV in text
    pipe, note = job_paths(load_config(PIPELINE, [*stored, "tracking.uri=http://127.0.0.1:5000"]), cwd=job,
                           environ={})
    assert pipe.runs_dir == "runs" and note is not None and "storage" in note
    assert job_paths(load_config(PIPELINE, [*stored, "tracking.enabled=false"]), cwd=job, environ={})[1]


@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", "file:mlruns", "mlruns"])
def test_a_relative_local_mlflow_uri_in_a_job_is_refused(tmp_path: Path, uri: str) -> None:
    job = _job_dir(tmp_path)
    env = {RUNS_DIR_ENV: str(tmp_path / "runs")}
    with pytest.raises(ConfigError) as exc:
        job_paths(load_config(PIPELINE, [*_abs_data(tmp_path), f"tracking.uri={uri}"]), cwd=job, environ=env)
    assert _one_line(exc).startswith(f"tracking.uri ({uri}): inside a Ray job")
    with pytest.raises(ConfigError) as exc:
        job_paths(load_config(PIPELINE, _abs_data(tmp_path)), cwd=job, environ={**env, "MLFLOW_TRACKING_URI": uri})
    assert _one_line(exc).startswith(f"MLFLOW_TRACKING_URI ({uri}): inside a Ray job")
    fine = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job_paths(load_config(PIPELINE, [*_abs_data(tmp_path), f"tracking.uri={fine}"]), cwd=job, environ=env)
