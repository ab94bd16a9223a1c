"""The first step of every chain: an item's audio paths -> float32 waveforms, or a reject.

A file that cannot be used raises ``Reject`` with a one-line reason; the executor turns it
into a row of the ``rejects`` table and carries on with the other files.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import soundfile as sf


class Reject(Exception):  # noqa: N818 - it is an outcome, not an error of the program
    """This item cannot go into the dataset; ``str(self)`` is the reason."""


def read_audio(path: str) -> tuple[np.ndarray, int]:
    """(mono float32 (T,), sample rate); multichannel files keep the first channel."""
    if not os.path.isfile(path):
        raise Reject(f"file not found: {path}")
    try:
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as e:
        raise Reject(f"unreadable audio: {path}: {str(e).strip()}") from None
    return np.ascontiguousarray(audio[:, 0]), int(sr)


def load_item(item: dict[str, Any], audio_columns: tuple[str, ...] | list[str], *,
              expect_sample_rate: int | None = None) -> dict[str, Any]:
    """A copy of ``item`` whose audio columns hold waveforms and with ``sample_rate`` set.

    Rejects an unreadable, missing or empty file, one with NaN/Inf samples, columns of one
    item at different rates, and (when ``expect_sample_rate`` is given) a file at another rate.
    """
    out = dict(item)
    rate = None
    for col in audio_columns:
        path = item[col]
        wave, sr = read_audio(path)
        if wave.size == 0:
            raise Reject(f"empty audio (0 samples): {path}")
        if not np.isfinite(wave).all():
            raise Reject(f"audio holds NaN or Inf samples: {path}")
        if expect_sample_rate is not None and sr != expect_sample_rate:
            raise Reject(f"wrong sample rate {sr} Hz (expected {expect_sample_rate} Hz; add the resample "
                         f"step to convert): {path}")
        if rate is not None and sr != rate:
            raise Reject(f"{col} is at {sr} Hz but {audio_columns[0]} at {rate} Hz: {path}")
        rate = sr
        out[col] = wave
    out["sample_rate"] = rate
    return out
