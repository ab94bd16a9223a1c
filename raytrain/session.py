"""Ray for the driver: start or join it, and size a phase's workers."""

from __future__ import annotations

import logging
import os
from typing import Any

from raytrain.config.schema import PhaseBase, PipelineConfig
from raytrain.logs import quiet_logger


def _ray_env() -> None:
    """What raytrain sets before it starts or joins any Ray: every worker's log lines, Ray Train V2."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def local_ray_env() -> None:
    """The environment of a one-node Ray that raytrain starts (set before `ray.init`; a test that starts
    its own local Ray calls this first, so it runs as a user's)."""
    _ray_env()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # A one-node Ray has no node that can be drained or preempted, and each idle Ray actor wakes up 100
    # times a second: leave Ray Train's preemption watcher (an actor at every phase's start) out.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


_VERBOSE = False


def set_verbose(on: bool) -> None:
    """`--verbose`: the next `ray_init` forwards Ray's worker log lines (`(RayTrainWorker pid=..., ip=...) ...`)
    to the driver's output. Without it they stay in the session's log files (`<ray temp>/session_latest/logs`);
    a failed phase still names its worker's error (`PipelineError`), and progress comes from the driver."""
    global _VERBOSE
    _VERBOSE = on


def ray_init(num_cpus: int | None = None) -> None:
    """Start (or join) Ray. A local Ray that raytrain starts listens on loopback only; `num_cpus` caps it
    (default: every CPU of the machine)."""
    import ray

    # Ray Train's controller sees that the workers finished (or failed) at its next poll of them, every 2 s
    # by default, and a phase's end takes several polls: ~6 s between the last step and `fit()` returning,
    # paid by every phase. A poll is one small RPC per worker; at 0.5 s a phase ends ~4 s sooner.
    # (Ray Train passes this variable on to the controller, also on a cluster raytrain joins.)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if ray.is_initialized():
        return
    dashboard: dict[str, Any] = {}
    if os.environ.get("RAY_ADDRESS"):
        _ray_env()
    else:
        local_ray_env()
        dashboard = _own_state_api()
    # The dashboard (on 127.0.0.1) serves the State API that Ray Train's placement-group cleaner polls. Ray 2.60
    # turns token authentication on for a local Ray (kept) and says so at every start: not a line for each run.
    # (RAY_AUTH_MODE=token would say it without the line, but Ray reads it when imported: too late here.)
    with quiet_logger("ray._private.authentication.authentication_token_setup"):
        try:
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=True,
                     log_to_driver=_VERBOSE, logging_level=logging.WARNING, configure_logging=True, num_cpus=num_cpus,
                     **dashboard)
        finally:
            if dashboard:  # Ray's processes have it; this process's children (`ray job submit`...) must not
                os.environ.pop("RAY_API_SERVER_ADDRESS", None)


def _own_state_api() -> dict[str, Any]:
    """The dashboard port of a local Ray about to start, also named in RAY_API_SERVER_ADDRESS, which its
    workers inherit. Ray Train's placement-group cleaner (an actor) finds the State API by that variable;
    without it, it looks for a Ray on this machine and, when it finds two (another run's, a test session's),
    fails at every poll, so a dead trial's placement group is never removed and a sweep waits forever."""
    import socket

    if os.environ.get("RAY_API_SERVER_ADDRESS"):  # the user's: theirs to keep
        return {}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # read by the raylet `ray.init` starts
    return {"dashboard_host": "127.0.0.1", "dashboard_port": port}


def quiet_data_context() -> Any:
    """This process's Ray Data context, without Ray Data's progress bars, start and end lines (raytrain prints its
    own progress) and without its warning that the bars are off, which it logs once per process."""
    from ray.data import DataContext
    from ray.util.debug import log_once

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    log_once("ray_data_progress_manager_disabled")  # the key of that warning (ray.data._internal.progress)
    if not _VERBOSE:  # "Dataset ... execution finished in 0.06 seconds" after each read (--verbose shows it)
        logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)
    return ctx


def worker_resources(pipe: PipelineConfig, phase: PhaseBase) -> tuple[bool, dict[str, float], int | None]:
    """(use_gpu, resources_per_worker, torch threads). Leaves CPU free for Ray Data: two workers
    that each reserve a whole CPU on a 2-CPU machine starve the read tasks and hang."""
    import ray

    sc = pipe.phase_scaling(phase)
    total = ray.cluster_resources()
    use_gpu = sc.use_gpu if isinstance(sc.use_gpu, bool) else total.get("GPU", 0) > 0
    if sc.cpus_per_worker is not None:
        cpus = sc.cpus_per_worker
    elif use_gpu:
        cpus = 1.0
    else:
        cpus = max(0.25, min(1.0, (total.get("CPU", 1) - 1) / sc.num_workers))
    threads = sc.threads_per_worker or max(1, (os.cpu_count() or 1) // sc.num_workers)
    return use_gpu, {"CPU": cpus}, threads
