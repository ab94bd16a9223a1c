"""Shard folders -> Ray Datasets for a phase (driver side).

A dataset is a folder with `_manifest.json` written by `datasets_prep`. Only the
columns training needs are read, one read task (one block) per shard file. Audio stays
in its stored bytes (PCM16, FLAC or float32) through Ray Data and is decoded in the
worker's collate (`raytrain.data.stream.Collate`, one `np.frombuffer` for PCM16): a
decode stage in Ray Data would push every waveform through the object store as a
pickled float32 array, twice the bytes of PCM16, and measured 3x slower here.

Small datasets (their stored audio fits in a quarter of Ray's object store, or
`cache: memory`) are read once per phase and held in the object store
(`Dataset.materialize`): later epochs start at once and cost no reading, which on a
few cores is CPU taken straight from training.

A streamed train dataset is read in *passes* of several epochs (`epochs_per_pass`): one
Ray Data execution reads every shard once per epoch, each epoch in its own seeded order.
Every execution costs a start (the executor, its first read task) and, in Ray 2.60, its
first second with the cluster's resources unknown to Ray Data, when read tasks run one at
a time; once per pass instead of once per epoch, that cost disappears into the pass.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from datasets_prep.shards import decode_audio, read_manifest

CACHE_FRACTION = 0.25  # cache: auto holds a dataset in memory when it needs at most this share of the store
PASS_ROWS = 20_000  # a streamed train dataset is read in passes of at least this many rows (whole epochs)
MAX_EPOCHS_PER_PASS = 32

SPEECH_COLUMNS = ["id", "speaker", "audio", "text", "phonemes"]  # those a dataset has
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


def audio_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the collate needs to decode a dataset's audio: its audio columns and their format."""
    return {"columns": list(manifest["audio_columns"]), "format": manifest.get("audio_format", "pcm_s16le")}


def decode_columns(batch: dict[str, np.ndarray], spec: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """Stored audio bytes -> object arrays of float32 (T,) waveforms, in place; other columns untouched."""
    if not spec:
        return batch
    for col in spec["columns"]:
        values = batch.get(col)
        if values is None or not len(values) or not isinstance(values[0], bytes):
            continue
        out = np.empty(len(values), dtype=object)
        for i, raw in enumerate(values):
            out[i] = decode_audio(raw, spec["format"])
        batch[col] = out
    return batch


def shard_orders(num_files: int, shuffle_seed: int | None, epochs: int) -> list[list[int]]:
    """The shard order of each epoch of a pass: as listed without a seed, else a permutation drawn
    from (seed, epoch). The same for every pass, so a resumed run reads what the first one read."""
    if shuffle_seed is None:
        return [list(range(num_files)) for _ in range(epochs)]
    return [[int(i) for i in np.random.default_rng((shuffle_seed, e)).permutation(num_files)]
            for e in range(epochs)]


def epochs_per_pass(manifest: dict[str, Any]) -> int:
    """Epochs one Ray Data execution of a streamed train dataset covers: enough for `PASS_ROWS` rows."""
    rows = max(1, int(manifest.get("rows") or 0))
    return max(1, min(MAX_EPOCHS_PER_PASS, math.ceil(PASS_ROWS / rows)))


def read_dataset(path: str, manifest: dict[str, Any] | None = None, shuffle_seed: int | None = None,
                 epochs: int = 1) -> Any:
    """A streaming Ray Dataset of a shard folder's training columns, `epochs` times over (one block per
    shard and epoch, see `raytrain.data.shard_source`; `manifest`: the folder's, if already read).

    `shuffle_seed`: each epoch reads the shard files in an order drawn from (seed, epoch), the same
    in every pass (a resumed run must read what the uninterrupted one read); the phase's
    `shuffle_buffer` reshuffles rows differently each pass on top of it."""
    import ray.data

    from datasets_prep.storage import filesystem
    from raytrain.data.shard_source import ShardFiles

    manifest = manifest or read_manifest(path)
    if not manifest["shards"]:
        raise ValueError(f"{path}: its manifest lists no shards (every input was rejected?); "
                         "prepare the dataset again with raytrain prep")
    fs, root = filesystem(path)
    files = [f"{root.rstrip('/')}/{sh['file']}" for sh in manifest["shards"]]
    rows = [int(sh["rows"]) for sh in manifest["shards"]]
    source = ShardFiles(fs, files, rows, _columns(manifest), shard_orders(len(files), shuffle_seed, epochs),
                        held_bytes(manifest) / max(1, sum(rows)))
    return ray.data.read_datasource(source, override_num_blocks=len(source.tasks))


def held_bytes(manifest: dict[str, Any]) -> int:
    """Bytes of a shard folder's audio as stored (what the object store holds for it): 2 per sample for
    PCM16 (and as an upper bound for FLAC), 4 for float32."""
    samples = float(manifest.get("hours", 0.0)) * 3600 * int(manifest.get("sample_rate") or 0)
    per_sample = 4 if manifest.get("audio_format") == "f32le" else 2
    return int(samples * per_sample * max(1, len(manifest.get("audio_columns", []))))


def should_cache(cache: str, manifest: dict[str, Any], store_bytes: float) -> bool:
    """`cache: memory|stream` decide; `auto` caches when the stored audio fits a quarter of the store."""
    if cache != "auto":
        return cache == "memory"
    return held_bytes(manifest) <= CACHE_FRACTION * store_bytes


def open_dataset(name: str, path: str, cache: str = "auto", shuffle_seed: int | None = None,
                 passes: bool = False) -> tuple[Any, bool, dict[str, Any]]:
    """(`read_dataset`, materialized in the object store when `should_cache` says so; whether it was;
    its `audio_spec`). `passes`: a streamed dataset spans `epochs_per_pass` epochs (train datasets),
    which its spec says under that key."""
    import ray

    manifest = read_manifest(path)
    store = float(ray.available_resources().get("object_store_memory", 0.0))
    if not should_cache(cache, manifest, store):
        epochs = epochs_per_pass(manifest) if passes else 1
        spec = {**audio_spec(manifest), "epochs_per_pass": epochs}
        return read_dataset(path, manifest, shuffle_seed, epochs), False, spec
    t0 = time.perf_counter()
    ds = read_dataset(path, manifest, shuffle_seed).materialize()
    print(f"data {name}: read once, {held_bytes(manifest) / 1e6:.0f} MB held in memory "
          f"({time.perf_counter() - t0:.1f} s)")
    return ds, True, audio_spec(manifest)


def phase_datasets(data: dict[str, tuple[str, str]], train: list[str], eval_name: str | None,
                   seed: int = 0) -> tuple[dict[str, Any], list[str], dict[str, dict[str, Any]]]:
    """(`{"train:<name>": ds, ..., "eval": ds}`, the train datasets held in memory, each dataset's
    `audio_spec` under the same keys) for a phase; `data` maps names to (resolved folder, cache).
    Train datasets read their files in a seeded order."""
    out, held, specs = {}, [], {}
    for k, name in enumerate(train):
        key = f"train:{name}"
        out[key], cached, specs[key] = open_dataset(name, *data[name], shuffle_seed=(seed * 1_000_003 + k) % 2**32,
                                                    passes=True)
        if cached:
            held.append(name)
    if eval_name:
        out["eval"], _, specs["eval"] = open_dataset(eval_name, *data[eval_name])
    return out, held, specs
