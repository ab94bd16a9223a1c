"""The torch.distributed set-up of a phase's workers, as Ray Train's `TorchConfig` does it, with no torch in
the Train controller.

Ray Train sends the backend config to each phase's controller, a new process, and `ray.train.torch.config`
imports torch at its top: ~1.4 s of every phase's start spent importing torch where no tensor is ever
made. Here the config and the controller-side steps import nothing heavy; what needs torch runs in the
workers (which import it anyway), through Ray's own functions. Same process group, same environment
variables, same shutdown as `TorchConfig`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ray.train.backend import Backend, BackendConfig


class _CudaDevice:
    """`TorchConfig`'s context around the train loop (each worker's default CUDA device is its own), imported in
    the worker, where torch is."""

    def __enter__(self) -> None:
        from ray.train.torch.config import TorchConfigContextManager

        TorchConfigContextManager().__enter__()

    def __exit__(self, *exc: object) -> None:
        return None


@dataclass
class LeanTorchConfig(BackendConfig):
    """`TorchConfig`'s fields and behaviour (the `env://` init method); `TorchTrainer` takes it as
    `torch_config` and fills `backend` (gloo on CPU, nccl on GPU)."""

    backend: str | None = None
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type[Backend]:
        return _LeanTorchBackend

    @property
    def train_func_context(self) -> type[_CudaDevice]:
        return _CudaDevice

    @property
    def framework(self) -> Any:
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH


def _distributed_env(addr: str, port: int) -> None:
    """The rendezvous address, then the ranks and sizes torch.distributed reads (`env://`)."""
    from ray.train.torch.config import _set_torch_distributed_env_vars

    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)
    _set_torch_distributed_env_vars()


def _init_process_group(**kwargs: Any) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(**kwargs)


def _shutdown(destroy_process_group: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)


class _LeanTorchBackend(Backend):
    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group: Any, backend_config: Any) -> None:
        import ray
        from ray.train._internal.utils import get_address_and_port

        backend = backend_config.backend or (
            "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo")
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_distributed_env, addr=addr, port=port)
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(i, _init_process_group, backend=backend, world_rank=i,
                                                   world_size=n, init_method="env://",
                                                   timeout_s=backend_config.timeout_s) for i in range(n)])

    def on_shutdown(self, worker_group: Any, backend_config: Any) -> None:
        import logging

        import ray
        from ray._private import ray_constants
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import (
            DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
        )

        futures = worker_group.execute_async(_shutdown, destroy_process_group=len(worker_group) > 1)
        timeout_s = ray_constants.env_integer(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                              DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            logging.getLogger(__name__).warning("torch process group shutdown timed out after %s s", timeout_s)
