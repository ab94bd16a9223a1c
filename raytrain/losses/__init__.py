"""Training losses by name.

A loss is ``fn(outputs: dict, batch: dict) -> Tensor``: a scalar, averaged over the
batch, to minimise. Phases combine several with weights (``losses: {name: weight}``).
Users plug in ``pkg.mod:fn`` through the same slot.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from raytrain.losses.separation import si_sdr_pit
from raytrain.registry import Registry

LossFn = Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]

LOSSES: Registry[LossFn] = Registry("loss")
LOSSES.register("si_sdr_pit")(si_sdr_pit)
LOSSES.register("separation")(si_sdr_pit)

__all__ = ["LOSSES", "LossFn", "si_sdr_pit"]
