"""Voice-conversion metrics (SECS, DNSMOS, MCD) and the speaker loss on real speech (espeak-ng)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import numpy as np
import pytest
import soundfile as sf
import torch

from datasets_prep.steps.audio import resample_wave
from raytrain.losses import LOSSES, speaker_cosine
from raytrain.losses.voice import embedding_from_logmel
from raytrain.metrics import METRICS, dnsmos, mcd, secs, secs_gender, similarity, speaker_embedding
from raytrain.metrics.voice import (
    NoSpeechError,
    dnsmos_scores,
    mel_cepstral_distortion,
    speaker_embeddings,
    voice_encoder,
)

SR = 16000
ONE = "the quick brown fox jumps over the lazy dog"
TWO = "please call stella and ask her to bring these things"


def _say(tmp, text: str, voice: str, speed: int | None = None) -> np.ndarray:
    exe = shutil.which("espeak-ng")
    assert exe, "espeak-ng is installed by `make test` (apt); install it to run these tests"
    wav = tmp / f"{voice}_{speed}_{len(text)}.wav"
    args = [exe, "-v", voice, *(["-s", str(speed)] if speed else []), "-w", str(wav), text]
    subprocess.run(args, check=True, capture_output=True)
    x, sr = sf.read(str(wav), dtype="float32")
    return resample_wave(x, sr, SR)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The encoder's LSTM is small: on a loaded machine two torch threads contend (10x slower), one does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """A male (en+m1) and a female (en+f3) voice saying two sentences; m1 also says the first slowly."""
    tmp = tmp_path_factory.mktemp("voices")
    return {"m1_one": _say(tmp, ONE, "en+m1"), "m1_two": _say(tmp, TWO, "en+m1"),
            "f3_one": _say(tmp, ONE, "en+f3"), "f3_two": _say(tmp, TWO, "en+f3"),
            "m1_one_slow": _say(tmp, ONE, "en+m1", speed=130)}


def _pad(rows: list[np.ndarray], fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded (batch, time) tensor and its lengths, as pad_collate makes them."""
    out = torch.full((len(rows), max(len(r) for r in rows)), fill)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.from_numpy(r)
    return out, torch.tensor([len(r) for r in rows])


def test_registered_names() -> None:
    assert METRICS.get("secs") is secs and METRICS.get("secs_gender") is secs_gender
    assert METRICS.get("dnsmos") is dnsmos and METRICS.get("mcd") is mcd
    assert LOSSES.get("speaker_cosine") is speaker_cosine
    assert secs.reads == ("audio", "reference") and secs_gender.reads == ("audio", "reference", "cross")
    assert mcd.reads == ("audio", "parallel") and dnsmos.reads == ()


def test_same_voice_is_more_similar_than_another_gender(speech) -> None:
    emb = {k: speaker_embedding(v, SR) for k, v in speech.items() if k != "m1_one_slow"}
    assert emb["m1_one"].shape == (256,) and abs(np.linalg.norm(emb["m1_one"]) - 1) < 1e-5
    same = [similarity(emb["m1_one"], emb["m1_two"]), similarity(emb["f3_one"], emb["f3_two"])]
    other = [similarity(emb["m1_one"], emb["f3_one"]), similarity(emb["m1_two"], emb["f3_two"])]
    assert min(same) > max(other) + 0.1, (same, other)  # measured: 0.84, 0.87 vs 0.64, 0.65


def test_secs_of_the_parallel_beats_the_source_and_padding_is_ignored(speech) -> None:
    # row 0: m1 -> f3 (cross-gender), row 1: the same m1 voice as target (within); rows of different lengths
    source, src_len = _pad([speech["m1_one"], speech["m1_two"]])
    reference, ref_len = _pad([speech["f3_two"], speech["m1_one_slow"]])
    parallel, par_len = _pad([speech["f3_one"], speech["m1_two"]])
    batch = {"audio": source, "lengths": src_len, "reference": reference, "reference_lengths": ref_len,
             "cross": torch.tensor([1.0, 0.0])}
    out = secs_gender({"audio_out": parallel, "audio_out_lengths": par_len}, batch)
    assert out["secs"].shape == out["secs_source"].shape == (2,)
    assert out["secs"][0] > out["secs_source"][0] + 0.1  # converting m1 to f3 must beat the m1 source
    num, den = out["secs_cross"]
    assert den.tolist() == [1.0, 0.0] and float(num.sum() / den.sum()) == pytest.approx(float(out["secs"][0]))
    num, den = out["secs_within"]
    assert den.tolist() == [0.0, 1.0] and float(num.sum() / den.sum()) == pytest.approx(float(out["secs"][1]))
    alone = secs({"audio_out": parallel[:1, : par_len[0]]},
                 {"audio": source[:1, : src_len[0]], "reference": reference[:1, : ref_len[0]]})
    assert "secs_cross" not in alone
    assert alone["secs"][0] == pytest.approx(float(out["secs"][0]), abs=1e-6)
    assert alone["secs_source"][0] == pytest.approx(float(out["secs_source"][0]), abs=1e-6)
    assert torch.allclose(out["secs_gain"], out["secs"] - out["secs_source"])


def test_batched_embeddings_are_resemblyzers_own(speech) -> None:
    """One encoder call for many clips gives embed_utterance's value for each: clips of one and of several
    partial windows, and a silent clip (None) among them."""
    from resemblyzer import preprocess_wav

    clips = [speech["m1_one"], speech["f3_two"][: SR // 2], np.zeros(SR, dtype=np.float32), speech["m1_one_slow"]]
    batched = speaker_embeddings(clips, SR)
    assert batched[2] is None
    for clip, emb in zip(clips, batched, strict=True):
        if emb is not None:
            own = voice_encoder().embed_utterance(preprocess_wav(clip, source_sr=SR))
            assert emb.shape == (256,) and np.abs(emb - own).max() < 1e-5
            assert np.abs(speaker_embedding(clip, SR) - own).max() < 1e-5


def test_silence_and_short_clips(speech) -> None:
    with pytest.raises(NoSpeechError, match="silent clip"):
        speaker_embedding(np.zeros(SR, dtype=np.float32), SR)
    with pytest.raises(ValueError, match="voice activity detection kept nothing"):
        speaker_embedding(1e-4 * np.random.default_rng(0).standard_normal(SR).astype(np.float32), SR)
    short = speaker_embedding(speech["m1_one"][: SR // 2], SR)  # under one 1.6 s window: zero-padded
    assert similarity(short, speaker_embedding(speech["m1_two"], SR)) > 0.5
    wave, lengths = _pad([speech["m1_one"], speech["f3_one"]])
    silent = torch.zeros_like(wave)
    out = secs({"audio_out": silent, "audio_out_lengths": lengths},
               {"audio": wave, "lengths": lengths, "reference": wave, "reference_lengths": lengths})
    assert out["secs"].tolist() == [0.0, 0.0] and (out["secs_source"] > 0.99).all()  # silence: the worst score
    with pytest.raises(ValueError, match=r"'reference'\] row 1: no speech"):
        secs({"audio_out": wave, "audio_out_lengths": lengths},
             {"audio": wave, "lengths": lengths, "reference": wave * torch.tensor([[1.0], [0.0]]),
              "reference_lengths": lengths})


def test_mcd_is_zero_on_itself_and_grows_with_the_voice(speech) -> None:
    ref = speech["m1_one"]
    assert mel_cepstral_distortion(ref, ref) == pytest.approx(0.0, abs=1e-6)
    assert mel_cepstral_distortion(0.1 * ref, ref) < 0.1  # c0 is left out: gain does not count
    slow = mel_cepstral_distortion(speech["m1_one_slow"], ref)
    other = mel_cepstral_distortion(speech["f3_one"], ref)
    assert other > 2 * slow, (slow, other)  # measured: 11.4 dB vs 50.6 dB
    # the metric: rows of different lengths, each as alone; the parallel itself as output scores 0
    parallel, par_len = _pad([ref, speech["f3_two"]])
    source, src_len = _pad([speech["f3_one"], speech["m1_two"]])
    out_wave, out_len = _pad([speech["m1_one_slow"], speech["f3_two"]])
    got = mcd({"audio_out": out_wave, "audio_out_lengths": out_len},
              {"audio": source, "lengths": src_len, "parallel": parallel, "parallel_lengths": par_len})
    assert got["mcd"][0] == pytest.approx(slow, rel=1e-6) and got["mcd"][1] == pytest.approx(0.0, abs=1e-6)
    assert got["mcd_source"][0] == pytest.approx(other, rel=1e-6) and got["mcd_source"][1] > 10
    num, den = got["mcd_ratio"]  # the set's ratio: summed over rows, not a mean of per-row ratios
    assert float(num.sum() / den.sum()) == pytest.approx(slow / float(other + got["mcd_source"][1]), rel=1e-6)


def test_dnsmos_prefers_clean_speech_to_noisy(speech) -> None:
    clean = speech["m1_one"]
    noise = np.random.default_rng(0).standard_normal(len(clean)).astype(np.float32)
    noisy = clean + noise * np.sqrt(np.mean(clean**2) / np.mean(noise**2))  # 0 dB SNR
    wave, lengths = _pad([clean[: len(clean) * 3 // 4], noisy])  # row 0 shorter: padded
    out = dnsmos({"audio_out": wave, "audio_out_lengths": lengths}, {})
    assert set(out) == {"dnsmos", "dnsmos_sig", "dnsmos_bak"} and out["dnsmos"].shape == (2,)
    assert out["dnsmos"][0] > out["dnsmos"][1] + 0.5  # measured: 2.4 vs 1.5 OVRL
    assert out["dnsmos_bak"][0] > out["dnsmos_bak"][1] + 1.0
    assert out["dnsmos"][0] == pytest.approx(dnsmos_scores(clean[: len(clean) * 3 // 4])["ovrl"], abs=1e-6)


def _logmel(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipes' log-mel (torchaudio MelSpectrogram defaults, n_fft 1024, + 1e-6), padded with 0.0 (a
    loud value: only the lengths keep the padding out)."""
    import torchaudio

    transform = torchaudio.transforms.MelSpectrogram(SR, n_fft=1024, win_length=400, hop_length=160, n_mels=80)
    mels = [torch.log(transform(torch.from_numpy(r)) + 1e-6).T for r in rows]
    out = torch.zeros(len(mels), max(len(m) for m in mels), 80)
    for i, m in enumerate(mels):
        out[i, : len(m)] = m
    return out, torch.tensor([len(m) for m in mels])


def test_speaker_loss_matches_resemblyzer_and_trains_only_the_mel(speech) -> None:
    mel, lengths = _logmel([speech["m1_one"], speech["f3_one"]])
    emb = embedding_from_logmel(mel, lengths)
    for i, key in enumerate(("m1_one", "f3_one")):  # the differentiable path vs embed_utterance (measured 0.999, 0.995)
        assert similarity(emb[i].numpy(), speaker_embedding(speech[key], SR)) > 0.95
        alone = embedding_from_logmel(mel[i: i + 1, : lengths[i]])
        assert torch.allclose(alone[0], emb[i], atol=1e-5)  # padding is ignored
        middle = embedding_from_logmel(mel, lengths, windows="middle")  # what the loss hears: one window
        assert similarity(middle[i].numpy(), speaker_embedding(speech[key], SR)) > 0.9
        assert torch.allclose(embedding_from_logmel(mel[i: i + 1, : lengths[i]], windows="middle")[0], middle[i],
                              atol=1e-5)
    right = torch.from_numpy(np.stack([speaker_embedding(speech["m1_two"], SR), speaker_embedding(speech["f3_two"], SR)]))
    wrong = right.flip(0)
    mel.requires_grad_(True)
    loss = speaker_cosine({"mel": mel, "mel_lengths": lengths}, {"ref_emb": right})
    assert loss.ndim == 0 and 0 < loss.item() < 0.3
    assert loss.item() < speaker_cosine({"mel": mel, "mel_lengths": lengths}, {"ref_emb": wrong}).item() - 0.1
    loss.backward()
    assert mel.grad is not None and torch.isfinite(mel.grad).all()
    assert mel.grad[0, : lengths[0]].abs().sum() > 0 and mel.grad[1, lengths[1]:].abs().sum() == 0
    encoder = voice_encoder("cpu")
    assert not encoder.training
    assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())
