"""The README's cluster commands on a one-machine Ray cluster (`ray start --head`, loopback only), as a new user
runs them: `ray job submit --working-dir . --runtime-env configs/clusters/runtime_env.yaml -- raytrain run
configs/pipelines/separation_tiny.yaml`.

The runtime env leaves `data/` out of the upload, so the config's relative shard paths resolve inside the job's
temporary copy of the code: the job must fail with one line naming the keys and the fixes. With absolute data
paths and `RAYTRAIN_RUNS_DIR`, the run folder and the sqlite MLflow store must go there, and outlive the Ray
session (not into Ray's `runtime_resources/working_dir_files/_ray_pkg_<hash>/runs`).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from raytrain.jobs import RUNS_DIR_ENV

from ._procs import BIN, local_head

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_ENV = "configs/clusters/runtime_env.yaml"
PIPELINE = "configs/pipelines/separation_tiny.yaml"
# The first phase only, 2 steps of a smaller model; no MLflow model logging (the run and its metrics suffice).
CUT = ["--phases", "short", "-o", "phases.short.max_steps=2", "-o", "phases.short.eval_every=2",
       "-o", "phases.short.checkpoint_every=2", "-o", "model.args.msk_num_layers=2", "-o", "model.args.msk_num_stacks=1",
       "-o", "defaults.batch_size=4", "-o", "defaults.shuffle_buffer=16", "-o", "tracking.log_model=false"]

WAIT_JOB = r'''
import json, sys, time
from ray.job_submission import JobSubmissionClient

client, job_id, deadline = JobSubmissionClient(sys.argv[1]), sys.argv[2], time.monotonic() + float(sys.argv[3])
while not (info := client.get_job_info(job_id)).status.is_terminal() and time.monotonic() < deadline:
    time.sleep(1)
print(json.dumps({"status": str(info.status.value), "message": info.message, "logs": client.get_job_logs(job_id)}))
'''


def _job(env: dict[str, str], address: str, tmp_path: Path, entrypoint: list[str], deadline: float) -> dict[str, Any]:
    """`ray job submit` from the project root, as the README says; waits for the job's end."""
    job_id = f"raytrain_it_{uuid.uuid4().hex[:8]}"
    sub = subprocess.run([BIN / "ray", "job", "submit", "--address", address, "--submission-id", job_id,
                          "--working-dir", ".", "--runtime-env", RUNTIME_ENV, "--no-wait", "--", *entrypoint],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert sub.returncode == 0, f"ray job submit failed:\n{sub.stdout}\n{sub.stderr}"
    (tmp_path / "wait_job.py").write_text(WAIT_JOB)
    res = subprocess.run([BIN / "python", tmp_path / "wait_job.py", address, job_id, str(deadline)], env=env,
                         capture_output=True, text=True, timeout=deadline + 120)
    assert res.returncode == 0, f"waiting for job {job_id} failed:\n{res.stdout}\n{res.stderr}"
    job: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    (tmp_path / f"{job_id}.log").write_text(job["logs"])
    return job


def test_the_readme_job_on_a_one_machine_cluster(corpus: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    shared = tmp_path / "shared_runs"
    with local_head(tmp_path) as (env, address, temp):
        # 1. as the README had it: relative data paths, not uploaded
        job = _job(env, address, tmp_path, ["raytrain", "run", PIPELINE], deadline=180)
        assert job["status"] == "FAILED", f"{job['status']}: {job['message']}\n{job['logs'][-4000:]}"
        lines = [ln for ln in job["logs"].splitlines() if "data.train.shards (" in ln]
        assert len(lines) == 1, job["logs"][-4000:]
        assert ("data.train.shards (data/shards/espeak_sep_tiny/train), data.dev.shards "
                "(data/shards/espeak_sep_tiny/dev): not found: inside a Ray job") in lines[0], lines[0]
        assert "_ray_pkg_" in lines[0] and "bucket or a folder every node shares" in lines[0]
        assert "-o data.train.shards=/abs/path/train -o data.dev.shards=/abs/path/dev" in lines[0]
        assert "Traceback" not in job["logs"] and "prepare it first" not in job["logs"], job["logs"][-4000:]

        # 2. absolute data paths, the run folder in RAYTRAIN_RUNS_DIR (the variable on the job's command line)
        data = ["-o", f"data.train.shards={corpus / 'train'}", "-o", f"data.dev.shards={corpus / 'dev'}"]
        job = _job(env, address, tmp_path, [f"{RUNS_DIR_ENV}={shared}", "raytrain", "run", PIPELINE, *data, *CUT],
                   deadline=300)
        assert job["status"] == "SUCCEEDED", f"{job['status']}: {job['message']}\n{job['logs'][-6000:]}"
        assert f"Ray job: run folders and the default MLflow store go to {shared} (${RUNS_DIR_ENV})" in job["logs"]
        packages = list(temp.glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*"))
        assert packages, "no unpacked working dir: did the job run elsewhere?"
        assert not [p for p in packages if (p / "runs").exists()], "the run went into Ray's temporary package"

    # after the Ray session (its temp dir removed): the run and its MLflow store are where the job said
    assert not temp.exists()
    (summary_path,) = shared.glob("separation_tiny/*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["phases"]["short"]["status"] == "finished" and summary["phases"]["short"]["steps"] == 2, summary
    assert Path(summary["phases"]["short"]["best_checkpoint"]).is_relative_to(shared)
    assert summary["mlflow_uri"] == f"sqlite:///{shared / 'mlflow.db'}" and (shared / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=summary["mlflow_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [(r.info.run_name, r.info.status) for r in children] == [("short", "FINISHED")]
