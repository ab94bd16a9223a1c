"""Distillation losses: ``fn(outputs, batch, teacher) -> Tensor``, the student's outputs against a frozen
teacher's outputs on the same batch (a `distill` phase passes ``teacher``)."""

from __future__ import annotations

import torch
from torch import Tensor

from raytrain.data.columns import reads_keys
from raytrain.metrics.separation import pit_si_sdr


@reads_keys()
def distill_si_sdr_pit(outputs: dict[str, Tensor], batch: dict[str, Tensor], teacher: dict[str, Tensor]) -> Tensor:
    """``-SI-SDR`` of the student's sources against the teacher's, under the best permutation (the two may
    order the sources differently). Reads ``est_sources`` of both and optional ``batch["lengths"]``."""
    best, _ = pit_si_sdr(outputs["est_sources"], teacher["est_sources"].detach(), batch.get("lengths"))
    return -best.mean()


@reads_keys()
def distill_mse(outputs: dict[str, Tensor], batch: dict[str, Tensor], teacher: dict[str, Tensor]) -> Tensor:
    """Mean squared difference over every floating-point output the student and the teacher share."""
    keys = [k for k, v in outputs.items() if torch.is_floating_point(v) and k in teacher
            and teacher[k].shape == v.shape]
    if not keys:
        raise ValueError(f"distill_mse: the student's outputs {sorted(outputs)} and the teacher's {sorted(teacher)} "
                         "share no floating-point output of the same shape")
    return torch.stack([torch.mean((outputs[k] - teacher[k].detach()) ** 2) for k in keys]).mean()
