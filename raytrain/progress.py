"""Driver side of rank 0's events: a progress bar on a terminal, log lines otherwise,
and the metrics into MLflow. Workers `put_nowait` small dicts on a Ray queue."""

from __future__ import annotations

import sys
import threading
from typing import Any


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


_QUEUES: dict[tuple[str, str], Any] = {}


def shared_queue() -> Any:
    """The driver's event queue actor, one per Ray cluster and job, reused by every phase: an actor is a
    process to start (about a second of a small machine's CPU at every phase's start)."""
    import ray
    from ray.util.queue import Queue

    ctx = ray.get_runtime_context()
    key = (ctx.get_node_id(), ctx.get_job_id())
    if key not in _QUEUES:
        _QUEUES.clear()  # a queue of an earlier Ray (shut down since) is gone with it
        _QUEUES[key] = Queue(actor_options={"num_cpus": 0})
    return _QUEUES[key]


class EventPump:
    """Context manager: drains the shared queue (`shared_queue`) in a thread while a phase runs; events of
    another phase (a late one of the phase before) are dropped."""

    def __init__(self, phase: str, max_steps: int, tracker: Any, run_id: str | None,
                 progress: bool | None = None, poll_s: float = 1.0) -> None:
        self.phase, self.max_steps, self.tracker, self.run_id = phase, max_steps, tracker, run_id
        self.queue = shared_queue()
        self._drain(keep=False)  # nothing of an earlier phase is shown as this one's
        self.tty = sys.stderr.isatty() if progress is None else progress
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="raytrain-events", daemon=True)
        self._bar: Any = None
        self.last: dict[str, Any] = {}

    def __enter__(self) -> EventPump:
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.max_steps, desc=self.phase, unit="step", dynamic_ncols=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        if self._bar is not None:
            self._bar.close()

    def _loop(self) -> None:
        # A long poll (one RPC per event or per `poll_s`), not a busy poll: on a small machine every
        # wake-up of the driver and the queue actor is CPU taken from the training worker.
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self.handle(self.queue.get(block=True, timeout=self.poll_s))
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - queue gone at shutdown
                if self._stop.wait(self.poll_s):
                    return
                continue
            self._drain()

    def _drain(self, keep: bool = True) -> None:
        try:
            items = self.queue.get_nowait_batch(self.queue.qsize())
        except Exception:  # noqa: BLE001 - queue gone at shutdown
            return
        for ev in items if keep else ():
            self.handle(ev)

    def handle(self, ev: dict[str, Any]) -> None:
        if ev.get("phase", self.phase) != self.phase:
            return
        kind = ev.get("kind")
        if kind == "progress":
            self.last = ev
            m = ev["metrics"]
            lrs = {f"lr/{k}": v for k, v in ev.get("group_lrs", {}).items()}  # one per param group, if several
            self.tracker.metrics(self.run_id, {**m, "lr": ev["lr"], **lrs, "steps_per_s": ev["rate"]}, ev["step"])
            eta = (self.max_steps - ev["step"]) / ev["rate"] if ev["rate"] > 0 else 0.0
            if self._bar is not None:
                self._bar.n = ev["step"]
                self._bar.set_postfix(loss=f"{m['train/loss']:.4g}", lr=f"{ev['lr']:.2e}", refresh=False)
                self._bar.refresh()
            else:
                print(f"[{self.phase}] step {ev['step']}/{self.max_steps} loss {m['train/loss']:.4f} "
                      f"lr {ev['lr']:.2e} {ev['rate']:.2f} steps/s eta {_fmt_eta(eta)}", flush=True)
        elif kind == "eval":
            self.tracker.metrics(self.run_id, ev["metrics"], ev["step"])
            text = " ".join(f"{k}={v:.3f}" for k, v in ev["metrics"].items())
            self._write(f"[{self.phase}] eval at step {ev['step']}: {text}")
        elif kind == "log":
            self._write(f"[{self.phase}] {ev['message']}")

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)
