"""Audio-visual target-speaker mixtures of the ``av_tse_asr`` recipe, from prepared speech shards.

A row is one talker (the target) heard over another (the interferer) and, optionally, background
noise, with a synthetic grey video of the target's mouth: a model must use the video to know whose
words to transcribe. The video carries exactly that: the mouth opens with the target's loudness.

- ``mix_target``: places the interferer over a drawn share (``overlap``) of the target's span, sets the
  levels as ``datasets_prep.mixtures.mix_pair`` does (both at ``TARGET_RMS``, the target ``snr_db`` above the
  interferer, each RMS over the samples it occupies in the mix), adds seeded pink noise ``noise_snr_db``
  below the target, and scales everything so no peak exceeds ``PEAK``: ``mix == target + rest``.
- The clean target is the column ``s1`` (the first source, as in separation datasets): the SI-SDR loss and
  metrics read it as ``sources``.
- ``render_lips``: uint8 frames ``(video_frames(samples, sample_rate, fps), size, size, 1)`` of a mouth
  ellipse whose opening follows the target's log-energy envelope (``mouth_opening``), lagged ``lag``
  frames, drawn in its talker's shape and grey levels (``Talker.of``: the same talker looks the same in
  every clip), with per-frame jitter of the centre and Gaussian pixel noise.
- ``select_train`` / ``select_dev`` pick (target, interferer) pairs of different speakers AND different
  sentences: two talkers saying the same words at espeak-ng's fixed rate move their mouths alike, which
  makes the video ambiguous. ``write_av_mixtures`` writes them as an ``av_mixtures`` dataset.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow.parquet as pq

from datasets_prep.codecs import decode_audio
from datasets_prep.columns import ColumnSpec
from datasets_prep.manifest import read_manifest, shard_paths
from datasets_prep.mixtures import PEAK, TARGET_RMS
from datasets_prep.shards import DatasetWriter

AV_VERSION = 2  # recorded in each manifest: a change of mixing or rendering makes older sets stale
VIDEO_SIZE = 24
VIDEO_FPS = 25
LAG_FRAMES = (-1, 2)  # the mouth lags the audio by this many frames (negative: leads), drawn per mixture
PIXEL_NOISE = 8.0  # Gaussian noise of the frames, grey levels
OPENING_RANGE_DB = 30.0  # log-energy below the speech level (OPENING_PERCENTILE) at which the mouth is shut
OPENING_PERCENTILE = 90.0


def video_frames(num_samples: int, sample_rate: int, fps: float = VIDEO_FPS) -> int:
    """Video frames of ``num_samples`` audio samples at ``sample_rate``: ``ceil(num_samples * fps / sample_rate)``
    (frame ``i`` shows the audio from ``i / fps`` seconds on; a last, partial frame counts)."""
    if float(fps).is_integer():
        return -(-int(num_samples) * int(fps) // int(sample_rate))
    return math.ceil(round(num_samples * fps / sample_rate, 9))


def _frame_starts(num_samples: int, sample_rate: int, fps: float) -> np.ndarray:
    n = video_frames(num_samples, sample_rate, fps)
    if float(fps).is_integer():
        return np.arange(n, dtype=np.int64) * int(sample_rate) // int(fps)
    return np.floor(np.arange(n) * sample_rate / fps).astype(np.int64)


def log_energy(audio: np.ndarray, sample_rate: int, fps: float = VIDEO_FPS) -> np.ndarray:
    """dB of the mean power of each video frame's audio (``video_frames`` values)."""
    x = np.asarray(audio, dtype=np.float64)
    starts = _frame_starts(len(x), sample_rate, fps)
    if not len(starts):
        return np.zeros(0)
    power = np.add.reduceat(x**2, starts) / np.diff(np.append(starts, len(x)))
    return 10.0 * np.log10(power + 1e-10)


def mouth_opening(audio: np.ndarray, sample_rate: int, fps: float = VIDEO_FPS, lag: int = 0) -> np.ndarray:
    """How open the mouth is in each video frame, in [0, 1]: the frame's log-energy between the utterance's
    speech level (its ``OPENING_PERCENTILE`` percentile) and ``OPENING_RANGE_DB`` below it, shifted ``lag``
    frames later (shut where shifted in), smoothed over 3 frames."""
    db = log_energy(audio, sample_rate, fps)
    if not len(db):
        return db
    top = float(np.percentile(db, OPENING_PERCENTILE))
    opening = np.clip((db - (top - OPENING_RANGE_DB)) / OPENING_RANGE_DB, 0.0, 1.0)
    shifted = np.zeros_like(opening)
    n, k = len(opening), min(abs(lag), len(opening))
    if lag >= 0:
        shifted[k:] = opening[: n - k]
    else:
        shifted[: n - k] = opening[k:]
    return np.convolve(np.pad(shifted, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")


@dataclass(frozen=True)
class Talker:
    """A talker's mouth: sizes as shares of the frame's side, grey levels 0-255."""

    half_width: float  # of the mouth opening
    max_open: float  # half-height of the opening, wide open
    lip: float  # lip thickness around the opening
    skin: float
    lips: float
    mouth: float  # inside of the open mouth
    dx: float  # where the mouth sits, off the frame's centre
    dy: float

    @classmethod
    def of(cls, speaker: str) -> Talker:
        """The talker of ``speaker``, derived from a hash of the id alone (the same in every clip and run)."""
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"talker:{speaker}".encode()).digest()[:8], "little"))
        skin = rng.uniform(150, 215)
        lips = skin - rng.uniform(45, 85)
        return cls(half_width=rng.uniform(0.22, 0.32), max_open=rng.uniform(0.12, 0.2), lip=rng.uniform(0.05, 0.09),
                   skin=skin, lips=lips, mouth=rng.uniform(10, 45), dx=rng.uniform(-0.04, 0.04),
                   dy=rng.uniform(0.0, 0.06))


def _ellipse_cover(x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of each pixel (x, y offsets from the centre) inside an ellipse of half-axes ``a``, ``b`` (soft edge of
    about one pixel; a flat ellipse becomes a faint line rather than vanishing)."""
    a, b = np.maximum(a, 1e-3), np.maximum(b, 1e-3)
    r = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    return np.clip(0.5 - (r - 1.0) * np.minimum(a, b), 0.0, 1.0)


def render_lips(audio: np.ndarray, sample_rate: int, *, talker: str, lag: int, rng: np.random.Generator,
                size: int = VIDEO_SIZE, fps: float = VIDEO_FPS, pixel_noise: float = PIXEL_NOISE) -> np.ndarray:
    """uint8 frames ``(video_frames(len(audio), sample_rate, fps), size, size, 1)`` of ``talker``'s mouth saying
    ``audio`` (``mouth_opening`` lagged ``lag`` frames); ``rng`` draws the jitter (+/-1 px a frame) and the pixel
    noise (``pixel_noise`` grey levels)."""
    t = Talker.of(talker)
    opening = mouth_opening(audio, sample_rate, fps, lag)
    n = len(opening)
    jitter = rng.integers(-1, 2, size=(n, 2)).astype(np.float64)
    centre = (size - 1) / 2.0
    cx = (centre + t.dx * size + jitter[:, 0])[:, None, None]
    cy = (centre + t.dy * size + jitter[:, 1])[:, None, None]
    grid = np.arange(size, dtype=np.float64)
    x, y = grid[None, None, :] - cx, grid[None, :, None] - cy
    a = np.full((n, 1, 1), t.half_width * size)
    b = (opening * t.max_open * size)[:, None, None]
    lip = t.lip * size
    outer, inner = _ellipse_cover(x, y, a + lip, b + lip), _ellipse_cover(x, y, a, b)
    img = t.skin + outer * (t.lips - t.skin) + inner * (t.mouth - t.lips)
    img = img + rng.normal(0.0, pixel_noise, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)[..., None]


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of seeded 1/f noise (zero mean, unit RMS)."""
    if n < 2:
        return np.zeros(n)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    spec[0] = 0.0
    spec[1:] /= np.sqrt(f[1:])
    x = np.fft.irfft(spec, n=n)
    return x / max(float(np.sqrt(np.mean(x**2))), 1e-12)


class Mixed(NamedTuple):
    mix: np.ndarray  # float32 (T,), T = len(target)
    target: np.ndarray  # the target as it is inside the mix
    rest: np.ndarray  # interferer + noise: mix == target + rest
    overlap: float  # share of the target's samples the interferer covers
    start: int  # where the interferer starts, in target samples (negative: before the target)


def _rms(x: np.ndarray) -> float:
    return max(float(np.sqrt(np.mean(x**2))) if len(x) else 0.0, 1e-8)


def place_interferer(target_len: int, interferer_len: int, overlap: float, rng: np.random.Generator) -> int:
    """Start of the interferer (in target samples) so that it covers ``round(overlap * target_len)`` samples of
    the target: its tail over the target's start or its head over the target's end (either, drawn), anywhere
    along it when it covers all of it, and wholly inside at a drawn place when it is shorter than that."""
    T, L = int(target_len), int(interferer_len)
    k = min(T, max(0, round(overlap * T)))
    if k == 0:
        return T  # after the target: not in the mix
    if L <= k:
        return int(rng.integers(0, T - L + 1))
    if k == T:
        return int(rng.integers(T - L, 1))
    return k - L if rng.random() < 0.5 else T - k


def mix_target(target: np.ndarray, interferer: np.ndarray, *, snr_db: float, overlap: float,
               noise_snr_db: float | None, rng: np.random.Generator) -> Mixed:
    """The target with the interferer over ``overlap`` of its span (``place_interferer``, cut at the target's
    ends), the target ``snr_db`` above the interferer (both around ``TARGET_RMS``, each RMS over the samples it
    occupies), pink noise ``noise_snr_db`` below the target (None: none), all scaled so that no peak of mix,
    target or rest exceeds ``PEAK``. Every output has the target's length."""
    t_in = np.asarray(target, dtype=np.float64)
    i_in = np.asarray(interferer, dtype=np.float64)
    T, L = len(t_in), len(i_in)
    start = place_interferer(T, L, overlap, rng)
    lo, hi = max(0, start), min(T, start + L)
    t = t_in * (TARGET_RMS * 10 ** (snr_db / 40) / _rms(t_in))
    rest = np.zeros(T)
    if hi > lo:
        seg = i_in[lo - start: hi - start]
        rest[lo:hi] = seg * (TARGET_RMS * 10 ** (-snr_db / 40) / _rms(seg))
    if noise_snr_db is not None:
        rest += pink_noise(T, rng) * (_rms(t) * 10 ** (-noise_snr_db / 20))
    peak = max(float(np.abs(t + rest).max(initial=0.0)), float(np.abs(t).max(initial=0.0)),
               float(np.abs(rest).max(initial=0.0)))
    if peak > PEAK:
        t, rest = t * (PEAK / peak), rest * (PEAK / peak)
    t32, r32 = t.astype(np.float32), rest.astype(np.float32)
    return Mixed(t32 + r32, t32, r32, (hi - lo) / T if T else 0.0, start)


# ---- pairs -------------------------------------------------------------------------------------------
def read_utterances(folder: str | os.PathLike) -> tuple[list[dict[str, Any]], int, str]:
    """(utterances sorted by id: id, speaker, text, audio as stored; sample rate; audio format) of a speech
    dataset."""
    man = read_manifest(folder)
    rows: list[dict[str, Any]] = []
    for p in shard_paths(folder, man):
        rows.extend(pq.read_table(p, columns=["id", "speaker", "text", "audio"]).to_pylist())
    rows.sort(key=lambda r: r["id"])
    return rows, int(man["sample_rate"]), str(man.get("audio_format") or "pcm_s16le")


def _fits(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["speaker"] != b["speaker"] and a["text"] != b["text"]


def _interferer(utts: Sequence[dict[str, Any]], ti: int, rng: random.Random, taken: set[int]) -> int | None:
    """A seeded utterance of another speaker and another sentence than ``utts[ti]``, not in ``taken``."""
    t = utts[ti]
    for _ in range(100):
        j = rng.randrange(len(utts))
        if j not in taken and _fits(t, utts[j]):
            return j
    left = [j for j, u in enumerate(utts) if j not in taken and _fits(t, u)]
    return rng.choice(left) if left else None


def select_train(utts: Sequence[dict[str, Any]], per_utterance: int, seed: int) -> list[tuple[int, int]]:
    """(target, interferer) indices: every utterance the target of ``per_utterance`` mixtures with as many
    different interferers (other speakers, other sentences), in the utterances' order."""
    out: list[tuple[int, int]] = []
    for ti, t in enumerate(utts):
        rng = random.Random(f"av_train:{seed}:{t['id']}")
        taken: set[int] = set()
        for _ in range(per_utterance):
            j = _interferer(utts, ti, rng, taken)
            if j is None:
                raise ValueError(f"mixtures_per_utterance={per_utterance}: {t['id']} has only {len(taken)} possible "
                                 "interferers (other voices reading other sentences); lower it or add voices")
            taken.add(j)
            out.append((ti, j))
    return out


def select_dev(utts: Sequence[dict[str, Any]], num: int, seed: int) -> list[tuple[int, int]]:
    """``num`` fixed (target, interferer) pairs: targets taken in a seeded order (each utterance once before any
    twice), interferers of other speakers and sentences, no pair twice."""
    rng = random.Random(f"av_dev:{seed}")
    active = list(range(len(utts)))
    rng.shuffle(active)
    used: dict[int, set[int]] = {}
    out: list[tuple[int, int]] = []
    pos = 0
    while len(out) < num:
        if not active:
            raise ValueError(f"dev_mixtures={num}: the dev utterances give only {len(out)} distinct pairs of other "
                             "voices reading other sentences; lower it or add dev voices")
        ti = active[pos % len(active)]
        j = _interferer(utts, ti, rng, used.setdefault(ti, set()))
        if j is None:  # every interferer of this target is used: the others take its turns
            active.remove(ti)
            continue
        used[ti].add(j)
        out.append((ti, j))
        pos += 1
    return out


def av_params(*, seed: int, snr_db: Sequence[float], overlap: Sequence[float], noise_snr_db: Sequence[float] | None,
              lag: Sequence[int], size: int, fps: float, pixel_noise: float, per_utterance: int | None = None,
              num: int | None = None) -> dict[str, Any]:
    """The ``prep["mixtures"]`` entry of an ``av_mixtures`` manifest (what makes two sets equal)."""
    return {"version": AV_VERSION, "seed": seed, "snr_db": list(snr_db), "overlap": list(overlap),
            "noise_snr_db": list(noise_snr_db) if noise_snr_db is not None else None, "noise": "pink",
            "lag": list(lag), "video": {"size": size, "fps": fps, "pixel_noise": pixel_noise},
            "target_rms": TARGET_RMS, "peak": PEAK,
            **({"mixtures_per_utterance": per_utterance} if per_utterance is not None else {}),
            **({"num": num} if num is not None else {})}


def av_columns(sample_rate: int, audio_format: str = "pcm_s16le", size: int = VIDEO_SIZE,
               fps: float = VIDEO_FPS) -> dict[str, ColumnSpec]:
    """The columns of an ``av_mixtures`` dataset."""
    return {"id": ColumnSpec.id(), "speaker": ColumnSpec.label(), "interferer": ColumnSpec.label(),
            "text": ColumnSpec.text(), "mix": ColumnSpec.audio(sample_rate, audio_format),
            "s1": ColumnSpec.audio(sample_rate, audio_format),
            "video": ColumnSpec.video(fps=fps, height=size, width=size, channels=1),
            "snr_db": ColumnSpec.meta("float32"), "overlap": ColumnSpec.meta("float32"), "lag": ColumnSpec.meta("int32")}


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(f"av:{seed}:{key}".encode()).digest()[:8], "little"))


def write_av_mixtures(utts: Sequence[dict[str, Any]], pairs: Sequence[tuple[int, int]], out_dir: str | os.PathLike, *,
                      sample_rate: int, audio_format: str, params: dict[str, Any], rows_per_shard: int = 200,
                      prep: dict | None = None) -> dict:
    """Write the mixtures of ``pairs`` (indices into ``utts``, see ``read_utterances``) as an ``av_mixtures``
    dataset with the draws and video of ``params`` (``av_params``); returns its manifest. Each row's draws come
    from its id, ``av<i:05d>|<target id>|<interferer id>``: snr_db, overlap (recorded as the share the
    interferer covers, below the drawn one when it is shorter), noise level, lag; then the jitter and noise
    of its frames."""
    video = params["video"]
    size, fps, pixel_noise = int(video["size"]), video["fps"], float(video["pixel_noise"])
    noise = params.get("noise_snr_db")
    lag_lo, lag_hi = params["lag"]
    prep = {"mixtures": params, **(prep or {})}
    cols = av_columns(sample_rate, audio_format, size, fps)
    with DatasetWriter(out_dir, cols, kind="av_mixtures", rows_per_shard=rows_per_shard, prep=prep) as writer:
        for i, (ti, ji) in enumerate(pairs):
            t, j = utts[ti], utts[ji]
            rid = f"av{i:05d}|{t['id']}|{j['id']}"
            rng = _rng(int(params["seed"]), rid)
            snr = float(rng.uniform(*params["snr_db"]))
            overlap = float(rng.uniform(*params["overlap"]))
            noise_db = float(rng.uniform(*noise)) if noise is not None else None
            lag = int(rng.integers(lag_lo, lag_hi + 1))
            m = mix_target(decode_audio(t["audio"], audio_format), decode_audio(j["audio"], audio_format),
                           snr_db=snr, overlap=overlap, noise_snr_db=noise_db, rng=rng)
            frames = render_lips(m.target, sample_rate, talker=t["speaker"], lag=lag, rng=rng, size=size, fps=fps,
                                 pixel_noise=pixel_noise)
            writer.write({"id": rid, "speaker": t["speaker"], "interferer": j["speaker"], "text": t["text"],
                          "mix": m.mix, "s1": m.target, "video": frames, "snr_db": snr, "overlap": m.overlap,
                          "lag": lag})
    return writer.manifest()
