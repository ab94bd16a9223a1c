"""Evaluation metrics by name.

A metric is ``fn(outputs: dict, batch: dict) -> dict[str, Tensor | (Tensor, Tensor)]``
returning per-example values of shape ``(batch,)``; the loop sums them and the example
count across ranks, then averages. A ``(numerator, denominator)`` pair of per-example
values is summed separately and divided once (a corpus error rate: edits / reference
length). Users plug in ``pkg.mod:fn`` through the same slot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from raytrain.metrics.asr import cer, wer
from raytrain.metrics.music import latent_mse, mel_l1
from raytrain.metrics.separation import mixture_si_sdr, pit_si_sdr, si_sdr, si_sdri
from raytrain.metrics.voice import dnsmos, mcd, secs, secs_gender, similarity, speaker_embedding
from raytrain.registry import Registry

MetricFn = Callable[[dict[str, Tensor], dict[str, Tensor]], dict[str, Any]]

METRICS: Registry[MetricFn] = Registry("metric")
METRICS.register("si_sdr")(si_sdr)
METRICS.register("si_sdri")(si_sdri)
METRICS.register("cer")(cer)
METRICS.register("wer")(wer)
METRICS.register("secs")(secs)
METRICS.register("secs_gender")(secs_gender)
METRICS.register("dnsmos")(dnsmos)
METRICS.register("mcd")(mcd)
METRICS.register("latent_mse")(latent_mse)
METRICS.register("mel_l1")(mel_l1)


class MetricTotals:
    """What an evaluation sums over its batches: per metric key the sum of its per-example values, and for
    a ``(numerator, denominator)`` pair the two sums apart; ``means`` divides (by the example count, or
    by the denominator). A pair whose denominator sums to 0 (no row it counts: no cross-gender row, a
    source that is its own parallel reference) is left out rather than reported as 0 or a huge ratio."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.dens: dict[str, float] = {}

    def add(self, values: dict[str, Any]) -> None:
        """A metric's (or the loss's) values for one batch."""
        for key, vals in values.items():
            if isinstance(vals, tuple):  # (numerator, denominator): a corpus-level rate
                self.sums[key] = self.sums.get(key, 0.0) + float(vals[0].double().sum())
                self.dens[key] = self.dens.get(key, 0.0) + float(vals[1].double().sum())
            else:
                self.sums[key] = self.sums.get(key, 0.0) + float(vals.float().sum())

    def flat(self) -> tuple[list[str], list[str], list[float]]:
        """(sum keys, denominator keys, their values in that order): one vector to reduce across ranks."""
        keys, den_keys = sorted(self.sums), sorted(self.dens)
        return keys, den_keys, [self.sums[k] for k in keys] + [self.dens[k] for k in den_keys]

    def means(self, count: float) -> dict[str, float]:
        """``eval/<key>``: each sum over ``count`` examples, or over its denominator."""
        n = max(float(count), 1.0)
        return {f"eval/{k}": v / (self.dens[k] if k in self.dens else n) for k, v in self.sums.items()
                if k not in self.dens or self.dens[k] > 0}

    @classmethod
    def from_flat(cls, keys: list[str], den_keys: list[str], values: list[float]) -> MetricTotals:
        """The totals of ``flat``'s vector once reduced."""
        out = cls()
        out.sums = dict(zip(keys, values[: len(keys)], strict=True))
        out.dens = dict(zip(den_keys, values[len(keys):], strict=True))
        return out


__all__ = ["METRICS", "MetricFn", "MetricTotals", "cer", "dnsmos", "mcd", "mixture_si_sdr", "pit_si_sdr", "secs", "secs_gender",
           "si_sdr", "si_sdri", "similarity", "speaker_embedding", "wer"]
