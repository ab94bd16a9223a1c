"""A tiny pipeline and a sweep as Ray Jobs on a real two-node Ray cluster, submitted the way users do.

The two nodes live in two network namespaces on this machine, joined by a veth pair: the test
sends traffic only to hosts it made. The head advertises no CPU, so every CPU task and actor
(Ray Data reads, the Train worker, a sweep's trials) must run on the worker node; the job's driver runs
on the head. The worker node has a disk of its own at `node_local/` (a tmpfs mounted in its mount
namespace): what a trial writes there the head never sees, as on a real cluster, so a sweep's table
can only list it through `storage:`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from ._procs import netns_skip_reason, stop_namespace
from .conftest import pipeline_dict

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, `raytrain`, python
RUNTIME_ENV = "configs/clusters/runtime_env.yaml"
HEAD_IP, WORKER_IP = "10.213.7.1", "10.213.7.2"  # private to the two namespaces: no clash with anything
GCS_PORT, DASHBOARD_PORT = 6379, 8265  # each namespace has its own ports: other Rays here cannot collide
JOB_DEADLINE_S = 420
MAX_UPLOAD = 5 * 1024 * 1024

# Runs inside the head namespace (the test's own process cannot reach the namespace's addresses).
HELPER = r'''
import json, sys, time
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_nodes

address, what = sys.argv[1], sys.argv[2]
if what == "nodes":
    nodes = list_nodes(address=address, raise_on_missing_output=False)
    print(json.dumps([{"ip": n.node_ip, "state": n.state, "head": n.is_head_node,
                       "cpus": (n.resources_total or {}).get("CPU", 0)} for n in nodes]))
else:
    client, job_id, deadline = JobSubmissionClient(address), sys.argv[3], time.monotonic() + float(sys.argv[4])
    while not (info := client.get_job_info(job_id)).status.is_terminal() and time.monotonic() < deadline:
        time.sleep(3)
    print(json.dumps({"status": str(info.status.value), "message": info.message,
                      "runtime_env": info.runtime_env, "logs": client.get_job_logs(job_id)}))
'''


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, f"ip {' '.join(args)}: {res.stderr.strip()}"


@dataclass
class Cluster:
    head_ns: str
    worker_ns: str
    env: dict[str, str]
    helper: Path
    logs: Path
    node_local: Path  # the head's disk here; the worker node sees an empty tmpfs of its own

    def run(self, ns: str, *cmd: str | Path, timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, *map(str, cmd)], env=self.env, capture_output=True,
                              text=True, timeout=timeout, **kw)

    def helper_json(self, *args: str, timeout: float) -> Any:
        res = self.run(self.head_ns, BIN / "python", self.helper, f"http://{HEAD_IP}:{DASHBOARD_PORT}", *args,
                       timeout=timeout)
        assert res.returncode == 0, f"helper {args} failed:\n{res.stdout}\n{res.stderr}"
        return json.loads(res.stdout.strip().splitlines()[-1])


def _ray_start(cluster: Cluster, ns: str, name: str, *args: str, private: Path | None = None) -> None:
    cmd: list[str | Path] = [BIN / "ray", "start", *args, "--disable-usage-stats"]
    if private is not None:  # a tmpfs over `private`, in the node's own mount namespace
        cmd = ["sh", "-c", 'mount -t tmpfs -o size=256m tmpfs "$1" && shift && exec "$@"', "sh", private, *cmd]
    res = cluster.run(ns, *cmd, timeout=180)
    (cluster.logs / f"ray_start_{name}.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, f"ray start ({name}) failed:\n{res.stdout}\n{res.stderr}"


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = netns_skip_reason("creates network namespaces for a two-node Ray cluster")
    if reason:
        pytest.skip(reason)
    tmp_path = tmp_path_factory.mktemp("cluster")
    node_local = tmp_path / "node_local"
    node_local.mkdir()
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:4]}"
    head_ns, worker_ns = f"rt-head-{tag}", f"rt-work-{tag}"
    veth_head, veth_worker = f"rth{tag[-8:]}", f"rtw{tag[-8:]}"  # interface names: at most 15 characters
    home = tmp_path / "home"  # the head would write ~/.ray/auth_token: keep the real ~ out of it
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k not in ("PYTHONPATH", "HOME")}
    # No RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 here: it forbids a second node. The token is ours, passed
    # to every node and client: Ray 2.60 turns token auth on for `ray start --head`.
    env.update(HOME=str(home), PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex + uuid.uuid4().hex)
    helper = tmp_path / "cluster_helper.py"
    helper.write_text(HELPER)
    # Ray's unix sockets live under --temp-dir: pytest's tmp_path is too long for them.
    temp_dirs = [tempfile.mkdtemp(prefix="rt"), tempfile.mkdtemp(prefix="rt")]
    cluster = Cluster(head_ns, worker_ns, env, helper, tmp_path, node_local)
    try:
        _ip("netns", "add", head_ns)
        _ip("netns", "add", worker_ns)
        _ip("link", "add", veth_head, "netns", head_ns, "type", "veth", "peer", "name", veth_worker,
            "netns", worker_ns)
        for ns, dev, addr in ((head_ns, veth_head, HEAD_IP), (worker_ns, veth_worker, WORKER_IP)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        _ray_start(cluster, head_ns, "head", "--head", "--node-ip-address", HEAD_IP, "--port", str(GCS_PORT),
                   "--dashboard-host", HEAD_IP, "--dashboard-port", str(DASHBOARD_PORT), "--num-cpus", "0",
                   "--object-store-memory", str(200 * 2**20), "--temp-dir", temp_dirs[0])
        # `ip netns exec` runs in a mount namespace of its own: the tmpfs is seen by the worker node's Ray
        # processes only, and goes when they do.
        _ray_start(cluster, worker_ns, "worker", "--address", f"{HEAD_IP}:{GCS_PORT}", "--node-ip-address",
                   WORKER_IP, "--num-cpus", "2", "--object-store-memory", str(300 * 2**20),
                   "--temp-dir", temp_dirs[1], private=node_local)
        deadline = time.monotonic() + 120
        while True:
            nodes = cluster.helper_json("nodes", timeout=120)
            alive = sorted((n["ip"], n["cpus"]) for n in nodes if n["state"] == "ALIVE")
            if alive == [(HEAD_IP, 0), (WORKER_IP, 2)]:
                break
            assert time.monotonic() < deadline, f"the worker node did not join: {nodes}"
            time.sleep(2)
        yield cluster
    finally:
        try:
            for ns in (worker_ns, head_ns):
                stop_namespace(ns)
        finally:
            for ns in (worker_ns, head_ns):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            subprocess.run(["ip", "link", "del", veth_head], capture_output=True, timeout=30)
            for d in temp_dirs:
                shutil.rmtree(d, ignore_errors=True)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert head_ns not in left and worker_ns not in left, f"namespaces left behind: {left}"
        assert subprocess.run(["ip", "link", "show", veth_head], capture_output=True).returncode != 0


def _working_dir_package(tmp: Path) -> tuple[str, int]:
    """(package URI, zip size) of the project root under the runtime env's excludes, made by the same Ray
    functions `ray job submit` calls (with .gitignore applied, Ray's default)."""
    from ray._private.runtime_env import packaging

    excludes = yaml.safe_load((ROOT / RUNTIME_ENV).read_text())["excludes"]
    zip_path = tmp / "working_dir.zip"
    zip_path.unlink(missing_ok=True)
    quiet = logging.getLogger(packaging.__name__)  # one INFO line per ignore file it reads
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        uri = packaging.get_uri_for_directory(str(ROOT), include_gitignore=True, excludes=excludes)
        packaging.create_package(str(ROOT), zip_path, include_gitignore=True, excludes=excludes)
    finally:
        quiet.setLevel(level)
    return uri, zip_path.stat().st_size


def test_tiny_pipeline_runs_as_a_ray_job_on_two_nodes(two_node_cluster: Cluster, corpus: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow.tracking import MlflowClient

    cluster = two_node_cluster
    runs = tmp_path / "runs"
    # Absolute paths: the job runs in a copy of the working dir; both nodes share this machine's disk.
    pipe = tmp_path / "tiny_pipeline.yaml"
    pipe.write_text(yaml.safe_dump(pipeline_dict(corpus, runs)))

    uri_before, size = _working_dir_package(tmp_path)
    with capsys.disabled():
        print(f"\nworking-dir upload: {size / 1024:.0f} KiB ({uri_before})", flush=True)
    assert size < MAX_UPLOAD, f"working-dir upload is {size / 2**20:.1f} MiB: extend the excludes in {RUNTIME_ENV}"

    job_id = f"raytrain_it_{uuid.uuid4().hex[:8]}"
    # The head has no CPU, the worker 2: raytrain gives its one Train worker (2 - 1) / 1 = 1 CPU and leaves
    # one for Ray Data, so no `-o scaling.cpus_per_worker` is needed.
    sub = cluster.run(cluster.head_ns, BIN / "ray", "job", "submit", "--address",
                      f"http://{HEAD_IP}:{DASHBOARD_PORT}", "--submission-id", job_id, "--working-dir", ROOT,
                      "--runtime-env", RUNTIME_ENV, "--no-wait", "--", "raytrain", "run", pipe, "--verbose",
                      timeout=180, cwd=ROOT)
    assert sub.returncode == 0, f"ray job submit failed:\n{sub.stdout}\n{sub.stderr}"
    uri_after, _ = _working_dir_package(tmp_path)  # other edits to the checkout may land in between

    job = cluster.helper_json("job", job_id, str(JOB_DEADLINE_S), timeout=JOB_DEADLINE_S + 120)
    (tmp_path / "job.log").write_text(job["logs"])
    assert job["status"] == "SUCCEEDED", (f"job {job_id} ended {job['status']}: {job['message']}\n"
                                          f"--- job logs ---\n{job['logs'][-12000:]}")
    assert job["runtime_env"]["working_dir"] in (uri_before, uri_after), job["runtime_env"]

    summaries = list((runs / "it_sep").glob("*/summary.json"))
    assert len(summaries) == 1, summaries
    summary = json.loads(summaries[0].read_text())
    assert summary["status"] == "finished"
    assert {n: (e["status"], e["steps"]) for n, e in summary["phases"].items()} == {
        "a": ("finished", 8), "b": ("finished", 6)}

    client = MlflowClient(tracking_uri=summary["mlflow_uri"])
    assert summary["mlflow_uri"] == f"sqlite:///{runs / 'mlflow.db'}"
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted((r.info.run_name, r.info.status) for r in children) == [("a", "FINISHED"), ("b", "FINISHED")]

    # The driver runs on the head; Ray prefixes the output of a worker on another node with that node's ip
    # (--verbose: without it, Ray's worker log lines stay in the session's log files).
    worker_lines = [ln for ln in job["logs"].splitlines() if "(RayTrainWorker" in ln]
    assert worker_lines, f"no RayTrainWorker output in the job logs:\n{job['logs'][-4000:]}"
    assert all(f"ip={WORKER_IP}" in ln for ln in worker_lines), worker_lines[:5]


def _submit(cluster: Cluster, tmp_path: Path, *command: str | Path) -> dict[str, Any]:
    """`ray job submit` of `command` from the head; waits for the job and returns its info (logs in job.log)."""
    job_id = f"raytrain_it_{uuid.uuid4().hex[:8]}"
    sub = cluster.run(cluster.head_ns, BIN / "ray", "job", "submit", "--address",
                      f"http://{HEAD_IP}:{DASHBOARD_PORT}", "--submission-id", job_id, "--working-dir", ROOT,
                      "--runtime-env", RUNTIME_ENV, "--no-wait", "--", *command, timeout=180, cwd=ROOT)
    assert sub.returncode == 0, f"ray job submit failed:\n{sub.stdout}\n{sub.stderr}"
    job: dict[str, Any] = cluster.helper_json("job", job_id, str(JOB_DEADLINE_S), timeout=JOB_DEADLINE_S + 120)
    (tmp_path / "job.log").write_text(job["logs"])
    assert job["status"] == "SUCCEEDED", (f"job {job_id} ended {job['status']}: {job['message']}\n"
                                          f"--- job logs ---\n{job['logs'][-12000:]}")
    return job


def test_a_sweep_lists_trials_that_ran_on_another_node_through_storage(two_node_cluster: Cluster, corpus: Path,
                                                                       tmp_path: Path) -> None:
    """The sweep's driver runs on the head, its trials on the worker node, which writes its run folders to a
    disk the head cannot see; `storage:` (a folder both nodes share) holds Tune's state and the trials."""
    from mlflow.tracking import MlflowClient

    cluster = two_node_cluster
    runs, storage = cluster.node_local / f"runs_{uuid.uuid4().hex[:6]}", tmp_path / "storage"
    raw = pipeline_dict(corpus, runs)
    raw["storage"] = str(storage)
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}  # one store both nodes reach
    raw["phases"] = [{"name": "a", "max_steps": 4, "eval_every": 4, "checkpoint_every": 4},
                     {"name": "b", "init_from": "a", "max_steps": 4, "eval_every": 2, "checkpoint_every": 4}]
    sweep = {"phase": "b", "metric": "eval/si_sdri", "mode": "max", "num_samples": 1, "max_concurrent_trials": 1,
             "params": {"phases.b.optim.lr": {"grid": [1e-3, 3e-3]}}, "searcher": {"name": "grid"},
             "scheduler": {"name": "fifo"}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    job = _submit(cluster, tmp_path, "raytrain", "tune", tmp_path / "p.yaml", "--sweep", tmp_path / "s.yaml")

    local = sorted((runs / "it_sep" / "sweeps").glob(f"*/{'sweep.json'}"))
    assert len(local) == 1, f"no sweep.json on the head's disk:\n{job['logs'][-4000:]}"
    state = json.loads(local[0].read_text())
    remote = storage / "it_sep" / "sweeps" / local[0].parent.name
    assert state["status"] == "finished" and len(state["trials"]) == 2, state
    assert sorted(r["values"]["phases.b.optim.lr"] for r in state["trials"]) == [1e-3, 3e-3]
    for row in state["trials"]:
        assert (row["status"], row["steps"]) == ("finished", 4), (row, job["logs"][-4000:])
        assert row["metric"] is not None and row["dir"] == str(remote / "trials" / row["trial"])
        trial = json.loads((remote / "trials" / row["trial"] / "summary.json").read_text())
        assert trial["phases"]["b"]["status"] == "finished"
        assert trial["phases"]["b"]["best_checkpoint_uri"].startswith(str(remote / "trials" / row["trial"]))
        # The trial ran on the worker node: its own run folder is on that node's disk, not the head's.
        assert not (local[0].parent / "trials" / row["trial"] / "summary.json").exists()
    assert json.loads((remote / "sweep.json").read_text())["status"] == "finished"
    assert list((remote / "tune").glob("experiment_state*.json")), "Tune's state is not in storage"
    assert (remote / "base" / "summary.json").is_file()  # phase a ran once, for every trial

    client = MlflowClient(tracking_uri=raw["tracking"]["uri"])
    children = client.search_runs([client.get_run(state["mlflow_run_id"]).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{state['mlflow_run_id']}'")
    assert sorted(r.info.run_name for r in children if r.info.run_name.startswith("trial")) == sorted(
        f"trial {row['trial']}" for row in state["trials"])
