"""The first step of every chain: an item's audio paths -> float32 waveforms, or a reject.

A file that cannot be used raises ``Reject`` with a one-line reason; the executor turns it
into a row of the ``rejects`` table and carries on with the other files.

Token files (``sketch_path`` of the JSONL format: ``.npy``, ``.npz`` or ``.pt``) are read
here too and stored as three columns, ``sketch`` (raw little-endian bytes), ``sketch_shape``
and ``sketch_dtype`` (``datasets_prep.shards.decode_tokens`` gives the array back).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import soundfile as sf

from datasets_prep.shards import encode_tokens

# item fields holding a token file path -> the column prefix its array is stored under
TOKEN_PATH_FIELDS = {"sketch_path": "sketch"}
INTEGER_TOKEN_FIELDS = ("sketch_path",)  # a sketch is codebook indices: a float array is not one
TOKEN_EXTS = (".npy", ".npz", ".pt", ".pth")
TOKEN_KEYS = ("tokens", "codes", "sketch")  # the array to take from an .npz / a saved dict holding several


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


def _one_array(named: Mapping[str, Any], path: str) -> Any:
    """The single value of ``named`` (an .npz or a saved dict), or the one under a ``TOKEN_KEYS`` name."""
    keys = list(named.keys())
    if len(keys) == 1:
        return named[keys[0]]
    for k in TOKEN_KEYS:
        if k in named:
            return named[k]
    if not keys:
        raise Reject(f"token file holds no arrays: {path}")
    raise Reject(f"token file holds several arrays {sorted(map(str, keys))} and none is named "
                 f"{' or '.join(map(repr, TOKEN_KEYS))}: {path}")


def _load_tokens(path: str, ext: str) -> np.ndarray:
    if ext in (".npy", ".npz"):
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:  # an NpzFile (np.load reads by content: an .npy named .npz works too, and back)
            return np.asarray(_one_array(loaded, path))
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping):
        obj = _one_array(obj, path)
    if not isinstance(obj, torch.Tensor):
        raise Reject(f"token file holds a {type(obj).__name__}, expected a tensor (or a dict of one): {path}")
    if obj.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds every value exactly
        obj = obj.float()
    return obj.detach().cpu().numpy()


def read_tokens(path: str) -> np.ndarray:
    """The array of a token file: ``.npy``, ``.npz`` (its one array, or ``tokens``/``codes``/``sketch``) or ``.pt``
    (``torch.load(weights_only=True)``: a tensor, or a dict of one / with ``tokens``/``codes``/``sketch``).

    Rejects a missing, unreadable or ill-formed file, a non-numeric array and an empty or 0-d one.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in TOKEN_EXTS:
        raise Reject(f"unknown token file type {ext or '(no extension)'!r} (expected .npy, .npz or .pt): {path}")
    if not os.path.isfile(path):
        raise Reject(f"token file not found: {path}")
    try:
        arr = _load_tokens(path, ext)
    except Reject:
        raise
    except Exception as e:  # numpy, zipfile and torch raise many kinds for a damaged file
        lines = str(e).strip().splitlines()
        raise Reject(f"unreadable token file: {path}: {type(e).__name__}: {lines[0][:200] if lines else ''}") from None
    if arr.dtype.kind not in "biufc":
        raise Reject(f"token file holds a non-numeric array (dtype {arr.dtype}): {path}")
    if arr.ndim == 0 or arr.size == 0:
        raise Reject(f"token file holds an empty or 0-d array (shape {list(arr.shape)}): {path}")
    return arr


def load_item(item: dict[str, Any], audio_columns: tuple[str, ...] | list[str], *,
              expect_sample_rate: int | None = None) -> dict[str, Any]:
    """A copy of ``item`` whose audio columns hold waveforms and with ``sample_rate`` set.

    Rejects an unreadable, missing or empty file, one with NaN/Inf samples, columns of one
    item at different rates, and (when ``expect_sample_rate`` is given) a file at another rate.
    A token file (``TOKEN_PATH_FIELDS``, e.g. ``sketch_path``) adds ``<prefix>``, ``<prefix>_shape``
    and ``<prefix>_dtype`` (``read_tokens``, ``encode_tokens``); the path field is kept as it is. A sketch
    (``INTEGER_TOKEN_FIELDS``) of another dtype than integers is rejected.
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
    for field, prefix in TOKEN_PATH_FIELDS.items():
        if item.get(field):
            tokens = read_tokens(str(item[field]))
            if field in INTEGER_TOKEN_FIELDS and tokens.dtype.kind not in "biu":
                raise Reject(f"{field}: tokens must be integers (codebook indices), the file holds {tokens.dtype}: "
                             f"{item[field]}")
            data, shape, dtype = encode_tokens(tokens)
            out[prefix], out[f"{prefix}_shape"], out[f"{prefix}_dtype"] = data, shape, dtype
    return out
