"""DatasetWriter: any columns by role, read back whole or in part, exactly."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from datasets_prep.columns import ColumnSpec, manifest_columns
from datasets_prep.dummies import AV_RATES, AV_SECONDS, av_columns, av_row, write_av_dataset
from datasets_prep.manifest import read_manifest, shard_paths
from datasets_prep.shards import DatasetWriter
from raytrain.data.datasets import audio_spec, decode_columns, held_bytes, read_columns
from raytrain.data.stream import Collate


def _read(folder, names: list[str]) -> dict[str, np.ndarray]:
    """The shards' `names` as Ray Data's numpy batches hold them (object arrays for binary columns)."""
    man = read_manifest(folder)
    tables = [pq.read_table(p, columns=names) for p in shard_paths(folder, man)]
    out = {}
    for n in names:
        values = [v for t in tables for v in t.column(n).to_pylist()]
        out[n] = np.empty(len(values), dtype=object)
        out[n][:] = values
    return out


def test_av_dataset_round_trips_every_column_exactly(tmp_path) -> None:
    man = write_av_dataset(tmp_path, rows_per_shard=4)
    assert man["kind"] == "av" and man["rows"] == len(AV_SECONDS) and [s["rows"] for s in man["shards"]] == [4, 2]
    assert man["sample_rate"] == 16000 and man["audio_columns"] == ["audio"]
    assert man["hours"] == pytest.approx(sum(AV_SECONDS) / 3600, abs=1e-6)
    assert manifest_columns(read_manifest(tmp_path)) == av_columns()
    assert man["columns"] == {"id": "string", "audio": "binary", "video": "binary", "latents": "binary",
                              "tokens": "binary", "text": "string"}
    names = read_columns(man)
    batch = decode_columns(_read(tmp_path, names), audio_spec(man, names))
    for i, seconds in enumerate(AV_SECONDS):
        want = av_row(i, seconds)
        assert batch["id"][i] == want["id"] and batch["text"][i] == want["text"]
        for col in ("audio", "video", "latents", "tokens"):
            got = batch[col][i]
            assert got.dtype == want[col].dtype and got.shape == want[col].shape, col
            np.testing.assert_array_equal(got, want[col])
    assert batch["video"][0].shape == (round(AV_SECONDS[0] * AV_RATES["video"]), 24, 24, 1)


def test_reading_some_columns_reads_only_those_and_the_id(tmp_path) -> None:
    man = write_av_dataset(tmp_path)
    assert read_columns(man, ["video", "tokens"]) == ["id", "video", "tokens"]
    names = read_columns(man, ["latents"])
    batch = decode_columns(_read(tmp_path, names), audio_spec(man, names))
    assert set(batch) == {"id", "latents"} and batch["latents"][1].shape == (120, 8)
    assert held_bytes(man, ["latents"]) == pytest.approx(sum(AV_SECONDS) * 50 * 8 * 4, rel=1e-3)  # hours: 6 decimals
    assert held_bytes(man) > held_bytes(man, ["latents"])
    with pytest.raises(ValueError, match="has no column 'lips'.*it has id, audio, video"):
        read_columns(man, ["lips"], "av")


def test_collate_pads_every_time_column_with_its_lengths(tmp_path) -> None:
    man = write_av_dataset(tmp_path, seconds=(2.0, 2.4, 3.0))
    names = read_columns(man)
    out = Collate([], epoch=0, audio=audio_spec(man, names))(_read(tmp_path, names))
    assert out["lengths"].tolist() == [32000, 38400, 48000]  # the main audio column keeps `lengths`
    assert out["video_lengths"].tolist() == [50, 60, 75] and out["video"].shape == (3, 75, 24, 24, 1)
    assert out["video"].dtype == torch.uint8 and out["latents"].dtype == torch.float32
    assert out["latents_lengths"].tolist() == [100, 120, 150] and out["latents"].shape == (3, 150, 8)
    assert out["tokens_lengths"].tolist() == [150, 180, 225] and out["tokens"].dtype == torch.int64
    assert not out["tokens"][0, 150:].any() and not out["video"][0, 50:].any()  # zero padding


def test_write_batch_cuts_padded_model_outputs_to_their_lengths(tmp_path) -> None:
    """What a cache phase does: ids, a new float column from a model's padded output, carried text."""
    latents = np.random.default_rng(0).standard_normal((3, 10, 4)).astype(np.float32)
    cols = {"id": ColumnSpec.id(), "z": ColumnSpec.like(latents[0], frame_rate=50), "text": ColumnSpec.text()}
    with DatasetWriter(tmp_path, cols, kind="cache") as w:
        w.write_batch({"id": ["a", "b", "c"], "z": latents, "z_lengths": np.array([10, 3, 7]),
                       "text": ["x", "y", "z"], "unrelated": [0, 0, 0]})
    man = read_manifest(tmp_path)
    assert man["sample_rate"] is None and man["hours"] == pytest.approx(20 / 50 / 3600, abs=1e-6)
    batch = decode_columns(_read(tmp_path, ["id", "z"]), audio_spec(man))
    assert [len(z) for z in batch["z"]] == [10, 3, 7]
    np.testing.assert_array_equal(batch["z"][1], latents[1, :3])


def test_values_that_do_not_fit_their_column_are_errors_naming_it(tmp_path) -> None:
    with DatasetWriter(tmp_path, av_columns(), kind="av") as w:
        row = av_row(0, 1.0)
        with pytest.raises(ValueError, match=r"'video' \(video\) holds \(T, 24, 24, 1\) arrays, got shape"):
            w.write({**row, "video": np.zeros((25, 24, 24, 3), np.uint8)})
        with pytest.raises(ValueError, match="'tokens' .* stores int64, got float64"):
            w.write({**row, "tokens": np.arange(75) * 1.5})
        with pytest.raises(ValueError, match=r"missing keys \['text'\]"):
            w.write({k: v for k, v in row.items() if k != "text"})
        w.write(row)
    with pytest.raises(ValueError, match="needs an id column"):
        DatasetWriter(tmp_path, {"audio": ColumnSpec.audio(8000)})


def test_rerun_skips_finished_shards(tmp_path) -> None:
    first = write_av_dataset(tmp_path, rows_per_shard=2)
    mtime = (tmp_path / "shard-00000.parquet").stat().st_mtime_ns
    (tmp_path / "shard-00001.parquet").unlink()
    again = write_av_dataset(tmp_path, rows_per_shard=2)
    assert again["shards"] == first["shards"] and (tmp_path / "shard-00000.parquet").stat().st_mtime_ns == mtime
