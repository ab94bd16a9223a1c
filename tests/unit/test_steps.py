"""The prep steps on real speech (espeak-ng) and synthetic signals."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from datasets_prep.steps.audio import Chain, resample_wave
from datasets_prep.steps.load import Reject

SR = 16000


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """A real spoken sentence (espeak-ng) at 16 kHz with its own edge silence cut at -40 dBFS."""
    exe = shutil.which("espeak-ng")
    assert exe, "espeak-ng is installed by `make test` (apt); install it to run these tests"
    wav = tmp_path_factory.mktemp("speech") / "s.wav"
    subprocess.run([exe, "-v", "en+m3", "-w", str(wav), "the quick brown fox jumps over the lazy dog"],
                   check=True, capture_output=True)
    x, sr = sf.read(str(wav), dtype="float32")
    x = resample_wave(x, sr, SR)
    loud = np.flatnonzero(np.abs(x) > 0.01)
    return x[loud[0]:loud[-1] + 1]


def _row(wave: np.ndarray, **extra: object) -> dict:
    return {"id": "u", "audio": wave.astype(np.float32), "sample_rate": SR, **extra}


@pytest.mark.parametrize(("lead_s", "tail_s"), [(1.0, 1.5), (0.4, 2.0)])
def test_vad_trim_removes_added_silence_to_within_100_ms(speech: np.ndarray, lead_s: float, tail_s: float) -> None:
    rng = np.random.default_rng(0)
    lead, tail = int(lead_s * SR), int(tail_s * SR)
    noisy = np.concatenate([np.zeros(lead), speech, np.zeros(tail)]) + rng.normal(0, 1e-3, lead + len(speech) + tail)
    (out,) = Chain([("vad_trim", {"pad_ms": 0})], ["audio"])(_row(noisy))
    start = _find(noisy, out["audio"])
    end = start + len(out["audio"])
    assert abs(start - lead) / SR <= 0.1, f"start off by {(start - lead) / SR:.3f} s"
    assert abs(end - (lead + len(speech))) / SR <= 0.1, f"end off by {(end - lead - len(speech)) / SR:.3f} s"
    (padded,) = Chain([("vad_trim", {"pad_ms": 100})], ["audio"])(_row(noisy))
    assert len(padded["audio"]) - len(out["audio"]) == pytest.approx(2 * 0.1 * SR, abs=2)


def _find(haystack: np.ndarray, needle: np.ndarray) -> int:
    first = needle[: 64].astype(np.float64)
    for i in range(len(haystack) - len(first)):
        if np.allclose(haystack[i:i + len(first)], first, atol=1e-6):
            return i
    raise AssertionError("trimmed audio is not a slice of the input")


def test_vad_trim_rejects_silence_and_too_short(speech: np.ndarray) -> None:
    with pytest.raises(Reject, match="no speech"):
        Chain([("vad_trim", {})], ["audio"])(_row(np.zeros(SR)))
    with pytest.raises(Reject, match="too short after trimming"):
        Chain([("vad_trim", {"min_seconds": 10})], ["audio"])(_row(np.concatenate([np.zeros(SR), speech])))


def test_segment_cuts_in_pauses_and_keeps_every_piece_under_the_limit(speech: np.ndarray) -> None:
    gap = np.zeros(int(0.5 * SR))
    long = np.concatenate([speech, gap, speech, gap, speech, gap, speech])
    limit = (2 * len(speech) + 1.5 * len(gap)) / SR + 0.1  # room for two sentences and a half pause
    rows = Chain([("segment", {"max_seconds": limit, "min_seconds": 0.5})], ["audio"])(_row(long))
    assert len(rows) == 2 and [r["id"] for r in rows] == ["u_000", "u_001"]
    assert all(len(r["audio"]) <= limit * SR for r in rows)
    cut = int(rows[1]["segment_start"] * SR)
    assert 2 * len(speech) + len(gap) <= cut <= 2 * len(speech) + 2 * len(gap)  # inside the middle pause
    assert sum(len(r["audio"]) for r in rows) == len(long)
    (short,) = Chain([("segment", {"max_seconds": 60})], ["audio"])(_row(speech))
    assert short["id"] == "u"


def test_segment_rejects_a_transcribed_row_it_would_have_to_cut(speech: np.ndarray) -> None:
    long = np.concatenate([speech, np.zeros(SR // 2), speech])
    row = {**_row(long), "text": "two sentences"}
    with pytest.raises(Reject, match="transcript \\(text\\) that cannot be cut"):
        Chain([("segment", {"max_seconds": len(speech) / SR})], ["audio"])(row)
    (whole,) = Chain([("segment", {"max_seconds": 60})], ["audio"])(row)  # short enough: kept with its text
    assert whole["text"] == "two sentences"


def test_normalize_peak_and_loudness_keep_sources_consistent(speech: np.ndarray) -> None:
    row = {"id": "m", "mix": 0.1 * (speech + speech[::-1]), "s1": 0.1 * speech, "s2": 0.1 * speech[::-1],
           "sample_rate": SR}
    (out,) = Chain([("normalize", {"mode": "peak", "peak_db": -3})], ["mix", "s1", "s2"])(row)
    assert 20 * np.log10(np.abs(out["mix"]).max()) == pytest.approx(-3, abs=1e-3)
    np.testing.assert_allclose(out["mix"], out["s1"] + out["s2"], atol=1e-5)
    import pyloudnorm

    (loud,) = Chain([("normalize", {"mode": "loudness", "lufs": -26})], ["audio"])(_row(0.05 * speech))
    assert pyloudnorm.Meter(SR).integrated_loudness(loud["audio"].astype(np.float64)) == pytest.approx(-26, abs=0.1)
    with pytest.raises(Reject, match="silent"):
        Chain([("normalize", {})], ["audio"])(_row(np.zeros(SR)))


def test_resample_and_features_shapes(speech: np.ndarray) -> None:
    chain = Chain([("resample", {"sample_rate": 8000}), ("features", {"n_mels": 40, "f0": True})], ["audio"])
    (out,) = chain(_row(speech))
    assert out["sample_rate"] == 8000 and len(out["audio"]) == -(-len(speech) // 2)
    frames = len(out["audio"]) // 80 + 1  # hop 10 ms at 8 kHz, centered frames
    assert out["mel"].shape == (frames, 40) and out["mel"].dtype == np.float32 and np.isfinite(out["mel"]).all()
    assert out["f0"].dtype == np.float32 and out["f0"].ndim == 1 and len(out["f0"]) > 0
    voiced = np.median(out["f0"][out["f0"] > 0])
    assert 60 < voiced < 300  # a male espeak voice
    assert chain.describe()[0] == {"step": "resample", "sample_rate": 8000}
    assert chain.output_rate(16000) == 8000


def test_unknown_step_and_bad_params() -> None:
    with pytest.raises(ValueError, match="unknown prep step 'denoise'"):
        Chain([("denoise", {})], ["audio"])
    with pytest.raises(ValueError, match="aggressiveness"):
        Chain([("vad_trim", {"aggressiveness": 7})], ["audio"])


def test_steps_do_not_need_files() -> None:
    # the chain works on in-memory rows: what Ray Data tasks hand it
    rows = Chain([], ["audio"])(_row(np.ones(10)))
    assert len(rows) == 1 and rows[0]["audio"].dtype == np.float32
