"""``_manifest.json``: built in one place (``build_manifest``) from per-shard records, read by ``read_manifest``.

Both writers of shards, ``datasets_prep.shards.DatasetWriter`` (rows in one process: generators,
fixed mixtures, tests, a cache phase) and ``datasets_prep.execute`` (chunks on Ray Data), describe
each shard they finish with a record (``shard_record``) and hand the list to ``build_manifest``.

Schema 2 adds the ``roles`` block (each column's role and shape, ``datasets_prep.columns``); a
schema 1 manifest reads as before and gets its roles derived.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from datasets_prep.columns import ColumnSpec, columns_json

SCHEMA_VERSION = 2
READ_VERSIONS = (1, 2)  # schema 1: no `roles` (derived from `kind`, see datasets_prep.columns)
MANIFEST_NAME = "_manifest.json"
CREATED_BY = "raytrain datasets_prep"
DURATION_BINS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, math.inf)  # seconds, for the manifest histogram


def main_time_column(columns: Mapping[str, ColumnSpec]) -> str | None:
    """The column durations and hours are measured on: the first audio column, else the first time
    column with a rate."""
    audio = [n for n, s in columns.items() if s.role == "audio"]
    timed = [n for n, s in columns.items() if s.is_time and s.time_rate()]
    return (audio or timed)[0] if audio or timed else None


def speaker_column(columns: Mapping[str, ColumnSpec]) -> str | None:
    """The label column that names speakers (``speaker``, or ``speakers`` as "spkA,spkB"), if any."""
    return next((n for n in ("speaker", "speakers") if n in columns and columns[n].role == "label"), None)


def row_stats(rows: list[dict[str, Any]], lengths: list[int], rates: list[float],
              speaker_key: str | None) -> dict[str, Any]:
    """The statistics part of a shard record: main-column ``samples`` (steps at its rate), per-row
    ``durations`` in seconds, and ``speaker_samples`` per speaker (a comma-separated value counts for each)."""
    stats: dict[str, Any] = {"samples": int(sum(lengths)), "speaker_samples": {},
                             "durations": [n / r for n, r in zip(lengths, rates, strict=True)]}
    if speaker_key:
        for row, n in zip(rows, lengths, strict=True):
            for spk in str(row.get(speaker_key) or "").split(","):
                if spk:
                    stats["speaker_samples"][spk] = stats["speaker_samples"].get(spk, 0) + int(n)
    return stats


def shard_record(file: str | None, rows: int, sha256: str | None, stats: Mapping[str, Any],
                 **extra: Any) -> dict[str, Any]:
    """What ``build_manifest`` needs of one shard (``file`` None: a chunk whose every item was rejected)."""
    return {"file": file, "rows": rows, "sha256": sha256, "samples": stats.get("samples", 0),
            "speaker_samples": dict(stats.get("speaker_samples", {})), "durations": list(stats.get("durations", [])),
            **extra}


def _histogram(durations: list[float]) -> list[dict[str, Any]]:
    counts = np.histogram(np.asarray(durations, dtype=np.float64), bins=np.asarray(DURATION_BINS))[0]
    return [{"min_s": lo, "max_s": hi if math.isfinite(hi) else None, "count": int(c)}
            for lo, hi, c in zip(DURATION_BINS[:-1], DURATION_BINS[1:], counts, strict=True)]


def build_manifest(*, kind: str, records: list[dict[str, Any]], columns: Mapping[str, str],
                   roles: Mapping[str, ColumnSpec], prep: dict[str, Any], sample_rate: int | None,
                   hours_rate: float | None = None, audio_columns: list[str] | None = None,
                   audio_format: str | None = None, **extra: Any) -> dict[str, Any]:
    """The manifest of a dataset whose shards ``records`` describe (in order).

    ``columns``: stored name -> Arrow type; ``roles``: each column's ``ColumnSpec``; ``sample_rate``:
    the audio rate (None without audio); ``hours_rate``: the rate of the records' ``samples`` (default
    ``sample_rate``); ``audio_columns``, ``audio_format``: default those of the audio-role columns; ``extra`` keys (rejects, items, steps) go in before ``prep``.
    """
    audio = audio_columns if audio_columns is not None else [n for n, s in roles.items() if s.role == "audio"]
    formats = {s.format for s in roles.values() if s.role == "audio"}
    rate = hours_rate or sample_rate
    sec = 3600.0 * rate if rate else 1.0
    spk: dict[str, int] = {}
    for r in records:
        for k, v in r["speaker_samples"].items():
            spk[k] = spk.get(k, 0) + v
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "columns": dict(columns),
        "roles": columns_json(roles),
        "audio_columns": audio,
        "audio_format": audio_format or (formats.pop() if len(formats) == 1 else "pcm_s16le"),
        "sample_rate": sample_rate,
        "rows": sum(int(r["rows"]) for r in records),
        "hours": round(sum(r["samples"] for r in records) / sec, 6),
        "num_speakers": len(spk),
        "speaker_hours": {k: round(v / sec, 6) for k, v in sorted(spk.items())},
        "duration_histogram": _histogram([d for r in records for d in r["durations"]]),
        "shards": [{"file": r["file"], "rows": r["rows"], "sha256": r["sha256"]} for r in records if r["file"]],
        **extra,
        "prep": prep,
        "created_by": CREATED_BY,
    }


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode()


def _fs_and_path(folder: str | os.PathLike) -> tuple[Any, str]:
    """(pyarrow filesystem, path) for local folders and ``s3://`` / ``gs://`` URIs."""
    from datasets_prep.storage import filesystem

    return filesystem(folder)


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a dataset folder; raises if the folder is not a (finished, compatible) dataset."""
    filesystem, path = _fs_and_path(folder)
    mpath = f"{path.rstrip('/')}/{MANIFEST_NAME}"
    try:
        with filesystem.open_input_stream(mpath) as f:
            manifest = json.loads(f.read().decode())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{folder} is not a dataset: no {MANIFEST_NAME} "
                                "(was `raytrain prep` interrupted? re-run it)") from e
    version = manifest.get("schema_version")
    if version not in READ_VERSIONS:
        raise ValueError(f"{folder}/{MANIFEST_NAME} has schema_version {version}, this raytrain reads "
                         f"{', '.join(map(str, READ_VERSIONS))}: re-run `raytrain prep` to rewrite the shards"
                         + (" (or update raytrain)" if isinstance(version, int) and version > SCHEMA_VERSION else ""))
    return manifest


def shard_paths(folder: str | os.PathLike, manifest: dict) -> list[str]:
    """Absolute paths (or URIs, for remote folders) of the manifest's shards, in order."""
    s = str(folder)
    if "://" in s:
        return [f"{s.rstrip('/')}/{sh['file']}" for sh in manifest["shards"]]
    base = Path(s).resolve()
    return [str(base / sh["file"]) for sh in manifest["shards"]]
