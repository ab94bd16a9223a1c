"""Voice-conversion metrics: speaker similarity (SECS), DNSMOS quality and mel-cepstral distortion.

Batch keys (after ``pad_collate``): ``audio`` (the source, (batch, time), 16 kHz) with ``lengths`` (the
collate names the main audio column's lengths ``lengths``, not ``audio_lengths``), ``reference`` (an
utterance of the target speaker) with ``reference_lengths``, ``parallel`` (the target speaker saying the
source's sentence: the ground truth) with ``parallel_lengths``, and optionally ``cross`` ((batch,) float,
1.0 for a cross-gender pair). The model's eval outputs hold ``audio_out`` (batch, time) at 16 kHz with
``audio_out_lengths``. Each row is scored on its valid samples only, so padding never changes a value.

- ``secs``: speaker-embedding cosine similarity (resemblyzer's ``VoiceEncoder``: ``preprocess_wav`` then
  ``embed_utterance``) of the converted audio to the reference, and ``secs_source``: of the unconverted
  source to the reference, the baseline a conversion must beat. ``secs_gender`` adds ``secs_cross`` and
  ``secs_within`` as (numerator, denominator) pairs, so each is a mean over its own rows; it declares
  ``cross``, so that column is read when the phase reads only declared columns (``secs`` adds the pair
  too whenever the batch holds ``cross``).
- ``dnsmos``: DNSMOS P.835 (``sig_bak_ovr.onnx`` from the ``speechmos`` wheel) of the converted audio:
  ``dnsmos`` (OVRL), ``dnsmos_sig`` and ``dnsmos_bak``. It stands in for UTMOS (no weights to download).
  Absolute values on espeak-ng audio are low: clean espeak speech scores about 2.1-3.0 OVRL (by voice
  and sentence), a Griffin-Lim resynthesis about 1.6, so recipes should set bars relative to the source
  (or to a reference system) rather than absolute MOS figures.
- ``mcd``: mel-cepstral distortion in dB of the converted audio against ``parallel``, DTW-aligned, and
  ``mcd_source``: of the source against ``parallel``. See ``mel_cepstrum`` for the features.

``speaker_embedding`` and ``similarity`` serve code outside the loop (inference prints per-file SECS;
data prep computes ``ref_emb``).

Silent or too short audio (resemblyzer): ``embed_utterance`` zero-pads any clip shorter than one 1.6 s
partial, so short clips embed (less reliably); but ``preprocess_wav``'s voice activity detection keeps
nothing of a silent clip (nor of a quiet noise, or a clip of a few 30 ms VAD windows: they are smoothed
over 8), and resemblyzer would then embed 1.6 s of zeros (normalising a silent clip also divides by zero). ``speaker_embedding`` raises
``NoSpeechError`` (a ValueError) instead. In ``secs`` a reference or source without speech is a data
error (ValueError naming the key and row); a converted output without speech scores 0.0, the lowest
cosine resemblyzer's non-negative embeddings can have, so a model that outputs silence is scored, not
crashed on.

Costs (2 busy CPU cores): an embedding takes ~0.1 s for 3 s of audio (with one torch thread: several
threads contending on a loaded machine took 6-10 s), a DNSMOS call 0.7-2 s (one 9.01 s window, one
ONNX thread), an MCD 40-100 ms after numba compiled librosa's DTW (~2 s once per process, cached on
disk). The source's and the reference's embeddings are cached by content (the same at every evaluation).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raytrain.data.columns import reads_keys

# resemblyzer, librosa and onnxruntime are imported where they are used: resemblyzer and librosa take
# about a second (scipy, numba), which `raytrain plan`, the driver and workers without these metrics
# need not pay.

SAMPLE_RATE = 16000  # resemblyzer's and DNSMOS's rate; the metrics expect batches at this rate


class NoSpeechError(ValueError):
    """resemblyzer's voice activity detection found no speech in a clip."""


# --- speaker similarity -----------------------------------------------------------------------------


@functools.cache
def voice_encoder(device: str = "cpu") -> Any:
    """resemblyzer's ``VoiceEncoder`` on ``device``, loaded once per process, frozen and in eval mode."""
    with warnings.catch_warnings():  # it imports scipy.ndimage.morphology, deprecated in scipy 1.x
        warnings.simplefilter("ignore", DeprecationWarning)
        from resemblyzer import VoiceEncoder

    encoder = VoiceEncoder(device=device, verbose=False).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def _preprocess(wave: np.ndarray, sr: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from resemblyzer import preprocess_wav

    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"speaker_embedding takes a mono waveform (time,), got shape {wave.shape}")
    if not np.isfinite(wave).all():
        raise ValueError("speaker_embedding: the waveform holds NaN or inf")
    if not np.any(wave):  # resemblyzer's volume normalisation would divide by zero
        raise NoSpeechError(f"no speech: a silent clip ({len(wave) / sr:.2f} s of zeros)")
    out = preprocess_wav(wave, source_sr=sr)
    if len(out) == 0:
        raise NoSpeechError(f"no speech: resemblyzer's voice activity detection kept nothing of a "
                            f"{len(wave) / sr:.2f} s clip")
    return out


def speaker_embedding(wave: np.ndarray, sr: int) -> np.ndarray:
    """resemblyzer's speaker embedding (256,) float32, L2-normalised and non-negative, of a mono waveform
    at ``sr`` Hz (resampled to 16 kHz, volume-normalised, long silences cut: ``preprocess_wav``).

    Raises ``NoSpeechError`` (a ValueError) when the clip holds no speech (see the module docstring).
    """
    return _embed([_preprocess(wave, sr)])[0]


def speaker_embeddings(waves: list[np.ndarray], sr: int) -> list[np.ndarray | None]:
    """``speaker_embedding`` of each clip, None for a clip without speech: the same values, with the partial
    windows of all clips through the encoder in one call (per clip on a CPU: 72 ms against 87 ms at one
    thread, 52 ms against 136 ms at two)."""
    pre: list[np.ndarray | None] = []
    for wave in waves:
        try:
            pre.append(_preprocess(wave, sr))
        except NoSpeechError:
            pre.append(None)
    kept = [p for p in pre if p is not None]
    embedded = iter(_embed(kept) if kept else [])
    return [None if p is None else next(embedded) for p in pre]


PARTIAL_RATE, MIN_COVERAGE = 1.3, 0.75  # embed_utterance's defaults (partial windows a second, last one's coverage)


def _embed(clips: list[np.ndarray]) -> list[np.ndarray]:
    """resemblyzer's ``embed_utterance`` of preprocessed clips, step for step (partial windows of its
    default rate and coverage, the clip zero-padded to the last window, the partials' embeddings averaged
    and L2-normalised), with every clip's windows in one forward."""
    from resemblyzer import VoiceEncoder
    from resemblyzer.audio import wav_to_mel_spectrogram

    encoder = voice_encoder()
    windows: list[np.ndarray] = []
    owner: list[int] = []
    for i, wav in enumerate(clips):
        wav_slices, mel_slices = VoiceEncoder.compute_partial_slices(len(wav), PARTIAL_RATE, MIN_COVERAGE)
        stop = wav_slices[-1].stop
        if stop >= len(wav):
            wav = np.pad(wav, (0, stop - len(wav)), "constant")
        mel = wav_to_mel_spectrogram(wav)
        windows.extend(mel[s] for s in mel_slices)
        owner.extend([i] * len(mel_slices))
    with torch.no_grad():
        partial = encoder(torch.from_numpy(np.stack(windows)).to(encoder.device)).cpu().numpy()
    index = np.asarray(owner)
    out = []
    for i in range(len(clips)):
        raw = partial[index == i].mean(axis=0)
        out.append((raw / np.linalg.norm(raw, 2)).astype(np.float32))
    return out


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two speaker embeddings (resemblyzer's lie in [0, 1])."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


_CACHE_SIZE = 4096  # 1 KiB per embedding
_EMBEDDINGS: OrderedDict[bytes, np.ndarray | None] = OrderedDict()


def _cached_embeddings(waves: list[np.ndarray], sr: int) -> list[np.ndarray | None]:
    """``speaker_embeddings`` of inputs that are the same at every evaluation (sources, references),
    cached by content; only the clips not seen before are embedded."""
    keys = [hashlib.blake2b(np.ascontiguousarray(w, dtype=np.float32).tobytes(), digest_size=16,
                            person=str(sr).encode()).digest() for w in waves]
    missing = [i for i, k in enumerate(keys) if k not in _EMBEDDINGS]
    for i, emb in zip(missing, speaker_embeddings([waves[i] for i in missing], sr), strict=True):
        _EMBEDDINGS[keys[i]] = emb
    out = []
    for k in keys:
        _EMBEDDINGS.move_to_end(k)
        out.append(_EMBEDDINGS[k])
    while len(_EMBEDDINGS) > _CACHE_SIZE:
        _EMBEDDINGS.popitem(last=False)
    return out


def rows(x: Tensor, lengths: Tensor | None) -> list[np.ndarray]:
    """The valid part of each row of a padded (batch, time) batch, float32 numpy."""
    if x.ndim != 2:
        raise ValueError(f"voice metrics expect waveforms (batch, time), got {tuple(x.shape)}")
    x = x.detach().float().cpu()
    if lengths is None:
        return [r.numpy() for r in x]
    if lengths.shape != (x.shape[0],):
        raise ValueError(f"lengths must have shape ({x.shape[0]},), got {tuple(lengths.shape)}")
    return [x[i, : int(n)].numpy() for i, n in enumerate(lengths.cpu())]


def _input_embeddings(batch: dict[str, Tensor], key: str, lengths_key: str) -> list[np.ndarray]:
    waves = rows(batch[key], batch.get(lengths_key))
    embeddings = _cached_embeddings(waves, SAMPLE_RATE)
    for i, emb in enumerate(embeddings):
        if emb is None:
            try:
                _preprocess(waves[i], SAMPLE_RATE)  # for the reason
            except NoSpeechError as exc:
                raise ValueError(f"secs: batch[{key!r}] row {i}: {exc}") from None
    return embeddings  # type: ignore[return-value]


def _pair(values: Tensor, cross: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    c = cross.detach().double().cpu().reshape(-1)
    if c.shape != values.shape:
        raise ValueError(f"batch['cross'] must have shape {tuple(values.shape)}, got {tuple(cross.shape)}")
    return {"secs_cross": (values * c, c), "secs_within": (values * (1 - c), 1 - c)}


@reads_keys("audio", "reference")
@torch.no_grad()
def secs(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Any]:
    """``{"secs", "secs_source", "secs_gain": (batch,)}``: speaker-embedding cosine of ``outputs["audio_out"]``
    and of the source ``audio`` to ``reference``, and how much conversion gained (``secs - secs_source``: a
    gate on it holds the model to moving the voice, whatever the source's own similarity); with
    ``batch["cross"]``, also ``secs_cross`` / ``secs_within`` as (numerator, denominator) pairs over the
    cross- and within-gender rows."""
    if outputs["audio_out"].shape[0] != batch["reference"].shape[0]:
        raise ValueError(f"secs: audio_out has {outputs['audio_out'].shape[0]} rows, the batch "
                         f"{batch['reference'].shape[0]}")
    refs = _input_embeddings(batch, "reference", "reference_lengths")
    sources = _input_embeddings(batch, "audio", "lengths")
    outs = speaker_embeddings(rows(outputs["audio_out"], outputs.get("audio_out_lengths")), SAMPLE_RATE)
    value = torch.tensor([0.0 if o is None else similarity(o, r) for o, r in zip(outs, refs, strict=True)],
                         dtype=torch.float64)
    source = torch.tensor([similarity(s, r) for s, r in zip(sources, refs, strict=True)], dtype=torch.float64)
    result: dict[str, Any] = {"secs": value, "secs_source": source, "secs_gain": value - source}
    if "cross" in batch:
        result.update(_pair(value, batch["cross"]))
    return result


@reads_keys("audio", "reference", "cross")
@torch.no_grad()
def secs_gender(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Any]:
    """``secs`` on a dataset with a ``cross`` column, which it declares (so a phase reads it): adds
    ``secs_cross`` and ``secs_within``, the mean SECS over cross-gender and within-gender rows."""
    return secs(outputs, batch)


# --- DNSMOS ------------------------------------------------------------------------------------------

DNSMOS_WINDOW = int(9.01 * SAMPLE_RATE)  # the model's input: 9.01 s at 16 kHz
# speechmos's (and Microsoft's DNSMOS script's) polynomial fits of the raw outputs, non-personalised
_DNSMOS_FIT = {
    "sig": np.poly1d([-0.08397278, 1.22083953, 0.0052439]),
    "bak": np.poly1d([-0.13166888, 1.60915514, -0.39604546]),
    "ovrl": np.poly1d([-0.06766283, 1.11546468, 0.04602535]),
}


@functools.cache
def _dnsmos_session() -> Any:
    import onnxruntime as ort
    import speechmos

    path = os.path.join(os.path.dirname(speechmos.__file__), "dnsmos_models", "sig_bak_ovr.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def dnsmos_window(wave: np.ndarray) -> np.ndarray:
    """The one 9.01 s window DNSMOS scores: the clip clipped to [-1, 1] and repeated end to end until it
    is long enough (as speechmos does), then its first 9.01 s; an empty clip is 9.01 s of silence."""
    wave = np.clip(np.nan_to_num(np.asarray(wave, dtype=np.float32)), -1.0, 1.0)
    if len(wave) == 0:
        return np.zeros(DNSMOS_WINDOW, dtype=np.float32)
    while len(wave) < DNSMOS_WINDOW:
        wave = np.concatenate([wave, wave])
    return wave[:DNSMOS_WINDOW]


def dnsmos_scores(wave: np.ndarray) -> dict[str, float]:
    """``{"sig", "bak", "ovrl"}``: DNSMOS P.835 of a 16 kHz mono clip, from one 9.01 s window (a longer
    clip is scored on its first 9.01 s; speechmos's ``run`` averages 1 s hops over the tiled clip instead,
    which costs 6-17 s a call). Measured within 0.1 of speechmos's on espeak clips of 3-6 s."""
    raw = _dnsmos_session().run(None, {"input_1": dnsmos_window(wave)[None]})[0][0]
    return {name: float(_DNSMOS_FIT[name](float(r))) for name, r in zip(("sig", "bak", "ovrl"), raw, strict=True)}


@reads_keys()
@torch.no_grad()
def dnsmos(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{"dnsmos" (OVRL), "dnsmos_sig", "dnsmos_bak": (batch,)}`` of ``outputs["audio_out"]`` (the stand-in
    for UTMOS; absolute values on espeak audio are low: compare against a baseline)."""
    scores = [dnsmos_scores(w) for w in rows(outputs["audio_out"], outputs.get("audio_out_lengths"))]
    return {key: torch.tensor([s[name] for s in scores], dtype=torch.float64)
            for key, name in (("dnsmos", "ovrl"), ("dnsmos_sig", "sig"), ("dnsmos_bak", "bak"))}


# --- mel-cepstral distortion -------------------------------------------------------------------------

MCD_CEPSTRA = 13  # c1..c13; c0 (the frame's log energy) is left out, so MCD ignores loudness
MCD_TRIM_DB = 30.0  # leading/trailing audio this far below the clip's peak is cut before alignment
_MCD_FLOOR = 1e-4  # mel power floor relative to the clip's peak bin: 40 dB below (see mel_cepstrum)
_MCD_SCALE = 10.0 / math.log(10.0) * math.sqrt(2.0)


def mel_cepstrum(wave: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    """(frames, 13) cepstra c1..c13 of a clip: an 80-bin mel power spectrogram (librosa, with the settings of
    the recipes' log-mel, torchaudio's ``MelSpectrogram`` defaults: HTK mel scale without filter norm, 25 ms
    Hann windows zero-padded to n_fft 1024, 10 ms hop, centred), natural log floored 40 dB below the
    clip's peak bin (so a gain never matters, and neither does detail in near-silent bins: with an 80 dB
    floor, white noise at -50 dB added to a clip scores 61 dB against it, more than another male voice;
    with 40 dB, 1.8 dB), DCT-II with orthonormal scaling (``scipy.fft.dct(norm="ortho")``,
    as librosa's MFCC) over the mel axis, coefficients 1..13. Not torchaudio's MFCC (dB log-mel).

    These are MFCC-style cepstra of the log mel *power*, not SPTK's all-pass mel-cepstra, so MCD values are
    on their own scale (the ortho DCT over 80 bins is ~sqrt(2 * 80) times a true cepstrum, and log power
    is twice log amplitude): on espeak-ng speech, the same voice at another speed scores ~11 dB, another
    male variant ~17, an en-us voice ~33, a female voice ~50. Compare a system's ``mcd`` with
    ``mcd_source`` or another system's, not with the 4-10 dB figures of papers.
    """
    import librosa
    import scipy.fft

    win, hop = int(0.025 * sr), int(0.010 * sr)
    mel = librosa.feature.melspectrogram(y=np.asarray(wave, dtype=np.float32), sr=sr, n_fft=1024, hop_length=hop,
                                         win_length=win, n_mels=80, power=2.0, htk=True, norm=None)
    logmel = np.log(np.maximum(mel, max(float(mel.max()), 1e-20) * _MCD_FLOOR))
    return scipy.fft.dct(logmel, type=2, axis=0, norm="ortho")[1: MCD_CEPSTRA + 1].T


def _trim(wave: np.ndarray) -> np.ndarray:
    import librosa

    if not np.any(wave):
        return wave
    trimmed, _ = librosa.effects.trim(wave, top_db=MCD_TRIM_DB)
    return trimmed if len(trimmed) else wave


def mel_cepstral_distortion(est: np.ndarray, ref: np.ndarray, sr: int = SAMPLE_RATE) -> float:
    """MCD in dB of ``est`` against ``ref`` (mono clips at ``sr``): both trimmed of leading and trailing
    silence (``librosa.effects.trim``, 30 dB below the peak), cepstra from ``mel_cepstrum``, aligned by DTW
    (``librosa.sequence.dtw``, Euclidean cost, steps (1,1), (0,1), (1,0)), then
    ``(10 / ln 10) * sqrt(2 * sum_d (c_d - c'_d)^2)`` averaged over the aligned frame pairs."""
    import librosa

    a, b = _trim(np.asarray(est, dtype=np.float32)), _trim(np.asarray(ref, dtype=np.float32))
    if len(a) == 0 or len(b) == 0:
        raise ValueError(f"mel_cepstral_distortion of an empty clip ({len(a)} and {len(b)} samples)")
    ca, cb = mel_cepstrum(a, sr), mel_cepstrum(b, sr)
    _, path = librosa.sequence.dtw(X=ca.T, Y=cb.T, metric="euclidean")
    diff = ca[path[:, 0]] - cb[path[:, 1]]
    return float(_MCD_SCALE * np.sqrt((diff.astype(np.float64) ** 2).sum(-1)).mean())


@reads_keys("audio", "parallel")
@torch.no_grad()
def mcd(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Any]:
    """``{"mcd", "mcd_source": (batch,)}``: MCD in dB of ``outputs["audio_out"]`` and of the source ``audio``
    against ``parallel`` (lower is better), and ``mcd_ratio``, their ratio over the whole set as a
    (numerator, denominator) pair (0.8: the conversion is 20% closer to the parallel reference)."""
    parallel = rows(batch["parallel"], batch.get("parallel_lengths"))
    outs = rows(outputs["audio_out"], outputs.get("audio_out_lengths"))
    sources = rows(batch["audio"], batch.get("lengths"))
    if len(outs) != len(parallel):
        raise ValueError(f"mcd: audio_out has {len(outs)} rows, the batch {len(parallel)}")
    for i, p in enumerate(parallel):
        if not np.any(p):
            raise ValueError(f"mcd: batch['parallel'] row {i} is silent or empty")
    out = torch.tensor([mel_cepstral_distortion(o, p) for o, p in zip(outs, parallel, strict=True)],
                       dtype=torch.float64)
    source = torch.tensor([mel_cepstral_distortion(s, p) for s, p in zip(sources, parallel, strict=True)],
                          dtype=torch.float64)
    return {"mcd": out, "mcd_source": source, "mcd_ratio": (out, source)}
