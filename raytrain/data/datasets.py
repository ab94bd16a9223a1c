"""Shard folders -> Ray Datasets for a phase (driver side).

A dataset is a folder with `_manifest.json` written by `datasets_prep`. Only the
columns training needs are read; PCM16 audio is decoded to float32 in a Ray Data
`map_batches` stage so decoding runs in Ray tasks beside the training workers.

Small datasets (the decoded audio fits in a quarter of Ray's object store, or
`cache: memory`) are read and decoded once per phase and held in the object store
(`Dataset.materialize`): later epochs start at once and cost no reading or decoding,
which on a few cores is CPU taken straight from training.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from datasets_prep.shards import decode_audio, read_manifest, shard_paths

CACHE_FRACTION = 0.25  # cache: auto holds a dataset in memory when it needs at most this share of the store

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
    """map_batches UDF: binary audio columns (PCM16, FLAC or float32) -> object arrays of float32 1-D waveforms."""

    def __init__(self, audio_columns: list[str], audio_format: str = "pcm_s16le") -> None:
        self.audio_columns = audio_columns
        self.audio_format = audio_format

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for col in self.audio_columns:
            if col in batch:
                out = np.empty(len(batch[col]), dtype=object)
                for i, raw in enumerate(batch[col]):
                    out[i] = decode_audio(raw, self.audio_format)
                batch[col] = out
        return batch


def read_dataset(path: str, manifest: dict[str, Any] | None = None, shuffle_seed: int | None = None) -> Any:
    """A streaming Ray Dataset of decoded rows from one shard folder (`manifest`: its, if already read).

    `shuffle_seed`: read the shard files in an order drawn from this seed. The order is the same
    every epoch (a resumed run must read what the uninterrupted one read); the phase's
    `shuffle_buffer` reshuffles rows differently each epoch on top of it."""
    import ray.data
    from ray.data.datasource import FileShuffleConfig

    manifest = manifest or read_manifest(path)
    files = shard_paths(path, manifest)
    shuffle = None if shuffle_seed is None else FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=False)
    ds = ray.data.read_parquet(files, shuffle=shuffle).select_columns(_columns(manifest))
    decode = DecodeAudio(list(manifest["audio_columns"]), manifest.get("audio_format", "pcm_s16le"))
    return ds.map_batches(decode, batch_format="numpy", batch_size=64)


def decoded_bytes(manifest: dict[str, Any]) -> int:
    """Bytes of the float32 waveforms of a shard folder once decoded (what the object store would hold)."""
    samples = float(manifest.get("hours", 0.0)) * 3600 * int(manifest.get("sample_rate") or 0)
    return int(samples * 4 * max(1, len(manifest.get("audio_columns", []))))


def should_cache(cache: str, manifest: dict[str, Any], store_bytes: float) -> bool:
    """`cache: memory|stream` decide; `auto` caches when the decoded audio fits a quarter of the store."""
    if cache != "auto":
        return cache == "memory"
    return decoded_bytes(manifest) <= CACHE_FRACTION * store_bytes


def open_dataset(name: str, path: str, cache: str = "auto", shuffle_seed: int | None = None) -> tuple[Any, bool]:
    """(`read_dataset`, materialized in the object store when `should_cache` says so; whether it was)."""
    import ray

    manifest = read_manifest(path)
    ds = read_dataset(path, manifest, shuffle_seed)
    store = float(ray.available_resources().get("object_store_memory", 0.0))
    if not should_cache(cache, manifest, store):
        return ds, False
    t0 = time.perf_counter()
    ds = ds.materialize()
    print(f"data {name}: read and decoded once, {decoded_bytes(manifest) / 1e6:.0f} MB held in memory "
          f"({time.perf_counter() - t0:.1f} s)")
    return ds, True


def phase_datasets(data: dict[str, tuple[str, str]], train: list[str], eval_name: str | None,
                   seed: int = 0) -> tuple[dict[str, Any], list[str]]:
    """(`{"train:<name>": ds, ..., "eval": ds}`, the train datasets held in memory) for a phase;
    `data` maps names to (resolved folder, cache). Train datasets read their files in a seeded order."""
    out, held = {}, []
    for k, name in enumerate(train):
        out[f"train:{name}"], cached = open_dataset(name, *data[name], shuffle_seed=(seed * 1_000_003 + k) % 2**32)
        if cached:
            held.append(name)
    if eval_name:
        out["eval"], _ = open_dataset(eval_name, *data[eval_name])
    return out, held
