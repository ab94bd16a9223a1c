"""Parquet shards + ``_manifest.json``: the one contract between data prep and training.

A dataset is a folder of ``shard-00000.parquet``, ``shard-00001.parquet``, ... and a
``_manifest.json`` written LAST. A folder without a manifest is not a dataset (an
interrupted prep), so readers never see half a dataset. Every file is written under a
temp name in the same folder and renamed (atomic on POSIX). Rows arrive in a
deterministic order, so a re-run after a crash skips shards that are already on disk
(after checking their ids and prep hash) and only writes the missing ones.

Audio is stored as raw ``pcm_s16le`` mono bytes (``encode_pcm16``): half the size of
float32, no codec to install, and decoding is one ``np.frombuffer``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
MANIFEST_NAME = "_manifest.json"
AUDIO_FORMAT = "pcm_s16le"
CREATED_BY = "raytrain datasets_prep"
_PREP_META_KEY = b"raytrain.prep_sha256"

SCHEMAS: dict[str, pa.Schema] = {
    # single-speaker utterances (train / dev_speech)
    "speech": pa.schema([
        ("id", pa.string()), ("speaker", pa.string()), ("text", pa.string()), ("audio", pa.binary()),
        ("num_samples", pa.int64()), ("sample_rate", pa.int32()),
    ]),
    # fixed 2-speaker mixtures (dev/test); speakers is "spkA,spkB", mix == s1 + s2
    "mixtures": pa.schema([
        ("id", pa.string()), ("speakers", pa.string()), ("mix", pa.binary()), ("s1", pa.binary()),
        ("s2", pa.binary()), ("num_samples", pa.int64()), ("sample_rate", pa.int32()),
    ]),
}


def encode_pcm16(wave: np.ndarray) -> bytes:
    """float in [-1, 1] (any shape, usually (T,)) -> little-endian int16 bytes; values are clipped.

    Scale 32768 matches soundfile's int16 -> float conversion, so a PCM16 wav read as float
    and re-encoded gives back the exact same bytes.
    """
    x = np.clip(np.asarray(wave, dtype=np.float64) * 32768.0, -32768.0, 32767.0)
    return np.rint(x).astype("<i2").tobytes()


def decode_pcm16(data: bytes) -> np.ndarray:
    """pcm_s16le bytes -> float32 array of shape (T,) in [-1, 1)."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


AUDIO_FORMATS = ("pcm_s16le", "flac", "f32le")


def encode_audio(wave: np.ndarray, fmt: str, sample_rate: int) -> bytes:
    """float32 (T,) -> bytes in ``fmt``: ``pcm_s16le`` (default), ``flac`` (lossless 16-bit, ~half
    the size, costs a decode), or ``f32le`` (float32, no quantization, twice the size)."""
    if fmt == "pcm_s16le":
        return encode_pcm16(wave)
    if fmt == "f32le":
        return np.asarray(wave, dtype="<f4").tobytes()
    if fmt == "flac":
        import io

        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, np.clip(np.asarray(wave, dtype=np.float32), -1.0, 32767 / 32768), sample_rate,
                 format="FLAC", subtype="PCM_16")
        return buf.getvalue()
    raise ValueError(f"audio format {fmt!r} is unknown; use one of {AUDIO_FORMATS}")


def decode_audio(data: bytes, fmt: str = "pcm_s16le") -> np.ndarray:
    """bytes in ``fmt`` (see ``encode_audio``) -> float32 (T,)."""
    if fmt == "pcm_s16le":
        return decode_pcm16(data)
    if fmt == "f32le":
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if fmt == "flac":
        import io

        import soundfile as sf

        return sf.read(io.BytesIO(data), dtype="float32")[0]
    raise ValueError(f"audio format {fmt!r} is unknown; use one of {AUDIO_FORMATS}")


def encode_tokens(arr: np.ndarray) -> tuple[bytes, list[int], str]:
    """A numeric array (tokens, codes) -> (raw little-endian bytes, shape, dtype name), three columns of a row."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biufc":
        raise ValueError(f"tokens must be a numeric array, got dtype {arr.dtype}")
    little = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return little.tobytes(), [int(n) for n in arr.shape], arr.dtype.name


def decode_tokens(data: bytes, shape: list[int] | tuple[int, ...], dtype: str) -> np.ndarray:
    """``encode_tokens``' columns -> the array (a writable copy, native byte order)."""
    raw = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"))
    return raw.astype(np.dtype(dtype)).reshape(tuple(int(n) for n in shape))


def _json_normal(obj: Any) -> Any:
    """Tuples -> lists etc., so a prep dict compares equal to the one read back from JSON."""
    return json.loads(json.dumps(obj, sort_keys=True))


def prep_sha256(prep: dict | None) -> str:
    return hashlib.sha256(json.dumps(_json_normal(prep or {}), sort_keys=True).encode()).hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Buffers rows and writes ``rows_per_shard``-row Parquet shards, then the manifest.

    Use as a context manager; the manifest is written only on a clean exit::

        with ShardWriter(out, kind="speech", sample_rate=8000, audio_columns=["audio"]) as w:
            w.write({"id": "spk/0001", "speaker": "spk", "text": "hi", "audio": wave})

    Audio values may be float arrays (encoded with ``encode_pcm16``) or ready PCM16 bytes;
    ``num_samples`` and ``sample_rate`` are filled in when missing.
    """

    def __init__(self, out_dir: str | os.PathLike, *, kind: str, sample_rate: int, audio_columns: list[str],
                 rows_per_shard: int = 200, prep: dict | None = None) -> None:
        if kind not in SCHEMAS:
            raise ValueError(f"ShardWriter kind={kind!r} is unknown; use one of {sorted(SCHEMAS)}")
        self.schema = SCHEMAS[kind]
        binary = [f.name for f in self.schema if f.type == pa.binary()]
        if sorted(audio_columns) != sorted(binary):
            raise ValueError(f"ShardWriter kind={kind!r} has audio columns {binary}, got audio_columns={audio_columns}")
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.out_dir = Path(out_dir)
        self.kind, self.sample_rate, self.audio_columns = kind, int(sample_rate), list(audio_columns)
        self.rows_per_shard = rows_per_shard
        self.prep = _json_normal(prep or {})
        self._prep_sha = prep_sha256(self.prep).encode()
        self._buffer: list[dict] = []
        self._shards: list[dict] = []
        self._rows = 0
        self._samples = 0
        self._speaker_samples: dict[str, int] = {}
        self.skipped_shards = 0

    # -- context manager -------------------------------------------------------------
    def __enter__(self) -> ShardWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for p in self.out_dir.glob(".*.tmp"):  # leftovers of a killed run
            p.unlink()
        # the dataset is being (re)written: it stops being a dataset until the new manifest lands
        (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for p in self.out_dir.glob(".*.tmp"):
                p.unlink(missing_ok=True)
            return
        if self._buffer or not self._shards:
            self._flush()
        for p in self.out_dir.glob("shard-*.parquet"):  # stale shards of a bigger earlier run
            if p.name not in {s["file"] for s in self._shards}:
                p.unlink()
        _atomic_write_bytes(self.out_dir / MANIFEST_NAME, (json.dumps(self.manifest(), indent=2) + "\n").encode())

    # -- rows ------------------------------------------------------------------------
    def write(self, row: dict) -> None:
        row = dict(row)
        for col in self.audio_columns:
            if isinstance(row.get(col), np.ndarray):
                row[col] = encode_pcm16(row[col])
        if "num_samples" not in row:
            row["num_samples"] = len(row[self.audio_columns[0]]) // 2
        row.setdefault("sample_rate", self.sample_rate)
        names = set(self.schema.names)
        if set(row) != names:
            raise ValueError(f"row {row.get('id')!r} for a {self.kind!r} shard: missing keys "
                             f"{sorted(names - set(row))}, unexpected keys {sorted(set(row) - names)}")
        if int(row["sample_rate"]) != self.sample_rate:
            raise ValueError(f"row {row['id']!r} has sample_rate {row['sample_rate']}, the dataset is "
                             f"{self.sample_rate} Hz: resample before writing")
        n = int(row["num_samples"])
        for col in self.audio_columns:
            if len(row[col]) != 2 * n:
                raise ValueError(f"row {row['id']!r}: column {col!r} has {len(row[col]) // 2} samples, "
                                 f"num_samples says {n}")
        self._rows += 1
        self._samples += n
        spk_key = "speaker" if self.kind == "speech" else "speakers"
        for spk in str(row[spk_key]).split(","):
            self._speaker_samples[spk] = self._speaker_samples.get(spk, 0) + n
        self._buffer.append(row)
        if len(self._buffer) >= self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        name = f"shard-{len(self._shards):05d}.parquet"
        path = self.out_dir / name
        ids = [r["id"] for r in self._buffer]
        existing = self._existing_shard(path, ids)
        if existing is not None:
            self._shards.append({"file": name, "rows": len(ids), "sha256": existing})
            self.skipped_shards += 1
        else:
            cols = {f.name: [r[f.name] for r in self._buffer] for f in self.schema}
            table = pa.table(cols, schema=self.schema.with_metadata({_PREP_META_KEY: self._prep_sha}))
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd", row_group_size=max(1, len(ids)),
                           use_dictionary=[c for c in self.schema.names if c not in self.audio_columns],
                           write_statistics=[c for c in self.schema.names if c not in self.audio_columns])
            data = sink.getvalue().to_pybytes()
            _atomic_write_bytes(path, data)
            self._shards.append({"file": name, "rows": len(ids), "sha256": hashlib.sha256(data).hexdigest()})
        self._buffer = []

    def _existing_shard(self, path: Path, ids: list[str]) -> str | None:
        """sha256 of ``path`` if it is a finished shard of this very dataset (same prep, same ids)."""
        if not path.exists():
            return None
        try:
            meta = pq.read_schema(path).metadata or {}
            same = meta.get(_PREP_META_KEY) == self._prep_sha and \
                pq.read_table(path, columns=["id"]).column("id").to_pylist() == ids
        except (pa.ArrowException, OSError):
            same = False  # unreadable: rewrite it
        return hashlib.sha256(path.read_bytes()).hexdigest() if same else None

    def manifest(self) -> dict:
        sec = 3600.0 * self.sample_rate
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind,
            "columns": {f.name: str(f.type) for f in self.schema},
            "audio_columns": self.audio_columns,
            "audio_format": AUDIO_FORMAT,
            "sample_rate": self.sample_rate,
            "rows": self._rows,
            "hours": round(self._samples / sec, 6),
            "num_speakers": len(self._speaker_samples),
            "speaker_hours": {k: round(v / sec, 6) for k, v in sorted(self._speaker_samples.items())},
            "shards": list(self._shards),
            "prep": self.prep,
            "created_by": CREATED_BY,
        }


def _fs_and_path(folder: str | os.PathLike):
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
    if version != SCHEMA_VERSION:
        raise ValueError(f"{folder}/{MANIFEST_NAME} has schema_version {version}, this raytrain reads "
                         f"{SCHEMA_VERSION}: re-run `raytrain prep` to rewrite the shards")
    return manifest


def shard_paths(folder: str | os.PathLike, manifest: dict) -> list[str]:
    """Absolute paths (or URIs, for remote folders) of the manifest's shards, in order."""
    s = str(folder)
    if "://" in s:
        return [f"{s.rstrip('/')}/{sh['file']}" for sh in manifest["shards"]]
    base = Path(s).resolve()
    return [str(base / sh["file"]) for sh in manifest["shards"]]
