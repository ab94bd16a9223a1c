"""Shard folders -> Ray Datasets for a phase (driver side).

A dataset is a folder with `_manifest.json` written by `datasets_prep`. Only the
columns training needs are read; PCM16 audio is decoded to float32 in a Ray Data
`map_batches` stage so decoding runs in Ray tasks beside the training workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from datasets_prep.shards import decode_pcm16, read_manifest, shard_paths

SPEECH_COLUMNS = ["id", "speaker", "audio"]
MIXTURE_COLUMNS = ["id", "mix", "s1", "s2"]


def resolve(path: str, base: Path | None = None) -> str:
    """Absolute local path (workers run in another directory) or an untouched URI."""
    if "://" in path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base or Path.cwd()) / p)


def dataset_info(path: str) -> dict[str, Any] | None:
    """The manifest, or None when the folder has not been prepared yet (plan shows it)."""
    try:
        return read_manifest(path)
    except FileNotFoundError:
        return None


def _columns(manifest: dict[str, Any]) -> list[str]:
    wanted = MIXTURE_COLUMNS if manifest["kind"] == "mixtures" else SPEECH_COLUMNS
    return [c for c in wanted if c in manifest["columns"]]


class DecodeAudio:
    """map_batches UDF: binary PCM16 columns -> object arrays of float32 1-D waveforms."""

    def __init__(self, audio_columns: list[str]) -> None:
        self.audio_columns = audio_columns

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for col in self.audio_columns:
            if col in batch:
                out = np.empty(len(batch[col]), dtype=object)
                for i, raw in enumerate(batch[col]):
                    out[i] = decode_pcm16(raw)
                batch[col] = out
        return batch


def read_dataset(path: str) -> Any:
    """A streaming Ray Dataset of decoded rows from one shard folder."""
    import ray.data

    manifest = read_manifest(path)
    files = shard_paths(path, manifest)
    ds = ray.data.read_parquet(files, shuffle=None).select_columns(_columns(manifest))
    return ds.map_batches(DecodeAudio(list(manifest["audio_columns"])), batch_format="numpy", batch_size=64)


def phase_datasets(data: dict[str, str], train: list[str], eval_name: str | None) -> dict[str, Any]:
    """`{"train:<name>": ds, ..., "eval": ds}` for a phase; `data` maps names to resolved folders."""
    out = {f"train:{name}": read_dataset(data[name]) for name in train}
    if eval_name:
        out["eval"] = read_dataset(data[eval_name])
    return out
