"""Dynamic mixing and random crops on Ray-Data-shaped numpy batches."""

from __future__ import annotations

import numpy as np
import pytest

from raytrain.data.transforms import TRANSFORMS, Crop, DynamicMix

SR = 1000


def _speech_batch(
    lengths: list[int], speakers: list[str], level: float | None = None
) -> dict[str, np.ndarray]:
    """Like map_batches(batch_format="numpy"): variable-length audio as an object array.

    With ``level`` each utterance is constant at ``level * (speaker index + 1)`` so a
    source's speaker can be read back from its samples.
    """
    rng = np.random.default_rng(0)
    names = sorted(set(speakers))
    audio = np.empty(len(lengths), dtype=object)
    for i, (n, spk) in enumerate(zip(lengths, speakers, strict=True)):
        if level is None:
            audio[i] = rng.standard_normal(n).astype(np.float32) * 0.3
        else:
            audio[i] = np.full(n, level * (names.index(spk) + 1), dtype=np.float32)
    return {
        "audio": audio,
        "speaker": np.array(speakers, dtype=object),
        "id": np.array([f"u{i}" for i in range(len(lengths))]),
    }


def test_registered_and_built_from_config() -> None:
    t = TRANSFORMS.get("dynamic_mix")(num_speakers=2, crop_seconds=0.5, sample_rate=SR, seed=3)
    assert isinstance(t, DynamicMix) and t.num_samples == 500
    assert TRANSFORMS.get("crop") is Crop


@pytest.mark.parametrize("num_speakers", [2, 3])
def test_partners_are_other_speakers(num_speakers: int) -> None:
    speakers = ["a", "a", "b", "c", "c", "d", "a", "b"] * 4
    batch = _speech_batch([1200] * len(speakers), speakers, level=0.01)
    out = DynamicMix(num_speakers, crop_seconds=1.0, gain_db=(0, 0), sample_rate=SR, seed=0)(batch)
    assert out["sources"].shape == (32, num_speakers, SR)
    which = np.rint(out["sources"][:, :, 0] / 0.01).astype(int) - 1  # (rows, sources) speaker index
    names = sorted(set(speakers))
    for i, row in enumerate(which):
        assert names[row[0]] == speakers[i]  # source 0 is row i itself
        assert len(set(row.tolist())) == num_speakers  # all speakers of a mixture differ


def test_same_batch_and_epoch_mix_identically() -> None:
    batch = _speech_batch([1500, 900, 2100, 1300, 1700, 800], ["a", "b", "a", "c", "b", "c"])
    mix = DynamicMix(crop_seconds=0.5, sample_rate=SR, seed=7)
    first, again = mix(batch, epoch=2), DynamicMix(crop_seconds=0.5, sample_rate=SR, seed=7)(batch, epoch=2)
    for key in ("mix", "sources", "lengths"):
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["sources"], mix(batch, epoch=3)["sources"])
    other_seed = DynamicMix(crop_seconds=0.5, sample_rate=SR, seed=8)(batch, epoch=2)
    assert not np.array_equal(first["sources"], other_seed["sources"])


def test_batches_without_id_are_still_reproducible_and_distinct() -> None:
    a = _speech_batch([1500, 1200, 1300, 1700], ["a", "b", "a", "b"])
    b = _speech_batch([1400, 1200, 1300, 1700], ["a", "b", "a", "b"])
    del a["id"], b["id"]
    mix = DynamicMix(crop_seconds=0.5, sample_rate=SR, seed=0)
    np.testing.assert_array_equal(mix(a)["sources"], mix(a)["sources"])
    assert not np.array_equal(mix(a)["sources"][1], mix(b)["sources"][1])


def test_mix_is_sum_of_sources_and_peak_bounded() -> None:
    batch = _speech_batch([3000] * 8, ["a", "b"] * 4)
    for i in range(8):
        batch["audio"][i] = batch["audio"][i] * 10  # loud: peaks well above 1
    out = DynamicMix(crop_seconds=2.0, gain_db=(-5, 5), sample_rate=SR, seed=1)(batch)
    assert out["mix"].dtype == out["sources"].dtype == np.float32
    assert out["lengths"].dtype == np.int64
    np.testing.assert_allclose(out["mix"], out["sources"].sum(axis=1), atol=1e-6)
    assert np.abs(out["mix"]).max() <= 0.9 + 1e-6
    assert np.abs(out["sources"]).max() <= 0.9 + 1e-6
    quiet = _speech_batch([3000] * 4, ["a", "b"] * 2, level=0.01)
    out = DynamicMix(crop_seconds=2.0, gain_db=(0, 0), sample_rate=SR, seed=1)(quiet)
    np.testing.assert_allclose(np.abs(out["sources"]).max(axis=(1, 2)), 0.02, rtol=1e-5)  # not rescaled


def test_short_utterances_are_padded_and_lengths_are_the_longest_source() -> None:
    lengths = [300, 450, 2000, 200]
    batch = _speech_batch(lengths, ["a", "b", "c", "d"], level=0.01)
    out = DynamicMix(crop_seconds=1.0, gain_db=(0, 0), sample_rate=SR, seed=0)(batch)
    per_source_valid = (out["sources"] != 0).sum(axis=-1)  # constant non-zero audio: valid = non-zero
    np.testing.assert_array_equal(out["lengths"], per_source_valid.max(axis=1))
    assert out["sources"][0, 0, :300].all() and not out["sources"][0, 0, 300:].any()
    for i in range(4):
        assert not out["mix"][i, out["lengths"][i] :].any()


def test_a_batch_with_too_few_speakers_repeats_one_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    """Chance (few speakers, small batches) must not end a run: the missing partners are other utterances."""
    mix = DynamicMix(num_speakers=3, crop_seconds=1.0, gain_db=(0, 0), sample_rate=SR, seed=0)
    speakers = ["a", "b", "a", "a", "b"]
    batch = _speech_batch([1000] * 5, speakers)
    with caplog.at_level("WARNING", logger="raytrain.data.transforms"):
        out = mix(batch)
        mix(_speech_batch([1000] * 4, ["a"] * 4))
    assert [r.message.count("holds 2 speaker(s)") for r in caplog.records] == [1]  # said once
    assert out["sources"].shape == (5, 3, SR) and mix.few_speaker_batches == 2
    audio = [np.asarray(a[:SR]) for a in batch["audio"]]
    for i in range(5):
        # a source is its utterance scaled (the mixture's peak limit): the one it correlates with fully
        rows = [next(r for r in range(5) if abs(np.corrcoef(out["sources"][i, j], audio[r])[0, 1]) > 0.999)
                for j in range(3)]
        assert rows[0] == i and len(set(rows)) == 3  # three different utterances
        assert {speakers[r] for r in rows} == {"a", "b"}  # both speakers of the batch in every mixture
    with pytest.raises(ValueError, match="batch of 2 row.*set batch_size to at least 3"):
        mix(_speech_batch([1000] * 2, ["a", "b"]))


def test_fixed_shape_audio_column_is_accepted() -> None:
    batch = {
        "audio": np.random.default_rng(0).standard_normal((4, 1200)).astype(np.float32) * 0.1,
        "speaker": np.array(["a", "b", "c", "d"]),
    }
    out = DynamicMix(crop_seconds=1.0, sample_rate=SR, seed=0)(batch)
    assert out["sources"].shape == (4, 2, SR)
    np.testing.assert_array_equal(out["lengths"], [SR] * 4)


def test_crop_is_fixed_length_with_lengths_and_keeps_other_columns() -> None:
    batch = _speech_batch([2500, 400, 1000], ["a", "b", "c"])
    out = Crop(seconds=1.0, sample_rate=SR, seed=0)(batch, epoch=1)
    assert out["audio"].shape == (3, SR) and out["audio"].dtype == np.float32
    np.testing.assert_array_equal(out["lengths"], [1000, 400, 1000])
    np.testing.assert_array_equal(out["audio"][1, :400], batch["audio"][1])
    assert not out["audio"][1, 400:].any()
    np.testing.assert_array_equal(out["audio"][2], batch["audio"][2])
    src = batch["audio"][0]
    start = int(np.flatnonzero(src == out["audio"][0, 0])[0])
    np.testing.assert_array_equal(out["audio"][0], src[start : start + SR])
    np.testing.assert_array_equal(out["speaker"], batch["speaker"])
    np.testing.assert_array_equal(
        out["audio"], Crop(seconds=1.0, sample_rate=SR, seed=0)(batch, epoch=1)["audio"]
    )


def test_bad_configuration_is_rejected() -> None:
    with pytest.raises(ValueError, match="num_speakers"):
        DynamicMix(num_speakers=1, sample_rate=SR, seed=0)
    with pytest.raises(ValueError, match="gain_db"):
        DynamicMix(gain_db=(3, -3), sample_rate=SR, seed=0)
    with pytest.raises(ValueError, match="positive duration"):
        Crop(seconds=0.0, sample_rate=SR, seed=0)
