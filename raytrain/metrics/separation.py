"""Separation metrics: permutation-invariant SI-SDR and SI-SDR improvement.

Padded batches are scored on each row's valid region only: samples at or beyond
``batch["lengths"][i]`` are zeroed in both estimate and reference, and each row is
made zero-mean over its valid samples (the usual ``zero_mean=True`` of SI-SDR,
restricted to the valid part). Zeros add nothing to the dot products inside
SI-SDR, so a padded row scores exactly as the same row without padding would.

Metrics return **per-example** values, shape ``(batch,)``, so the training loop can
sum them with the example count across ranks and divide once.
"""

from __future__ import annotations

import itertools
from functools import cache

import torch
from torch import Tensor

from raytrain.data.columns import reads_keys

# SI-SDR and its permutation search are written here, not taken from torchmetrics: importing torchmetrics
# imports all its metrics, transformers and scipy.signal (~2 s of CPU), and every phase's worker is a new
# process, so each separation phase paid it before its first step. tests/unit/test_losses.py checks these
# against torchmetrics' `scale_invariant_signal_distortion_ratio` and `permutation_invariant_training`.


def si_sdr_db(est: Tensor, ref: Tensor) -> Tensor:
    """SI-SDR in dB over the last axis (Le Roux et al. 2019), broadcasting the others; no centring (callers
    centre over the valid samples). The epsilons are torchmetrics': a silent reference or estimate gives a
    finite value with a finite gradient."""
    eps = torch.finfo(est.dtype).eps
    alpha = ((est * ref).sum(-1, keepdim=True) + eps) / ((ref * ref).sum(-1, keepdim=True) + eps)
    target = alpha * ref
    noise = target - est
    return 10 * torch.log10(((target * target).sum(-1) + eps) / ((noise * noise).sum(-1) + eps))


@cache
def _permutations(n: int) -> Tensor:
    return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long)  # (n!, n)


def valid_mask(lengths: Tensor | None, batch: int, time: int, device: torch.device) -> Tensor:
    """Boolean mask of valid samples.  # (batch, time)

    ``lengths`` is ``(batch,)`` int; ``None`` means every sample is valid.
    """
    if lengths is None:
        return torch.ones(batch, time, dtype=torch.bool, device=device)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    return torch.arange(time, device=device)[None, :] < lengths.to(device)[:, None]


def mask_and_center(x: Tensor, mask: Tensor) -> Tensor:
    """Zero ``x`` outside ``mask`` and remove its mean over the valid samples.

    ``x`` is ``(batch, ..., time)``; ``mask`` is ``(batch, time)`` bool. A row with no
    valid sample stays all zeros.
    """
    m = mask.to(x.dtype).reshape(mask.shape[0], *([1] * (x.ndim - 2)), mask.shape[1])
    count = m.sum(dim=-1, keepdim=True).clamp_min(1.0)
    mean = (x * m).sum(dim=-1, keepdim=True) / count
    return (x - mean) * m


def _check_shapes(est: Tensor, ref: Tensor) -> None:
    if est.ndim != 3 or est.shape != ref.shape:
        raise ValueError(
            "separation outputs and targets must both be (batch, sources, time) with equal shapes; "
            f"got est_sources {tuple(est.shape)} and sources {tuple(ref.shape)}. "
            "Does the model trim its output to the input length and predict the configured num_sources?"
        )


def pit_si_sdr(est: Tensor, ref: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Best-permutation SI-SDR in dB (mean over sources) and that permutation.

    ``est`` and ``ref`` are ``(batch, sources, time)``; ``lengths`` is ``(batch,)``.
    Returns ``(si_sdr (batch,), perm (batch, sources))`` where ``perm[b, j]`` is the
    estimate index matched to reference ``j``. Scored in float32 (or wider), so bf16/fp16
    outputs under autocast do not overflow the epsilon guards. Differentiable in ``est``.
    """
    _check_shapes(est, ref)
    dtype = torch.promote_types(est.dtype, torch.float32)
    mask = valid_mask(lengths, est.shape[0], est.shape[-1], est.device)
    est_c = mask_and_center(est.to(dtype), mask)
    ref_c = mask_and_center(ref.to(dtype), mask)
    n = est.shape[1]
    pair = si_sdr_db(est_c[:, None], ref_c[:, :, None])  # (batch, reference j, estimate i)
    perms = _permutations(n).to(est.device)  # (P, n): perms[p, j] is the estimate matched to reference j
    scores = pair[:, torch.arange(n, device=est.device)[None, :], perms].mean(-1)  # (batch, P)
    best, index = scores.max(dim=1)
    return best, perms[index]


def mixture_si_sdr(mix: Tensor, ref: Tensor, lengths: Tensor | None = None) -> Tensor:
    """SI-SDR of the unprocessed mixture against each reference, mean over sources.

    ``mix`` is ``(batch, time)``, ``ref`` ``(batch, sources, time)``; returns ``(batch,)``.
    The mixture is the same estimate for every source, so no permutation is involved.
    """
    if mix.ndim != 2 or mix.shape != (ref.shape[0], ref.shape[-1]):
        raise ValueError(
            f"mix must be (batch, time) = {(ref.shape[0], ref.shape[-1])}, got {tuple(mix.shape)}"
        )
    dtype = torch.promote_types(mix.dtype, torch.float32)
    mask = valid_mask(lengths, ref.shape[0], ref.shape[-1], ref.device)
    ref_c = mask_and_center(ref.to(dtype), mask)
    mix_c = mask_and_center(mix.to(dtype), mask).unsqueeze(1).expand_as(ref_c)
    return si_sdr_db(mix_c, ref_c).mean(dim=1)


@reads_keys("sources")
@torch.no_grad()
def si_sdr(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{"si_sdr": (batch,)}``: PIT SI-SDR of ``outputs["est_sources"]`` in dB."""
    best, _ = pit_si_sdr(outputs["est_sources"], batch["sources"], batch.get("lengths"))
    return {"si_sdr": best}


@reads_keys("sources", "mix")
@torch.no_grad()
def si_sdri(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{"si_sdri": (batch,)}``: PIT SI-SDR of the estimate minus that of the mixture, dB."""
    lengths = batch.get("lengths")
    best, _ = pit_si_sdr(outputs["est_sources"], batch["sources"], lengths)
    return {"si_sdri": best - mixture_si_sdr(batch["mix"], batch["sources"], lengths)}
