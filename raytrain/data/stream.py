"""Worker side: an endless, deterministic, resumable stream of training batches.

Several train datasets are interleaved batch by batch with their weights; the
choice for pick k depends only on (seed, k), and each source records its epoch and
the batches it has consumed, so a resumed run skips exactly what was already seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from raytrain.data.collate import pad_collate
from raytrain.data.transforms import TRANSFORMS


def build_transforms(specs: list[dict[str, Any]], sample_rate: int, seed: int) -> list[Any]:
    return [TRANSFORMS.get(s["name"])(**s.get("args", {}), sample_rate=sample_rate, seed=seed) for s in specs]


def to_model_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pre-mixed rows (mix, s1, s2 …) -> mix (B, T), sources (B, S, T), lengths (B,)."""
    src_keys = sorted(k for k in batch if k[:1] == "s" and k[1:].isdigit())
    if src_keys:
        # numpy, not torch.stack: this runs in Ray Data's collate thread, and a torch op there
        # starts a second OpenMP team that fights the training thread's team for the cores.
        batch["sources"] = torch.from_numpy(np.stack([batch.pop(k).numpy() for k in src_keys], axis=1))
        for k in src_keys:
            batch.pop(f"{k}_lengths", None)
    return batch


class Collate(NumpyBatchCollateFn):
    """numpy batch -> transforms (with the epoch) -> padded tensors."""

    def __init__(self, transforms: list[Any], epoch: int) -> None:
        self.transforms = transforms
        self.epoch = epoch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        for t in self.transforms:
            batch = t(batch, epoch=self.epoch)
        return to_model_batch(pad_collate(batch))


class BatchStream:
    """Endless batches from weighted sources. `position()` / `position=` make it resumable."""

    def __init__(self, shards: dict[str, Any], weights: dict[str, float], *, batch_size: int,
                 transforms: list[Any], seed: int, shuffle_buffer: int = 0,
                 position: dict[str, Any] | None = None, prefetch: int = 2) -> None:
        self.shards, self.names = shards, list(shards)
        w = np.array([weights[n] for n in self.names], dtype=np.float64)
        self.p = w / w.sum()
        self.batch_size, self.transforms, self.seed = batch_size, transforms, seed
        self.shuffle_buffer, self.prefetch = shuffle_buffer, prefetch
        pos = position or {}
        self.picks: int = pos.get("picks", 0)
        self.epoch: dict[str, int] = {n: pos.get("epoch", {}).get(n, 0) for n in self.names}
        self.consumed: dict[str, int] = {n: pos.get("consumed", {}).get(n, 0) for n in self.names}
        self._iters: dict[str, Iterator[dict[str, torch.Tensor]]] = {}

    def position(self) -> dict[str, Any]:
        return {"picks": self.picks, "epoch": dict(self.epoch), "consumed": dict(self.consumed)}

    def _open(self, name: str) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.epoch[name]
        kwargs: dict[str, Any] = {}
        if self.shuffle_buffer:
            kwargs = {"local_shuffle_buffer_size": self.shuffle_buffer,
                      "local_shuffle_seed": self.seed * 100_003 + epoch}
        it = iter(self.shards[name].iter_torch_batches(
            batch_size=self.batch_size, collate_fn=Collate(self.transforms, epoch), drop_last=True,
            prefetch_batches=self.prefetch, **kwargs))
        for _ in range(self.consumed[name]):  # resume mid-epoch: skip what was already trained on
            next(it)
        return it

    def _next_from(self, name: str) -> dict[str, torch.Tensor]:
        for _attempt in range(2):
            if name not in self._iters:
                self._iters[name] = self._open(name)
            try:
                batch = next(self._iters[name])
                self.consumed[name] += 1
                return batch
            except StopIteration:
                del self._iters[name]
                if self.consumed[name] == 0:
                    break
                self.epoch[name] += 1
                self.consumed[name] = 0
        raise RuntimeError(
            f"train dataset {name!r} yields no batch of {self.batch_size} rows on this worker; "
            "lower batch_size or num_workers, or prepare more data"
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if len(self.names) == 1:
            name = self.names[0]
        else:
            name = self.names[np.random.default_rng((self.seed, self.picks)).choice(len(self.names), p=self.p)]
        self.picks += 1
        return self._next_from(name)


def eval_batches(shard: Any, batch_size: int, transforms: list[Any]) -> Iterator[dict[str, torch.Tensor]]:
    collate: Callable[[dict[str, np.ndarray]], dict[str, torch.Tensor]] = Collate(transforms, epoch=0)
    yield from shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate, drop_last=False)
