"""Training losses by name.

A loss is ``fn(outputs: dict, batch: dict) -> Tensor``: a scalar, averaged over the
batch, to minimise. Phases combine several with weights (``losses: {name: weight}``).
Users plug in ``pkg.mod:fn`` through the same slot.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from raytrain.losses.asr import asr_ctc, phone_ctc
from raytrain.losses.distill import distill_mse, distill_si_sdr_pit
from raytrain.losses.separation import si_sdr_pit
from raytrain.registry import Registry

LossFn = Callable[..., Tensor]  # (outputs, batch) -> scalar; distill losses also take `teacher`

LOSSES: Registry[LossFn] = Registry("loss")
LOSSES.register("si_sdr_pit")(si_sdr_pit)
LOSSES.register("separation")(si_sdr_pit)
LOSSES.register("asr_ctc")(asr_ctc)
LOSSES.register("phone_ctc")(phone_ctc)
LOSSES.register("distill_si_sdr_pit")(distill_si_sdr_pit)
LOSSES.register("distill_mse")(distill_mse)

__all__ = ["LOSSES", "LossFn", "asr_ctc", "distill_mse", "distill_si_sdr_pit", "phone_ctc", "si_sdr_pit"]
