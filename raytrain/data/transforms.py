"""On-the-fly transforms on Ray Data numpy batches (dynamic mixing, random crops).

A transform is a class built as ``T(**args, sample_rate=int, seed=int)`` whose
``__call__(batch, epoch=0)`` maps a ``dict[str, np.ndarray]`` as
``map_batches(batch_format="numpy")`` gives it, where variable-length audio is an
object array of 1-D float32 arrays, to a new numpy batch. A transform whose ``__call__`` also
takes ``specs`` gets the ``{column: ColumnSpec}`` of the batch's dataset (roles, rates, shapes;
see ``datasets_prep.columns``) with every batch: ``call_transform`` does the calling.

Each declares the batch keys it ``reads`` (always needed) and ``makes`` (``{key: keys it is made
from}``), so a phase reads only the columns it needs (``raytrain.needs.needed_columns``); a
transform without either may make any key, and the phase then reads every column.

Randomness is reproducible per batch: each call seeds a fresh
``numpy.random.Generator`` from ``(seed, epoch, batch key)``. The batch key is a
CRC32 of the first row's ``"id"`` when the batch has an ``id`` column, else a CRC32
of the row count and the utterance lengths. The same batch in the same epoch is
therefore mixed identically, which makes a resumed run reproduce the interrupted
one as long as batches are formed the same way (deterministic block order, same
``batch_size``); a new epoch draws new crops, gains and partners.
"""

from __future__ import annotations

import inspect
import logging
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from raytrain.registry import Registry

TRANSFORMS: Registry[Any] = Registry("transform")
log = logging.getLogger(__name__)

NumpyBatch = dict[str, np.ndarray]


def takes_specs(transform: Any) -> bool:
    """Whether ``transform(batch, epoch=..., specs=...)`` is the way to call it (it names ``specs``)."""
    try:
        return "specs" in inspect.signature(transform).parameters
    except (TypeError, ValueError):
        return False


def call_transform(transform: Any, batch: NumpyBatch, epoch: int, specs: Mapping[str, Any] | None,
                   with_specs: bool | None = None) -> NumpyBatch:
    """``transform(batch, epoch=epoch)``, with ``specs=`` when it takes them (``with_specs``: known already)."""
    if with_specs if with_specs is not None else takes_specs(transform):
        return transform(batch, epoch=epoch, specs=specs)  # type: ignore[no-any-return]
    return transform(batch, epoch=epoch)  # type: ignore[no-any-return]


def batch_rng(batch: NumpyBatch, seed: int, epoch: int, lengths: np.ndarray) -> np.random.Generator:
    """Generator seeded from ``(seed, epoch, batch key)``; see the module docstring."""
    if "id" in batch and len(batch["id"]):
        key = zlib.crc32(str(batch["id"][0]).encode())
    else:
        key = zlib.crc32(np.asarray([len(lengths), *lengths], dtype=np.int64).tobytes())
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), key])


def _rows(column: np.ndarray) -> list[np.ndarray]:
    """The audio of each row as a 1-D float32 array (object or fixed-shape column)."""
    return [np.asarray(a, dtype=np.float32).reshape(-1) for a in column]


def _crop_into(out: np.ndarray, audio: np.ndarray, rng: np.random.Generator) -> int:
    """Copy a random window of ``audio`` into ``out`` (zeros after it); return its valid length."""
    size = out.shape[-1]
    if len(audio) > size:
        start = int(rng.integers(0, len(audio) - size + 1))
        out[:] = audio[start : start + size]
        return size
    out[: len(audio)] = audio
    return len(audio)


def _num_samples(seconds: float, sample_rate: int) -> int:
    n = round(seconds * sample_rate)
    if n <= 0:
        raise ValueError(f"crop of {seconds} s at {sample_rate} Hz is empty; give a positive duration")
    return n


@TRANSFORMS.register("dynamic_mix")
class DynamicMix:
    """Mix each utterance with ``num_speakers - 1`` utterances of other speakers in the same batch.

    Input columns: ``"audio"`` (object array of float32 1-D), ``"speaker"`` (str).
    Output, one mixture per input row::

        mix      (N, T)     float32   sum of the sources
        sources  (N, S, T)  float32   row i's crop first, then its partners
        lengths  (N,)       int64     longest valid source length (<= T)

    with ``T = round(crop_seconds * sample_rate)``. Partners are drawn by picking
    ``S - 1`` distinct other speakers uniformly, then one of their utterances, so all
    ``S`` speakers of a mixture differ. A batch that holds fewer than ``S`` speakers
    (by chance: few speakers, small batches) fills the missing partners with other
    utterances of its speakers and logs a warning the first time. Each source is a random ``T``-sample window
    (shorter utterances are zero-padded at the end), scaled by a gain drawn uniformly
    in ``gain_db`` dB; sources and mix are then scaled together so that no sample of
    either exceeds 0.9 in magnitude. Other columns are dropped.
    """

    reads: ClassVar[tuple[str, ...]] = ("audio", "speaker")
    makes: ClassVar[dict[str, tuple[str, ...]]] = {"mix": (), "sources": (), "lengths": ()}

    def __init__(
        self,
        num_speakers: int = 2,
        crop_seconds: float = 1.0,
        gain_db: Sequence[float] = (-2.5, 2.5),
        *,
        sample_rate: int,
        seed: int = 0,
    ) -> None:
        if num_speakers < 2:
            raise ValueError(f"dynamic_mix: num_speakers must be >= 2, got {num_speakers}")
        low, high = (float(g) for g in gain_db)
        if low > high:
            raise ValueError(
                f"dynamic_mix: gain_db must be (low, high) with low <= high, got {tuple(gain_db)}"
            )
        self.num_speakers = num_speakers
        self.few_speaker_batches = 0  # batches with fewer speakers than a mixture needs (warned about once)
        self.num_samples = _num_samples(crop_seconds, sample_rate)
        self.gain_db = (low, high)
        self.sample_rate = sample_rate
        self.seed = seed

    def __call__(self, batch: NumpyBatch, epoch: int = 0) -> NumpyBatch:
        for col in ("audio", "speaker"):
            if col not in batch:
                raise KeyError(f"dynamic_mix needs a {col!r} column; the batch has {sorted(batch)}")
        audio = _rows(batch["audio"])
        names, codes = np.unique(np.asarray(batch["speaker"]).astype(str), return_inverse=True)
        n, s, t = len(audio), self.num_speakers, self.num_samples
        if n < s:
            raise ValueError(
                f"dynamic_mix: a batch of {n} row(s) cannot make mixtures of {s} utterances; "
                f"set batch_size to at least {s}")
        rng = batch_rng(batch, self.seed, epoch, np.array([len(a) for a in audio]))
        by_speaker = [np.flatnonzero(codes == c) for c in range(len(names))]

        rows = np.empty((n, s), dtype=np.int64)
        rows[:, 0] = np.arange(n)
        if len(names) < s:
            self._few_speakers(len(names), n)
        k = min(s - 1, len(names) - 1)  # other speakers per mixture, one utterance each
        for i in range(n):
            others = rng.choice(len(names) - 1, size=k, replace=False)
            others = others + (others >= codes[i])  # skip row i's own speaker code
            for j, c in enumerate(others, start=1):
                group = by_speaker[c]
                rows[i, j] = group[rng.integers(len(group))]
            if k < s - 1:  # too few speakers in this batch: fill up with other utterances of the same ones
                taken = set(rows[i, :k + 1].tolist())
                rest = np.array([r for r in range(n) if r not in taken])
                rows[i, k + 1:] = rng.choice(rest, size=s - 1 - k, replace=False)

        sources = np.zeros((n, s, t), dtype=np.float32)
        valid = np.zeros((n, s), dtype=np.int64)
        for i in range(n):
            for j in range(s):
                valid[i, j] = _crop_into(sources[i, j], audio[rows[i, j]], rng)
        gains = 10.0 ** (rng.uniform(*self.gain_db, size=(n, s, 1)) / 20.0)
        sources *= gains.astype(np.float32)
        mix = sources.sum(axis=1)
        peak = np.maximum(np.abs(mix).max(axis=-1), np.abs(sources).max(axis=(1, 2)))
        scale = np.where(peak > 0.9, 0.9 / np.maximum(peak, 1e-12), 1.0).astype(np.float32)
        sources *= scale[:, None, None]
        return {"mix": sources.sum(axis=1), "sources": sources, "lengths": valid.max(axis=1)}

    def _few_speakers(self, speakers: int, rows: int) -> None:
        """A batch with fewer speakers than a mixture needs (chance, with few speakers and small batches):
        its mixtures repeat a speaker. Said once per worker; failing would end a run by chance."""
        self.few_speaker_batches += 1
        if self.few_speaker_batches == 1:
            log.warning("dynamic_mix: a batch of %d rows holds %d speaker(s), fewer than the %d a mixture needs; "
                        "its mixtures repeat a speaker (a larger batch_size or shuffle_buffer makes this rarer)",
                        rows, speakers, self.num_speakers)


@TRANSFORMS.register("crop")
class Crop:
    """Random fixed-length window of ``"audio"``.

    Replaces ``"audio"`` with ``(N, T)`` float32, ``T = round(seconds * sample_rate)``,
    zero-padding shorter utterances, and adds ``"lengths"`` ``(N,)`` int64. Other
    columns pass through (``aligned_crop`` crops every time column of a row together).
    """

    reads: ClassVar[tuple[str, ...]] = ("audio",)
    makes: ClassVar[dict[str, tuple[str, ...]]] = {"audio": ("audio",), "lengths": ()}

    def __init__(self, seconds: float = 1.0, *, sample_rate: int, seed: int = 0) -> None:
        self.num_samples = _num_samples(seconds, sample_rate)
        self.sample_rate = sample_rate
        self.seed = seed

    def __call__(self, batch: NumpyBatch, epoch: int = 0) -> NumpyBatch:
        if "audio" not in batch:
            raise KeyError(f"crop needs an 'audio' column; the batch has {sorted(batch)}")
        audio = _rows(batch["audio"])
        rng = batch_rng(batch, self.seed, epoch, np.array([len(a) for a in audio]))
        out = np.zeros((len(audio), self.num_samples), dtype=np.float32)
        lengths = np.array([_crop_into(out[i], a, rng) for i, a in enumerate(audio)], dtype=np.int64)
        return {**batch, "audio": out, "lengths": lengths}


from raytrain.data import aligned as _aligned  # noqa: E402,F401  registers aligned_crop
from raytrain.data import text as _text  # noqa: E402,F401  registers ctc_targets
from raytrain.data import video as _video  # noqa: E402,F401  registers video_swap
from raytrain.data import voice as _voice  # noqa: E402,F401  registers flow_noise, room_reverb
