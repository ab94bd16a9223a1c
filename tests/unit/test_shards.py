"""ShardWriter / manifest contract: round trip, atomicity, restart, clear errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from datasets_prep.shards import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    ShardWriter,
    decode_pcm16,
    encode_pcm16,
    read_manifest,
    shard_paths,
)


def _rows(n: int, sr: int = 8000) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"id": f"spk{i % 3}/u{i:03d}", "speaker": f"spk{i % 3}", "text": f"word {i}",
             "audio": np.clip(0.2 * rng.standard_normal(sr // 10 + i), -0.9, 0.9).astype(np.float32)} for i in range(n)]


def _write(folder, rows, **kw):
    with ShardWriter(folder, kind="speech", sample_rate=8000, audio_columns=["audio"], rows_per_shard=4,
                     prep={"test": True}, **kw) as w:
        for r in rows:
            w.write(r)
    return w


def test_pcm16_round_trip_and_clipping():
    x = np.array([0.0, 0.5, -0.5, 1.5, -1.5, 1.0], dtype=np.float32)
    data = encode_pcm16(x)
    assert len(data) == 2 * len(x)
    y = decode_pcm16(data)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y[:3], x[:3], atol=1 / 32768)
    assert y[3] == pytest.approx(32767 / 32768) and y[4] == -1.0
    assert encode_pcm16(decode_pcm16(data)) == data  # int16 -> float -> int16 is exact


def test_rows_round_trip_and_manifest(tmp_path):
    rows = _rows(10)
    _write(tmp_path, rows)
    man = read_manifest(tmp_path)
    assert man["schema_version"] == SCHEMA_VERSION and man["kind"] == "speech"
    assert man["rows"] == 10 and [s["rows"] for s in man["shards"]] == [4, 4, 2]
    assert man["columns"]["audio"] == "binary" and man["columns"]["sample_rate"] == "int32"
    assert man["audio_format"] == "pcm_s16le" and man["num_speakers"] == 3
    assert man["prep"] == {"test": True} and man["created_by"] == "raytrain datasets_prep"
    total = sum(len(r["audio"]) for r in rows)
    assert man["hours"] == pytest.approx(total / 8000 / 3600, abs=1e-5)
    assert sum(man["speaker_hours"].values()) == pytest.approx(man["hours"], abs=1e-5)
    paths = shard_paths(tmp_path, man)
    got = [r for p in paths for r in pq.read_table(p).to_pylist()]
    assert [r["id"] for r in got] == [r["id"] for r in rows]
    for g, r in zip(got, rows, strict=True):
        assert g["speaker"] == r["speaker"] and g["text"] == r["text"] and g["sample_rate"] == 8000
        assert g["num_samples"] == len(r["audio"])
        np.testing.assert_allclose(decode_pcm16(g["audio"]), r["audio"], atol=1 / 32768)
    for sh, p in zip(man["shards"], paths, strict=True):
        assert hashlib.sha256(open(p, "rb").read()).hexdigest() == sh["sha256"]
    assert str(pq.read_schema(paths[0]).field("audio").type) == "binary"


def test_exception_leaves_no_manifest_and_no_tmp(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, kind="speech", sample_rate=8000, audio_columns=["audio"], rows_per_shard=4) as w:
            for r in _rows(6):
                w.write(r)
            raise RuntimeError("boom")
    assert not (tmp_path / MANIFEST_NAME).exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(FileNotFoundError, match="not a dataset"):
        read_manifest(tmp_path)


def test_rerun_rewrites_only_missing_shard(tmp_path):
    rows = _rows(10)
    _write(tmp_path, rows)
    first = (tmp_path / MANIFEST_NAME).read_text()
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*.parquet")}
    (tmp_path / "shard-00001.parquet").unlink()
    (tmp_path / ".shard-00002.parquet.tmp").write_bytes(b"half a shard")  # a killed run's leftover
    w = _write(tmp_path, rows)
    assert w.skipped_shards == 2
    assert (tmp_path / MANIFEST_NAME).read_text() == first
    assert not list(tmp_path.glob(".*.tmp"))
    now = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*.parquet")}
    assert now["shard-00000.parquet"] == mtimes["shard-00000.parquet"]
    assert now["shard-00002.parquet"] == mtimes["shard-00002.parquet"]


def test_changed_rows_are_not_skipped(tmp_path):
    _write(tmp_path, _rows(10))
    w = _write(tmp_path, _rows(10)[1:])  # different ids in every shard, one shard fewer
    assert w.skipped_shards == 0
    man = read_manifest(tmp_path)
    assert man["rows"] == 9 and sorted(p.name for p in tmp_path.glob("shard-*")) == [
        "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]


def test_read_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a dataset.*re-run"):
        read_manifest(tmp_path)
    _write(tmp_path, _rows(2))
    man = json.loads((tmp_path / MANIFEST_NAME).read_text())
    man["schema_version"] = 99
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(man))
    with pytest.raises(ValueError, match="schema_version 99"):
        read_manifest(tmp_path)


def test_bad_rows_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        ShardWriter(tmp_path, kind="video", sample_rate=8000, audio_columns=["audio"])
    with ShardWriter(tmp_path, kind="speech", sample_rate=8000, audio_columns=["audio"]) as w:
        with pytest.raises(ValueError, match="missing keys.*text"):
            w.write({"id": "a", "speaker": "s", "audio": np.zeros(10, np.float32)})
        with pytest.raises(ValueError, match="resample"):
            w.write({"id": "a", "speaker": "s", "text": "", "audio": np.zeros(10, np.float32),
                     "sample_rate": 16000})
