"""Small synthetic datasets for tests: every test builds its own world with the real writer.

``write_av_dataset`` writes an audio-visual dataset with cached latents and tokens, each column at
its own rate, whose every time step holds its own index (sample ``t`` of the audio is ``t * 2**-16``,
every pixel of frame ``t`` is ``t``, latent frame ``t`` is all ``t``, token ``t`` is ``t``), so a test
can read back where a crop started in each column (``time_index``) and check they line up exactly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from datasets_prep.columns import ColumnSpec
from datasets_prep.shards import DatasetWriter

AV_RATES = {"audio": 16000, "video": 25, "latents": 50, "tokens": 75}  # steps per second
AUDIO_STEP = 2.0**-16  # audio sample t holds t * AUDIO_STEP: exact in float32 below 2**24 samples
AV_SECONDS = (2.0, 2.4, 3.0, 2.2, 2.8, 2.6)  # whole multiples of 40 ms: every column has whole steps


def av_columns(size: int = 24) -> dict[str, ColumnSpec]:
    """id, audio (16 kHz, float32 storage), video (25 fps, size x size x 1), latents (50 Hz, 8 dims),
    tokens (75 Hz), text."""
    return {
        "id": ColumnSpec.id(),
        "audio": ColumnSpec.audio(AV_RATES["audio"], "f32le"),
        "video": ColumnSpec.video(fps=AV_RATES["video"], height=size, width=size, channels=1),
        "latents": ColumnSpec.features(frame_rate=AV_RATES["latents"], dims=8),
        "tokens": ColumnSpec.tokens(rate=AV_RATES["tokens"], vocab=1024),
        "text": ColumnSpec.text(),
    }


def av_row(i: int, seconds: float, size: int = 24) -> dict[str, Any]:
    """Row ``i``, ``seconds`` long, each column counting its own time steps."""
    n = {c: round(seconds * r) for c, r in AV_RATES.items()}
    frames = np.broadcast_to(np.arange(n["video"], dtype=np.uint8)[:, None, None, None], (n["video"], size, size, 1))
    return {
        "id": f"utt{i:04d}",
        "audio": (np.arange(n["audio"]) * AUDIO_STEP).astype(np.float32),
        "video": np.ascontiguousarray(frames),
        "latents": np.repeat(np.arange(n["latents"], dtype=np.float32)[:, None], 8, axis=1),
        "tokens": np.arange(n["tokens"], dtype=np.int64),
        "text": f"row {i}",
    }


def time_index(column: str, value: Any) -> np.ndarray:
    """The time step indices an ``av_row`` column's (cropped, decoded) value holds, one per step."""
    arr = np.asarray(value)
    if column == "audio":
        return np.rint(arr.astype(np.float64) / AUDIO_STEP).astype(np.int64)
    if column == "video":
        return arr.reshape(arr.shape[0], -1)[:, 0].astype(np.int64)
    if column == "latents":
        return arr[:, 0].astype(np.int64)
    return arr.astype(np.int64)


def write_av_dataset(out_dir: str | os.PathLike, seconds: Sequence[float] = AV_SECONDS, size: int = 24,
                     rows_per_shard: int = 4) -> dict[str, Any]:
    """Write ``av_row``s of the given lengths with ``DatasetWriter``; returns the manifest."""
    with DatasetWriter(out_dir, av_columns(size), kind="av", rows_per_shard=rows_per_shard,
                       prep={"dummy": "av", "seconds": list(seconds), "size": size}) as w:
        for i, s in enumerate(seconds):
            w.write(av_row(i, s, size))
    return w.manifest()
