"""``aligned_crop``: the same span of time from every time column of a row.

A row of an audio-visual or cached-latent dataset holds several time axes at different rates:
16,000 samples, 25 video frames, 50 latent frames and 75 tokens in each second. Cropping each on
its own would cut different moments; this transform draws one start time per row and cuts
``round(seconds * rate)`` steps of every time column from there (1 s: 16,000 samples beside 25
frames beside 50 latents beside 75 tokens).

The start is a whole number of *grid* periods, the largest period at which every column's rate
gives a whole number of steps (1 / gcd of the rates: 40 ms for 16 kHz, 25, 50 and 75 Hz), so
every column starts exactly at the same time. When that grid is coarser than the crop (rates
with no useful common divisor), starts fall on the slowest column's steps and the others round
to the nearest step of theirs. A row shorter than ``seconds`` keeps all of itself (start 0); the
collate pads it and its ``<column>_lengths`` say how much is real. ``strategy: start`` always takes the
first ``seconds`` (the song fine-tuning codes' ``--segment-strategy start``: every epoch sees the same
opening), ``random`` (the default) a seeded random start per row and epoch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, ClassVar

import numpy as np

from datasets_prep.columns import ColumnSpec
from raytrain.data.columns import specs_of
from raytrain.data.transforms import TRANSFORMS, NumpyBatch, batch_rng

_AUDIO_NAMES = ("audio", "mix")
CROP_START = "crop_start"  # (batch,) seconds: where each row's crop starts, for times given in the row's clock


def _rate(value: float) -> Fraction:
    return Fraction(value).limit_denominator(10_000)


def start_grid(rates: list[Fraction], seconds: float) -> Fraction:
    """Starts per second a crop may take: the gcd of ``rates`` (every column starts on a step of its own),
    or the slowest rate when the gcd's period is longer than the crop."""
    denominator = math.lcm(*(r.denominator for r in rates))
    grid = Fraction(math.gcd(*(int(r * denominator) for r in rates)), denominator)
    return grid if 1 / grid <= seconds else min(rates)


@TRANSFORMS.register("aligned_crop")
class AlignedCrop:
    """Crop every time column of a row (audio, video, tokens and features with a rate) to the same
    ``seconds``, starting at the same time (see the module docstring); other columns pass through.

    Output columns are object arrays of the crops, ``(n, *frame_shape)`` with ``n = round(seconds *
    rate)`` (fewer for a shorter row), which the collate pads with their lengths; ``crop_start`` holds
    each row's start in seconds (for a later transform reading times of the whole row, e.g. word times). The dataset's column
    specs arrive with each batch (``specs``); without them, ``audio``/``mix``/``s<k>`` columns are taken
    as audio at ``sample_rate``. ``columns``: crop only these (default: every time column with a rate).
    """

    reads: ClassVar[tuple[str, ...]] = ()
    makes: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, seconds: float = 1.0, columns: list[str] | None = None, strategy: str = "random", *,
                 sample_rate: int, seed: int = 0, specs: Mapping[str, Any] | None = None) -> None:
        if not seconds > 0:
            raise ValueError(f"aligned_crop: seconds must be > 0, got {seconds}")
        if strategy not in ("random", "start"):
            raise ValueError(f"aligned_crop: strategy must be 'random' or 'start', got {strategy!r}")
        self.strategy = strategy
        self.seconds, self.only, self.sample_rate, self.seed = float(seconds), columns, int(sample_rate), seed
        self.specs = specs_of(specs) if specs else None

    def _time_columns(self, batch: NumpyBatch, specs: Mapping[str, ColumnSpec] | None) -> dict[str, Fraction]:
        if specs is None:
            specs = {k: ColumnSpec.audio(self.sample_rate) for k in batch
                     if k in _AUDIO_NAMES or (k[:1] == "s" and k[1:].isdigit())}
        names = self.only if self.only is not None else list(specs)
        out = {}
        for name in names:
            spec = specs.get(name)
            if spec is None or name not in batch:
                if self.only is not None:
                    raise KeyError(f"aligned_crop: column {name!r} is not a time column of the batch; it has "
                                   f"{sorted(batch)}")
                continue
            rate = spec.time_rate()
            if spec.is_time and rate:
                out[name] = _rate(rate)
        if not out:
            raise KeyError(f"aligned_crop: the batch has no time column with a rate (columns {sorted(batch)})")
        return out

    def __call__(self, batch: NumpyBatch, epoch: int = 0, specs: Mapping[str, Any] | None = None) -> NumpyBatch:
        rates = self._time_columns(batch, specs_of(specs) if specs else self.specs)
        grid = start_grid(list(rates.values()), self.seconds)
        sizes = {c: max(1, round(self.seconds * r)) for c, r in rates.items()}
        columns = {c: list(batch[c]) for c in rates}
        first = next(iter(rates))
        rng = batch_rng(batch, self.seed, epoch, np.array([len(a) for a in columns[first]]))
        out: dict[str, np.ndarray] = {c: np.empty(len(columns[first]), dtype=object) for c in rates}
        out[CROP_START] = np.zeros(len(columns[first]), dtype=np.float64)
        for i in range(len(columns[first])):
            lengths = {c: len(columns[c][i]) for c in rates}
            # the last start (in grid periods) at which every column still holds a whole crop
            last = min(math.floor((lengths[c] - sizes[c]) * grid / r) for c, r in rates.items())
            k = int(rng.integers(0, last + 1)) if last > 0 and self.strategy == "random" else 0
            out[CROP_START][i] = float(k / grid)
            for c, r in rates.items():
                start = round(k * r / grid)
                out[c][i] = np.asarray(columns[c][i])[start:start + sizes[c]]
        return {**batch, **out}
