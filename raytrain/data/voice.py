"""Transforms of the voice-conversion recipe: the flow's starting noise and room reverberation.

``flow_noise`` draws the Gaussian noise a flow sampler starts from as a batch column (``noise``,
frames x n_mels per row), so that a teacher and its student in a `distill` phase start from the same
noise, and an eval set is sampled from the same noise at every evaluation.

``room_reverb`` convolves the source (``audio``) with the impulse response of a fresh simulated
room per row (pyroomacoustics shoebox rooms: size, absorption from an RT60 drawn in ``rt60``,
source and microphone positions, all drawn from the batch's seeded generator) and writes it as
``audio_reverb`` beside the clean source, aligned with it (the response is cut at its direct-path
peak) and scaled to the clean source's peak. Its reflections stop at order ``max_order`` (20: a room in
11 ms instead of 41 ms at the dev rooms' 40, with an RT60 0.91x the drawn one instead of 1.03x; see
``datasets_prep.vc.room_impulse_response``): at 40, drawing the rooms kept phase 2 waiting on data 20% of
its steps on two cores.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from datasets_prep.vc import reverberate, room_impulse_response
from raytrain.data.transforms import TRANSFORMS, NumpyBatch, _rows, batch_rng


@TRANSFORMS.register("flow_noise")
class FlowNoise:
    """``noise``: standard normal (frames, n_mels) float32 per row, frames = samples // hop_length + 1
    (the frames of the model's log-mel of ``audio``)."""

    reads: ClassVar[tuple[str, ...]] = ("audio",)
    makes: ClassVar[dict[str, tuple[str, ...]]] = {"noise": ("audio",)}

    def __init__(self, n_mels: int = 80, hop_length: int = 160, *, sample_rate: int, seed: int = 0) -> None:
        self.n_mels, self.hop, self.seed = int(n_mels), int(hop_length), int(seed)

    def __call__(self, batch: NumpyBatch, epoch: int = 0) -> NumpyBatch:
        audio = _rows(batch["audio"])
        rng = batch_rng(batch, self.seed + 7919, epoch, np.array([len(a) for a in audio]))
        out = np.empty(len(audio), dtype=object)
        for i, a in enumerate(audio):
            out[i] = rng.standard_normal((len(a) // self.hop + 1, self.n_mels)).astype(np.float32)
        return {**batch, "noise": out}


@TRANSFORMS.register("room_reverb")
class RoomReverb:
    """``audio_reverb``: ``audio`` in a fresh simulated room per row (see the module docstring).
    ``prob``: share of rows that get a room (the others keep the clean source)."""

    reads: ClassVar[tuple[str, ...]] = ("audio",)
    makes: ClassVar[dict[str, tuple[str, ...]]] = {"audio_reverb": ("audio",)}

    def __init__(self, rt60: tuple[float, float] | list[float] = (0.15, 0.45),
                 room_size: Any = ((3.0, 7.0), (3.0, 6.0), (2.4, 3.2)), prob: float = 1.0, max_order: int = 20,
                 *, sample_rate: int, seed: int = 0) -> None:
        lo, hi = (float(x) for x in rt60)
        if not 0 < lo <= hi:
            raise ValueError(f"room_reverb: rt60 must be [min, max] seconds with 0 < min <= max, got {list(rt60)}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"room_reverb: prob must be in [0, 1], got {prob}")
        self.rt60 = (lo, hi)
        self.size = tuple((float(a), float(b)) for a, b in room_size)
        if len(self.size) != 3:
            raise ValueError(f"room_reverb: room_size needs three [min, max] ranges (x, y, z), got {room_size}")
        if int(max_order) < 1:
            raise ValueError(f"room_reverb: max_order must be at least 1, got {max_order}")
        self.prob, self.max_order, self.sample_rate, self.seed = float(prob), int(max_order), int(sample_rate), int(seed)

    def __call__(self, batch: NumpyBatch, epoch: int = 0) -> NumpyBatch:
        audio = _rows(batch["audio"])
        rng = batch_rng(batch, self.seed + 104729, epoch, np.array([len(a) for a in audio]))
        out = np.empty(len(audio), dtype=object)
        for i, a in enumerate(audio):
            room = rng.random() < self.prob
            out[i] = (reverberate(a, room_impulse_response(rng, self.sample_rate, self.rt60, self.size, self.max_order))
                      if room else a.copy())
        return {**batch, "audio_reverb": out}
