"""Sung songs: espeak-ng voices singing a melody over the synthetic accompaniment of ``datasets_prep.songs``.

What the ``songs`` layout of ``raytrain prep`` writes for each corpus (``write_sung_corpus``): ``songs`` songs,
each sung by one of ``singers`` espeak voices (``choose_singers``), ``duration_sec`` long, plus a ``prompt_sec``
continuation (same singer, key and tempo, the bars that follow: a style prompt sharing no samples).

- Melody: lines of 2 beats of a major or minor scale within one octave above the key's root; a verse is two
  new lines, a chorus one line sung twice, the same in every chorus of the song (``plan_song``). A tenth of
  the notes are rests.
- Voice: every sung note is one word, one espeak-ng call (about 10 ms) with SSML ``<prosody range="0">`` (a
  steady pitch instead of speech intonation), ``-p`` from the note (``Tuning``: espeak's ``-p`` moves F0
  log-linearly, about an octave over 57 units, measured per voice) and ``-s`` from the tempo; the word is
  placed at the note's onset and cut, with a fade, to the note's length. The key's root is the note a singer
  sings at its own ``-p`` (``VoiceSpec.pitch``), so the voice is in tune with the accompaniment.
- Accompaniment (``songs.add_tones``, ``add_bass``, ``add_hihat``): the melody doubled softly an octave or two
  up, a bass note a bar, a hi-hat on every beat; vocals ``VOCALS_DB`` louder (RMS), the mix peak-normalised.
- ``songs.jsonl``: ``idx, audio_path, lyrics, prompt_wav, speaker, language, word_times`` (paths relative to
  it), lyrics the words sung in ``audio_path`` in order under their section tags: ``[verse] a b c d [chorus] e
  f e f``; ``word_times`` when each is sung (``"0.000-0.420 0.420-0.850 ..."``, seconds).

Every file is written by temp + rename and the manifest last; ``_songs.json`` records the parameters, so the
same parameters skip rendering and other ones re-render. The same parameters write the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import soundfile as sf

from datasets_prep.readers.espeak import (
    ESPEAK_RATE,
    VoiceSpec,
    _check_variants,
    _diverse,
    _espeak,
    resample,
    voice_pool,
)
from datasets_prep.shards import _atomic_write_bytes
from datasets_prep.songs import (
    Key,
    Note,
    _wav_bytes,
    add_bass,
    add_hihat,
    add_tones,
    draw_harmonics,
    draw_key,
)

MANIFEST = "songs.jsonl"
PARAMS_FILE = "_songs.json"
UNSINGABLE = ("whisper", "whisperf", "croak")  # no pitch (whisper), or voiced only at -p >= 80 (croak)
PITCH_RANGE = (10, 99)  # the -p a note may get: below 10 male voices fall under 50 Hz
TUNE_PITCHES = (30, 90)  # -p of the two calibration notes of ``tune``
TUNE_WORD = "la"
SECTIONS = ("[verse]", "[chorus]")
LINE_BEATS = 2
LINES_PER_SECTION = 2
RHYTHMS = ((1.0, 1.0), (1.0, 1.0), (0.5, 0.5, 1.0), (1.0, 0.5, 0.5), (2.0,), (0.5, 0.5, 0.5, 0.5))  # beats
STEPS = (-3, -2, -1, -1, 0, 1, 1, 2, 3)  # scale degrees from one note to the next
REST_SHARE = 0.1
VOCALS_DB = 6.0  # vocals over the accompaniment, RMS
PAD_GAIN, BASS_GAIN = 0.1, 0.1  # songs.py's are 0.3 and 0.2: here they accompany a voice
PEAK = 0.9
FADE_IN_S, FADE_OUT_S = 0.005, 0.03


def choose_singers(n: int, seed: int, bases: Sequence[str] | None = None, pitches: Sequence[int] | None = None,
                   speeds: Sequence[int] | None = None) -> list[VoiceSpec]:
    """``n`` singers from ``espeak.voice_pool`` without the voices that cannot carry a tune (``UNSINGABLE``),
    every timbre before one repeats. A singer's ``pitch`` is the ``-p`` of its songs' root note, its ``speed``
    the ``-s`` it sings at 120 bpm."""
    pool = [v for v in voice_pool(list(bases) if bases else None, list(pitches) if pitches else None,
                                  list(speeds) if speeds else None) if v.variant not in UNSINGABLE]
    if n > len(pool):
        raise ValueError(f"asked for {n} singers, the espeak pool has {len(pool)}")
    return _diverse(pool, random.Random(f"singers:{seed}"))[:n]


def sing_word(exe: str, singer: VoiceSpec, word: str, pitch: int, speed: int) -> np.ndarray:
    """``word`` sung on one steady pitch: float32 (T,) at ``ESPEAK_RATE``, leading silence cut."""
    ssml = f'<speak><prosody range="0">{escape(word)}</prosody></speak>'
    cmd = [exe, "--stdout", "-m", "-v", f"{singer.base}+{singer.variant}", "-p", str(pitch), "-s", str(speed), ssml]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0 or len(proc.stdout) <= 44:
        raise RuntimeError(f"espeak-ng failed to sing {word!r} (voice {singer.id}, -p {pitch}, -s {speed}): "
                           f"rc={proc.returncode} {proc.stderr.decode(errors='replace').strip()}")
    wave, _ = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    loud = np.nonzero(np.abs(wave) > 1e-3)[0]
    return wave[loud[0]:] if len(loud) else wave[:0]


def estimate_f0(wave: np.ndarray, sample_rate: int, fmin: float = 50.0, fmax: float = 1000.0,
                frame_s: float = 0.04, hop_s: float = 0.01, threshold: float = 0.15) -> np.ndarray:
    """F0 in Hz per frame of ``wave`` (T,) by YIN (cumulative mean normalised difference), NaN where unvoiced
    or quieter than 5% of the loudest frame. -> (frames,), frame ``i`` centred at ``i * hop_s + frame_s / 2``."""
    x = np.asarray(wave, dtype=np.float64)
    size, hop = int(frame_s * sample_rate), int(hop_s * sample_rate)
    if len(x) < size:
        return np.full(0, np.nan)
    max_lag = min(int(sample_rate / fmin), size // 2)
    min_lag = max(2, int(sample_rate / fmax))
    frames = np.lib.stride_tricks.sliding_window_view(x, size)[::hop]  # (F, size)
    w = size - max_lag
    lags = np.arange(max_lag + 1)
    power = np.concatenate([np.zeros((len(frames), 1)), np.cumsum(frames ** 2, axis=1)], axis=1)
    nfft = 1 << int(np.ceil(np.log2(size + w)))
    cross = np.fft.irfft(np.conj(np.fft.rfft(frames[:, :w], nfft)) * np.fft.rfft(frames, nfft), nfft)[:, :max_lag + 1]
    diff = power[:, w:w + 1] + power[:, lags + w] - power[:, lags] - 2 * cross  # (F, max_lag + 1)
    cmnd = np.ones_like(diff)
    cmnd[:, 1:] = diff[:, 1:] * lags[1:] / np.maximum(np.cumsum(diff[:, 1:], axis=1), 1e-12)
    rms = np.sqrt(np.mean(frames ** 2, axis=1))
    f0 = np.full(len(frames), np.nan)
    for i in np.nonzero(rms > 0.05 * rms.max(initial=0.0))[0]:
        below = np.nonzero(cmnd[i, min_lag:] < threshold)[0]
        if not len(below):
            continue
        lag = int(below[0]) + min_lag
        while lag < max_lag and cmnd[i, lag + 1] < cmnd[i, lag]:
            lag += 1
        shift = 0.0
        if lag < max_lag:
            a, b, c = cmnd[i, lag - 1:lag + 2]
            shift = float(np.clip(0.5 * (a - c) / (a - 2 * b + c), -0.5, 0.5)) if a - 2 * b + c > 0 else 0.0
        f0[i] = sample_rate / (lag + shift)
    return f0


def midi_of(f0: float | np.ndarray) -> Any:
    return 69.0 + 12.0 * np.log2(np.asarray(f0) / 440.0)


@dataclass(frozen=True)
class Tuning:
    """A voice's ``-p`` -> pitch line (espeak moves F0 log-linearly in ``-p``), from two sung notes."""

    midi_low: float  # the MIDI pitch sung at -p TUNE_PITCHES[0]
    units_per_semitone: float

    def midi_at(self, pitch: float) -> float:
        return self.midi_low + (pitch - TUNE_PITCHES[0]) / self.units_per_semitone

    def pitch_of(self, midi: float) -> int:
        """The ``-p`` that sings MIDI ``midi``, within ``PITCH_RANGE``."""
        p = TUNE_PITCHES[0] + (midi - self.midi_low) * self.units_per_semitone
        return int(min(max(round(p), PITCH_RANGE[0]), PITCH_RANGE[1]))


def tune(exe: str, singer: VoiceSpec) -> Tuning:
    """Measure ``singer``'s pitch at the two ``TUNE_PITCHES`` (two espeak-ng calls)."""
    lo_hi = []
    for p in TUNE_PITCHES:
        f0 = estimate_f0(sing_word(exe, singer, TUNE_WORD, p, 120), ESPEAK_RATE)
        if not np.isfinite(f0).any():
            raise RuntimeError(f"espeak-ng voice {singer.id} sang no pitch at -p {p}: it cannot sing; leave the "
                               f"variant {singer.variant!r} out")
        lo_hi.append(float(midi_of(np.nanmedian(f0))))
    if lo_hi[1] - lo_hi[0] < 3:
        raise RuntimeError(f"espeak-ng voice {singer.id}: -p {TUNE_PITCHES[0]} and {TUNE_PITCHES[1]} sang "
                           f"{lo_hi[0]:.1f} and {lo_hi[1]:.1f} (MIDI): its pitch does not follow -p")
    return Tuning(lo_hi[0], (TUNE_PITCHES[1] - TUNE_PITCHES[0]) / (lo_hi[1] - lo_hi[0]))


@dataclass(frozen=True)
class SungNote:
    """One note of a song's vocal line: a word sung at ``midi``, or a rest."""

    start: float  # seconds from the song's start
    dur: float  # seconds
    midi: int | None  # None: a rest
    word: str | None
    section: str  # a SECTIONS tag


@dataclass(frozen=True)
class SongPlan:
    """Everything of a song drawn before rendering (its lyrics need no espeak-ng call)."""

    key: Key
    speed: int  # espeak -s
    harmonics: np.ndarray  # the accompaniment's timbre
    notes: list[SungNote]


def _line(rng: np.random.Generator, key: Key, vocab: Sequence[str], degree: int
          ) -> tuple[list[tuple[float, float, int | None, str | None]], int]:
    """One line of ``LINE_BEATS`` beats: [(onset beats, beats, MIDI or None, word or None)], last degree."""
    out: list[tuple[float, float, int | None, str | None]] = []
    onset = 0.0
    for beats in RHYTHMS[int(rng.integers(len(RHYTHMS)))]:
        if rng.random() < REST_SHARE:
            out.append((onset, beats, None, None))
        else:
            degree = int(np.clip(degree + int(rng.choice(STEPS)), 0, len(key.scale)))
            out.append((onset, beats, key.midi(degree), str(vocab[int(rng.integers(len(vocab)))])))
        onset += beats
    return out, degree


def plan_song(rng: np.random.Generator, singer: VoiceSpec, tuning: Tuning, seconds: float, vocab: Sequence[str],
              bpm: tuple[float, float]) -> SongPlan:
    """Key (its root the note ``singer`` sings at its own ``-p``), tempo and the sung notes of ``seconds``."""
    root = int(round(tuning.midi_at(singer.pitch)))
    key = draw_key(rng, bpm, (root, root + 1))
    speed = int(min(max(round(singer.speed * 60.0 / key.beat / 120.0), 80), 450))
    harmonics = draw_harmonics(rng)
    chorus, _ = _line(rng, key, vocab, int(rng.integers(0, 5)))
    degree = int(rng.integers(0, 5))
    notes: list[SungNote] = []
    t, k = 0.0, 0
    while t < seconds:
        section = SECTIONS[k % len(SECTIONS)]
        for _ in range(LINES_PER_SECTION):
            if section == "[chorus]":
                line = chorus
            else:
                line, degree = _line(rng, key, vocab, degree)
            notes += [SungNote(t + on * key.beat, beats * key.beat, midi, word, section)
                      for on, beats, midi, word in line]
            t += LINE_BEATS * key.beat
        k += 1
    return SongPlan(key, speed, harmonics, notes)


def word_times_of(notes: Sequence[SungNote], until: float) -> str:
    """When each word of ``lyrics_of`` is sung: ``"start-end start-end ..."`` in seconds (its note, cut at
    ``until``), one pair per word in order, for models that read lyrics aligned to time."""
    return " ".join(f"{n.start:.3f}-{min(n.start + n.dur, until):.3f}" for n in notes
                    if n.start < until and n.word is not None)


def lyrics_of(notes: Sequence[SungNote], until: float) -> str:
    """The words of the notes starting before ``until`` seconds, each section under its tag."""
    parts: list[str] = []
    section = None
    for n in notes:
        if n.start >= until or n.word is None:
            continue
        if n.section != section:
            parts.append(n.section)
            section = n.section
        parts.append(n.word)
    return " ".join(parts)


def _vocals(exe: str, singer: VoiceSpec, tuning: Tuning, plan: SongPlan, seconds: float) -> np.ndarray:
    """The sung notes over ``seconds``: float32 (T,) at ``ESPEAK_RATE``."""
    n = int(math.ceil(seconds * ESPEAK_RATE))
    out = np.zeros(n, dtype=np.float64)
    sung: dict[tuple[str, int], np.ndarray] = {}  # a chorus sings the same words on the same notes again
    fade_in, fade_out = int(FADE_IN_S * ESPEAK_RATE), int(FADE_OUT_S * ESPEAK_RATE)
    for note in plan.notes:
        start = int(round(note.start * ESPEAK_RATE))
        if note.midi is None or note.word is None or start >= n:
            continue
        pitch = tuning.pitch_of(note.midi)
        if (note.word, pitch) not in sung:
            sung[note.word, pitch] = sing_word(exe, singer, note.word, pitch, plan.speed)
        word = sung[note.word, pitch]
        length = min(len(word), int(note.dur * ESPEAK_RATE), n - start)
        if length <= 0:
            continue
        env = np.ones(length)
        k_in, k_out = min(fade_in, length), min(fade_out, length)
        env[:k_in] = np.linspace(0.0, 1.0, k_in, endpoint=False)
        env[length - k_out:] *= np.linspace(1.0, 0.0, k_out)
        out[start:start + length] += word[:length] * env
    return out.astype(np.float32)


@dataclass(frozen=True)
class SungSong:
    plan: SongPlan
    mix: np.ndarray  # float32 (T,) at sample_rate: vocals + accompaniment, peak PEAK
    vocals: np.ndarray  # float32 (T,): the vocals as they are in ``mix``


def render_sung_song(exe: str, singer: VoiceSpec, tuning: Tuning, rng: np.random.Generator, seconds: float,
                     sample_rate: int, vocab: Sequence[str], bpm: tuple[float, float]) -> SungSong:
    """``seconds`` of a song sung by ``singer`` (see the module docstring); ``rng`` draws everything."""
    plan = plan_song(rng, singer, tuning, seconds, vocab, bpm)
    n = int(round(seconds * sample_rate))
    vocals = resample(_vocals(exe, singer, tuning, plan, seconds), ESPEAK_RATE, sample_rate).astype(np.float64)
    vocals = np.pad(vocals[:n], (0, max(0, n - len(vocals))))
    acc = np.zeros(n, dtype=np.float64)
    up = 12 * max(0, math.ceil((60 - plan.key.root) / 12))  # the doubled melody from middle C up
    add_tones(acc, [Note(x.start, x.dur, None if x.midi is None else x.midi + up) for x in plan.notes],
              plan.harmonics, sample_rate, gain=PAD_GAIN)
    add_bass(acc, 36 + plan.key.root % 12, plan.key.beat, sample_rate, gain=BASS_GAIN)
    add_hihat(acc, rng, plan.key.beat, sample_rate)
    rms_v, rms_a = float(np.sqrt(np.mean(vocals ** 2))), float(np.sqrt(np.mean(acc ** 2)))
    if rms_v > 0:
        vocals *= 10 ** (VOCALS_DB / 20) * rms_a / rms_v
    mix = vocals + acc
    gain = PEAK / (float(np.abs(mix).max()) or 1.0)
    return SungSong(plan, (mix * gain).astype(np.float32), (vocals * gain).astype(np.float32))


def song_params(singers: Sequence[VoiceSpec], songs: int, seed: int, vocab: Sequence[str], duration_sec: float,
                prompt_sec: float, sample_rate: int, bpm: tuple[float, float]) -> dict[str, Any]:
    """What makes two sung corpora equal (``_songs.json``, and the prep manifests of their shards)."""
    return {"singers": [v.id for v in singers], "songs": songs, "seed": seed,
            "vocab_sha256": hashlib.sha256("\n".join(vocab).encode()).hexdigest(), "duration_sec": duration_sec,
            "prompt_sec": prompt_sec, "sample_rate": sample_rate, "bpm": list(bpm), "manifest": 2}


def _sync(out: Path, params: dict[str, Any]) -> bool:
    """True when ``out`` holds a finished corpus of ``params``; else make it ready to (re)render: a changed
    corpus loses its manifest and wavs first."""
    path = out / PARAMS_FILE
    same = path.exists() and json.loads(path.read_text()) == params
    if same and (out / MANIFEST).exists():
        return True
    if not same:
        (out / MANIFEST).unlink(missing_ok=True)
        old = [*out.glob("audio/*.wav"), *out.glob("prompts/*.wav")]
        for f in old:
            f.unlink()
        if old:
            print(f"[songs] {out}: parameters changed, removed {len(old)} old files", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(path, (json.dumps(params, indent=2) + "\n").encode())
    for p in out.rglob(".*.tmp"):
        p.unlink()
    return False


def write_sung_corpus(out_dir: str | os.PathLike, *, name: str, singers: Sequence[VoiceSpec], songs: int, seed: int,
                      vocab: Sequence[str], duration_sec: float, prompt_sec: float, sample_rate: int,
                      bpm: tuple[float, float] = (80.0, 140.0), workers: int = 2, progress: bool = True) -> Path:
    """Write ``songs`` sung songs under ``out_dir`` (module docstring); returns the manifest's path. Song ``i``
    is ``<name>_<i:04d>``, sung by ``singers[i % len(singers)]``, drawn from ``default_rng([seed, i])``."""
    out = Path(out_dir)
    params = song_params(singers, songs, seed, vocab, duration_sec, prompt_sec, sample_rate, bpm)
    if _sync(out, params):
        return out / MANIFEST
    exe = _espeak()
    _check_variants(exe, list(singers))
    for sub in ("audio", "prompts"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        tunings = dict(zip((v.id for v in singers), ex.map(lambda v: tune(exe, v), singers), strict=True))

        def one(i: int) -> dict[str, Any]:
            singer = singers[i % len(singers)]
            idx = f"{name}_{i:04d}"
            row = {"idx": idx, "audio_path": f"audio/{idx}.wav", "lyrics": "", "prompt_wav": f"prompts/{idx}.wav",
                   "speaker": singer.id, "language": singer.base.split("-")[0]}
            rng = np.random.default_rng([seed, i])
            if (out / row["audio_path"]).exists() and (out / row["prompt_wav"]).exists():  # an interrupted run's
                plan = plan_song(rng, singer, tunings[singer.id], duration_sec + prompt_sec, vocab, bpm)
            else:
                song = render_sung_song(exe, singer, tunings[singer.id], rng, duration_sec + prompt_sec, sample_rate,
                                        vocab, bpm)
                plan, cut = song.plan, int(round(duration_sec * sample_rate))
                _atomic_write_bytes(out / row["prompt_wav"], _wav_bytes(song.mix[cut:], sample_rate))
                _atomic_write_bytes(out / row["audio_path"], _wav_bytes(song.mix[:cut], sample_rate))
            row["lyrics"] = lyrics_of(plan.notes, duration_sec)
            row["word_times"] = word_times_of(plan.notes, duration_sec)
            return row

        rows = []
        try:
            for i, row in enumerate(ex.map(one, range(songs))):
                rows.append(json.dumps(row, ensure_ascii=False))
                if progress and (i + 1) % max(1, songs // 5) == 0:
                    print(f"  {out.name}: {i + 1}/{songs} songs", flush=True)
        except BaseException:
            ex.shutdown(wait=True, cancel_futures=True)  # no song more after a failed one (or Ctrl-C)
            raise
    _atomic_write_bytes(out / MANIFEST, ("\n".join(rows) + "\n").encode("utf-8"))
    return out / MANIFEST
