"""The preprocessing steps: resample, normalize, vad_trim, segment, features.

A step maps one loaded row (audio columns as float32 waveforms, ``sample_rate``, metadata)
to a list of rows: one, several (``segment``) or raises ``Reject``. Rows with several audio
columns (wsj0-2mix: ``mix``, ``s1``, ``s2``) are treated as one signal: gains, trims and
cut points come from the first column and apply to all, so ``mix == s1 + s2`` still holds.
A ``prompt`` column (a song's style prompt, JSONL ``prompt_wav``) is a signal of its own length:
resample and normalize (with the first column's gain) treat it like the others, and the steps that
cut (``vad_trim``, ``segment``) refuse a chain holding one.
Each step's parameters are a pydantic model; the chain records them in the manifest.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from datasets_prep.steps.load import Reject


class StepParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- resample ------------------------------------------------------------------------------------
class Resample(StepParams):
    sample_rate: int = Field(16000, gt=0)


def resample_wave(wave: np.ndarray, orig: int, new: int) -> np.ndarray:
    """torchaudio's windowed-sinc resampler (float32 (T,) -> float32 (ceil(T * new / orig),)).

    The input is zero-padded to whole seconds (then trimmed): oneDNN caches kernels per input
    shape and thread, and thousands of distinct utterance lengths would cost gigabytes.
    """
    if orig == new:
        return wave
    import torch

    n = len(wave)
    padded = np.pad(wave, (0, -(-n // orig) * orig - n))
    with torch.no_grad():
        return _resampler(orig, new)(torch.from_numpy(padded)[None])[0, : math.ceil(n * new / orig)].numpy()


@functools.lru_cache(maxsize=16)
def _resampler(orig: int, new: int) -> Any:
    """torchaudio's ``Resample`` for one pair of rates, built once per process: its sinc kernel costs
    more than the filtering of a few seconds of audio (0.1 s for 44.1 -> 16 kHz), and
    ``torchaudio.functional.resample`` builds it on every call. The kernel is made in float32, as the
    functional form makes it for float32 input, so the output is the same, bit for bit."""
    import torch
    import torchaudio

    return torchaudio.transforms.Resample(orig, new, dtype=torch.float32)


def resample(row: dict[str, Any], p: Resample, columns: list[str]) -> list[dict[str, Any]]:
    sr = int(row["sample_rate"])
    for c in columns:
        row[c] = resample_wave(row[c], sr, p.sample_rate)
    row["sample_rate"] = p.sample_rate
    return [row]


# ---- normalize -----------------------------------------------------------------------------------
class Normalize(StepParams):
    mode: Literal["peak", "loudness"] = "peak"
    peak_db: float = Field(-1.0, le=0)  # mode: peak — the loudest sample, dBFS
    lufs: float = Field(-23.0, lt=0)  # mode: loudness — integrated loudness (ITU-R BS.1770, pyloudnorm)
    max_gain_db: float = Field(30.0, ge=0)  # never amplify near-silence by more than this


def normalize(row: dict[str, Any], p: Normalize, columns: list[str]) -> list[dict[str, Any]]:
    ref = row[columns[0]]
    peak = float(np.max(np.abs(ref))) if ref.size else 0.0
    if peak <= 1e-6:
        raise Reject("silent audio: nothing to normalize")
    if p.mode == "peak":
        gain_db = p.peak_db - 20 * math.log10(peak)
    else:
        import pyloudnorm

        sr = int(row["sample_rate"])
        if len(ref) < int(0.4 * sr):  # BS.1770 gates 400 ms blocks
            raise Reject(f"too short for loudness normalization ({len(ref) / sr:.2f} s < 0.4 s)")
        loud = pyloudnorm.Meter(sr).integrated_loudness(ref.astype(np.float64))
        if not math.isfinite(loud):
            raise Reject("silent audio: loudness is -inf")
        gain_db = p.lufs - loud
        gain_db = min(gain_db, -20 * math.log10(peak))  # and never clip
    gain = 10 ** (min(gain_db, p.max_gain_db) / 20)
    for c in columns:
        row[c] = (row[c] * gain).astype(np.float32)
    return [row]


# ---- voice activity ------------------------------------------------------------------------------
class VadTrim(StepParams):
    aggressiveness: int = Field(2, ge=0, le=3)  # webrtcvad mode: 0 keeps most, 3 cuts most
    frame_ms: Literal[10, 20, 30] = 30
    pad_ms: float = Field(100.0, ge=0)  # kept before the first and after the last voiced frame
    min_seconds: float = Field(0.3, ge=0)  # shorter after trimming: rejected
    window_ms: float = Field(300.0, gt=0)  # speech starts/ends where this window is mostly voiced
    voiced_ratio: float = Field(0.6, gt=0, le=1)  # ... by at least this share of its frames


_VAD_RATES = (8000, 16000, 32000, 48000)


def voiced_frames(wave: np.ndarray, sample_rate: int, aggressiveness: int = 2, frame_ms: int = 30
                  ) -> tuple[np.ndarray, int]:
    """(bool per frame: speech?, frame length in samples at ``sample_rate``) from webrtcvad.

    Rates webrtcvad does not take are resampled to 16 kHz for the decision only.
    """
    import webrtcvad

    rate = sample_rate if sample_rate in _VAD_RATES else 16000
    x = wave if rate == sample_rate else resample_wave(wave, sample_rate, rate)
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
    n = rate * frame_ms // 1000
    vad = webrtcvad.Vad(aggressiveness)
    flags = np.array([vad.is_speech(pcm[i:i + n].tobytes(), rate) for i in range(0, len(pcm) - n + 1, n)],
                     dtype=bool)
    return flags, sample_rate * frame_ms // 1000


def vad_trim(row: dict[str, Any], p: VadTrim, columns: list[str]) -> list[dict[str, Any]]:
    sr = int(row["sample_rate"])
    ref = row[columns[0]]
    flags, hop = voiced_frames(ref, sr, p.aggressiveness, p.frame_ms)
    # webrtcvad flags a few frames of plain noise while its noise model adapts: speech starts at
    # the first window of `window_ms` that is mostly voiced (and ends at the last such window)
    w = max(1, min(len(flags), round(p.window_ms / p.frame_ms)))
    dense = np.convolve(flags.astype(np.float64), np.ones(w) / w, mode="valid") >= p.voiced_ratio - 1e-9
    if not dense.any():
        raise Reject("no speech found by the VAD")
    i, j = int(np.argmax(dense)), len(dense) - 1 - int(np.argmax(dense[::-1]))
    first = i + int(np.argmax(flags[i:i + w]))  # first voiced frame of the first dense window
    last = j + w - 1 - int(np.argmax(flags[j:j + w][::-1]))  # last voiced frame of the last one
    # the VAD holds on for a few frames after speech: drop edge frames near the noise floor
    n = len(flags) * hop
    db = 10 * np.log10(np.mean(ref[:n].astype(np.float64).reshape(-1, hop) ** 2, axis=1) + 1e-12)
    floor = min(float(np.percentile(db, 10)) + 10.0, float(np.median(db[first:last + 1])) - 20.0)
    while first < last and db[first] < floor:
        first += 1
    while last > first and db[last] < floor:
        last -= 1
    pad = int(p.pad_ms * sr / 1000)
    start, end = max(0, first * hop - pad), min(len(ref), (last + 1) * hop + pad)
    if (end - start) / sr < p.min_seconds:
        raise Reject(f"too short after trimming ({(end - start) / sr:.2f} s < min_seconds {p.min_seconds})")
    for c in columns:
        row[c] = np.ascontiguousarray(row[c][start:end])
    return [row]


# ---- segment -------------------------------------------------------------------------------------
TRANSCRIPT_COLUMNS = ("text", "phonemes", "lyrics")  # text that belongs to the whole utterance
class Segment(StepParams):
    max_seconds: float = Field(15.0, gt=0)
    min_seconds: float = Field(1.0, ge=0)  # pieces shorter than this are dropped (a tail of silence)
    min_silence_ms: float = Field(200.0, ge=0)  # cut inside pauses at least this long when there is one
    aggressiveness: int = Field(2, ge=0, le=3)


def segment(row: dict[str, Any], p: Segment, columns: list[str]) -> list[dict[str, Any]]:
    """Split audio longer than ``max_seconds`` at the middle of its pauses, each piece at most
    ``max_seconds``; ids get ``_000``, ``_001``... suffixes (one piece keeps its id)."""
    sr = int(row["sample_rate"])
    ref = row[columns[0]]
    limit = int(p.max_seconds * sr)
    if len(ref) <= limit:
        return [row]
    transcribed = [c for c in TRANSCRIPT_COLUMNS if row.get(c)]
    if transcribed:  # each piece would carry the whole transcript: wrong targets, silently
        raise Reject(f"{len(ref) / sr:.1f} s is longer than segment max_seconds {p.max_seconds} and the row has a "
                     f"transcript ({', '.join(transcribed)}) that cannot be cut without an alignment; raise "
                     "max_seconds, or segment the corpus with its alignments before prep")
    flags, hop = voiced_frames(ref, sr, p.aggressiveness, 30)
    min_run = max(1, math.ceil(p.min_silence_ms / 30))
    # candidate cut points: the middle of each silent run long enough
    cuts, i = [], 0
    while i < len(flags):
        if not flags[i]:
            j = i
            while j < len(flags) and not flags[j]:
                j += 1
            if j - i >= min_run:
                cuts.append(((i + j) // 2) * hop)
            i = j
        else:
            i += 1
    bounds, start = [], 0
    while len(ref) - start > limit:
        inside = [c for c in cuts if start < c <= start + limit]
        end = inside[-1] if inside and inside[-1] - start >= p.min_seconds * sr else start + limit
        bounds.append((start, end))
        start = end
    bounds.append((start, len(ref)))
    out = []
    for k, (a, b) in enumerate(x for x in bounds if (x[1] - x[0]) >= p.min_seconds * sr):
        piece = dict(row)
        piece["id"] = f"{row['id']}_{k:03d}"
        piece["segment_start"] = a / sr
        for c in columns:
            piece[c] = np.ascontiguousarray(row[c][a:b])
        out.append(piece)
    if not out:
        raise Reject(f"no piece of at least min_seconds {p.min_seconds} after segmenting")
    return out


# ---- features ------------------------------------------------------------------------------------
class Features(StepParams):
    n_mels: int = Field(80, gt=0)
    n_fft: int = Field(1024, gt=0)
    win_ms: float = Field(25.0, gt=0)
    hop_ms: float = Field(10.0, gt=0)
    f_min: float = Field(0.0, ge=0)
    f_max: float | None = None
    f0: bool = False  # also a pitch track (torchaudio's NCCF detector), one value per hop


@functools.lru_cache(maxsize=16)
def _mel_transform(sr: int, n_fft: int, win: int, hop: int, f_min: float, f_max: float | None, n_mels: int) -> Any:
    """torchaudio's ``MelSpectrogram``, built once per process and parameter set (its mel filterbank
    and window cost about as much as the spectrogram of a 5 s utterance)."""
    import torchaudio

    return torchaudio.transforms.MelSpectrogram(sample_rate=sr, n_fft=n_fft, win_length=win, hop_length=hop,
                                                f_min=f_min, f_max=f_max, n_mels=n_mels, power=2.0)


def features(row: dict[str, Any], p: Features, columns: list[str]) -> list[dict[str, Any]]:
    """Adds ``mel`` (float32 (frames, n_mels) log-mel, natural log of power + 1e-6) and, with
    ``f0``, ``f0`` (float32 (frames,) Hz) computed on the first audio column."""
    import torch

    sr = int(row["sample_rate"])
    win, hop = int(p.win_ms * sr / 1000), int(p.hop_ms * sr / 1000)
    mel = _mel_transform(sr, max(p.n_fft, win), win, hop, p.f_min, p.f_max, p.n_mels)
    x = torch.from_numpy(np.ascontiguousarray(row[columns[0]]))
    with torch.no_grad():
        m = torch.log(mel(x) + 1e-6).T.contiguous()
        row["mel"] = m.numpy().astype(np.float32)
        if p.f0:
            import torchaudio.functional as AF

            f0 = AF.detect_pitch_frequency(x[None], sr, frame_time=p.hop_ms / 1000, win_length=30)[0]
            row["f0"] = f0.numpy().astype(np.float32)
    return [row]


STEPS: dict[str, tuple[type[StepParams], Any]] = {
    "resample": (Resample, resample),
    "normalize": (Normalize, normalize),
    "vad_trim": (VadTrim, vad_trim),
    "segment": (Segment, segment),
    "features": (Features, features),
}


SEPARATE_COLUMNS = ("prompt",)  # audio columns of their own length, not cut with the first one
CUTTING_STEPS = ("vad_trim", "segment")  # cut every audio column at the first one's points


class Chain:
    """An ordered list of configured steps; ``__call__(row)`` -> rows (or raises ``Reject``)."""

    def __init__(self, steps: list[tuple[str, dict[str, Any]]], audio_columns: list[str]) -> None:
        self.audio_columns = list(audio_columns)
        self.steps: list[tuple[str, StepParams, Any]] = []
        separate = [c for c in self.audio_columns[1:] if c in SEPARATE_COLUMNS]
        cutting = [name for name, _ in steps if name in CUTTING_STEPS]
        if separate and cutting:
            raise ValueError(f"steps {cutting} cut every audio column where they cut {self.audio_columns[0]!r}, but "
                             f"{separate[0]!r} (from prompt_wav) is a signal of its own length: drop {cutting} for "
                             "this corpus (trim or cut the songs and their prompts before prep)")
        for name, params in steps:
            if name not in STEPS:
                raise ValueError(f"unknown prep step {name!r}; use some of {list(STEPS)}")
            model, fn = STEPS[name]
            self.steps.append((name, model.model_validate(params or {}), fn))

    def describe(self) -> list[dict[str, Any]]:
        """[{"step": name, **params}] as recorded in the manifest."""
        return [{"step": name, **p.model_dump(mode="json")} for name, p, _ in self.steps]

    def output_rate(self, input_rate: int | None) -> int | None:
        for name, p, _ in self.steps:
            if name == "resample":
                input_rate = p.sample_rate  # type: ignore[attr-defined]
        return input_rate

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        rows = [row]
        for _, params, fn in self.steps:
            rows = [out for r in rows for out in fn(r, params, self.audio_columns)]
        return rows
