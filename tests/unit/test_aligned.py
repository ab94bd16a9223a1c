"""aligned_crop: one span of time from every time column of a row, at each column's rate."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from datasets_prep.columns import ColumnSpec
from datasets_prep.dummies import AV_RATES, av_columns, av_row, time_index, write_av_dataset
from raytrain.data.aligned import AlignedCrop, start_grid
from raytrain.data.datasets import audio_spec, read_columns
from raytrain.data.stream import Collate, build_transforms
from raytrain.data.transforms import TRANSFORMS

SPECS = av_columns()
LENGTHS = (2.0, 3.0, 2.4, 1.6, 2.8, 3.0, 2.2, 2.0)


def _batch(seconds: tuple[float, ...] = LENGTHS) -> dict[str, np.ndarray]:
    rows = [av_row(i, s) for i, s in enumerate(seconds)]
    out = {}
    for col in rows[0]:
        out[col] = np.empty(len(rows), dtype=object)
        out[col][:] = [r[col] for r in rows]
    return out


def _starts(out: dict[str, np.ndarray], i: int) -> dict[str, Fraction]:
    """Where row i's crop starts in each column, in seconds, after checking the crop is contiguous."""
    starts = {}
    for col, rate in AV_RATES.items():
        idx = time_index(col, out[col][i])
        np.testing.assert_array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))  # no gap, no repeat
        starts[col] = Fraction(int(idx[0]), rate)
    return starts


def test_one_second_is_16000_samples_25_frames_50_latents_75_tokens_from_the_same_instant() -> None:
    crop = TRANSFORMS.get("aligned_crop")(seconds=1.0, sample_rate=16000, seed=3)
    out = crop(_batch(), epoch=0, specs=SPECS)
    seen = set()
    for i in range(len(LENGTHS)):
        assert [len(out[c][i]) for c in AV_RATES] == [16000, 25, 50, 75]
        assert out["video"][i].shape == (25, 24, 24, 1) and out["latents"][i].shape == (50, 8)
        starts = _starts(out, i)
        assert len(set(starts.values())) == 1, starts  # exactly aligned: the same start in seconds
        start = starts["audio"]
        assert start % Fraction(1, 25) == 0 and start + 1 <= Fraction(LENGTHS[i]).limit_denominator(100)
        seen.add(start)
    assert len(seen) > 3  # starts are drawn, not always 0
    assert out["text"].tolist() == [f"row {i}" for i in range(len(LENGTHS))]  # other columns pass through


def test_strategy_start_takes_every_row_from_its_first_frame() -> None:
    out = AlignedCrop(seconds=1.0, strategy="start", sample_rate=16000, seed=3)(_batch(), epoch=5, specs=SPECS)
    for i in range(len(LENGTHS)):
        assert set(_starts(out, i).values()) == {0}
    with pytest.raises(ValueError, match="strategy"):
        AlignedCrop(seconds=1.0, strategy="middle", sample_rate=16000)


def test_crops_are_seeded_by_batch_and_epoch() -> None:
    crop = AlignedCrop(seconds=1.0, sample_rate=16000, seed=3)
    first = crop(_batch(), epoch=1, specs=SPECS)
    again = AlignedCrop(seconds=1.0, sample_rate=16000, seed=3)(_batch(), epoch=1, specs=SPECS)
    other = crop(_batch(), epoch=2, specs=SPECS)
    assert all(np.array_equal(a, b) for a, b in zip(first["tokens"], again["tokens"], strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(first["tokens"], other["tokens"], strict=True))


def test_a_row_shorter_than_the_crop_is_kept_whole_and_the_collate_pads_it() -> None:
    batch = _batch((0.6, 2.0))
    collate = Collate(build_transforms([{"name": "aligned_crop", "args": {"seconds": 1.0}}], 16000, 0), epoch=0,
                      audio={"columns": ["audio"], "format": "f32le",
                             "roles": {n: s.to_json() for n, s in SPECS.items()}})
    out = collate(batch)
    assert out["audio"].shape == (2, 16000) and out["lengths"].tolist() == [9600, 16000]
    assert out["video"].shape == (2, 25, 24, 24, 1) and out["video_lengths"].tolist() == [15, 25]
    assert out["latents_lengths"].tolist() == [30, 50] and out["tokens_lengths"].tolist() == [45, 75]
    assert time_index("tokens", out["tokens"][0, :45].numpy()).tolist() == list(range(45))


def test_from_stored_shards_through_the_collate(tmp_path) -> None:
    """The worker's path: stored bytes decoded by role, cropped with the dataset's specs, padded."""
    import pyarrow.parquet as pq

    man = write_av_dataset(tmp_path, seconds=(2.0, 3.0, 2.4), rows_per_shard=8)
    names = read_columns(man, ["audio", "video", "latents", "tokens"])
    table = pq.read_table(tmp_path / man["shards"][0]["file"], columns=names)
    batch = {}
    for n in names:
        batch[n] = np.empty(table.num_rows, dtype=object)
        batch[n][:] = table.column(n).to_pylist()
    out = Collate(build_transforms([{"name": "aligned_crop", "args": {"seconds": 1.0}}], 16000, 5), epoch=0,
                  audio=audio_spec(man, names))(batch)
    assert out["audio"].shape == (3, 16000) and out["video"].shape == (3, 25, 24, 24, 1)
    assert out["latents"].shape == (3, 50, 8) and out["tokens"].shape == (3, 75)
    for i in range(3):
        starts = {c: Fraction(int(time_index(c, out[c][i].numpy())[0]), r) for c, r in AV_RATES.items()}
        assert len(set(starts.values())) == 1, starts


def test_start_grid_is_the_common_step_of_the_rates() -> None:
    assert start_grid([Fraction(16000), Fraction(25), Fraction(50), Fraction(75)], 1.0) == 25
    assert start_grid([Fraction(16000), Fraction(40)], 1.0) == 40
    assert start_grid([Fraction(16000), Fraction(25), Fraction(40)], 1.0) == 5  # 200 ms steps
    hop = Fraction(44100, 512)  # 86.13 frames/s: a common step of 5.12 s, longer than the crop
    assert start_grid([Fraction(16000), hop], 1.0) == hop


def test_without_specs_audio_columns_are_cropped_at_the_sample_rate() -> None:
    audio = np.empty(2, dtype=object)
    audio[:] = [np.arange(3000, dtype=np.float32), np.arange(2500, dtype=np.float32)]
    out = AlignedCrop(seconds=0.5, sample_rate=2000, seed=0)({"audio": audio, "id": np.array(["a", "b"])})
    assert [len(a) for a in out["audio"]] == [1000, 1000]
    with pytest.raises(KeyError, match="no time column"):
        AlignedCrop(seconds=0.5, sample_rate=2000)({"text": np.array(["x"])}, specs={"text": ColumnSpec.text()})
