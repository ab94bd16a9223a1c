"""Starting a Ray head of a test's own (`local_head`) and stopping the processes of a Ray a test started,
without `ray stop` (that stops every Ray on the machine, other tests' included)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from raytrain.jobs import RUNS_DIR_ENV

BIN = Path(sys.executable).parent  # the venv's bin: `ray`, `raytrain`, python


def netns_pids(ns: str) -> list[int]:
    """Processes of network namespace `ns`."""
    res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []


def stop_all(find: Callable[[], list[int]], what: str, timeout: float = 60) -> None:
    """SIGTERM every process `find()` lists, SIGKILL what is left after 10 s, until none is left."""
    start = time.monotonic()
    while pids := find():
        elapsed = time.monotonic() - start
        assert elapsed < timeout, f"processes of {what} still alive: {pids}"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM if elapsed < 10 else signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def netns_skip_reason(what: str, tools: tuple[str, ...] = ("ip",)) -> str | None:
    """Why a test that runs Ray in network namespaces of its own (`what` it does there) cannot run here, or None."""
    if os.geteuid() != 0:
        return f"needs root: {what}"
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"needs {' and '.join(f'`{t}`' for t in missing)} (iproute2) for network namespaces"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return None


def stop_namespace(ns: str, timeout: float = 60) -> None:
    """Every process in network namespace `ns` (Ray's daemons, drivers, workers) stopped."""
    stop_all(lambda: netns_pids(ns), f"namespace {ns}", timeout)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _marked(marker: str) -> list[int]:
    """Live processes whose environment holds `marker`: the Ray this test started, its workers and its jobs'
    drivers (all inherit `ray start`'s environment). Not `ray stop`: that stops every Ray on the machine."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if marker.encode() in (d / "environ").read_bytes() and \
                    (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(int(d.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


def _stop(marker: str, timeout: float = 60) -> None:
    stop_all(lambda: _marked(marker), "the test's Ray", timeout)


@contextmanager
def local_head(tmp_path: Path) -> Iterator[tuple[dict[str, str], str, Path]]:
    """`ray start --head` on 127.0.0.1 with 2 CPUs and the dashboard (the job server): (env, address, temp dir).
    Stopped (every process of it) on exit."""
    marker = uuid.uuid4().hex  # in the environment of every process of this Ray (RAYTRAIN_TEST_HEAD)
    home = tmp_path / "home"  # the head writes ~/.ray/auth_token: keep the real ~ out of it
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_")) and k not in ("PYTHONPATH", "HOME", RUNS_DIR_ENV)}
    # Loopback only (a single node); Ray 2.60 turns token auth on for `ray start --head`: the token is ours.
    env.update(HOME=str(home), PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=uuid.uuid4().hex + uuid.uuid4().hex, RAYTRAIN_TEST_HEAD=marker)
    temp = Path(tempfile.mkdtemp(prefix="rt"))  # Ray's unix sockets: pytest's tmp_path is too long for them
    gcs, dash, client, agent, agent_grpc, env_agent, metrics = _free_ports(7)
    try:
        res = subprocess.run([BIN / "ray", "start", "--head", "--num-cpus", "2", "--include-dashboard", "true",
                              "--dashboard-host", "127.0.0.1", "--port", str(gcs), "--dashboard-port", str(dash),
                              "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
                              "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port",
                              str(env_agent), "--metrics-export-port", str(metrics),
                              "--object-store-memory", str(200 * 2**20), "--temp-dir", str(temp),
                              "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
        (tmp_path / "ray_start.log").write_text(res.stdout + res.stderr)
        assert res.returncode == 0, f"ray start failed:\n{res.stdout}\n{res.stderr}"
        yield env, f"http://127.0.0.1:{dash}", temp
    finally:
        _stop(f"RAYTRAIN_TEST_HEAD={marker}")
        shutil.rmtree(temp, ignore_errors=True)
