"""Parquet shards + ``_manifest.json``: the one contract between data prep and training.

A dataset is a folder of ``shard-00000.parquet``, ``shard-00001.parquet``, ... and a
``_manifest.json`` written LAST. A folder without a manifest is not a dataset (an
interrupted prep), so readers never see half a dataset. Every file is written under a
temp name in the same folder and renamed (atomic on POSIX). Rows arrive in a
deterministic order, so a re-run after a crash skips shards that are already on disk
(after checking their ids and prep hash) and only writes the missing ones.

``DatasetWriter`` writes rows of any columns its ``ColumnSpec``s declare (audio, video frames,
tokens, feature frames, text, ids, labels, meta; see ``datasets_prep.columns`` and
``datasets_prep.codecs`` for how each is stored); ``ShardWriter`` is the same writer with the
fixed columns of the two original kinds (``speech``, ``mixtures``). ``datasets_prep.execute``
writes its chunks with ``parquet_bytes`` and builds its manifest with the same
``datasets_prep.manifest.build_manifest``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from datasets_prep.codecs import (  # noqa: F401 - the contract's codecs, importable from here as before
    decode_audio,
    decode_pcm16,
    decode_tokens,
    encode_audio,
    encode_pcm16,
    encode_tokens,
    encode_value,
    frames,
)
from datasets_prep.columns import AUDIO_FORMATS, ColumnSpec, columns_json  # noqa: F401
from datasets_prep.manifest import (  # noqa: F401
    CREATED_BY,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    build_manifest,
    main_time_column,
    manifest_bytes,
    read_manifest,
    row_stats,
    shard_paths,
    shard_record,
    speaker_column,
)

AUDIO_FORMAT = "pcm_s16le"
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


def parquet_bytes(table: pa.Table) -> bytes:
    """A shard's bytes: zstd, one row group, no dictionary or statistics for binary (audio, arrays) columns."""
    sink = pa.BufferOutputStream()
    binary = [f.name for f in table.schema if pa.types.is_binary(f.type)]
    pq.write_table(table, sink, compression="zstd", row_group_size=max(1, table.num_rows),
                   use_dictionary=[c for c in table.column_names if c not in binary],
                   write_statistics=[c for c in table.column_names if c not in binary])
    return sink.getvalue().to_pybytes()


def _numpy(x: Any) -> Any:
    """A torch tensor (a model's output) as numpy; anything else as it is."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


class DatasetWriter:
    """Buffers rows and writes ``rows_per_shard``-row Parquet shards, then the manifest.

    Use as a context manager; the manifest is written only on a clean exit::

        cols = {"id": ColumnSpec.id(), "audio": ColumnSpec.audio(16000),
                "lips": ColumnSpec.video(fps=25, height=96, width=96, channels=1),
                "latents": ColumnSpec.features(frame_rate=50, dims=8)}
        with DatasetWriter(out, cols, kind="av") as w:
            w.write({"id": "utt1", "audio": wave, "lips": frames, "latents": z})  # numpy arrays
            w.write_batch({"id": ids, "latents": padded, "latents_lengths": lengths, ...})

    Every declared column must be in every row (None for a value the row lacks). Values are encoded
    by their column's role (``datasets_prep.codecs.encode_value``); bytes pass through as already encoded.
    """

    def __init__(self, out_dir: str | os.PathLike, columns: Mapping[str, ColumnSpec], *, kind: str = "custom",
                 rows_per_shard: int = 200, prep: dict | None = None) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.columns = {str(n): s if isinstance(s, ColumnSpec) else ColumnSpec.model_validate(s)
                        for n, s in columns.items()}
        ids = [n for n, s in self.columns.items() if s.role == "id"]
        if not ids:
            raise ValueError(f"a dataset needs an id column (ColumnSpec.id()); columns: {sorted(self.columns)}")
        self.id_column = ids[0]
        self.out_dir = Path(out_dir)
        self.kind, self.rows_per_shard = kind, rows_per_shard
        self.prep = _json_normal(prep or {})
        self._prep_sha = self._sha().encode()
        self.main = main_time_column(self.columns)
        self.speaker = speaker_column(self.columns)
        self._types: dict[str, pa.DataType] = {n: t for n, s in self.columns.items()
                                               if (t := s.arrow_type()) is not None}
        self._buffer: list[dict[str, Any]] = []
        self._lengths: list[int] = []
        self._records: list[dict[str, Any]] = []
        self.skipped_shards = 0

    def _sha(self) -> str:
        return prep_sha256({"prep": self.prep, "roles": columns_json(self.columns)})

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> DatasetWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for p in self.out_dir.glob(".*.tmp"):  # leftovers of a killed run
            p.unlink()
        # the dataset is being (re)written: it stops being a dataset until the new manifest lands
        (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            for p in self.out_dir.glob(".*.tmp"):
                p.unlink(missing_ok=True)
            return
        if self._buffer or not self._records:
            self._flush()
        for p in self.out_dir.glob("shard-*.parquet"):  # stale shards of a bigger earlier run
            if p.name not in {r["file"] for r in self._records}:
                p.unlink()
        _atomic_write_bytes(self.out_dir / MANIFEST_NAME, manifest_bytes(self.manifest()))

    # -- rows ------------------------------------------------------------------------------------
    def _complete(self, row: dict[str, Any]) -> dict[str, Any]:
        """Fill in what a row may leave out (a subclass's derived columns)."""
        return row

    def _check(self, row: dict[str, Any]) -> None:
        """Checks of an encoded row beyond its columns' own (a subclass's)."""

    def write(self, row: Mapping[str, Any]) -> None:
        row = self._complete({k: _numpy(v) for k, v in row.items()})
        names = set(self.columns)
        if set(row) != names:
            raise ValueError(f"row {row.get(self.id_column)!r} for a {self.kind!r} dataset: missing keys "
                             f"{sorted(names - set(row))}, unexpected keys {sorted(set(row) - names)}")
        enc = {n: encode_value(n, spec, row[n]) for n, spec in self.columns.items()}
        self._check(enc)
        self._buffer.append(enc)
        self._lengths.append(frames(self.columns[self.main], enc[self.main]) if self.main else 0)
        if len(self._buffer) >= self.rows_per_shard:
            self._flush()

    def write_batch(self, batch: Mapping[str, Any]) -> None:
        """Write the rows of a batch of columns (sequences or arrays of equal length, e.g. a model's padded
        outputs): a time column ``c`` with ``c_lengths`` in the batch is cut to each row's length (the main
        audio column also by ``lengths``); keys that are not columns are ignored."""
        n = len(batch[self.id_column])
        for i in range(n):
            row = {}
            for name, spec in self.columns.items():
                value = _numpy(batch[name][i]) if name in batch else None
                lengths = batch.get(f"{name}_lengths", batch.get("lengths") if name == self.main else None)
                if spec.is_time and lengths is not None and value is not None:
                    value = value[: int(_numpy(lengths[i]))]
                row[name] = value
            self.write(row)

    def _table(self) -> pa.Table:
        arrays, fields = [], []
        for name in self.columns:
            values = [r[name] for r in self._buffer]
            arr = pa.array(values, type=self._types.get(name))
            if name not in self._types and not pa.types.is_null(arr.type):
                self._types[name] = arr.type  # a meta column: the type of its first values, for every shard
            arrays.append(arr)
            fields.append(pa.field(name, arr.type))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata={_PREP_META_KEY: self._prep_sha}))

    def _flush(self) -> None:
        name = f"shard-{len(self._records):05d}.parquet"
        path = self.out_dir / name
        ids = [r[self.id_column] for r in self._buffer]
        sha = self._existing_shard(path, ids)
        if sha is not None:
            self.skipped_shards += 1
        else:
            data = parquet_bytes(self._table())
            _atomic_write_bytes(path, data)
            sha = hashlib.sha256(data).hexdigest()
        rate = float(self.columns[self.main].time_rate() or 1.0) if self.main else 1.0
        stats = row_stats(self._buffer, self._lengths, [rate] * len(self._lengths), self.speaker)
        self._records.append(shard_record(name, len(ids), sha, stats))
        self._buffer, self._lengths = [], []

    def _existing_shard(self, path: Path, ids: list[str]) -> str | None:
        """sha256 of ``path`` if it is a finished shard of this very dataset (same prep, same ids)."""
        if not path.exists():
            return None
        try:
            meta = pq.read_schema(path).metadata or {}
            same = meta.get(_PREP_META_KEY) == self._prep_sha and \
                pq.read_table(path, columns=[self.id_column]).column(self.id_column).to_pylist() == ids
        except (pa.ArrowException, OSError):
            same = False  # unreadable: rewrite it
        return hashlib.sha256(path.read_bytes()).hexdigest() if same else None

    def manifest(self) -> dict:
        stored = {n: str(self._types.get(n, pa.null())) for n in self.columns}
        audio = [s.sample_rate for s in self.columns.values() if s.role == "audio"]
        main_rate = self.columns[self.main].time_rate() if self.main else None
        return build_manifest(kind=self.kind, records=self._records, columns=stored, roles=self.columns,
                              prep=self.prep, sample_rate=audio[0] if audio else None, hours_rate=main_rate)


def legacy_columns(kind: str, sample_rate: int) -> dict[str, ColumnSpec]:
    """The columns of a ``SCHEMAS`` kind as ``ColumnSpec``s."""
    roles = {"id": ColumnSpec.id(), "speaker": ColumnSpec.label(), "speakers": ColumnSpec.label(),
             "text": ColumnSpec.text()}
    out = {}
    for f in SCHEMAS[kind]:
        if f.type == pa.binary():
            out[f.name] = ColumnSpec.audio(sample_rate, AUDIO_FORMAT)
        else:
            out[f.name] = roles.get(f.name) or ColumnSpec.meta(str(f.type))
    return out


class ShardWriter(DatasetWriter):
    """``DatasetWriter`` of a fixed kind of ``SCHEMAS`` (``speech``, ``mixtures``) at one sample rate::

        with ShardWriter(out, kind="speech", sample_rate=8000, audio_columns=["audio"]) as w:
            w.write({"id": "spk/0001", "speaker": "spk", "text": "hi", "audio": wave})

    Audio values may be float arrays (encoded with ``encode_pcm16``) or ready PCM16 bytes;
    ``num_samples`` and ``sample_rate`` are filled in when missing.
    """

    def __init__(self, out_dir: str | os.PathLike, *, kind: str, sample_rate: int, audio_columns: list[str],
                 rows_per_shard: int = 200, prep: dict | None = None) -> None:
        if kind not in SCHEMAS:
            raise ValueError(f"ShardWriter kind={kind!r} is unknown; use one of {sorted(SCHEMAS)} "
                             "(or DatasetWriter with the columns of your data)")
        binary = [f.name for f in SCHEMAS[kind] if f.type == pa.binary()]
        if sorted(audio_columns) != sorted(binary):
            raise ValueError(f"ShardWriter kind={kind!r} has audio columns {binary}, got audio_columns={audio_columns}")
        self.sample_rate, self.audio_columns = int(sample_rate), list(audio_columns)
        super().__init__(out_dir, legacy_columns(kind, self.sample_rate), kind=kind, rows_per_shard=rows_per_shard,
                         prep=prep)

    def _complete(self, row: dict[str, Any]) -> dict[str, Any]:
        first = row.get(self.audio_columns[0])
        if "num_samples" not in row and first is not None:
            row["num_samples"] = len(first) // 2 if isinstance(first, bytes | bytearray) else len(first)
        row.setdefault("sample_rate", self.sample_rate)
        return row

    def _check(self, row: dict[str, Any]) -> None:
        if int(row["sample_rate"]) != self.sample_rate:
            raise ValueError(f"row {row['id']!r} has sample_rate {row['sample_rate']}, the dataset is "
                             f"{self.sample_rate} Hz: resample before writing")
        n = int(row["num_samples"])
        for col in self.audio_columns:
            if len(row[col]) != 2 * n:
                raise ValueError(f"row {row['id']!r}: column {col!r} has {len(row[col]) // 2} samples, "
                                 f"num_samples says {n}")
