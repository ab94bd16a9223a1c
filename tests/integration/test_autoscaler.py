"""The autoscaler on cluster.yaml's node types: a job that asks for more than the head offers scales GPU
worker nodes up from zero, and idle workers go away after the configured idle timeout.

The autoscaler is Ray's own (v2, what `ray up` runs since Ray 2.50) with Ray's fake multi-node provider:
every "node" it launches is a raylet started on this machine by the autoscaler's monitor process. The node
types come from cluster.yaml through `raytrain.cluster.local_autoscaling_config`: the same type names, head
type, GPU counts ("GPU" resources Ray only counts: no GPU is needed) and `min_workers: 0`, shrunk for a
2-core machine: CPU counts divided by 8 (gpu_1x 8 -> 1, gpu_4x 48 -> 6), `max_workers` capped at 2 per type
(and 4 in all), `idle_timeout_minutes` 10 -> 0.1 (6 s), a 100 MiB object store per node, and the cloud parts
(node_config, docker, setup commands) dropped.

Network: the whole cluster (head, monitor, the raylets the autoscaler starts, the job's driver) runs in a
network namespace of the test's own with only `lo` up; the test checks with `ss` that nothing listens beyond
that namespace's loopback. The provider is Ray's `FakeMultiNodeProvider` loaded as an `external` provider
(the wheel lacks the `example.yaml` defaults that `type: fake_multinode` reads), with the head tagged with
cluster.yaml's head type instead of Ray's fixed "ray.head.default".

Runtime on a 2-core machine: 55-95 s (the head's `ray start` alone 20-40 s under load; scale-up 10-20 s,
as the monitor starts the two nodes one after the other; scale-down 7 s after the job frees them).
"""

from __future__ import annotations

import json
import os
import re
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
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FakeMultiNodeProvider
from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

from raytrain.cluster import load_cluster_yaml, local_autoscaling_config

from ._procs import netns_pids, netns_skip_reason, stop_namespace

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, python
GCS = "127.0.0.1:6379"  # the namespace's own loopback: no clash with any other Ray on this machine
IDLE_TIMEOUT_MINUTES = 0.1
CPU_DIVISOR, MAX_WORKERS_PER_TYPE, OBJECT_STORE = 8, 2, 100 * 2**20
SCENARIO_DEADLINE_S = 180


class NamespacedFakeProvider(FakeMultiNodeProvider):
    """Ray's fake multi-node provider with the head tagged as the config's head type. Ray's own provider tags
    it "ray.head.default", a type cluster.yaml does not have. Imported by the autoscaler's monitor process
    (PYTHONPATH is the repository root)."""

    def __init__(self, provider_config: dict[str, Any], cluster_name: str) -> None:
        super().__init__(provider_config, cluster_name)
        self._nodes[self._head_node_id]["tags"][TAG_RAY_USER_NODE_TYPE] = provider_config["head_node_type"]


# The job: runs inside the namespace as a Ray driver. Records the autoscaler's state (GCS's cluster status,
# which the v2 autoscaler writes) while it asks for a placement group with one bundle per GPU worker type,
# runs a task in each bundle, hands `ss` time through `busy`/`go` files, frees the group and waits for the
# workers to go.
SCENARIO = r'''
import json, os, sys, time
import ray
from ray.autoscaler.v2.sdk import get_cluster_status
from ray.core.generated.gcs_pb2 import GcsNodeInfo
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

gcs, work, bundles, head_type = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
deadline = time.monotonic() + float(sys.argv[5])
t0 = time.monotonic()
out = {"timeline": [], "marks": {}}

def now():
    return round(time.monotonic() - t0, 2)

def node(n, state):
    usage = n.resource_usage
    return {"type": n.ray_node_type_name, "instance": n.instance_id, "node_id": n.node_id, "state": state,
            "status": n.node_status, "ip": n.ip_address,
            "total": {u.resource_name: u.total for u in usage.usage} if usage else {},
            "idle_ms": usage.idle_time_ms if usage else None}

def snap(phase):
    st = get_cluster_status(gcs)
    rec = {"t": now(), "phase": phase,
           "nodes": [node(n, "active") for n in st.active_nodes] + [node(n, "idle") for n in st.idle_nodes],
           "pending": [{"type": n.ray_node_type_name, "instance": n.instance_id, "status": n.node_status}
                       for n in st.pending_nodes],
           "launches": [{"type": r.ray_node_type_name, "count": r.count, "state": str(r.state)}
                        for r in st.pending_launches],
           "failed": [f"{r.ray_node_type_name}: {r.details}" for r in st.failed_launches],
           # nodes that are gone: those the autoscaler terminated show up here too ("NodeTerminated")
           "dead": [{"type": n.ray_node_type_name, "instance": n.instance_id, "detail": n.failure_detail}
                    for n in st.failed_nodes]}
    out["timeline"].append(rec)
    return rec

def workers(rec):
    return [n for n in rec["nodes"] if n["type"] != head_type] + rec["pending"] + rec["launches"]

def dump():
    with open(os.path.join(work, "scenario.json"), "w") as f:
        json.dump(out, f)

@ray.remote
def probe():
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "node_type": os.environ.get("RAY_NODE_TYPE_NAME"),
            "gpus": ctx.get_accelerator_ids().get("GPU", []), "ip": ray.util.get_node_ip_address()}

try:
    while not any(n["type"] == head_type for n in snap("start")["nodes"]):  # the autoscaler has reported
        assert time.monotonic() < deadline, "the autoscaler never reported the head"
        time.sleep(0.5)
    ray.init(address=gcs, logging_level="WARNING", log_to_driver=False)
    snap("before")
    out["marks"]["demand"] = now()
    pg = placement_group(bundles, strategy="STRICT_SPREAD")
    while not ray.wait([pg.ready()], timeout=0.5)[0]:
        snap("scale-up")
        assert time.monotonic() < deadline, "the placement group was never placed"
    out["marks"]["placed"] = now()
    out["tasks"] = ray.get([probe.options(
        num_cpus=b.get("CPU", 0), num_gpus=b.get("GPU", 0),
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)).remote()
        for i, b in enumerate(bundles)])
    snap("busy")
    open(os.path.join(work, "busy"), "w").close()
    while not os.path.exists(os.path.join(work, "go")):
        assert time.monotonic() < deadline, "the test never said go"
        time.sleep(0.2)
    snap("busy")
    remove_placement_group(pg)
    out["marks"]["released"] = now()
    while workers(snap("scale-down")):
        assert time.monotonic() < deadline, "the worker nodes never went away"
        time.sleep(0.5)
    out["marks"]["gone"] = now()
    reasons = GcsNodeInfo.DESCRIPTOR.fields_by_name["death_info"].message_type.enum_types_by_name["Reason"]
    reason = lambda number: reasons.values_by_number[number].name
    out["ray_nodes"] = [{"NodeID": n["NodeID"], "Alive": n["Alive"], "NodeManagerAddress": n["NodeManagerAddress"],
                         "DeathReason": reason(n["DeathReason"]), "DeathReasonMessage": n["DeathReasonMessage"]}
                        for n in ray.nodes()]
finally:
    dump()
'''


def _listeners(ns: str | None) -> list[tuple[str, str]]:
    """(local address, process info) of every listening TCP / bound UDP socket, in `ns` or in this namespace."""
    cmd = ["ss", "-ltunpH"]
    res = subprocess.run(["ip", "netns", "exec", ns, *cmd] if ns else cmd, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines() if line.strip()]
    return [(r[4], " ".join(r[6:])) for r in rows]


@dataclass
class FakeCluster:
    ns: str
    env: dict[str, str]
    work: Path
    temp_dir: str

    def run(self, *cmd: str | Path, timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns, *map(str, cmd)], env=self.env, capture_output=True,
                              text=True, timeout=timeout, **kw)

    def popen(self, *cmd: str | Path, log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as f:
            return subprocess.Popen(["ip", "netns", "exec", self.ns, *map(str, cmd)], env=self.env, stdout=f,
                                    stderr=subprocess.STDOUT)

    def logs_tail(self, chars: int = 6000) -> str:
        logs = sorted(Path(self.temp_dir).glob("session_*/logs/monitor*"))
        text = "".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-chars:]}\n" for p in logs)
        return text or "(no monitor logs)"


@pytest.fixture
def namespace(tmp_path: Path) -> Iterator[FakeCluster]:
    reason = netns_skip_reason("runs the autoscaler's cluster in a network namespace of its own", ("ip", "ss"))
    if reason:
        pytest.skip(reason)
    ns = f"rt-as-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    home = tmp_path / "home"  # `ray start --head` writes ~/.ray/auth_token: keep the real ~ out of it
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in ("PYTHONPATH", "HOME")}
    env.update(HOME=str(home), PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]), PYTHONPATH=str(ROOT),
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex + uuid.uuid4().hex,
               # one node's view: every Ray address on 127.0.0.1 (the fake provider's nodes never `ray start`,
               # so the multi-node refusal of this switch does not apply to them)
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    temp_dir = tempfile.mkdtemp(prefix="rtas")  # Ray's unix sockets: pytest's tmp_path is too long for them
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=30)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, capture_output=True, timeout=30)
        yield FakeCluster(ns, env, tmp_path, temp_dir)
    finally:
        try:
            stop_namespace(ns)
        finally:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            shutil.rmtree(temp_dir, ignore_errors=True)
        assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_gpu_workers_scale_up_from_zero_and_go_after_the_idle_timeout(namespace: FakeCluster) -> None:
    cluster = namespace
    source = load_cluster_yaml(ROOT / "cluster.yaml")
    head_type = source["head_node_type"]
    provider = {"type": "external", "module": f"{__name__}.{NamespacedFakeProvider.__name__}",
                "head_node_type": head_type, "head_node_id": FAKE_HEAD_NODE_ID, "gcs_address": GCS,
                "launch_multiple": True, "disable_node_updaters": True, "disable_launch_config_check": True}
    config = local_autoscaling_config(source, provider=provider, idle_timeout_minutes=IDLE_TIMEOUT_MINUTES,
                                      cpu_divisor=CPU_DIVISOR, max_workers_per_type=MAX_WORKERS_PER_TYPE,
                                      object_store_memory=OBJECT_STORE)
    types = config["available_node_types"]
    assert set(types) == set(source["available_node_types"])
    gpu_types = {n: t["resources"] for n, t in types.items() if t["resources"].get("GPU")}
    assert len(gpu_types) >= 2 and all(t.get("min_workers") == 0 for n, t in types.items() if n in gpu_types)
    # A job that needs every GPU type once: one bundle per type, each a whole node of that type, on distinct
    # nodes. The head (CPU: 0) can hold none of it.
    bundles = [{k: v for k, v in r.items() if k in ("CPU", "GPU")} for r in gpu_types.values()]
    (cluster.work / "autoscaling.yaml").write_text(yaml.safe_dump(config))
    (cluster.work / "scenario.py").write_text(SCENARIO)

    head = types[head_type]["resources"]
    env = dict(cluster.env, RAY_FAKE_CLUSTER="1", RAY_enable_autoscaler_v2="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
               RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID, RAY_NODE_TYPE_NAME=head_type)
    started = time.monotonic()
    res = subprocess.run(
        ["ip", "netns", "exec", cluster.ns, BIN / "ray", "start", "--head", "--port", GCS.rsplit(":", 1)[1],
         "--node-ip-address", "127.0.0.1", "--num-cpus", str(head.get("CPU", 0)), "--num-gpus",
         str(head.get("GPU", 0)), "--object-store-memory", str(OBJECT_STORE), "--include-dashboard", "false",
         "--autoscaling-config", cluster.work / "autoscaling.yaml", "--temp-dir", cluster.temp_dir,
         "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, f"ray start --head failed:\n{res.stdout}\n{res.stderr}"
    head_up = time.monotonic() - started

    log = cluster.work / "scenario.log"
    proc = cluster.popen(BIN / "python", cluster.work / "scenario.py", GCS, cluster.work, json.dumps(bundles),
                         head_type, str(SCENARIO_DEADLINE_S), log=log)
    launched = time.monotonic()
    try:
        while not (cluster.work / "busy").exists():
            assert proc.poll() is None, f"the job ended early:\n{log.read_text()[-6000:]}\n{cluster.logs_tail()}"
            assert time.monotonic() - launched < SCENARIO_DEADLINE_S, log.read_text()[-6000:]
            time.sleep(0.3)
        # Worker nodes up: every socket of the cluster is in its namespace, on its loopback.
        inside, outside = _listeners(cluster.ns), _listeners(None)
        (cluster.work / "go").touch()
        proc.wait(timeout=SCENARIO_DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    elapsed = time.monotonic() - started
    out_path = cluster.work / "scenario.json"
    diag = f"{log.read_text()[-6000:]}\n{cluster.logs_tail()}"
    assert proc.returncode == 0 and out_path.exists(), f"the job failed:\n{diag}"
    out = json.loads(out_path.read_text())
    timeline, marks = out["timeline"], out["marks"]
    hosts = sorted({a.rsplit(":", 1)[0] for a, _ in inside})
    print(f"\nautoscaler test: head up in {head_up:.0f} s, {elapsed:.0f} s in all; job marks (s): {marks}; "
          f"{len(inside)} sockets listen in the namespace, on {hosts}")

    # Nothing listens outside the namespace; inside it, only on loopback (or on wildcards, which in a namespace
    # with only `lo` are loopback too).
    ns_pids = {str(p) for p in netns_pids(cluster.ns)}
    assert not [(a, p) for a, p in outside if any(f"pid={pid}," in p for pid in ns_pids)], outside
    assert inside, "no listening socket seen inside the namespace"
    assert set(hosts) <= {"127.0.0.1", "[::1]", "0.0.0.0", "*", "[::]", "[::ffff:127.0.0.1]"}, inside
    links = subprocess.run(["ip", "-n", cluster.ns, "-o", "link"], capture_output=True, text=True).stdout
    assert [ln.split(":")[1].strip() for ln in links.splitlines()] == ["lo"], links

    def workers(rec: dict[str, Any]) -> list[dict[str, Any]]:
        return [n for n in rec["nodes"] if n["type"] != head_type]

    # Before the job: the head alone (of cluster.yaml's head type), no worker up or pending. (The head's own
    # instance may still be listed as pending right after it joined: seen once in a full suite run.)
    (before,) = [r for r in timeline if r["phase"] == "before"]
    assert [n["type"] for n in before["nodes"]] == [head_type], before
    assert not [p for p in before["pending"] if p["type"] != head_type], before
    assert not (before["launches"] or before["dead"]), before

    # Scale-up from zero: the autoscaler asked for one node of each GPU type while there was no worker, and
    # exactly those came up, with cluster.yaml's (shrunk) resources.
    assert not [r["failed"] for r in timeline if r["failed"]], timeline
    from_zero = [r for r in timeline if r["phase"] == "scale-up" and not workers(r)]
    asked = {x["type"] for r in from_zero for x in r["launches"] + r["pending"]}
    assert asked == set(gpu_types), from_zero
    busy = [r for r in timeline if r["phase"] == "busy"][-1]
    assert sorted(n["type"] for n in workers(busy)) == sorted(gpu_types), busy
    assert {n["instance"] for r in timeline for n in workers(r)} == {n["instance"] for n in workers(busy)}
    for n in workers(busy):
        want = gpu_types[n["type"]]
        got = {k: n["total"].get(k) for k in ("CPU", "GPU", "object_store_memory")}
        assert got == {"CPU": want["CPU"], "GPU": want["GPU"], "object_store_memory": OBJECT_STORE}, n
        assert n["ip"] == "127.0.0.1", n
    # The job's tasks ran there: bundle i on the node of GPU type i, seeing that type's GPUs.
    by_id = {n["node_id"]: n["type"] for n in workers(busy)}
    for name, task in zip(gpu_types, out["tasks"], strict=True):
        assert (by_id.get(task["node_id"]), task["node_type"]) == (name, name), (task, busy)
        assert len(task["gpus"]) == gpu_types[name]["GPU"] and task["ip"] == "127.0.0.1", task

    # Scale-down: the workers stay while idle for less than idle_timeout_minutes, then the autoscaler drains
    # and removes them as idle.
    idle_s = IDLE_TIMEOUT_MINUTES * 60
    down = [r for r in timeline if r["phase"] == "scale-down"]
    early = [r for r in down if r["t"] < marks["released"] + idle_s - 1]
    assert early and all(sorted(n["type"] for n in workers(r)) == sorted(gpu_types) for r in early), down
    last_seen = [r for r in down if workers(r)][-1]
    assert min(n["idle_ms"] or 0 for n in workers(last_seen)) >= (idle_s - 1.5) * 1000, last_seen
    assert marks["gone"] - marks["released"] < idle_s + 45, marks
    final = down[-1]
    assert [n["type"] for n in final["nodes"]] == [head_type] and not final["pending"], final
    assert sorted(n["type"] for n in final["dead"]) == sorted(gpu_types), final
    dead = [n for n in out["ray_nodes"] if n["NodeID"] in by_id]
    assert len(dead) == len(by_id) and not any(n["Alive"] for n in dead), out["ray_nodes"]
    for n in dead:
        assert n["DeathReason"] == "AUTOSCALER_DRAIN_IDLE", n
        idle_for = re.search(r"idle for ([0-9.]+) seconds", n["DeathReasonMessage"])
        assert idle_for and float(idle_for.group(1)) > idle_s, n
