"""Stopping the processes of a Ray a test started, without `ray stop` (that stops every Ray on the machine,
other tests' included)."""

from __future__ import annotations

import os
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
