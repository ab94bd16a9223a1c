"""Worker side: an endless, deterministic, resumable stream of training batches.

Several train datasets are interleaved batch by batch with their weights; the
choice for pick k depends only on (seed, k), and each source records its epoch and
the batches it has consumed, so a resumed run skips exactly what was already seen.

A source marked `hold` (a dataset small enough to sit in memory) is read through Ray
Data once: the worker keeps the raw rows of its first epoch and serves every later
epoch from them, reshuffled by (seed, epoch), with no Ray Data work beside training.
A streamed source is read in passes of several epochs (its spec's `epochs_per_pass`, see
`raytrain.data.datasets`); its recorded "epoch" then counts passes.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from raytrain.data.collate import pad_collate
from raytrain.data.columns import specs_of
from raytrain.data.datasets import decode_columns
from raytrain.data.transforms import TRANSFORMS, call_transform, takes_specs


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
    """numpy batch -> stored columns decoded by role (`audio`: a dataset's `audio_spec`) -> transforms
    (with the epoch, and the dataset's column specs to those that take them) -> padded tensors, with
    lengths for each time column. Runs in Ray Data's prefetch thread, so it stays in numpy."""

    def __init__(self, transforms: list[Any], epoch: int, audio: dict[str, Any] | None = None) -> None:
        self.transforms = transforms
        self.epoch = epoch
        self.specs = specs_of(audio["roles"]) if audio and "roles" in audio else None
        self.audio = {**audio, "roles": self.specs} if audio and self.specs is not None else audio
        self.with_specs = [takes_specs(t) for t in transforms]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        batch = decode_columns(batch, self.audio)
        for t, with_specs in zip(self.transforms, self.with_specs, strict=True):
            batch = call_transform(t, batch, self.epoch, self.specs, with_specs)
        return to_model_batch(pad_collate(batch, columns=self.specs))


def _copy_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A private copy of a numpy batch (transforms may modify arrays in place)."""
    out = {}
    for k, v in batch.items():
        if v.dtype.kind == "O":
            c = np.empty(len(v), dtype=object)
            c[:] = [x.copy() if isinstance(x, np.ndarray) else x for x in v]
            out[k] = c
        else:
            out[k] = v.copy()
    return out


class _Recording(Collate):
    """Collate that also keeps a copy of every raw batch (the worker's rows of its first epoch).
    The last, short batch is kept but not trained on (it comes back as `{}`); with `record_only`
    no batch is collated (re-reading the rows on resume)."""

    def __init__(self, transforms: list[Any], epoch: int, sink: list[dict[str, np.ndarray]],
                 batch_size: int, record_only: bool = False, audio: dict[str, Any] | None = None) -> None:
        super().__init__(transforms, epoch, audio)
        self.sink, self.batch_size, self.record_only = sink, batch_size, record_only

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        # Held rows are kept decoded: later epochs then cost no decoding beside training.
        self.sink.append(_copy_rows(decode_columns(batch, self.audio)))
        if self.record_only or len(next(iter(batch.values()))) < self.batch_size:
            return {}
        return super().__call__(batch)


READ_ROWS = 256  # rows per batch that Ray Data delivers to the worker, before cutting into training batches


def join_rows(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate along rows; a column that is variable-length anywhere becomes one object array."""
    if len(arrays) == 1:
        return arrays[0]
    if all(a.dtype.kind != "O" for a in arrays) and len({a.shape[1:] for a in arrays}) == 1:
        return np.concatenate(arrays)
    out = np.empty(sum(len(a) for a in arrays), dtype=object)
    out[:] = [row for a in arrays for row in a]
    return out


def rebatch(blocks: Iterable[dict[str, np.ndarray]], batch_size: int, drop_last: bool = True
            ) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches of any size -> batches of exactly `batch_size` rows in the same row order (the
    short rest last unless `drop_last`)."""
    carry: dict[str, np.ndarray] | None = None
    for block in blocks:
        if carry is not None:
            block = {k: join_rows([carry[k], v]) for k, v in block.items()}
        n = len(next(iter(block.values()))) if block else 0
        full = n - n % batch_size
        for start in range(0, full, batch_size):
            yield {k: v[start:start + batch_size] for k, v in block.items()}
        carry = {k: v[full:] for k, v in block.items()} if full < n else None
    if carry is not None and not drop_last:
        yield carry


_DONE = object()


def prefetch(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run `items` in one background thread, `depth` ahead (0: in the caller's thread). An exception
    there is raised here, at the item where it happened."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)

    def fill() -> None:
        try:
            for item in items:
                q.put((True, item))
            q.put((True, _DONE))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put((False, exc))

    threading.Thread(target=fill, name="raytrain-batches", daemon=True).start()
    while True:
        ok, item = q.get()
        if not ok:
            raise item
        if item is _DONE:
            return
        yield item


class _Held:
    """The rows of one source held by this worker: their order of arrival, then a seeded permutation."""

    def __init__(self, parts: list[dict[str, np.ndarray]]) -> None:
        cols = {k: join_rows([p[k] for p in parts]) for k in parts[0]} if parts else {}
        self.rows = len(next(iter(cols.values()))) if cols else 0
        # Ray Data collates batches in a thread pool, so rows arrive here in no fixed order: put them in
        # one that does not depend on it (by id, else by content) before the per-epoch permutation.
        order = np.argsort(cols["id"].astype(str), kind="stable") if "id" in cols else self._by_content(cols)
        self.cols = {k: v[order] for k, v in cols.items()}

    def _by_content(self, cols: dict[str, np.ndarray]) -> np.ndarray:
        keys = []
        for i in range(self.rows):
            h = hashlib.blake2b(digest_size=16)
            for k in sorted(cols):
                h.update(np.asarray(cols[k][i]).tobytes())
            keys.append(h.hexdigest())
        return np.argsort(np.array(keys), kind="stable")

    def batches(self, batch_size: int, seed: int, epoch: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
        order = np.random.default_rng((seed, epoch)).permutation(self.rows)
        for b in range(skip, self.rows // batch_size):
            idx = order[b * batch_size:(b + 1) * batch_size]
            yield {k: v[idx] for k, v in self.cols.items()}


def pick_source(seed: int, k: int, p: np.ndarray) -> int:
    """The source of a mixture's k-th batch: drawn with probabilities ``p`` from (seed, k) alone."""
    return int(np.random.default_rng((seed, k)).choice(len(p), p=p))


class BatchStream:
    """Endless batches from weighted sources. `position()` / `position=` make it resumable."""

    def __init__(self, shards: dict[str, Any], weights: dict[str, float], *, batch_size: int,
                 transforms: list[Any], seed: int, shuffle_buffer: int = 0,
                 position: dict[str, Any] | None = None, prefetch: int = 2,
                 hold: set[str] | frozenset[str] = frozenset(),
                 audio: dict[str, dict[str, Any]] | None = None) -> None:
        self.shards, self.names = shards, list(shards)
        w = np.array([weights[n] for n in self.names], dtype=np.float64)
        self.p = w / w.sum()
        self.batch_size, self.transforms, self.seed = batch_size, transforms, seed
        self.shuffle_buffer, self.prefetch = shuffle_buffer, prefetch
        pos = position or {}
        self.picks: int = pos.get("picks", 0)
        self.epoch: dict[str, int] = {n: pos.get("epoch", {}).get(n, 0) for n in self.names}
        self.consumed: dict[str, int] = {n: pos.get("consumed", {}).get(n, 0) for n in self.names}
        self.batches: dict[str, int] = {n: pos.get("batches", {}).get(n, 0) for n in self.names}  # all epochs
        self._iters: dict[str, Iterator[dict[str, torch.Tensor]]] = {}
        self.hold = set(hold)
        self._held: dict[str, _Held] = {}
        self.audio = audio or {}  # source name -> audio_spec of its stored audio

    def position(self) -> dict[str, Any]:
        return {"picks": self.picks, "epoch": dict(self.epoch), "consumed": dict(self.consumed),
                "batches": dict(self.batches)}

    def _read(self, name: str, epoch: int, collate: Collate, drop_last: bool = True
              ) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch (a pass, for a streamed dataset) of `name`: Ray Data hands over numpy batches of
        `READ_ROWS` rows, which are cut into training batches and collated in one background thread. Ray Data's own batching of 16-row
        slices cost 1.7x the time per row here (an Arrow slice and a format conversion per batch)."""
        kwargs: dict[str, Any] = {}
        if self.shuffle_buffer:
            kwargs = {"local_shuffle_buffer_size": self.shuffle_buffer,
                      "local_shuffle_seed": self.seed * 100_003 + epoch}
        blocks = self.shards[name].iter_batches(batch_size=max(READ_ROWS, self.batch_size), batch_format="numpy",
                                                prefetch_batches=1, **kwargs)
        batches = rebatch(blocks, self.batch_size, drop_last)
        if self.audio.get(name, {}).get("epochs_per_pass", 1) > 1:
            return prefetch(self._keyed(collate, epoch, batches), self.prefetch)
        return prefetch((collate(b) for b in batches), self.prefetch)

    @staticmethod
    def _keyed(collate: Collate, epoch: int, batches: Iterable[dict[str, np.ndarray]]
               ) -> Iterator[dict[str, torch.Tensor]]:
        """A pass of several epochs: the same rows may come back in the same batch later in the pass, so
        transforms draw from (pass, batch number) rather than from the pass alone."""
        for i, b in enumerate(batches):
            collate.epoch = (epoch << 32) | i
            yield collate(b)

    def _open(self, name: str) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.epoch[name]
        if name in self.hold:
            if name not in self._held and epoch > 0:  # resumed after the first epoch: read the rows again
                sink: list[dict[str, np.ndarray]] = []
                recorder = _Recording([], 0, sink, self.batch_size, record_only=True, audio=self.audio.get(name))
                for _ in self._read(name, 0, recorder, drop_last=False):
                    pass
                self._held[name] = _Held(sink)
            if name in self._held:
                collate = Collate(self.transforms, epoch, self.audio.get(name))
                return (collate(b) for b in self._held[name].batches(
                    self.batch_size, self.seed * 100_003 + self.names.index(name), epoch, self.consumed[name]))
            sink = []
            it = self._read(name, epoch, _Recording(self.transforms, epoch, sink, self.batch_size,
                                                    audio=self.audio.get(name)), drop_last=False)
            it = self._then_hold(name, it, sink)
        else:
            it = self._read(name, epoch, Collate(self.transforms, epoch, self.audio.get(name)))
        for _ in range(self.consumed[name]):  # resume mid-epoch: skip what was already trained on
            next(it)
        return it

    def _then_hold(self, name: str, it: Iterator[dict[str, torch.Tensor]],
                   sink: list[dict[str, np.ndarray]]) -> Iterator[dict[str, torch.Tensor]]:
        for batch in it:
            if batch:
                yield batch
        self._held[name] = _Held(sink)

    def _next_from(self, name: str) -> dict[str, torch.Tensor]:
        for _attempt in range(2):
            if name not in self._iters:
                self._iters[name] = self._open(name)
            try:
                batch = next(self._iters[name])
                self.consumed[name] += 1
                self.batches[name] += 1
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
            name = self.names[pick_source(self.seed, self.picks, self.p)]
        self.picks += 1
        return self._next_from(name)


def eval_batches(shard: Any, batch_size: int, transforms: list[Any], audio: dict[str, Any] | None = None
                 ) -> Iterator[dict[str, torch.Tensor]]:
    collate: Callable[[dict[str, np.ndarray]], dict[str, torch.Tensor]] = Collate(transforms, epoch=0, audio=audio)
    yield from shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate, drop_last=False)
