"""Shard folders -> Ray Datasets for a phase (driver side).

A dataset is a folder with `_manifest.json` written by `datasets_prep`; its columns and their
roles are `datasets_prep.columns.manifest_columns`. Only the columns a phase asks for are read
(`columns=`, see `raytrain.needs.needed_columns`; all of them without a list), one read task
(one block) per shard file. Audio, video frames, tokens and feature frames stay in their
stored bytes through Ray Data and are decoded by role in the worker's collate
(`raytrain.data.stream.Collate`, one `np.frombuffer` each): a decode stage in Ray Data would
push every waveform through the object store as a pickled float32 array, twice the bytes of
PCM16, and measured 3x slower here.

Small datasets (their stored audio fits in a quarter of Ray's object store, or
`cache: memory`) are read once and held in the object store (`Dataset.materialize`):
later epochs start at once and cost no reading, which on a few cores is CPU taken straight
from training; the next phase that reads the same folder, columns and file order takes it
as held (`phase_datasets` lets go of what a phase does not read; a pipeline run, of all).

A streamed train dataset is read in *passes* of several epochs (`epochs_per_pass`): one
Ray Data execution reads every shard once per epoch, each epoch in its own seeded order.
Every execution costs a start (the executor, its first read task) and, in Ray 2.60, its
first second with the cluster's resources unknown to Ray Data, when read tasks run one at
a time; once per pass instead of once per epoch, that cost disappears into the pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from datasets_prep.codecs import decode_array, decode_audio
from datasets_prep.columns import ARRAY_ROLES, ColumnSpec, companions, manifest_columns
from datasets_prep.manifest import read_manifest
from raytrain.data.columns import missing_columns, resolve_columns, specs_of

CACHE_FRACTION = 0.25  # cache: auto holds a dataset in memory when it needs at most this share of the store
PASS_ROWS = 20_000  # a streamed train dataset is read in passes of at least this many rows (whole epochs)
MAX_EPOCHS_PER_PASS = 32



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


def read_columns(manifest: dict[str, Any], columns: list[str] | None = None, where: str = "") -> list[str]:
    """The columns of a dataset to read for `columns` (None: all of them), in stored order, with the
    `id` column (batch keys of seeded transforms, the order of held rows) and each column's companions.
    A group key (`sources`) reads its columns (`s1`, `s2`, ...); a column the dataset lacks is an error."""
    specs = manifest_columns(manifest)
    if columns is None:
        wanted = set(specs)
    else:
        stored_beside = {c for n, s in specs.items() for c in companions(n, s)}
        columns = [c for c in columns if c not in stored_beside]
        missing = missing_columns(columns, specs)
        if missing:
            raise ValueError(f"dataset {where or '(manifest)'} has no column {', '.join(map(repr, missing))}; "
                             f"it has {', '.join(specs)}")
        wanted = set(resolve_columns(columns, specs)) | ({"id"} & set(specs))
    return [c for name in specs if name in wanted for c in (name, *companions(name, specs[name]))]


def audio_spec(manifest: dict[str, Any], columns: list[str] | None = None) -> dict[str, Any]:
    """What the collate needs to decode a dataset's columns: its audio columns and their format and, when
    the manifest gives them, the roles of the columns read (`columns`: stored names, default all)."""
    spec: dict[str, Any] = {"columns": [c for c in manifest["audio_columns"] if columns is None or c in columns],
                            "format": manifest.get("audio_format", "pcm_s16le")}
    try:
        roles = manifest_columns(manifest)
    except (KeyError, ValueError, TypeError):  # a partial manifest (tests, tools): audio only
        return spec
    if any(roles.get(c) is None or roles[c].role != "audio" for c in manifest["audio_columns"]):
        return spec
    spec["roles"] = {n: s.to_json() for n, s in roles.items() if columns is None or n in columns}
    return spec


def _decode(spec: ColumnSpec, values: np.ndarray, batch: dict[str, np.ndarray], name: str) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    shapes, dtypes = batch.get(f"{name}_shape"), batch.get(f"{name}_dtype")
    for i, raw in enumerate(values):
        if raw is None:
            out[i] = None
        elif spec.role == "audio":
            out[i] = decode_audio(raw, str(spec.format))
        else:
            out[i] = decode_array(spec, raw, None if shapes is None else shapes[i],
                                  None if dtypes is None else dtypes[i])
    return out


def decode_columns(batch: dict[str, np.ndarray], spec: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """Stored bytes -> object arrays of arrays, in place, by role: audio float32 (T,), video uint8
    (T, H, W, C), tokens and features (T, ...) of their dtype; companion columns are dropped, other
    columns untouched. A spec without roles (`audio_spec` of a partial manifest) decodes its audio."""
    if not spec:
        return batch
    if "roles" not in spec:
        for col in spec["columns"]:
            values = batch.get(col)
            if values is None or not len(values) or not isinstance(values[0], bytes):
                continue
            out = np.empty(len(values), dtype=object)
            for i, raw in enumerate(values):
                out[i] = decode_audio(raw, spec["format"])
            batch[col] = out
        return batch
    for col, s in specs_of(spec["roles"]).items():
        values = batch.get(col)
        if s.role not in ("audio", *ARRAY_ROLES) or values is None or not len(values):
            continue
        first = next((v for v in values if v is not None), None)
        if isinstance(first, bytes):
            batch[col] = _decode(s, values, batch, col)
        for c in companions(col, s):
            batch.pop(c, None)
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
                 epochs: int = 1, columns: list[str] | None = None) -> Any:
    """A streaming Ray Dataset of a shard folder's `columns` (see `read_columns`; None: all), `epochs`
    times over (one block per shard and epoch, see `raytrain.data.shard_source`; `manifest`: the
    folder's, if already read).

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
    names = read_columns(manifest, columns, path)
    source = ShardFiles(fs, files, rows, names, shard_orders(len(files), shuffle_seed, epochs),
                        held_bytes(manifest, names) / max(1, sum(rows)))
    return ray.data.read_datasource(source, override_num_blocks=len(source.tasks))


def _bytes_per_second(spec: ColumnSpec) -> float:
    """Stored bytes per second of a time column (PCM16 also stands for FLAC, as an upper bound)."""
    rate = float(spec.time_rate() or 0.0)
    if spec.role == "audio":
        return rate * (4 if spec.format == "f32le" else 2)
    if spec.dtype is None:
        return 0.0
    return rate * float(np.prod(spec.frame_shape(), dtype=np.int64)) * np.dtype(spec.dtype).itemsize


def held_bytes(manifest: dict[str, Any], columns: list[str] | None = None) -> int:
    """Bytes of a shard folder's time columns as stored (what the object store holds for it), of `columns`
    only when given: 2 per sample for PCM16 (and as an upper bound for FLAC), 4 for float32; video frames,
    tokens and feature frames at their rate and size. An old manifest (no roles) counts its audio."""
    seconds = float(manifest.get("hours", 0.0)) * 3600
    if manifest.get("roles"):
        specs = manifest_columns(manifest)
        return int(seconds * sum(_bytes_per_second(s) for n, s in specs.items() if columns is None or n in columns))
    samples = seconds * int(manifest.get("sample_rate") or 0)
    per_sample = 4 if manifest.get("audio_format") == "f32le" else 2
    audio = [c for c in manifest.get("audio_columns", []) if columns is None or c in columns]
    return int(samples * per_sample * max(1, len(audio)))


def should_cache(cache: str, manifest: dict[str, Any], store_bytes: float, columns: list[str] | None = None) -> bool:
    """`cache: memory|stream` decide; `auto` caches when the stored audio fits a quarter of the store."""
    if cache != "auto":
        return cache == "memory"
    return held_bytes(manifest, columns) <= CACHE_FRACTION * store_bytes


def open_dataset(name: str, path: str, cache: str = "auto", shuffle_seed: int | None = None,
                 passes: bool = False, columns: list[str] | None = None) -> tuple[Any, bool, dict[str, Any]]:
    """(`read_dataset` of `columns` (None: all), materialized in the object store when `should_cache` says
    so; whether it was; its `audio_spec`). `passes`: a streamed dataset spans `epochs_per_pass` epochs
    (train datasets), which its spec says under that key."""
    import ray

    manifest = read_manifest(path)
    names = read_columns(manifest, columns, f"{name!r} ({path})")
    store = float(ray.available_resources().get("object_store_memory", 0.0))
    if not should_cache(cache, manifest, store, names):
        epochs = epochs_per_pass(manifest) if passes else 1
        spec = {**audio_spec(manifest, names), "epochs_per_pass": epochs}
        return read_dataset(path, manifest, shuffle_seed, epochs, names), False, spec
    key = _held_key(path, manifest, shuffle_seed, names)
    if key in _HELD:
        print(f"data {name}: held in memory since an earlier phase")
        _HELD.move_to_end(key)
        return _HELD[key], True, audio_spec(manifest, names)
    t0 = time.perf_counter()
    ds = read_dataset(path, manifest, shuffle_seed, columns=names).materialize()
    print(f"data {name}: read once, {held_bytes(manifest, names) / 1e6:.0f} MB held in memory "
          f"({time.perf_counter() - t0:.1f} s)")
    _HELD[key] = ds
    return ds, True, audio_spec(manifest, names)


# Datasets held in memory, kept from one phase to the next of the same Ray session: a pipeline's phases
# mostly read the same folders (on 2 CPUs a read costs ~10 s a phase). `phase_datasets` keeps only what
# the current phase uses, so no more is held than one phase needs; `release_held` drops all of it.
_HELD: OrderedDict[tuple[Any, ...], Any] = OrderedDict()


def _held_key(path: str, manifest: dict[str, Any], shuffle_seed: int | None, names: list[str] | None
              ) -> tuple[Any, ...]:
    """What makes a held dataset the same: the Ray session, the folder and its manifest as written (a
    folder prepared again is read again), the file order's seed and the columns."""
    import ray

    stamp = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()
    return (ray.get_runtime_context().get_job_id(), str(path), stamp, shuffle_seed,
            tuple(names) if names is not None else None)


def release_held(keep: set[tuple[Any, ...]] | None = None) -> None:
    """Drop the held datasets (but those in ``keep``): their blocks leave the object store."""
    for key in [k for k in _HELD if not keep or k not in keep]:
        del _HELD[key]


def phase_datasets(data: dict[str, tuple[str, str]], train: list[str], eval_name: str | None,
                   seed: int = 0, columns: dict[str, list[str] | None] | None = None
                   ) -> tuple[dict[str, Any], list[str], dict[str, dict[str, Any]]]:
    """(`{"train:<name>": ds, ..., "eval": ds}`, the train datasets held in memory, each dataset's
    `audio_spec` under the same keys) for a phase; `data` maps names to (resolved folder, cache).
    Train datasets read their files in a seeded order.

    `columns`: the columns to read, by dataset name or by key (`"train:<name>"`, `"eval"`: a dataset
    read for both with different needs); a dataset absent or mapped to None reads all its columns."""
    columns = columns or {}
    out, held, specs = {}, [], {}
    for k, name in enumerate(train):
        key = f"train:{name}"
        out[key], cached, specs[key] = open_dataset(name, *data[name], shuffle_seed=(seed * 1_000_003 + k) % 2**32,
                                                    passes=True, columns=columns.get(key, columns.get(name)))
        if cached:
            held.append(name)
    if eval_name:
        out["eval"], _, specs["eval"] = open_dataset(eval_name, *data[eval_name],
                                                     columns=columns.get("eval", columns.get(eval_name)))
    release_held(keep={k for k, ds in _HELD.items() if any(ds is v for v in out.values())})  # what it does not read
    return out, held, specs
