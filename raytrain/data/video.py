"""``video_swap``: the wrong video for each row, to measure how much a model uses the right one.

An audio-visual model that ignores its video scores the same with any video. This transform, in an
``evaluate`` phase's ``eval_transforms``, gives each row either another row's video (``mode:
shuffle``: row i takes the video of row (i + k) mod n of its batch, k drawn per batch in 1..n-1, so no
row keeps its own; fitted to the row's own number of frames by cutting or repeating the last frame)
or all-zero frames (``mode: zero``). A batch of one row has no other video: with ``shuffle`` it gets
its own video reversed in time (still not the one that matches its audio).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from raytrain.data.transforms import TRANSFORMS, NumpyBatch, batch_rng


def _fit(frames: np.ndarray, n: int) -> np.ndarray:
    """``frames`` (T, ...) cut or extended (its last frame repeated) to ``n`` frames."""
    if len(frames) >= n:
        return frames[:n]
    if not len(frames):
        return np.zeros((n, *frames.shape[1:]), dtype=frames.dtype)
    return np.concatenate([frames, np.repeat(frames[-1:], n - len(frames), axis=0)])


@TRANSFORMS.register("video_swap")
class VideoSwap:
    """Replace ``video`` by another row's (``shuffle``) or by zeros (``zero``); see the module docstring."""

    reads: ClassVar[tuple[str, ...]] = ("video",)
    makes: ClassVar[dict[str, tuple[str, ...]]] = {"video": ("video",)}

    def __init__(self, mode: str = "shuffle", column: str = "video", *, sample_rate: int, seed: int = 0) -> None:
        if mode not in ("shuffle", "zero"):
            raise ValueError(f"video_swap: mode must be 'shuffle' or 'zero', got {mode!r}")
        self.mode, self.column, self.seed = mode, column, seed

    def __call__(self, batch: NumpyBatch, epoch: int = 0) -> NumpyBatch:
        if self.column not in batch:
            raise KeyError(f"video_swap: the batch has no column {self.column!r} (it has {sorted(batch)})")
        videos = [np.asarray(v) for v in batch[self.column]]
        n = len(videos)
        out = np.empty(n, dtype=object)
        if self.mode == "zero":
            for i, v in enumerate(videos):
                out[i] = np.zeros_like(v)
        elif n == 1:
            out[0] = videos[0][::-1].copy()
        else:
            shift = int(batch_rng(batch, self.seed + 104729, epoch, np.array([len(v) for v in videos])).integers(1, n))
            for i, v in enumerate(videos):
                out[i] = _fit(videos[(i + shift) % n], len(v))
        return {**batch, self.column: out}
