"""`generator.layout: av` without espeak-ng or Ray: target-speaker mixing, the lip video and what it carries,
pair selection, the config's one-line errors, and the other layouts' recorded parameters left as they were."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datasets_prep.av import (
    PEAK,
    Talker,
    av_columns,
    mix_target,
    mouth_opening,
    render_lips,
    select_dev,
    select_train,
    video_frames,
)
from datasets_prep.prep import load_prep_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "prep"
CONFIG = CONFIGS / "av_tse_asr_tiny.yaml"
SR = 8000


def _speechlike(seconds: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noise in syllable-like bursts with pauses, its amplitude envelope)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    env = np.zeros(n)
    pos = int(rng.uniform(0.05, 0.2) * SR)
    while pos < n:
        length = int(rng.uniform(0.08, 0.35) * SR)
        env[pos:pos + length] = np.hanning(length)[: n - pos] * rng.uniform(0.3, 1.0)
        pos += length + int(rng.uniform(0.03, 0.25) * SR)
    return (rng.standard_normal(n) * env * 0.3).astype(np.float32), env


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, dtype=np.float64) ** 2)))


# ---- mixing --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", [None, 10.0])
@pytest.mark.parametrize(("snr", "overlap", "seconds"), [(-5.0, 0.5, 2.0), (0.0, 0.75, 3.5), (2.5, 1.0, 4.0),
                                                         (4.0, 0.9, 1.0)])
def test_mix_is_target_plus_rest_at_the_drawn_level_and_overlap(snr, overlap, seconds, noise):
    target, _ = _speechlike(3.0, 1)
    interferer, _ = _speechlike(seconds, 2)
    m = mix_target(target, interferer, snr_db=snr, overlap=overlap, noise_snr_db=noise, rng=np.random.default_rng(3))
    assert len(m.mix) == len(m.target) == len(m.rest) == len(target)
    assert m.mix.dtype == m.target.dtype == np.float32
    np.testing.assert_allclose(m.mix, m.target + m.rest, atol=1e-6)
    assert max(np.abs(m.mix).max(), np.abs(m.target).max(), np.abs(m.rest).max()) <= PEAK + 1e-6
    np.testing.assert_allclose(m.target / np.abs(m.target).max(), target / np.abs(target).max(), atol=1e-5)
    lo, hi = max(0, m.start), min(len(target), m.start + len(interferer))
    want = min(round(overlap * len(target)), len(interferer)) / len(target)  # a short interferer lies inside
    assert m.overlap == pytest.approx(want, abs=1e-3) and m.overlap == pytest.approx((hi - lo) / len(target))
    placed = np.zeros(len(target))
    placed[lo:hi] = interferer[lo - m.start: hi - m.start]
    # the interferer's gain: the rest projected on it (the noise, independent of it, hardly counts)
    gain = float(m.rest[lo:hi] @ placed[lo:hi]) / float(placed[lo:hi] @ placed[lo:hi])
    if noise is None:  # the rest is the interferer alone, where it was placed, cut at the target's ends
        np.testing.assert_allclose(m.rest, placed * gain, atol=1e-6)
        assert not m.rest[:lo].any() and not m.rest[hi:].any()
    else:
        assert 20 * np.log10(_rms(m.target) / _rms(m.rest - placed * gain)) == pytest.approx(noise, abs=0.1)
    got = 20 * np.log10(_rms(m.target) / _rms(placed[lo:hi] * gain))
    assert got == pytest.approx(snr, abs=0.5)


def test_noise_is_the_drawn_level_below_the_target_and_seeded():
    target, _ = _speechlike(3.0, 4)
    interferer, _ = _speechlike(3.0, 5)
    quiet = mix_target(target, interferer, snr_db=0.0, overlap=0.0, noise_snr_db=12.0, rng=np.random.default_rng(1))
    assert quiet.overlap == 0.0  # no interferer: the rest is the noise
    assert 20 * np.log10(_rms(quiet.target) / _rms(quiet.rest)) == pytest.approx(12.0, abs=0.01)
    again = mix_target(target, interferer, snr_db=0.0, overlap=0.0, noise_snr_db=12.0, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(quiet.mix, again.mix)


def test_the_interferer_sits_before_after_or_over_the_whole_target():
    target, _ = _speechlike(2.0, 6)
    long, _ = _speechlike(3.0, 7)
    starts = {mix_target(target, long, snr_db=0, overlap=0.6, noise_snr_db=None,
                         rng=np.random.default_rng(s)).start for s in range(20)}
    assert starts == {round(0.6 * len(target)) - len(long), len(target) - round(0.6 * len(target))}
    full = [mix_target(target, long, snr_db=0, overlap=1.0, noise_snr_db=None, rng=np.random.default_rng(s))
            for s in range(5)]
    assert all(m.overlap == 1.0 and len(target) - len(long) <= m.start <= 0 for m in full)


# ---- video ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("samples", "rate", "fps", "frames"), [(0, 8000, 25, 0), (1, 8000, 25, 1), (320, 8000, 25, 1),
                                                               (321, 8000, 25, 2), (24000, 8000, 25, 75),
                                                               (16001, 16000, 25, 26), (22050, 22050, 30, 30)])
def test_video_frames_is_the_ceiling_of_the_audio_length(samples, rate, fps, frames):
    assert video_frames(samples, rate, fps) == frames


def test_lips_shape_dtype_and_determinism_per_talker():
    audio, _ = _speechlike(2.3, 8)
    a = render_lips(audio, SR, talker="en-us+m1_p40_s150", lag=1, rng=np.random.default_rng(0))
    assert a.shape == (video_frames(len(audio), SR, 25), 24, 24, 1) and a.dtype == np.uint8
    b = render_lips(audio, SR, talker="en-us+m1_p40_s150", lag=1, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)
    big = render_lips(audio, 16000, talker="x", lag=0, rng=np.random.default_rng(0), size=32, fps=30)
    assert big.shape == (video_frames(len(audio), 16000, 30), 32, 32, 1)
    assert Talker.of("en-us+m1_p40_s150") == Talker.of("en-us+m1_p40_s150") != Talker.of("en+f2_p60_s175")
    # the same talker looks the same in another clip: its mean still frame (mouth shut) matches, another's does not
    silence = np.zeros(SR, dtype=np.float32)
    frames = {t: render_lips(silence, SR, talker=t, lag=0, rng=np.random.default_rng(s), pixel_noise=0.0).mean(0)
              for s, t in enumerate(["en-us+m1_p40_s150", "en+f2_p60_s175"])}
    again = render_lips(silence, SR, talker="en-us+m1_p40_s150", lag=0, rng=np.random.default_rng(9),
                        pixel_noise=0.0).mean(0)
    same = np.abs(again - frames["en-us+m1_p40_s150"]).mean()
    other = np.abs(again - frames["en+f2_p60_s175"]).mean()
    assert same < other / 3


@pytest.mark.parametrize("lag", [-5, -1, 0, 3, 9])
def test_any_lag_keeps_the_frames_of_the_clip(lag):
    frames = render_lips(np.ones(500, dtype=np.float32), SR, talker="x", lag=lag, rng=np.random.default_rng(0))
    assert frames.shape == (2, 24, 24, 1)
    assert len(mouth_opening(np.zeros(0, dtype=np.float32), SR, lag=lag)) == 0


def test_the_mouth_darkens_with_the_envelope_and_lags_as_drawn():
    audio, _ = _speechlike(4.0, 10)
    opening = mouth_opening(audio, SR)
    assert opening.min() >= 0 and opening.max() <= 1 and opening.std() > 0.2
    for lag in (-1, 0, 2):
        frames = render_lips(audio, SR, talker="en+m3_p40_s150", lag=lag, rng=np.random.default_rng(lag + 5))
        darkness = 255.0 - frames[:, 4:20, 4:20, 0].astype(np.float64).mean(axis=(1, 2))
        corr = {k: np.corrcoef(darkness, mouth_opening(audio, SR, lag=k))[0, 1] for k in range(-3, 4)}
        assert corr[lag] > 0.9 and max(corr, key=corr.__getitem__) == lag, corr


def test_the_video_tells_the_target_from_the_interferer():
    """Correlating the mouth's darkness with each talker's log-energy picks the target (field notes: ~90%)."""
    hits = 0
    for seed in range(40):
        target, _ = _speechlike(3.0, 100 + seed)
        interferer, _ = _speechlike(3.0, 200 + seed)
        rng = np.random.default_rng(seed)
        m = mix_target(target, interferer, snr_db=0.0, overlap=1.0, noise_snr_db=None, rng=rng)
        frames = render_lips(m.target, SR, talker=f"t{seed}", lag=int(rng.integers(-1, 3)), rng=rng)
        darkness = 255.0 - frames[..., 0].astype(np.float64).mean(axis=(1, 2))
        corr = [np.corrcoef(darkness, mouth_opening(x, SR))[0, 1] for x in (m.target, m.rest)]
        hits += corr[0] > corr[1]
    assert hits >= 36


# ---- pairs -----------------------------------------------------------------------------------------------
def _utts(voices: int, per_voice: int, sentences: int) -> list[dict]:
    return [{"id": f"v{v}/s{(v + k) % sentences:03d}", "speaker": f"v{v}", "text": f"sentence {(v + k) % sentences}"}
            for v in range(voices) for k in range(per_voice)]


def test_pairs_are_other_speakers_saying_other_sentences():
    utts = _utts(4, 3, 3)  # every voice reads every sentence: many pairs would say the same words
    train = select_train(utts, 4, seed=0)
    assert len(train) == 4 * len(utts) and train == select_train(utts, 4, seed=0)
    for ti in range(len(utts)):
        mine = [j for t, j in train if t == ti]
        assert len(mine) == len(set(mine)) == 4
    dev = select_dev(utts, 50, seed=1)
    assert len(dev) == len(set(dev)) == 50 and dev == select_dev(utts, 50, seed=1) != select_dev(utts, 50, seed=2)
    for t, j in train + dev:
        assert utts[t]["speaker"] != utts[j]["speaker"] and utts[t]["text"] != utts[j]["text"]
    targets = [t for t, _ in dev]
    assert set(targets[: len(utts)]) == set(range(len(utts)))  # every utterance a target before any twice
    with pytest.raises(ValueError, match="dev_mixtures=1000"):
        select_dev(utts, 1000, seed=1)
    with pytest.raises(ValueError, match="mixtures_per_utterance=7"):
        select_train(utts, 7, seed=0)


def test_columns_declare_the_video_on_the_audio_clock():
    cols = av_columns(8000)
    assert list(cols) == ["id", "speaker", "interferer", "text", "mix", "s1", "video", "snr_db", "overlap", "lag"]
    assert cols["video"].frame_shape() == (24, 24, 1) and cols["video"].fps == 25 and cols["video"].dtype == "uint8"
    assert cols["mix"].sample_rate == cols["s1"].sample_rate == 8000
    assert (cols["snr_db"].dtype, cols["overlap"].dtype, cols["lag"].dtype) == ("float32", "float32", "int32")


# ---- config ----------------------------------------------------------------------------------------------
def test_the_tiny_and_full_configs_validate_with_disjoint_corpora_and_held_out_timbres():
    for name in ("av_tse_asr_tiny", "av_tse_asr"):
        g = load_prep_config(CONFIGS / f"{name}.yaml").generator
        assert g is not None and g.layout == "av" and set(g.av_corpora()) == {"main", "second"}
        voices = g.av_voices()
        train = {v for t, _ in voices.values() for v in t}
        dev = {v for _, d in voices.values() for v in d}
        assert not {v.variant for v in train} & {v.variant for v in dev}
        ids = [v.id for t, d in voices.values() for v in t + d]
        assert len(ids) == len(set(ids))


@pytest.mark.parametrize(("override", "key"), [
    ({"generator.corpora.main.overlap": [0.5, 1.2]}, "overlap=[0.5, 1.2]"),
    ({"generator.corpora.main.overlap": [0.9, 0.5]}, "overlap=[0.9, 0.5]"),
    ({"generator.corpora.main.snr_db": [3, -3]}, "snr_db=[3.0, -3.0]"),
    ({"generator.corpora.second.noise_snr_db": [15, 5]}, "noise_snr_db=[15.0, 5.0]"),
    ({"generator.corpora.main.utterances_per_voice": 900}, "utterances_per_voice=900 exceeds train_sentences"),
    ({"generator.corpora.main.dev_utterances_per_voice": 90}, "dev_utterances_per_voice=90 exceeds dev_sentences"),
    ({"generator.corpora.main.dev_mixtures": 100000}, "dev_mixtures=100000 exceeds"),
    ({"generator.corpora.main.mixtures_per_utterance": 1000}, "mixtures_per_utterance=1000 exceeds"),
    ({"generator.corpora.main.train_voices": 5000}, "corpora.main.train_voices=5000"),
    ({"generator.corpora.second.language": ["en-us"]}, "corpora.second: its voices"),
    ({"generator.corpora.main.mix_per_utt": 2}, "generator.corpora.main.mix_per_utt: unknown key"),
    ({"generator.corpora": {"extra": {"voices": 4}}}, "corpora.extra: a corpus of layout av needs"),
    ({"generator.corpora": None}, "corpora: layout av needs"),
    ({"generator.video.lag": [2, -1]}, "lag=[2, -1]"),
    ({"generator.video.size": 4}, "generator.video.size"),
    ({"dev_mixtures": {"num": 5}}, "dev_mixtures: layout av draws"),
])
def test_config_errors_are_one_line_naming_the_key(override, key):
    with pytest.raises(ValueError) as err:
        load_prep_config(CONFIG, override)
    header, *lines = str(err.value).splitlines()
    assert header.startswith("invalid prep config") and len(lines) == 1 and key in lines[0], str(err.value)


def test_an_av_corpus_is_refused_by_layout_vc():
    with pytest.raises(ValueError, match="an av corpus .* in layout vc"):
        load_prep_config(CONFIGS / "vc_flow_tiny.yaml", {"generator.corpora": {"av": {
            "train_voices": 4, "dev_voices": 2, "train_sentences": 8, "dev_sentences": 4, "utterances_per_voice": 2,
            "dev_utterances_per_voice": 2, "mixtures_per_utterance": 1, "dev_mixtures": 2}}})


# What separation/asr datasets recorded of their generator before layout av existed: unchanged, so the
# datasets already prepared stay up to date.
SOURCE_PARAMS = {
    "separation_tiny": {"dev_sentences": 60, "dev_variant_fraction": 0.2, "dev_vocab_fraction": 0.2, "dev_voices": 8,
                        "eval_utterances_per_voice": 4, "kind": "espeak", "layout": "separation", "seed": 0,
                        "test_sentences": 60, "train_sentences": 600, "train_voices": 56, "utterances_per_voice": 24},
    "separation": {"dev_sentences": 400, "dev_variant_fraction": 0.2, "dev_vocab_fraction": 0.2, "dev_voices": 32,
                   "eval_utterances_per_voice": 4, "kind": "espeak", "layout": "separation", "seed": 0,
                   "test_sentences": 60, "train_sentences": 6000, "train_voices": 240, "utterances_per_voice": 100},
    "streaming_asr_tiny": {
        "dev_sentences": 80, "dev_variant_fraction": 0.2, "dev_vocab_fraction": 0.2, "dev_voices": 8,
        "eval_utterances_per_voice": 4, "eval_voices": 24, "heldout_voices": 24, "kind": "espeak", "layout": "asr",
        "phonemes": "mnemonic", "pitches": [35, 50, 65], "seed": 0, "speeds": [140, 165, 190], "test_sentences": 80,
        "train_sentences": 5000, "train_voices": 320, "train_words": [3, 8], "utterances_per_voice": 20,
        "vocabulary_size": 6000, "words": "/usr/share/dict/words"},
}


@pytest.mark.parametrize("name", sorted(SOURCE_PARAMS))
def test_the_other_layouts_record_the_same_source_params(name):
    g = load_prep_config(CONFIGS / f"{name}.yaml").generator
    assert g is not None
    assert json.loads(json.dumps(g.source_params())) == SOURCE_PARAMS[name]
