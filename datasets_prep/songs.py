"""``raytrain prep dummy-songs``: a small song dataset in the JSONL layout of song fine-tuning code.

Each of ``num_samples`` songs is a seeded synthetic piece: a melody (notes of a major or minor scale
at a tempo of 80-140 bpm, a few harmonics under a decaying envelope) over a bass note per bar and a
noise hi-hat on every beat. It writes

- ``audio/song_NNNN.wav``: ``duration_sec`` of the song;
- ``prompts/song_NNNN.wav``: the ``prompt_sec`` that follow in the same song (the same key, tempo and
  timbre, none of the same samples): a style prompt;
- ``sketch/song_NNNN.<ext>``: the sketch, 1-D integer tokens at ``sketch_fps``, ``round(duration_sec *
  sketch_fps)`` of them: the melody's scale degree and octave under each frame (0 in the rests), so the
  tokens carry what the audio holds;
- ``songs.jsonl``: one line per song, ``idx, audio_path, lyrics, prompt_wav, sketch_path`` (paths
  relative to the manifest), lyrics with section tags (``[verse] ... [chorus] ...``).

Sketch files come in the formats song code reads (``sketch_format``): ``pt`` (a tensor), ``pt-dict``
(``{"sketch": tensor}``), ``npy``, ``npz``, or ``mixed`` (each song the next of the four). Every file
is written to a temporary name and renamed; the manifest is written last, so an interrupted run leaves
no manifest that names a missing file. The same arguments write the same bytes.

The parts (``draw_key``, ``add_tones``, ``add_bass``, ``add_hihat``) also accompany the sung songs of
``datasets_prep.sung`` (the ``songs`` layout of ``raytrain prep``).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from datasets_prep.shards import _atomic_write_bytes

SKETCH_FORMATS = ("pt", "pt-dict", "npy", "npz")
SKETCH_EXTS = {"pt": ".pt", "pt-dict": ".pt", "npy": ".npy", "npz": ".npz"}
MANIFEST = "songs.jsonl"
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
SECTIONS = ("[intro]", "[verse]", "[chorus]", "[verse]", "[chorus]", "[outro]")
WORDS = ("light", "river", "night", "home", "fire", "dream", "road", "sky", "heart", "rain", "gold", "wind",
         "stone", "sea", "song", "morning", "shadow", "dance", "open", "slow")
OCTAVES = 2  # the melody's range; tokens 1 .. 7 * OCTAVES are (octave, degree), 0 a rest


def _wav_bytes(wave: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def _sketch_bytes(tokens: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "npy":
        np.save(buf, tokens)
    elif fmt == "npz":
        np.savez(buf, sketch=tokens)
    else:
        import torch

        t = torch.from_numpy(tokens)
        torch.save(t if fmt == "pt" else {"sketch": t}, buf)
    return buf.getvalue()


@dataclass(frozen=True)
class Key:
    """A song's key and tempo."""

    scale: tuple[int, ...]  # semitones of the scale's degrees above its root (``SCALES``)
    root: int  # MIDI note of the scale's root
    beat: float  # seconds per beat

    def midi(self, degree: int) -> int:
        """The MIDI note of scale ``degree`` (0: the root; 7 the root an octave up, -1 the degree below the root)."""
        octave, step = divmod(degree, len(self.scale))
        return self.root + 12 * octave + self.scale[step]


@dataclass(frozen=True)
class Note:
    """One note of a part: ``midi`` None is a rest."""

    start: float  # seconds
    dur: float  # seconds
    midi: int | None


def hz(midi: float) -> float:
    return 440.0 * 2 ** ((midi - 69) / 12)


def draw_key(rng: np.random.Generator, bpm: tuple[float, float] = (80.0, 140.0), roots: tuple[int, int] = (48, 60)
             ) -> Key:
    """A major or minor scale on a root in ``[roots[0], roots[1])`` at a tempo in ``bpm``."""
    scale = SCALES["major" if rng.random() < 0.5 else "minor"]
    root = roots[0] + int(rng.integers(0, roots[1] - roots[0]))
    return Key(scale, root, 60.0 / float(rng.uniform(*bpm)))


def draw_harmonics(rng: np.random.Generator) -> np.ndarray:
    """Amplitudes of a tone's first three harmonics: a timbre."""
    return rng.uniform(0.2, 0.7, size=3) ** np.arange(1, 4)


def add_tones(wave: np.ndarray, notes: list[Note], harmonics: np.ndarray, sample_rate: int,
              gain: float = 0.3) -> None:
    """Add ``notes`` to ``wave`` (float64 (T,), in place): harmonics under a decaying envelope."""
    n = len(wave)
    t_all = np.arange(n) / sample_rate
    for note in notes:
        start, end = int(note.start * sample_rate), min(n, int((note.start + note.dur) * sample_rate))
        if note.midi is None or start >= end:
            continue
        freq = hz(note.midi)
        tt = t_all[start:end] - note.start
        env = np.exp(-3.0 * tt / note.dur) * np.minimum(1.0, tt / 0.01)
        wave[start:end] += gain * env * sum(a * np.sin(2 * np.pi * freq * (k + 1) * tt)
                                            for k, a in enumerate(harmonics))


def add_bass(wave: np.ndarray, root: int, beat: float, sample_rate: int, gain: float = 0.2) -> None:
    """Add a bass note a bar (4 beats) to ``wave`` (in place), on MIDI ``root`` and its fifth in turn."""
    n = len(wave)
    seconds = n / sample_rate
    t_all = np.arange(n) / sample_rate
    bar = 4 * beat
    for b in range(int(np.ceil(seconds / bar))):
        start, end = int(b * bar * sample_rate), min(n, int((b + 1) * bar * sample_rate))
        freq = hz(root + (0 if b % 2 == 0 else 7))
        tt = t_all[start:end] - b * bar
        wave[start:end] += gain * np.exp(-1.5 * tt / bar) * np.sin(2 * np.pi * freq * tt)


def add_hihat(wave: np.ndarray, rng: np.random.Generator, beat: float, sample_rate: int, gain: float = 0.05) -> None:
    """Add a hi-hat of filtered noise on every beat to ``wave`` (in place)."""
    n = len(wave)
    hat = int(0.03 * sample_rate)
    for k in range(int(np.ceil(n / sample_rate / beat))):
        start = int(k * beat * sample_rate)
        end = min(n, start + hat)
        if start < end:
            noise = np.diff(rng.standard_normal(end - start + 1))
            wave[start:end] += gain * noise * np.exp(-np.arange(end - start) / (0.2 * hat))


def _draw_melody(rng: np.random.Generator, key: Key, seconds: float) -> list[tuple[Note, int]]:
    """(note, sketch token) pairs over ``seconds``: a tenth of them rests (token 0)."""
    out = []
    t = 0.0
    while t < seconds:
        dur = key.beat * float(rng.choice([0.5, 1.0, 1.0, 2.0]))
        if rng.random() > 0.1:  # else a rest
            octave, degree = int(rng.integers(0, OCTAVES)), int(rng.integers(0, len(key.scale)))
            out.append((Note(t, dur, key.midi(len(key.scale) * (octave + 1) + degree)),
                        1 + octave * len(key.scale) + degree))
        else:
            out.append((Note(t, dur, None), 0))
        t += dur
    return out


def render_song(rng: np.random.Generator, seconds: float, sample_rate: int, sketch_fps: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """(waveform float32 of ``seconds``, sketch tokens int64 at ``sketch_fps`` over the same time)."""
    key = draw_key(rng)
    harmonics = draw_harmonics(rng)  # the melody's timbre
    melody = _draw_melody(rng, key, seconds)
    wave = np.zeros(int(round(seconds * sample_rate)), dtype=np.float64)
    add_tones(wave, [note for note, _ in melody], harmonics, sample_rate)
    frames = int(round(seconds * sketch_fps))
    tokens = np.zeros(frames, dtype=np.int64)
    for note, token in melody:
        f0, f1 = int(np.ceil(note.start * sketch_fps)), min(frames, int(np.ceil((note.start + note.dur) * sketch_fps)))
        tokens[f0:f1] = token
    add_bass(wave, key.root - 12, key.beat, sample_rate)
    add_hihat(wave, rng, key.beat, sample_rate)
    peak = float(np.abs(wave).max()) or 1.0
    return (0.6 * wave / peak).astype(np.float32), tokens


def lyrics(rng: np.random.Generator) -> str:
    """Section-tagged lyrics: ``[intro] w w w [verse] w w w w [chorus] w w w ...`` (3 to 6 sections)."""
    tags = SECTIONS[:int(rng.integers(3, len(SECTIONS) + 1))]
    return " ".join(f"{tag} " + " ".join(str(w) for w in rng.choice(WORDS, size=int(rng.integers(3, 7))))
                    for tag in tags)


def write_dummy_songs(output_dir: str | os.PathLike, *, num_samples: int, duration_sec: float, prompt_sec: float,
                      sketch_fps: float, sample_rate: int = 16000, sketch_format: str = "pt", seed: int = 0,
                      progress: bool = True) -> Path:
    """Write the dataset (module docstring) under ``output_dir``; returns the manifest's path."""
    if num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {num_samples}")
    if duration_sec <= 0 or prompt_sec <= 0:
        raise ValueError(f"--duration-sec and --prompt-sec must be positive, got {duration_sec} and {prompt_sec}")
    if sketch_fps <= 0 or duration_sec * sketch_fps < 1:
        raise ValueError(f"--sketch-fps {sketch_fps} gives no sketch frame in {duration_sec} s: use a positive rate")
    if sample_rate < 8000:
        raise ValueError(f"--sample-rate must be at least 8000, got {sample_rate}")
    if sketch_format != "mixed" and sketch_format not in SKETCH_FORMATS:
        raise ValueError(f"--sketch-format must be one of {', '.join((*SKETCH_FORMATS, 'mixed'))}, "
                         f"got {sketch_format!r}")
    out = Path(output_dir)
    for sub in ("audio", "prompts", "sketch"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for i in range(num_samples):
        rng = np.random.default_rng([seed, i])
        wave, tokens = render_song(rng, duration_sec + prompt_sec, sample_rate, sketch_fps)
        cut = int(round(duration_sec * sample_rate))
        fmt = SKETCH_FORMATS[i % len(SKETCH_FORMATS)] if sketch_format == "mixed" else sketch_format
        name = f"song_{i:04d}"
        row: dict[str, Any] = {
            "idx": name, "audio_path": f"audio/{name}.wav", "lyrics": lyrics(rng),
            "prompt_wav": f"prompts/{name}.wav", "sketch_path": f"sketch/{name}{SKETCH_EXTS[fmt]}"}
        _atomic_write_bytes(out / row["audio_path"], _wav_bytes(wave[:cut], sample_rate))
        _atomic_write_bytes(out / row["prompt_wav"], _wav_bytes(wave[cut:], sample_rate))
        _atomic_write_bytes(out / row["sketch_path"], _sketch_bytes(tokens[:int(round(duration_sec * sketch_fps))], fmt))
        lines.append(json.dumps(row, ensure_ascii=False))
        if progress and (i + 1) % max(1, num_samples // 10) == 0:
            print(f"  {i + 1}/{num_samples} songs", flush=True)
    manifest = out / MANIFEST
    _atomic_write_bytes(manifest, ("\n".join(lines) + "\n").encode("utf-8"))
    return manifest
