"""Parallel pairs and dev triples of the voice-conversion recipe (`vc_flow`), from prepared speech shards.

Why parallel data: a converter trained to reconstruct its own input learns to copy the voice; trained on
pairs (voice A says s -> voice B says s) it must take the words from A and the voice from B. The
espeak corpora make such pairs cheap: many voices read the same small sentence pool.

- ``write_pairs``: for every sentence read by >= 2 voices, seeded rows (A, B != A) plus a share of
  (A, A) rows: ``audio`` (A's waveform), ``target_mel`` (B's log-mel of the same sentence warped onto A's
  frames by DTW, ``dtw_warp``), ``reference`` (other utterances of B joined: the speaker reference),
  ``parallel`` (B's own reading) and ``cross`` (1.0 when A and B differ in gender).
- ``select_triples`` / ``write_triples``: fixed dev rows from held-out voices: ``audio`` (A says s),
  ``reference`` (B says s' != s), ``parallel`` (B says s: the ground truth), ``target_mel``, half of the
  pairs across genders; with ``rooms``, the source is reverberated in a seeded shoebox room per row.
  ``select_self_triples``: rows converting a voice to itself (``dev_self``: the self-reconstruction check).
- ``room_impulse_response`` / ``reverberate``: the rooms, shared with the training-time ``room_reverb``
  transform (``raytrain.data.voice``).

Mels are the prep ``features`` step's (natural-log mel power, ``(frames, n_mels)``, frames =
samples // hop + 1); ``target_mel`` always has exactly the frames of ``audio`` and is declared a
features column at the same frame rate, so aligned crops cut both at the same time.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from datasets_prep.codecs import audio_frames, decode_audio
from datasets_prep.columns import ColumnSpec
from datasets_prep.manifest import read_manifest, shard_paths
from datasets_prep.shards import DatasetWriter

# Euclidean distance between log-mel frames from which each utterance's mean frame is removed: the mean
# is mostly the voice (its spectral envelope and level), what is left is mostly the phones. On the tiny
# corpus it lined content up as well as or better than raw log-mels, cosine, or MFCCs (with or without the mean).
DTW_METRIC = "euclidean"
DTW_NORMALIZE = "utterance_mean"


@dataclass
class Speech:
    """A prepared speech dataset read back: its utterances and what its ``features`` step did."""

    utterances: list[dict[str, Any]]  # id, speaker, text, audio (stored bytes), mel float32 (frames, n_mels)
    sample_rate: int
    audio_format: str
    hop: int  # samples per mel frame
    frame_rate: float  # mel frames per second
    n_mels: int
    by_speaker: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for u in self.utterances:
            self.by_speaker.setdefault(u["speaker"], []).append(u)

    def frames_of(self, audio: bytes) -> int:
        """Mel frames the features step gives for stored ``audio`` (centred frames)."""
        return audio_frames(audio, self.audio_format) // self.hop + 1

    def columns(self, audio: tuple[str, ...]) -> dict[str, ColumnSpec]:
        cols = {"id": ColumnSpec.id(), "speaker": ColumnSpec.label(), "target_speaker": ColumnSpec.label()}
        cols.update({c: ColumnSpec.audio(self.sample_rate, self.audio_format) for c in audio})
        cols["target_mel"] = ColumnSpec.features(frame_rate=self.frame_rate, dims=self.n_mels)
        cols["cross"] = ColumnSpec.meta("float32")  # 1.0: source and target voices of different genders
        cols["text"] = ColumnSpec.text()
        return cols

    def decoded(self, u: dict[str, Any]) -> np.ndarray:
        return decode_audio(u["audio"], self.audio_format)


REFERENCE_GAP_S = 0.15  # silence between the utterances joined into one speaker reference


def cross_gender(a: str, b: str) -> float:
    """1.0 when espeak voice ids ``a`` and ``b`` (``<base>+<variant>_p.._s..``) are of different genders."""
    from datasets_prep.readers.espeak import VARIANTS

    def gender(voice: str) -> str:
        return VARIANTS.get(voice.split("+", 1)[-1].rsplit("_p", 1)[0], "?")

    return float(gender(a) != gender(b))


def shards_sha256(folder: str | os.PathLike) -> str:
    """One hash of a dataset's shards (from its manifest): what a dataset derived from it records."""
    return hashlib.sha256("".join(s["sha256"] for s in read_manifest(folder)["shards"]).encode()).hexdigest()


def read_speech(folder: str | os.PathLike) -> Speech:
    """The utterances of a speech dataset prepared with the ``features`` step (its ``mel`` column)."""
    man = read_manifest(folder)
    steps = {s.get("step"): s for s in man.get("steps") or man.get("prep", {}).get("steps") or []}
    feats = steps.get("features")
    if feats is None:
        raise ValueError(f"{folder}: prepared without the features step, so it has no mel column; add "
                         "`features` to steps (parallel pairs are aligned on its log-mels)")
    sr, fmt = int(man["sample_rate"]), str(man.get("audio_format") or "pcm_s16le")
    hop, n_mels = int(float(feats["hop_ms"]) * sr / 1000), int(feats["n_mels"])
    rows: list[dict[str, Any]] = []
    for p in shard_paths(folder, man):
        rows.extend(pq.read_table(p, columns=["id", "speaker", "text", "audio", "mel"]).to_pylist())
    for r in rows:
        r["mel"] = np.frombuffer(r["mel"], dtype="<f4").reshape(-1, n_mels)
    return Speech(rows, sr, fmt, hop, 1000.0 / float(feats["hop_ms"]), n_mels)


def dtw_warp(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``target`` (frames_t, n_mels) on ``source``'s (frames_s, n_mels) time axis: for each source frame,
    the mean of the target frames the DTW path matches to it (see ``DTW_METRIC``). -> (frames_s, n_mels)."""
    import librosa

    x, y = source - source.mean(axis=0), target - target.mean(axis=0)
    _, path = librosa.sequence.dtw(X=x.T.astype(np.float64), Y=y.T.astype(np.float64), metric=DTW_METRIC)
    sums = np.zeros(source.shape, dtype=np.float64)
    counts = np.zeros(len(source), dtype=np.float64)
    np.add.at(sums, path[:, 0], target[path[:, 1]])
    np.add.at(counts, path[:, 0], 1.0)
    return (sums / counts[:, None]).astype(np.float32)  # a full path visits every source frame


def _target_mel(speech: Speech, a: dict[str, Any], b: dict[str, Any]) -> np.ndarray:
    """B's mel on A's frames (A's own mel when B is A), checked against the frames of A's audio."""
    mel = a["mel"].copy() if b is a else dtw_warp(a["mel"], b["mel"])
    want = speech.frames_of(a["audio"])
    if len(mel) != want:
        raise ValueError(f"{a['id']}: its mel has {len(mel)} frames, its audio gives {want} at hop {speech.hop}: "
                         "the speech shards are inconsistent; delete the folder and re-run prep")
    return mel


def pair_params(per_sentence: int, self_share: float, seed: int, references: int = 1) -> dict[str, Any]:
    """The ``prep["pairs"]`` entry of a pairs manifest (what makes two pair sets equal)."""
    return {"pairs_per_sentence": per_sentence, "self_pairs": self_share, "seed": seed, "dtw": DTW_METRIC,
            "dtw_normalize": DTW_NORMALIZE, "reference_utterances": references}


def _sentences(speech: Speech) -> list[list[dict[str, Any]]]:
    """The readings of each sentence read by >= 2 voices (one per voice), in the order of first reading."""
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for u in speech.utterances:
        groups.setdefault(u["text"], {}).setdefault(u["speaker"], u)
    return [list(g.values()) for g in groups.values() if len(g) >= 2]


def _reference(speech: Speech, b: dict[str, Any], rng: random.Random, n: int = 1) -> list[dict[str, Any]] | None:
    """Up to ``n`` utterances of B's voice other than the sentence ``b`` says (None: there are none)."""
    others = [u for u in speech.by_speaker[b["speaker"]] if u["text"] != b["text"]]
    return rng.sample(others, min(n, len(others))) if others else None


def reference_audio(speech: Speech, refs: list[dict[str, Any]]) -> Any:
    """One speaker reference: the utterances joined with ``REFERENCE_GAP_S`` of silence (a single one as
    stored)."""
    if len(refs) == 1:
        return refs[0]["audio"]
    gap = np.zeros(int(REFERENCE_GAP_S * speech.sample_rate), dtype=np.float32)
    parts: list[np.ndarray] = []
    for u in refs:
        parts += [speech.decoded(u), gap]
    return np.concatenate(parts[:-1])


def _round(x: float, rng: random.Random) -> int:
    """``x`` rounded up with the probability of its fraction, so that shares hold on average."""
    return int(x) + (rng.random() < x - int(x))


def _pairs(speech: Speech, per_sentence: int, self_share: float, seed: int,
           references: int = 1) -> Iterator[tuple[dict, dict, list[dict]]]:
    """(A, B, B's reference) per row: up to ``per_sentence`` a sentence, ``self_share`` of them (on average)
    A == B."""
    for readings in _sentences(speech):
        rng = random.Random(f"vc_pairs:{seed}:{readings[0]['id']}")
        k = len(readings)
        want_self = _round(self_share * per_sentence, rng)
        n_cross = min(k * (k - 1), per_sentence - want_self)
        if n_cross < per_sentence - want_self:  # few readers: keep the share of the rows there are
            want_self = _round(n_cross * self_share / (1.0 - self_share), rng)
        n_self = min(k, want_self)
        cross = [(a, b) for a in readings for b in readings if a is not b]
        chosen = rng.sample(cross, n_cross) + [(a, a) for a in rng.sample(readings, n_self)]
        for a, b in chosen:
            ref = _reference(speech, b, rng, references)
            if ref is not None:  # a voice with one utterance left after rejects has no reference
                yield a, b, ref


def write_pairs(speech: Speech, out_dir: str | os.PathLike, *, per_sentence: int, self_share: float, seed: int,
                rows_per_shard: int = 200, prep: dict | None = None, references: int = 1) -> dict:
    """Write the parallel pairs of ``speech`` (see the module docstring) as a ``vc_pairs`` dataset;
    returns its manifest. Row ids are ``<A's id>|<B>``. ``parallel`` is B's own reading (as in dev rows,
    so that every dataset of the recipe has the same columns); ``reference`` joins ``references``
    utterances of B."""
    prep = {"pairs": pair_params(per_sentence, self_share, seed, references), **(prep or {})}
    with DatasetWriter(out_dir, speech.columns(("audio", "reference", "parallel")), kind="vc_pairs",
                       rows_per_shard=rows_per_shard, prep=prep) as writer:
        for a, b, ref in _pairs(speech, per_sentence, self_share, seed, references):
            writer.write({"id": f"{a['id']}|{b['speaker']}", "speaker": a["speaker"], "target_speaker": b["speaker"],
                          "audio": a["audio"], "reference": reference_audio(speech, ref), "parallel": b["audio"],
                          "target_mel": _target_mel(speech, a, b), "cross": cross_gender(a["speaker"], b["speaker"]),
                          "text": a["text"]})
    return writer.manifest()


# ---- dev triples ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Triple:
    """A dev row: ``source`` (A says s), ``parallel`` (B says s), ``reference`` (B says s' != s)."""

    source: dict[str, Any]
    parallel: dict[str, Any]
    reference: list[dict[str, Any]]  # utterances of B joined into one reference (``reference_audio``)
    pair: str  # "cross" (A and B of different genders), "within", or "self" (A is B)


def possible_triples(genders: list[str], sentences: int) -> dict[str, int]:
    """How many distinct (A, B, s) dev triples of each kind voices of ``genders`` reading every one of
    ``sentences`` sentences give."""
    count = {g: genders.count(g) for g in set(genders)}
    within = sum(n * (n - 1) for n in count.values()) * sentences
    cross = (len(genders) ** 2 - len(genders)) * sentences - within
    return {"cross": cross, "within": within}


def select_triples(speech: Speech, num: int, seed: int, gender: Callable[[str], str],
                   references: int = 1) -> list[Triple]:
    """``num`` fixed dev triples, ``num - num // 2`` across genders and ``num // 2`` within one; every
    (A, B) pair of a kind is used once before any is used again. ``gender``: speaker -> "M"/"F"."""
    rng = random.Random(f"vc_triples:{seed}")
    speakers = sorted(speech.by_speaker)
    out: list[Triple] = []
    for kind, n in (("cross", num - num // 2), ("within", num // 2)):
        options: list[list[Triple]] = []
        for a in speakers:
            for b in speakers:
                if a == b or (gender(a) != gender(b)) != (kind == "cross"):
                    continue
                said = {u["text"]: u for u in speech.by_speaker[b]}
                row = []
                for src in speech.by_speaker[a]:
                    par = said.get(src["text"])
                    ref = _reference(speech, par, rng, references) if par is not None else None
                    if par is not None and ref is not None:
                        row.append(Triple(src, par, ref, kind))
                rng.shuffle(row)
                options.append(row)
        rng.shuffle(options)
        chosen = [t for depth in range(max((len(o) for o in options), default=0))
                  for o in options if depth < len(o) for t in [o[depth]]][:n]
        if len(chosen) < n:
            raise ValueError(f"dev_triples={num}: the dev voices give only {len(chosen)} {kind}-gender triples "
                             f"(wanted {n}); lower dev_triples or raise dev_voices/dev_sentences")
        out.extend(chosen)
    return out


def select_self_triples(speech: Speech, num: int, seed: int, references: int = 1) -> list[Triple]:
    """``num`` fixed rows converting a voice to itself (the self-reconstruction check): source and parallel
    are the same utterance, the reference is other utterances of the same voice; voices taken in turn."""
    rng = random.Random(f"vc_self:{seed}")
    per_voice = []
    for spk in sorted(speech.by_speaker):
        utts = list(speech.by_speaker[spk])
        rng.shuffle(utts)
        per_voice.append(utts)
    out: list[Triple] = []
    for depth in range(max((len(u) for u in per_voice), default=0)):
        for utts in per_voice:
            if depth < len(utts) and len(out) < num:
                ref = _reference(speech, utts[depth], rng, references)
                if ref is not None:
                    out.append(Triple(utts[depth], utts[depth], ref, "self"))
    if len(out) < num:
        raise ValueError(f"dev_self_triples={num}: the dev voices give only {len(out)} rows; lower it")
    return out


MAX_ORDER = 40  # image-source reflection order of the dev rooms (prep): RT60 within a few % of the drawn value


def room_impulse_response(rng: np.random.Generator, sample_rate: int, rt60: tuple[float, float],
                          size: tuple[tuple[float, float], ...], max_order: int = MAX_ORDER) -> np.ndarray:
    """One shoebox room's impulse response (pyroomacoustics), every choice (size, RT60, positions) from ``rng``.
    The image-source order is the one ``inverse_sabine`` gives for the RT60, capped at ``max_order``: a lower
    cap cuts the late tail (faster: measured on rooms of the recipes' sizes and RT60 0.15-0.45 s, 41 ms a
    room at 40 and an RT60 1.03x the drawn one; 11 ms at 20, RT60 0.91x; 5 ms at 12, 0.69x)."""
    import pyroomacoustics as pra

    dims = np.array([rng.uniform(lo, hi) for lo, hi in size])
    target = float(rng.uniform(*rt60))
    try:
        absorption, order = pra.inverse_sabine(target, dims)
    except ValueError:  # too large a room for that RT60: the most reverberant it can be
        absorption, order = 0.01, max_order
    room = pra.ShoeBox(dims, fs=sample_rate, materials=pra.Material(absorption), max_order=min(order, max_order))
    room.add_source(rng.uniform(0.5, dims - 0.5))
    room.add_microphone(rng.uniform(0.5, dims - 0.5))
    room.compute_rir()
    return np.asarray(room.rir[0][0], dtype=np.float32)


def reverberate(audio: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """``audio`` through ``rir`` cut at its direct path (so it stays aligned with ``target_mel``), same length,
    scaled to ``audio``'s peak."""
    from scipy.signal import fftconvolve

    wet = fftconvolve(audio, rir[int(np.argmax(np.abs(rir))):])[: len(audio)].astype(np.float32)
    peak, wet_peak = float(np.abs(audio).max(initial=0.0)), float(np.abs(wet).max(initial=0.0))
    return wet * (peak / wet_peak) if wet_peak > 0 else wet


def triple_params(num: int, seed: int, rooms: dict[str, Any] | None, references: int = 1,
                  same_voice: bool = False) -> dict[str, Any]:
    """The ``prep["triples"]`` entry of a dev manifest."""
    return {"num": num, "seed": seed, "dtw": DTW_METRIC, "dtw_normalize": DTW_NORMALIZE,
            "reference_utterances": references, **({"rooms": rooms} if rooms else {}),
            **({"same_voice": True} if same_voice else {})}


def write_triples(speech: Speech, triples: list[Triple], out_dir: str | os.PathLike, *, seed: int,
                  rooms: dict[str, Any] | None = None, rows_per_shard: int = 200, prep: dict | None = None,
                  params: dict[str, Any] | None = None) -> dict:
    """Write dev ``triples`` as a ``vc_triples`` dataset; returns its manifest. ``rooms``
    ({"rt60": [lo, hi], "room_size": [[lo, hi]] * 3, "seed"}): reverberate each source in its own seeded room.
    Row ids are ``dev<i>|<A's id>|<B's id>`` (the same with and without rooms)."""
    prep = {"triples": params or triple_params(len(triples), seed, rooms), **(prep or {})}
    cols = speech.columns(("audio", "reference", "parallel"))
    cols["pair"] = ColumnSpec.label()
    with DatasetWriter(out_dir, cols, kind="vc_triples", rows_per_shard=rows_per_shard, prep=prep) as writer:
        for i, t in enumerate(triples):
            audio: Any = t.source["audio"]
            if rooms:
                rng = np.random.default_rng([int(rooms["seed"]), i])
                rir = room_impulse_response(rng, speech.sample_rate, tuple(rooms["rt60"]),
                                            tuple(tuple(r) for r in rooms["room_size"]))
                audio = reverberate(decode_audio(audio, speech.audio_format), rir)
            writer.write({"id": f"dev{i:04d}|{t.source['id']}|{t.parallel['id']}", "speaker": t.source["speaker"],
                          "target_speaker": t.parallel["speaker"], "audio": audio,
                          "reference": reference_audio(speech, t.reference), "parallel": t.parallel["audio"],
                          "target_mel": _target_mel(speech, t.source, t.parallel), "pair": t.pair,
                          "cross": float(t.pair == "cross"), "text": t.source["text"]})
    return writer.manifest()
