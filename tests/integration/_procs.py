"""Stopping the processes of a Ray a test started, without `ray stop` (that stops every Ray on the machine,
other tests' included)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable


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
