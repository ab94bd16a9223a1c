"""Pause points: a testing hook that stops a run at a known step, trial or shard until it is killed.

Kill-and-resume tests used to poll a run's progress and race to kill it: on a fast machine the run ended
first, on a slow one the test timed out. With ``RAYTRAIN_PAUSE_AT=KIND=N`` in a run's environment (Ray
workers of a local Ray started by that run inherit it), the first process that reaches point ``KIND``
with count ``N`` writes the marker ``MARKER_DIR/.paused_at_KIND_N`` (its content: that process's pid) and
sleeps until it is killed, so the test waits for the marker and kills a run that cannot have moved past
that point. Once the marker exists the point does nothing: a resumed run goes on past it.

The points:

- ``step=N``: rank 0 of a train phase, after step ``N`` and its checkpoint if it saves one (marker in the
  phase folder; the Ray Train controller goes on registering the checkpoint meanwhile);
- ``trial=N``: a sweep's trial that is the N-th to start (the N-th trial folder with a ``starts.log``),
  before it trains (marker in the sweep folder);
- ``shard=I``: a prep worker about to write chunk ``I``, so that shard is never written (marker in the
  output folder; the other workers go on).

Unset, the variable costs one lookup per process.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

ENV = "RAYTRAIN_PAUSE_AT"
KINDS = ("step", "trial", "shard")


@functools.cache
def pause_at() -> tuple[str, int] | None:
    """(kind, n) from ``RAYTRAIN_PAUSE_AT``, read once per process; None when it is unset or empty."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    kind, _, n = value.partition("=")
    if kind not in KINDS or not n.strip().isdigit():
        raise ValueError(f"{ENV}={value!r}: expected KIND=N with KIND one of {', '.join(KINDS)} (a testing hook)")
    return kind, int(n)


def marker_path(kind: str, n: int, marker_dir: Path) -> Path:
    return Path(marker_dir) / f".paused_at_{kind}_{n}"


def pause_point(kind: str, n: int, marker_dir: Path) -> None:
    """Block for good if ``RAYTRAIN_PAUSE_AT`` names ``kind=n`` and no process has paused there yet."""
    if pause_at() != (kind, n):
        return
    marker = marker_path(kind, n, marker_dir)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{os.getpid()}\n")
    try:
        os.link(tmp, marker)  # fails if another process claimed the point first: only one pauses
    except FileExistsError:
        return
    finally:
        tmp.unlink()
    print(f"{ENV}: paused at {kind}={n} (pid {os.getpid()}) until killed", file=sys.stderr, flush=True)
    while True:
        time.sleep(1)
