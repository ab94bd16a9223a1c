"""Fixed 2-speaker mixtures for evaluation (the wsj0-2mix recipe, "min" mode).

Training mixes on the fly from single-speaker shards; evaluation needs a *fixed* set so
SI-SDRi is comparable between runs and phases. Each mixture takes two utterances of
different speakers, truncates both to the shorter one (then to ``max_seconds``),
brings both to the same RMS, sets their relative level to a value drawn from
``snr_db``, and scales all three signals so no peak exceeds 0.9. ``mix == s1 + s2``
holds exactly in float before PCM16 encoding (within 1.5 LSB after it).
"""

from __future__ import annotations

import os
import random

import numpy as np

from datasets_prep.shards import ShardWriter, decode_pcm16

TARGET_RMS = 0.05  # about -26 dBFS per source before the peak limit
PEAK = 0.9


def _wave(rec: dict) -> np.ndarray:
    a = rec["audio"]
    return decode_pcm16(bytes(a)) if isinstance(a, bytes | bytearray) else np.asarray(a, dtype=np.float32)


def mix_pair(a: np.ndarray, b: np.ndarray, snr_db: float, max_samples: int) -> tuple[np.ndarray, ...]:
    """(mix, s1, s2), each float32 (T,) with T = min(len(a), len(b), max_samples); s1 is ``snr_db`` above s2."""
    n = min(len(a), len(b), max_samples)
    s1, s2 = a[:n].astype(np.float64), b[:n].astype(np.float64)
    s1 *= TARGET_RMS / max(float(np.sqrt(np.mean(s1**2))), 1e-8) * 10 ** (snr_db / 40)
    s2 *= TARGET_RMS / max(float(np.sqrt(np.mean(s2**2))), 1e-8) * 10 ** (-snr_db / 40)
    mix = s1 + s2
    peak = max(np.abs(mix).max(), np.abs(s1).max(), np.abs(s2).max())
    if peak > PEAK:
        scale = PEAK / peak
        s1, s2 = s1 * scale, s2 * scale
    s1, s2 = s1.astype(np.float32), s2.astype(np.float32)
    return s1 + s2, s1, s2


def mixture_params(num_mixtures: int, seed: int, max_seconds: float, snr_db: tuple[float, float]) -> dict:
    """The ``prep["mixtures"]`` entry of the manifest (what makes two mixture sets equal)."""
    return {"num_mixtures": num_mixtures, "seed": seed, "max_seconds": max_seconds, "snr_db": list(snr_db),
            "mode": "min", "target_rms": TARGET_RMS, "peak": PEAK}


def write_fixed_mixtures(records: list[dict], out_dir: str | os.PathLike, *, num_mixtures: int, seed: int,
                         sample_rate: int, max_seconds: float, snr_db: tuple[float, float] = (-2.5, 2.5),
                         rows_per_shard: int = 200, prep: dict | None = None) -> dict:
    """Write ``num_mixtures`` deterministic mixtures as a ``"mixtures"`` dataset; returns its manifest.

    ``records`` are single-speaker rows as yielded by ``read_speaker_dirs`` (``audio`` float32
    or PCM16 bytes, all at ``sample_rate``). Mixture ids are ``mix<i>|<id1>|<id2>``.
    """
    by_spk: dict[str, list[dict]] = {}
    for r in records:
        if int(r["sample_rate"]) != sample_rate:
            raise ValueError(f"record {r['id']!r} is {r['sample_rate']} Hz, mixtures are {sample_rate} Hz: resample first")
        by_spk.setdefault(r["speaker"], []).append(r)
    speakers = sorted(by_spk)
    if len(speakers) < 2:
        raise ValueError(f"mixtures need records of at least 2 speakers, got {speakers}")
    rng = random.Random(f"mixtures:{seed}")
    max_samples = int(round(max_seconds * sample_rate))
    seen: set[tuple[str, str]] = set()
    prep = {"mixtures": mixture_params(num_mixtures, seed, max_seconds, snr_db), **(prep or {})}
    with ShardWriter(out_dir, kind="mixtures", sample_rate=sample_rate, audio_columns=["mix", "s1", "s2"],
                     rows_per_shard=rows_per_shard, prep=prep) as writer:
        for i in range(num_mixtures):
            for _ in range(100):  # avoid repeating a pair while the pool allows it
                spk1, spk2 = rng.sample(speakers, 2)
                a, b = rng.choice(by_spk[spk1]), rng.choice(by_spk[spk2])
                if (a["id"], b["id"]) not in seen:
                    break
            seen.add((a["id"], b["id"]))
            snr = rng.uniform(*snr_db)
            mix, s1, s2 = mix_pair(_wave(a), _wave(b), snr, max_samples)
            writer.write({"id": f"mix{i:05d}|{a['id']}|{b['id']}", "speakers": f"{spk1},{spk2}",
                          "mix": mix, "s1": s1, "s2": s2})
    return writer.manifest()
