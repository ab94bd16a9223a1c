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

__all__ = ["METRICS", "MetricFn", "cer", "dnsmos", "mcd", "mixture_si_sdr", "pit_si_sdr", "secs", "secs_gender",
           "si_sdr", "si_sdri", "similarity", "speaker_embedding", "wer"]
