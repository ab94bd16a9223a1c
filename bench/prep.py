"""Hours of audio prepared per minute: `raytrain prep` (full step chain, 2 Ray workers) vs a plain loop.

    python bench/prep.py [--utterances 2400] [--reps 3] [--workers 2] [--rows-per-shard 16] [--min-ratio 1.5]

A fixed corpus (seed 0) of `--utterances` wav files (PCM16 at `--input-rate`, 44.1 kHz by default,
so resampling to 16 kHz does real work) is written as `<root>/<speaker>/<utt>.wav` over 16
speakers, with a `.txt` transcript beside each but the long ones (untranscribed recordings: `segment`
cuts only audio without a transcript). The audio is speech-like: voiced syllables
(harmonics of a gliding pitch) in words and phrases with pauses, with 0.3-1.5 s of near-silence
before and after (so `vad_trim` trims), and one file in ten lasts 20-45 s (so `segment` splits it).

- raytrain: the product path of `raytrain prep --input D --format speaker-dirs --output-dir O --steps
  resample normalize vad_trim segment features --sample-rate 16000 --workers 2`:
  `datasets_prep.execute.prep_corpus` on a local Ray started as the command starts it
  (`raytrain.pipeline.ray_init`); chunks of `--rows-per-shard` files go to `--workers` Ray Data
  actors (1 CPU each, so Ray gives each one torch thread). Every repetition writes a fresh output
  folder (nothing is skipped); the wall time of the `prep_corpus` call is measured, so the actors'
  start-up (a process each, importing torch) is counted; Ray's own start-up is reported apart.
- plain: one process, Ray shut down, torch's default threads (all cores): soundfile.read ->
  torchaudio `Resample` -> peak normalize -> webrtcvad trim -> cut at pauses into <= 15 s pieces ->
  torchaudio `MelSpectrogram` log-mel -> int16 -> one zstd Parquet file per `--rows-per-shard`
  files, written with pyarrow. The same operations with the steps' default parameters, written out
  plainly (no datasets_prep code), the transforms built once and reused; no rejects table, no
  manifest, no resume records, no fsync. Its rows and samples are checked against raytrain's.

Rate = hours of input audio / minutes of wall time. Each raytrain run sits between two plain runs
and is compared with their mean (this machine's speed drifts); the median ratio is the result.
Exit status 1 when it is below `--min-ratio`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

SR = 16000
SPEAKERS = 16
STEPS = ["resample", "normalize", "vad_trim", "segment", "features"]
RAY_WORKER_NICENESS = 15  # Ray starts its worker processes with nice 15 (RAY_worker_niceness)


# -- the corpus ------------------------------------------------------------------------------------------
def _syllables(rng: np.random.Generator, rate: int, n: int = 400) -> list[np.ndarray]:
    """A bank of voiced syllables (0.12-0.3 s): 10 harmonics of a gliding pitch with a vowel-like
    spectral tilt under a smooth envelope, peak 1."""
    bank = []
    k = np.arange(1, 11)[:, None]
    for _ in range(n):
        m = int(rng.uniform(0.12, 0.3) * rate)
        t = np.arange(m) / rate
        f0 = rng.uniform(90, 240) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
        weights = np.exp(-k / 5) * (1.2 + np.cos(2 * np.pi * k * f0.mean() / rng.uniform(400, 900)))
        s = (weights * np.sin(k * 2 * np.pi * np.cumsum(f0) / rate)).sum(axis=0) * np.sqrt(np.hanning(m))
        bank.append((s / np.abs(s).max()).astype(np.float32))
    return bank


def _speech(rng: np.random.Generator, bank: list[np.ndarray], seconds: float, rate: int) -> np.ndarray:
    """Phrases of 2-6 words of 1-3 syllables (each at its own level), 10-50 ms gaps inside words,
    50-120 ms between words and 0.3-0.7 s pauses between phrases."""
    parts: list[np.ndarray] = []
    n = 0
    while n < seconds * rate:
        for _ in range(rng.integers(2, 7)):
            for _ in range(rng.integers(1, 4)):
                syllable = bank[rng.integers(len(bank))] * np.float32(rng.uniform(0.05, 0.3))
                parts += [syllable, np.zeros(int(rng.uniform(0.01, 0.05) * rate), np.float32)]
                n += len(parts[-1]) + len(parts[-2])
            parts.append(np.zeros(int(rng.uniform(0.05, 0.12) * rate), np.float32))
            n += len(parts[-1])
        parts.append(np.zeros(int(rng.uniform(0.3, 0.7) * rate), np.float32))
        n += len(parts[-1])
    return np.concatenate(parts)


def make_corpus(root: Path, n: int, rate: int, seed: int = 0) -> float:
    """`n` utterances over SPEAKERS speakers, 0.3-1.5 s of near-silence before and after the speech
    (2-8 s; one in ten 20-45 s); returns their total duration in seconds."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    bank = _syllables(rng, rate)
    total = 0
    for i in range(n):
        spk = root / f"spk{i % SPEAKERS:02d}"
        spk.mkdir(parents=True, exist_ok=True)
        long = rng.random() < 0.1
        speech = _speech(rng, bank, rng.uniform(20, 45) if long else rng.uniform(2, 8), rate)
        lead, trail = (np.zeros(int(rng.uniform(0.3, 1.5) * rate), np.float32) for _ in range(2))
        wave = np.concatenate([lead, speech, trail])
        wave += rng.standard_normal(len(wave), dtype=np.float32) * np.float32(3e-4)  # a noise floor, not zeros
        sf.write(spk / f"u{i:05d}.wav", wave, rate, subtype="PCM_16")
        if not long:  # a long recording has no transcript: `segment` cuts untranscribed audio only
            (spk / f"u{i:05d}.txt").write_text(f"utterance {i} of speaker {i % SPEAKERS}\n")
        total += len(wave)
    return total / rate


# -- the plain loop --------------------------------------------------------------------------------------
def _voiced(vad: Any, x: np.ndarray, frame: int) -> np.ndarray:
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
    return np.array([vad.is_speech(pcm[i:i + frame].tobytes(), SR) for i in range(0, len(pcm) - frame + 1, frame)],
                    dtype=bool)


def _trim(vad: Any, x: np.ndarray) -> np.ndarray | None:
    """The speech between the first and last mostly-voiced 300 ms window, quiet edge frames dropped,
    100 ms kept around; None when there is none or it is shorter than 0.3 s."""
    hop = SR * 30 // 1000
    flags = _voiced(vad, x, hop)
    w = max(1, min(len(flags), 10))
    dense = np.convolve(flags.astype(np.float64), np.ones(w) / w, mode="valid") >= 0.6 - 1e-9
    if not dense.any():
        return None
    i, j = int(np.argmax(dense)), len(dense) - 1 - int(np.argmax(dense[::-1]))
    first = i + int(np.argmax(flags[i:i + w]))
    last = j + w - 1 - int(np.argmax(flags[j:j + w][::-1]))
    db = 10 * np.log10(np.mean(x[:len(flags) * hop].astype(np.float64).reshape(-1, hop) ** 2, axis=1) + 1e-12)
    floor = min(float(np.percentile(db, 10)) + 10.0, float(np.median(db[first:last + 1])) - 20.0)
    while first < last and db[first] < floor:
        first += 1
    while last > first and db[last] < floor:
        last -= 1
    pad = SR // 10
    start, end = max(0, first * hop - pad), min(len(x), (last + 1) * hop + pad)
    return x[start:end] if end - start >= 0.3 * SR else None


def _pieces(vad: Any, x: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(start sample, piece): x itself when <= 15 s, else cut at the middle of pauses >= 200 ms
    (or hard at 15 s), pieces under 1 s dropped."""
    limit, shortest = 15 * SR, SR
    if len(x) <= limit:
        return [(-1, x)]
    hop = SR * 30 // 1000
    flags = _voiced(vad, x, hop)
    cuts, i = [], 0
    while i < len(flags):
        if flags[i]:
            i += 1
            continue
        j = i
        while j < len(flags) and not flags[j]:
            j += 1
        if j - i >= 7:
            cuts.append((i + j) // 2 * hop)
        i = j
    out, start = [], 0
    while len(x) - start > limit:
        inside = [c for c in cuts if start < c <= start + limit]
        end = inside[-1] if inside and inside[-1] - start >= shortest else start + limit
        out.append((start, x[start:end]))
        start = end
    out.append((start, x[start:]))
    return [(a, p) for a, p in out if len(p) >= shortest]


def _pcm16(x: np.ndarray) -> bytes:
    return np.rint(np.clip(x.astype(np.float64) * 32768.0, -32768.0, 32767.0)).astype("<i2").tobytes()


def plain_prep(root: Path, out: Path, rows_per_shard: int) -> tuple[int, int]:
    """The baseline; returns (rows, samples) written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf
    import torchaudio
    import webrtcvad

    out.mkdir(parents=True)
    files = sorted(p for spk in sorted(root.iterdir()) for p in spk.glob("*.wav"))
    resamplers: dict[int, torch.nn.Module] = {}
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=SR, n_fft=1024, win_length=400, hop_length=160,
                                               n_mels=80, power=2.0)
    vad = webrtcvad.Vad(2)
    n_rows = n_samples = 0
    for shard, k in enumerate(range(0, len(files), rows_per_shard)):
        rows = []
        for path in files[k:k + rows_per_shard]:
            audio, rate = sf.read(path, dtype="float32", always_2d=True)
            x = torch.from_numpy(np.ascontiguousarray(audio[:, 0]))
            with torch.no_grad():
                if rate != SR:
                    if rate not in resamplers:
                        resamplers[rate] = torchaudio.transforms.Resample(rate, SR)
                    x = resamplers[rate](x)
            wave = x.numpy()
            peak = float(np.abs(wave).max())
            if peak <= 1e-6:
                continue
            wave = (wave * 10 ** (min(-1.0 - 20 * math.log10(peak), 30.0) / 20)).astype(np.float32)
            trimmed = _trim(vad, wave)
            if trimmed is None:
                continue
            pieces = _pieces(vad, trimmed)
            for n, (start, piece) in enumerate(pieces):
                with torch.no_grad():
                    m = torch.log(mel(torch.from_numpy(np.ascontiguousarray(piece))) + 1e-6).T.contiguous().numpy()
                utt, txt = f"{path.parent.name}/{path.stem}", path.with_suffix(".txt")
                rows.append({"id": utt if start < 0 else f"{utt}_{n:03d}", "speaker": path.parent.name,
                             "text": txt.read_text().strip() if txt.is_file() else "", "audio": _pcm16(piece),
                             "mel": m.tobytes(), "mel_frames": m.shape[0], "n_mels": m.shape[1],
                             "num_samples": len(piece), "sample_rate": SR,
                             "segment_start": None if start < 0 else start / SR})
                n_samples += len(piece)
        if rows:
            pq.write_table(pa.Table.from_pylist(rows), out / f"shard-{shard:05d}.parquet", compression="zstd")
            n_rows += len(rows)
    return n_rows, n_samples


# -- raytrain --------------------------------------------------------------------------------------------
def raytrain_prep(root: Path, out: Path, workers: int, rows_per_shard: int) -> dict[str, Any]:
    from datasets_prep.execute import prep_corpus

    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines; the manifest says the rest
        return prep_corpus(root, "speaker-dirs", out, steps=STEPS, sample_rate=SR, workers=workers,
                           rows_per_shard=rows_per_shard, progress=False)


def _plain_child(root: Path, out: Path, rows_per_shard: int, nice: int, results: Any) -> None:
    os.nice(nice)
    t0 = time.perf_counter()
    import pyarrow.parquet  # noqa: F401  - the loop's imports, done before its clock starts
    import soundfile  # noqa: F401
    import torchaudio  # noqa: F401
    import webrtcvad  # noqa: F401

    t_import = time.perf_counter() - t0
    seconds, (n_rows, n_samples) = _timed(plain_prep, root, out, rows_per_shard)
    results.put((seconds, n_rows, n_samples, t_import, torch.get_num_threads()))


def run_plain(root: Path, out: Path, rows_per_shard: int, nice: int) -> tuple[float, int, int, float, int]:
    """``plain_prep`` in a fresh process (cold, as Ray's fresh workers are) at niceness ``nice``:
    (loop seconds, rows, samples, seconds its imports took before the loop, torch threads)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_plain_child, args=(root, out, rows_per_shard, nice, results))
    proc.start()
    result = results.get()
    proc.join()
    return result


def _timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utterances", type=int, default=2400)
    ap.add_argument("--input-rate", type=int, default=44100, help="sample rate of the corpus files")
    ap.add_argument("--reps", type=int, default=3, help="raytrain runs, each between two plain runs")
    ap.add_argument("--workers", type=int, default=2, help="raytrain prep --workers")
    ap.add_argument("--rows-per-shard", type=int, default=16, help="input files per shard (both paths)")
    ap.add_argument("--plain-nice", type=int, default=RAY_WORKER_NICENESS,
                    help="niceness of the plain loop's process (default: that of Ray's workers)")
    ap.add_argument("--min-ratio", type=float, default=1.5, help="exit 1 when the median ratio is below this")
    args = ap.parse_args()
    import ray

    from raytrain.session import ray_init

    rows: list[tuple[float, float, float]] = []  # (plain s, raytrain s, ray start-up s), plain = bracket mean
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        t_make, seconds = _timed(make_corpus, corpus, args.utterances, args.input_rate)
        hours = seconds / 3600
        print(f"corpus: {args.utterances} files, {hours:.3f} h at {args.input_rate} Hz over {SPEAKERS} speakers "
              f"(written in {t_make:.0f} s)", flush=True)

        def rate(s: float) -> float:
            return hours / (s / 60)

        def plain(k: int) -> float:
            s, n_rows, n_samples, t_import, threads = run_plain(corpus, Path(tmp) / f"plain{k}", args.rows_per_shard,
                                                                args.plain_nice)
            outputs.add((n_rows, n_samples))
            print(f"plain    {s:6.1f} s  {rate(s):6.3f} h/min  ({threads} torch threads, nice {args.plain_nice}; "
                  f"its imports before the clock: {t_import:.1f} s)", flush=True)
            return s

        outputs: set[tuple[int, int]] = set()
        plain_before = plain(0)
        for rep in range(1, args.reps + 1):
            t_ray, _ = _timed(ray_init)
            rt, manifest = _timed(raytrain_prep, corpus, Path(tmp) / f"raytrain{rep}", args.workers,
                                  args.rows_per_shard)
            ray.shutdown()
            print(f"raytrain {rt:6.1f} s  {rate(rt):6.3f} h/min  (Ray start-up before it: {t_ray:.1f} s)", flush=True)
            plain_after = plain(rep)
            ((p_rows, p_samples),) = outputs
            # The rows must match; the audio may differ by a hair: about one row in eight ends one 30 ms VAD
            # frame (480 samples) earlier or later in one path than in the other (seen on this corpus).
            if manifest["rows"] != p_rows or abs(manifest["hours"] * 3600 * SR - p_samples) > 1e-3 * p_samples:
                print(f"MISMATCH: raytrain wrote {manifest['rows']} rows, {manifest['hours']:.4f} h; "
                      f"the plain loop {p_rows} rows, {p_samples / SR / 3600:.4f} h")
                return 1
            mean = (plain_before + plain_after) / 2
            rows.append((mean, rt, t_ray))
            print(f"rep {rep}: ratio {mean / rt:.3f} (raytrain vs the mean of the plain runs around it)", flush=True)
            plain_before = plain_after
    ratios = sorted(plain_s / rt for plain_s, rt, _ in rows)
    ratio = ratios[len(ratios) // 2]
    plain_med = sorted(r[0] for r in rows)[len(rows) // 2]
    rt_med = sorted(r[1] for r in rows)[len(rows) // 2]
    ray_med = sorted(r[2] for r in rows)[len(rows) // 2]
    print(f"\n{args.utterances} files, {hours:.3f} h in; out: {p_rows} rows, {p_samples / SR / 3600:.3f} h at {SR} Hz "
          f"in {math.ceil(args.utterances / args.rows_per_shard)} shards; steps {' '.join(STEPS)}")
    print(f"  plain single-process loop   {rate(plain_med):6.3f} h/min  ({plain_med:.1f} s, median of bracket means)")
    print(f"  raytrain prep, {args.workers} workers     {rate(rt_med):6.3f} h/min  ({rt_med:.1f} s, median)")
    print(f"  ratio (raytrain / plain): median {ratio:.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f}")
    print(f"  Ray start-up before each raytrain run (not counted): {ray_med:.1f} s (median)")
    if ratio < args.min_ratio:
        print(f"FAIL: ratio {ratio:.3f} < {args.min_ratio}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
