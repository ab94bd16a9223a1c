"""Losses of the `vc_flow` recipe (``raytrain.models.vc``): flow matching, a multi-resolution spectral
loss, reverberation consistency, and the two distillations (trajectory, distribution matching).

Every loss is averaged over the frames that hold audio (``outputs["frame_mask"]``) and the mel channels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from raytrain.data.columns import reads_keys


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` (batch, frames, ...) over the frames of ``mask`` (batch, frames)."""
    m = mask.to(x.dtype).reshape(*mask.shape, *([1] * (x.ndim - 2)))
    per_frame = x[0, 0].numel() if x.ndim > 2 else 1
    return (x * m).sum() / (m.sum() * per_frame).clamp_min(1.0)


def _need(outputs: dict[str, Tensor], keys: tuple[str, ...], loss: str, hint: str) -> None:
    missing = [k for k in keys if k not in outputs]
    if missing:
        raise KeyError(f"loss {loss!r} needs model outputs {missing}: {hint}")


@reads_keys("target_mel")
def flow_matching(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    """Conditional flow matching: squared error of the predicted velocity against ``x_1 - (1 - sigma) x_0``."""
    _need(outputs, ("v_pred", "v_target"), "flow_matching", "the model must train in train_mode 'flow'")
    return _masked_mean((outputs["v_pred"] - outputs["v_target"]) ** 2, outputs["frame_mask"])


def _pool(x: Tensor, mask: Tensor, time: int, freq: int) -> tuple[Tensor, Tensor]:
    """Average (batch, frames, n_mels) over ``time`` x ``freq`` tiles (the mask pooled alike)."""
    m = mask.to(x.dtype)[:, None]  # (batch, 1, frames)
    y = x.transpose(1, 2)  # (batch, n_mels, frames)
    if time > 1:
        y = F.avg_pool1d(y * m, time, ceil_mode=True)
        m = F.avg_pool1d(m, time, ceil_mode=True)
        y = y / m.clamp_min(1e-6)
    if freq > 1:
        y = F.avg_pool1d(y.transpose(1, 2), freq, ceil_mode=True).transpose(1, 2)
    return y.transpose(1, 2), m[:, 0] > 0.5


@reads_keys("target_mel")
def mel_multires(outputs: dict[str, Tensor], batch: dict[str, Tensor],
                 scales: tuple[tuple[int, int], ...] = ((1, 1), (2, 2), (4, 4), (8, 1), (1, 8))) -> Tensor:
    """Multi-resolution spectral loss on the one-step estimate of the clean log-mel frames
    (``x1_pred``) against the target: L1 distance of the frames averaged over tiles of several time x
    frequency sizes, so that both fine detail and the coarse envelope count. It is the mel-domain form
    of the multi-resolution STFT loss (the model predicts mel frames, not waveforms); its values are on
    the normalised log-mel scale."""
    _need(outputs, ("x1_pred", "target"), "mel_multires", "the model must train in train_mode 'flow'")
    total = outputs["x1_pred"].new_zeros(())
    for time, freq in scales:
        pred, mask = _pool(outputs["x1_pred"], outputs["frame_mask"], time, freq)
        ref, _ = _pool(outputs["target"], outputs["frame_mask"], time, freq)
        total = total + _masked_mean((pred - ref).abs(), mask)
    return total / len(scales)


@reads_keys()
def ir_consistency(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    """Content features of the reverberant source (``room_reverb``) against those of the clean source
    (no gradient): the content encoder learns to ignore the room."""
    if "content_clean" not in outputs:
        return outputs["frame_mask"].new_zeros((), dtype=torch.float32)  # no reverberant copy in this batch
    diff = (outputs["content"] - outputs["content_clean"]) ** 2  # (batch, dim, frames)
    return _masked_mean(diff.transpose(1, 2), outputs["frame_mask"])


@reads_keys()
def flow_trajectory(outputs: dict[str, Tensor], batch: dict[str, Tensor], teacher: dict[str, Tensor]) -> Tensor:
    """Trajectory distillation: the student's few-step sample against the teacher's many-step sample
    from the same noise (the ``flow_noise`` transform), both normalised log-mel frames."""
    _need(outputs, ("sample",), "flow_trajectory", "the student must use train_mode 'sample'")
    if "sample" not in teacher:
        raise KeyError("loss 'flow_trajectory' needs the teacher's 'sample' (a vc_flow teacher in eval mode)")
    return _masked_mean((outputs["sample"] - teacher["sample"].detach()) ** 2, outputs["frame_mask"])


def _noised(x: Tensor, t: Tensor, sigma_min: float) -> tuple[Tensor, Tensor]:
    """A point of the flow's path at time t from clean frames x and fresh noise: (x_t, noise)."""
    noise = torch.randn_like(x)
    tt = t[:, None, None]
    return (1 - (1 - sigma_min) * tt) * noise + tt * x, noise


def _clean_estimate(model: Any, xt: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    return xt + (1 - t)[:, None, None] * model.velocity(xt, t, cond)


@reads_keys()
def dmd(outputs: dict[str, Tensor], batch: dict[str, Tensor], teacher_model: Any, modules: dict[str, Any],
        t_range: tuple[float, float] = (0.02, 0.98)) -> Tensor:
    """Distribution matching distillation (Yin et al., 2024, in the flow-matching parametrisation).

    The student's sample ``x`` is noised to a random time t of the flow's path; the frozen teacher (the
    *real* score) and the ``fake_score`` module (a copy of the teacher trained on the student's samples,
    `dmd_fake_score`) each estimate the clean frames from it. Their difference is the gradient of the KL
    divergence between the student's distribution and the teacher's; normalised by the mean distance of
    the real estimate from the sample, it is applied to ``x`` through ``0.5 * ||x - sg(x - g)||^2``."""
    _need(outputs, ("sample",), "dmd", "the student must use train_mode 'sample'")
    if "fake_score" not in modules:
        raise KeyError("loss 'dmd' needs a module named 'fake_score' in the phase's modules:")
    x = outputs["sample"]
    mask = outputs["frame_mask"]
    fake = modules["fake_score"]
    t = torch.empty(x.shape[0], device=x.device).uniform_(*t_range)
    with torch.no_grad():
        xt, _ = _noised(x.detach(), t, teacher_model.sigma_min)
        real = _clean_estimate(teacher_model, xt, t, teacher_model.condition(batch))
        fake_est = _clean_estimate(fake, xt, t, fake.condition(batch))
        m = mask[:, :, None].to(x.dtype)
        weight = ((x.detach() - real).abs() * m).sum((1, 2), keepdim=True) / (m.sum((1, 2), keepdim=True)
                                                                              * x.shape[-1]).clamp_min(1.0)
        grad = (fake_est - real) / weight.clamp_min(1e-4)
        grad = torch.nan_to_num(grad) * m
    return 0.5 * _masked_mean((x - (x - grad).detach()) ** 2, mask)


@reads_keys()
def dmd_fake_score(outputs: dict[str, Tensor], batch: dict[str, Tensor], modules: dict[str, Any]) -> Tensor:
    """The fake-score module's own loss in distribution matching: flow matching on the student's
    (detached) samples, so it tracks the student's current distribution."""
    _need(outputs, ("sample",), "dmd_fake_score", "the student must use train_mode 'sample'")
    fake = modules["fake_score"]
    x1 = outputs["sample"].detach()
    t = torch.rand(x1.shape[0], device=x1.device)
    xt, x0 = _noised(x1, t, fake.sigma_min)
    v = fake.velocity(xt, t, fake.condition(batch))
    return _masked_mean((v - (x1 - (1 - fake.sigma_min) * x0)) ** 2, outputs["frame_mask"])
