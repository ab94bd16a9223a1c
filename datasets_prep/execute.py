"""Items -> processed shards, in parallel on Ray Data, restartable, with a rejects table.

The items (from ``datasets_prep.readers.manifests``) are cut into fixed chunks of
``rows_per_shard`` items (or, with ``shard_mb``, of about that many megabytes of input audio,
and never more than ``rows_per_shard`` items); chunk ``i`` becomes ``shard-0000i.parquet`` plus a small
``.shard-0000i.json`` record (its rows, seconds per speaker, durations, rejects, sha256)
written after it. Each chunk is one Ray Data row, processed by ``map_batches`` on
``workers`` CPUs: load -> steps -> encode -> atomic write. A re-run skips every chunk
whose record carries the same key (prep parameters + item ids) and whose shard still has
the recorded sha256, so a killed run resumes where it stopped and ends with the same
bytes. Once every chunk is done, the driver gives all shards one schema (``unify_shards``:
a column that was all None or absent in a chunk is rewritten there with the others' type).
``_manifest.json`` (and ``_rejects.parquet``) are written last, by the driver. A row read from a JSONL
manifest keeps its line number as the int column ``line`` (what a later phase names it by).

An item that cannot be used (unreadable, empty, NaN, wrong rate, too short after
trimming...) is a reject: a row of ``_rejects.parquet`` with its reason, counted in the
manifest and printed at the end; it never stops the job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datasets_prep.columns import derive_columns
from datasets_prep.faults import pause_point
from datasets_prep.manifest import build_manifest, manifest_bytes, row_stats, shard_record
from datasets_prep.readers.manifests import LINE_COLUMN, LINE_KEY, line_number
from datasets_prep.shards import (
    AUDIO_FORMATS,
    MANIFEST_NAME,
    _atomic_write_bytes,
    encode_audio,
    parquet_bytes,
    prep_sha256,
)
from datasets_prep.steps.audio import Chain
from datasets_prep.steps.load import Reject, load_item

REJECTS_NAME = "_rejects.parquet"  # "_": not a shard to readers of the folder
_KEY_META = b"raytrain.chunk_key"


def _record_path(out_dir: Path, i: int) -> Path:
    return out_dir / f".shard-{i:05d}.json"


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


def chunk_key(prep: dict[str, Any], items: list[dict[str, Any]]) -> str:
    ids = "\n".join(str(it["id"]) for it in items)
    return hashlib.sha256(f"{prep_sha256(prep)}\n{ids}".encode()).hexdigest()


def _arrow_value(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


def process_chunk(items: list[dict[str, Any]], *, audio_columns: list[str], chain: Chain,
                  expect_sample_rate: int | None, audio_format: str) -> tuple[list[dict[str, Any]], list[dict]]:
    """(output rows ready for Parquet, rejects) of one chunk; never raises for a bad item."""
    rows, rejects = [], []
    for item in items:
        source = item.get(LINE_KEY) or next((str(item[c]) for c in audio_columns if c in item), "")
        try:
            loaded = load_item(item, audio_columns, expect_sample_rate=expect_sample_rate)
            outs = chain(loaded)
        except Reject as e:
            rejects.append({"id": str(item["id"]), "source": source, "reason": str(e)})
            continue
        for r in outs:
            sr = int(r["sample_rate"])
            n = len(r[audio_columns[0]])
            row = {k: _arrow_value(v) for k, v in r.items()
                   if k not in audio_columns and k not in ("mel", "f0", LINE_KEY)}
            for c in audio_columns:
                row[c] = encode_audio(r[c], audio_format, sr)
            if "mel" in r:
                row["mel"] = np.ascontiguousarray(r["mel"], dtype="<f4").tobytes()
                row["mel_frames"], row["n_mels"] = int(r["mel"].shape[0]), int(r["mel"].shape[1])
            if "f0" in r:
                row["f0"] = np.ascontiguousarray(r["f0"], dtype="<f4").tobytes()
            row["num_samples"], row["sample_rate"] = n, sr
            row["id"] = str(r["id"])
            line = line_number(r)
            if line is not None:  # a JSONL row: later phases name it as <manifest>:<line>
                row[LINE_COLUMN] = line
            rows.append(row)
    return rows, rejects


def _table(rows: list[dict[str, Any]], key: str) -> pa.Table:
    cols: dict[str, list[Any]] = {}
    for name in ["id", *sorted({k for r in rows for k in r} - {"id"})]:
        cols[name] = [r.get(name) for r in rows]
    table = pa.table(cols)
    return table.replace_schema_metadata({_KEY_META: key.encode()})


def _schema_columns(schema: pa.Schema) -> dict[str, str]:
    return {f.name: str(f.type) for f in schema}


def _read_columns(data: bytes) -> dict[str, str]:
    """{column: type} as readers of the shard ``data`` see it (Parquet names list items ``element``)."""
    return _schema_columns(pq.read_schema(pa.BufferReader(data)))


def write_chunk(out_dir: Path, i: int, items: list[dict[str, Any]], key: str, **kw: Any) -> dict[str, Any]:
    """Process chunk ``i`` and write its shard and record atomically; returns the record."""
    pause_point("shard", i, out_dir)
    rows, rejects = process_chunk(items, **kw)
    audio_columns = kw["audio_columns"]
    info: dict[str, Any] = {"key": key, "index": i, "items": len(items), "rejects": rejects}
    if rows:
        data = parquet_bytes(_table(rows, key))
        _atomic_write_bytes(out_dir / _shard_name(i), data)
        rates = {int(r["sample_rate"]) for r in rows}
        spk_key = "speaker" if "speaker" in rows[0] else "speakers" if "speakers" in rows[0] else None
        stats = row_stats(rows, [int(r["num_samples"]) for r in rows], [int(r["sample_rate"]) for r in rows], spk_key)
        record = shard_record(_shard_name(i), len(rows), hashlib.sha256(data).hexdigest(), stats, **info,
                              sample_rate=rates.pop() if len(rates) == 1 else sorted(rates),
                              columns=_read_columns(data), audio_columns=list(audio_columns))
    else:
        (out_dir / _shard_name(i)).unlink(missing_ok=True)
        record = shard_record(None, 0, None, {}, **info, sample_rate=None, columns={})
    _atomic_write_bytes(_record_path(out_dir, i), json.dumps(record).encode())
    return record


def _finished(out_dir: Path, i: int, key: str) -> dict[str, Any] | None:
    """The record of chunk ``i`` if it was written for this very key and its shard is intact."""
    path = _record_path(out_dir, i)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("key") != key:
        return None
    if record["file"] is not None:
        shard = out_dir / record["file"]
        if not shard.exists() or hashlib.sha256(shard.read_bytes()).hexdigest() != record["sha256"]:
            return None
    return record


def _write_chunks(batch: dict[str, np.ndarray], out_dir: str, kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
    """map_batches UDF (batch_size=1): one chunk per call."""
    out = []
    for i, payload, key in zip(batch["index"], batch["items"], batch["key"], strict=True):
        rec = write_chunk(Path(out_dir), int(i), json.loads(payload), str(key), **kwargs)
        out.append(json.dumps(rec))
    return {"record": np.array(out, dtype=object)}


def run_chunks(out_dir: Path, todo: list[tuple[int, list[dict[str, Any]], str]], kwargs: dict[str, Any],
               workers: int, on_done: Callable[[dict[str, Any]], None]) -> None:
    """Process ``todo`` chunks (``kwargs`` go to ``write_chunk``): here when ``workers`` is 0, else on Ray Data."""
    if not todo:
        return
    if workers == 0:
        for i, items, key in todo:
            on_done(write_chunk(out_dir, i, items, key, **kwargs))
        return
    import ray
    import ray.data

    from raytrain.session import quiet_data_context, ray_init

    if not ray.is_initialized():  # a local Ray on loopback, set up as for training
        ray_init()
    quiet_data_context()  # one bar: ours, per finished shard
    source = ray.data.from_items([{"index": i, "items": json.dumps(items), "key": key} for i, items, key in todo],
                                 override_num_blocks=len(todo))
    # At most `workers` tasks at once, and no more than there are chunks (Ray Data warns of a limit above its
    # inputs). `compute=`: `concurrency=` is deprecated since Ray 2.51. Tasks, not an actor pool: a chunk needs
    # no set-up to keep, and Ray warns of every pool actor whose constructor arguments are in the object store.
    size = min(workers, len(todo))
    ds = source.map_batches(partial(_write_chunks, out_dir=str(out_dir), kwargs=kwargs), batch_size=1,
                            batch_format="numpy", compute=ray.data.TaskPoolStrategy(size=size), num_cpus=1)
    for row in ds.iter_rows():
        on_done(json.loads(row["record"]))


def _merge_types(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type holding values of ``a`` and ``b`` when they differ only by ``null`` (also inside lists and
    structs: a chunk whose rows all had ``[]``); None when they are two concrete types."""
    if a.equals(b):
        return a
    if pa.types.is_null(a):
        return b
    if pa.types.is_null(b):
        return a
    if pa.types.is_list(a) and pa.types.is_list(b):
        value = _merge_types(a.value_type, b.value_type)
        return None if value is None else pa.list_(a.value_field.with_type(value))
    if pa.types.is_struct(a) and pa.types.is_struct(b) and [f.name for f in a] == [f.name for f in b]:
        fields = []
        for fa, fb in zip(a, b, strict=True):
            t = _merge_types(fa.type, fb.type)
            if t is None:
                return None
            fields.append(fa.with_type(t))
        return pa.struct(fields)
    return None


def unify_shards(out: Path, records: list[dict[str, Any]]) -> None:
    """Give every shard of ``records`` one schema: ``id``, then the other columns sorted.

    Each chunk's table is typed from its own rows, so a field that is None in all of a chunk's
    rows is ``null`` there, and a field absent from them is missing. Such shards are rewritten
    (missing columns as nulls, ``null`` ones cast to the type the others have, chunk key kept)
    and their records get the new sha256 and columns, so a re-run still finds them finished.
    A column with two concrete types is a ValueError naming both shards.
    """
    written = [r for r in records if r["file"]]
    if len({json.dumps(list(r["columns"].items())) for r in written}) <= 1:
        return  # the usual case: every chunk came out with the same columns
    schemas = {r["file"]: pq.read_schema(out / r["file"]) for r in written}
    types: dict[str, tuple[pa.DataType, str]] = {}  # column -> (type so far, a shard that has it)
    for file, schema in schemas.items():
        for f in schema:
            if f.name not in types:
                types[f.name] = (f.type, file)
                continue
            seen, where = types[f.name]
            merged = _merge_types(seen, f.type)
            if merged is None:
                raise ValueError(f"{out}: column {f.name!r} is {seen} in {where} but {f.type} in {file}: give the "
                                 "field one type in every row of the source (or null)")
            if not merged.equals(seen):
                types[f.name] = (merged, file)
    unified = pa.schema([(n, types[n][0]) for n in ["id", *sorted(set(types) - {"id"})]])
    columns = _schema_columns(unified)
    for r in written:
        path = out / r["file"]
        if not schemas[r["file"]].equals(unified):
            table = pq.read_table(path)
            arrays = [table.column(f.name).cast(f.type) if f.name in table.column_names
                      else pa.chunked_array([pa.nulls(table.num_rows, f.type)]) for f in unified]
            key = (table.schema.metadata or {}).get(_KEY_META, b"")
            data = parquet_bytes(pa.Table.from_arrays(arrays, schema=unified.with_metadata({_KEY_META: key})))
            _atomic_write_bytes(path, data)
            r["sha256"] = hashlib.sha256(data).hexdigest()
        elif list(r["columns"].items()) == list(columns.items()):
            continue
        r["columns"] = columns
        _atomic_write_bytes(_record_path(out, int(r["index"])), json.dumps(r).encode())


def _item_bytes(item: dict[str, Any], audio_columns: list[str]) -> int:
    """Bytes of an item's input audio files (0 for one that is missing: it will be a reject)."""
    total = 0
    for c in audio_columns:
        path = item.get(c)
        if isinstance(path, str) and "://" not in path:
            with contextlib.suppress(OSError):
                total += os.path.getsize(path)
    return total


def cut_chunks(items: list[dict[str, Any]], rows_per_shard: int, shard_mb: float | None = None,
               audio_columns: list[str] | None = None) -> list[list[dict[str, Any]]]:
    """Consecutive chunks of at most ``rows_per_shard`` items; with ``shard_mb``, a chunk also ends
    before the item that would take its input audio past ``shard_mb`` megabytes (a bigger single item
    is a chunk of its own). Input bytes stand for shard bytes: PCM16 at the input's rate stores about
    as much as a wav file; resampling or FLAC changes it in proportion."""
    if shard_mb is None:
        return [items[k:k + rows_per_shard] for k in range(0, len(items), rows_per_shard)]
    limit = shard_mb * 1e6
    chunks: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    size = 0
    for item in items:
        b = _item_bytes(item, audio_columns or [])
        if current and (size + b > limit or len(current) >= rows_per_shard):
            chunks.append(current)
            current, size = [], 0
        current.append(item)
        size += b
    if current:
        chunks.append(current)
    return chunks


def prepare_items(items: list[dict[str, Any]], out_dir: str | os.PathLike, *, kind: str, audio_columns: list[str],
                  steps: list[tuple[str, dict[str, Any]]] | None = None, rows_per_shard: int = 200,
                  shard_mb: float | None = None, audio_format: str = "pcm_s16le",
                  expect_sample_rate: int | None = None, workers: int = 2,
                  prep: dict[str, Any] | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Write ``items`` as a dataset folder; returns its manifest (also written as ``_manifest.json``).

    ``steps``: [(name, params)] of ``datasets_prep.steps.audio.STEPS``; ``workers``: Ray Data
    tasks at once (0: this process, no Ray); ``shard_mb``: cut shards by input megabytes (see
    ``cut_chunks``); ``prep``: extra parameters recorded in the manifest.
    """
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"audio_format {audio_format!r} is unknown; use one of {AUDIO_FORMATS}")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    if shard_mb is not None and not shard_mb > 0:
        raise ValueError(f"shard_mb must be > 0, got {shard_mb}")
    steps = list(steps or [])
    chain = Chain(steps, audio_columns)  # validates the steps before any work, and before the folder is touched
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for p in out.glob(".*.tmp"):  # leftovers of a killed run
        p.unlink()
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # not a dataset until this run's manifest lands
    params = {**(prep or {}), "kind": kind, "steps": chain.describe(), "audio_format": audio_format,
              "rows_per_shard": rows_per_shard, "expect_sample_rate": expect_sample_rate}
    if shard_mb is not None:
        params["shard_mb"] = shard_mb
    if any(LINE_KEY in it for it in items):  # JSONL rows: their line column and prompt audio change the rows
        params["audio_columns"] = list(audio_columns)
    chunks = cut_chunks(items, rows_per_shard, shard_mb, list(audio_columns))
    keys = [chunk_key(params, c) for c in chunks]
    records: dict[int, dict[str, Any]] = {}
    todo = []
    for i, (c, key) in enumerate(zip(chunks, keys, strict=True)):
        rec = _finished(out, i, key)
        if rec is not None:
            records[i] = rec
        else:
            todo.append((i, c, key))
    t0 = time.perf_counter()
    bar = None
    tty = (progress if progress is not None else os.isatty(2))
    if todo:
        print(f"prep {out}: {len(items)} items in {len(chunks)} shards, {len(records)} already done, "
              f"{len(todo)} to write on {workers or 'no'} Ray worker{'s' if workers != 1 else ''}", flush=True)
        if tty:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), unit="shard", desc="prep")

    def done(rec: dict[str, Any]) -> None:
        records[int(rec["index"])] = rec
        if bar is not None:
            bar.update(1)
        elif len(records) % max(1, len(chunks) // 10) == 0 or len(records) == len(chunks):
            print(f"  {len(records)}/{len(chunks)} shards ({time.perf_counter() - t0:.0f} s)", flush=True)

    run_chunks(out, todo, {"audio_columns": list(audio_columns), "chain": chain,
                           "expect_sample_rate": expect_sample_rate, "audio_format": audio_format},
               workers, done)
    if bar is not None:
        bar.close()
    ordered = [records[i] for i in range(len(chunks))]
    unify_shards(out, ordered)
    return _write_manifest(out, ordered, kind, audio_columns, params)


def _write_manifest(out: Path, records: list[dict[str, Any]], kind: str, audio_columns: list[str],
                    params: dict[str, Any]) -> dict[str, Any]:
    names = {r["file"] for r in records if r["file"]}
    for p in out.glob("shard-*.parquet"):  # shards of a bigger earlier run
        if p.name not in names:
            p.unlink()
    for p in out.glob(".shard-*.json"):
        if p.name not in {_record_path(out, r["index"]).name for r in records}:
            p.unlink()
    rates = {r["sample_rate"] for r in records if r["sample_rate"] is not None and not isinstance(r["sample_rate"], list)}
    mixed = [r for r in records if isinstance(r["sample_rate"], list)] or len(rates) > 1
    if mixed:
        raise ValueError(f"{out}: the prepared audio has several sample rates {sorted(map(str, rates))}: "
                         "add the resample step (or expect_sample_rate to reject other rates)")
    sr = rates.pop() if rates else (params.get("expect_sample_rate") or 0)
    rejects = [rj for r in records for rj in r["rejects"]]
    table = pa.table({"id": [r["id"] for r in rejects], "source": [r["source"] for r in rejects],
                      "reason": [r["reason"] for r in rejects]},
                     schema=pa.schema([("id", pa.string()), ("source", pa.string()), ("reason", pa.string())]))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    _atomic_write_bytes(out / REJECTS_NAME, sink.getvalue().to_pybytes())
    columns: dict[str, str] = {}
    for r in records:
        columns.update(r["columns"])
    roles = derive_columns({"columns": columns, "audio_columns": list(audio_columns), "sample_rate": sr,
                            "audio_format": params["audio_format"], "steps": params["steps"]})
    manifest = build_manifest(kind=kind, records=records, columns=columns, roles=roles, prep=params,
                              sample_rate=sr, audio_columns=list(audio_columns),
                              audio_format=params["audio_format"],
                              rejects={"count": len(rejects), "file": REJECTS_NAME},
                              items=sum(r["items"] for r in records), steps=params["steps"])
    _atomic_write_bytes(out / MANIFEST_NAME, manifest_bytes(manifest))
    print(f"prep {out}: {manifest['rows']} rows, {manifest['hours']:.3f} h, {len(manifest['shards'])} shards, "
          f"{len(rejects)} rejected")
    for rj in rejects[:20]:  # a manifest line is named; an audio path is in the reason already
        where = f" ({rj['source']})" if rj["source"] and rj["source"] not in rj["reason"] else ""
        print(f"  rejected {rj['id']}{where}: {rj['reason']}")
    if len(rejects) > 20:
        print(f"  ... {len(rejects) - 20} more in {out / REJECTS_NAME}")
    return manifest


def prep_corpus(source: str | os.PathLike, fmt: str, output_dir: str | os.PathLike, *, steps: list[str] | None = None,
                sample_rate: int | None = None, workers: int = 2, rows_per_shard: int = 200,
                shard_mb: float | None = None, audio_format: str = "pcm_s16le",
                progress: bool | None = None) -> dict[str, Any]:
    """The flag form of ``raytrain prep``: list ``source`` as ``fmt``, run ``steps`` with their default
    parameters (``resample`` to ``sample_rate``), write shards to ``output_dir``.

    Without a resample step, ``sample_rate`` is the rate every file must have (others are rejects).
    """
    from datasets_prep.readers.manifests import list_items, with_audio_columns

    steps = list(steps or [])
    if "resample" in steps and not sample_rate:
        raise ValueError("the resample step needs --sample-rate (the output rate)")
    step_params = [(s, {"sample_rate": sample_rate} if s == "resample" else {}) for s in steps]
    items, audio_columns = with_audio_columns(fmt, list_items(fmt, source))
    return prepare_items(items, output_dir, kind="mixtures" if fmt == "wsj0-2mix" else "speech",
                         audio_columns=audio_columns, steps=step_params,
                         rows_per_shard=rows_per_shard, shard_mb=shard_mb, audio_format=audio_format,
                         expect_sample_rate=None if "resample" in steps else sample_rate, workers=workers,
                         prep={"format": fmt, "source": str(source)}, progress=progress)
