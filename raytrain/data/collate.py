"""Numpy batch -> torch batch, for ``iter_torch_batches(collate_fn=pad_collate)``.

Ray Data hands variable-length columns to the collate function as object arrays of
numpy arrays. ``pad_collate`` right-zero-pads those into one preallocated array and
records the valid lengths, turns fixed-shape numeric columns into tensors, and drops
columns that cannot become tensors (strings, bytes, ``None``, dates). Every column pads along
its first axis, which is time for every time role (audio ``(T,)``, video ``(T, H, W, C)``,
tokens ``(T,)``, feature frames ``(T, dims)``); given the dataset's column roles, each time
column present gets its lengths even when all rows have the same length.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from datasets_prep.columns import ColumnSpec

_LENGTHS = "lengths"
_MAIN_AUDIO = ("audio", "mix")


def _is_numeric(column: np.ndarray) -> bool:
    """Numeric or bool fixed-shape column, or object column whose first row is an array."""
    if column.dtype.kind != "O":
        return column.dtype.kind in "biufc"
    first = next((x for x in column.flat if x is not None), None)
    return isinstance(first, (np.ndarray, list, tuple)) and np.asarray(first).dtype.kind in "biufc"


def _numeric_dtype(dtype: np.dtype) -> np.dtype:
    """float64 becomes float32 (models train in float32); other numeric dtypes stay."""
    return np.dtype(np.float32) if dtype == np.float64 else dtype


def _pad(rows: list[np.ndarray], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Right-zero-pad arrays ``(L_i, *rest)`` to ``(N, max L, *rest)``; return it and ``(N,)`` lengths."""
    rest = {r.shape[1:] for r in rows}
    if len(rest) > 1:
        raise ValueError(f"column {key!r}: rows differ beyond the first axis ({sorted(rest)}); cannot pad")
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    dtype = _numeric_dtype(np.result_type(*{r.dtype for r in rows}))
    out = np.zeros((len(rows), int(lengths.max(initial=0)), *rest.pop()), dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, lengths


def _lengths_key(key: str, taken: Iterable[str], main: str | None = None) -> str:
    if (key in _MAIN_AUDIO or key == main) and _LENGTHS not in taken:
        return _LENGTHS
    return f"{key}_lengths"


def main_audio(batch: Mapping[str, object], columns: Mapping[str, ColumnSpec] | None) -> str | None:
    """The column whose lengths are ``lengths``: ``audio`` or ``mix``, else the first audio-role column."""
    if any(k in batch for k in _MAIN_AUDIO):
        return None
    return next((n for n, s in (columns or {}).items() if s.role == "audio" and n in batch), None)


def pad_collate(
    batch: dict[str, np.ndarray], *, audio_keys: Iterable[str] | None = None,
    columns: Mapping[str, ColumnSpec] | None = None,
) -> dict[str, torch.Tensor]:
    """Collate a Ray Data numpy batch into tensors.

    - Object columns of numeric arrays (``(L_i,)`` or ``(L_i, *rest)``) become
      right-zero-padded ``(batch, max_len, *rest)`` tensors (float32 for floats) plus
      ``"<key>_lengths"`` ``(batch,)`` int64; for ``"audio"`` or ``"mix"`` the lengths
      go to ``"lengths"`` unless the batch already has that column, which is kept.
    - Fixed-shape numeric columns become tensors (float64 -> float32).
    - Other columns (strings, bytes, ``None``, dates) are dropped: they cannot become tensors.

    ``audio_keys`` names columns that must be present and always get lengths, even
    when every row has the same length and Ray delivers a fixed-shape array. ``columns`` (the
    dataset's roles) does so for the time columns present whose lengths the batch does not
    already hold (a transform's), and names the main audio column when it is not ``audio``/``mix``.
    """
    wanted = set(audio_keys or ())
    missing = wanted - set(batch)
    if missing:
        raise KeyError(f"pad_collate: audio_keys {sorted(missing)} not in batch columns {sorted(batch)}")
    main = main_audio(batch, columns)
    for name, spec in (columns or {}).items():
        own = _LENGTHS if name in _MAIN_AUDIO or name == main else f"{name}_lengths"
        if spec.is_time and name in batch and own not in batch:
            wanted.add(name)
    out: dict[str, torch.Tensor] = {}
    for key, column in batch.items():
        column = np.asarray(column)
        if not _is_numeric(column):
            continue
        if column.dtype.kind == "O":
            values, lengths = _pad([np.asarray(x) for x in column], key)
        else:
            values = np.ascontiguousarray(column, dtype=_numeric_dtype(column.dtype))
            if not values.flags.writeable:  # a zero-copy view of Arrow memory: tensors must own theirs
                values = values.copy()
            if key not in wanted:
                out[key] = torch.from_numpy(values)
                continue
            lengths = np.full(len(values), values.shape[1] if values.ndim > 1 else 1, dtype=np.int64)
        out[key] = torch.from_numpy(values)
        out[_lengths_key(key, [*batch, *out], main)] = torch.from_numpy(lengths)
    return out
