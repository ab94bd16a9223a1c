"""Speech separation models behind the batch-dict interface.

Every model here maps ``batch["mix"]`` ``(batch, time)`` to
``{"est_sources": (batch, sources, time)}`` with exactly the input length, and zeroes
the estimate beyond ``batch["lengths"]`` when given, so padding stays zeros as the
batch contract says. ``separate(mix)`` is the plain-tensor path for export and
inference. ``sample_rate`` is the rate the model was trained at; inference resamples
input audio to it.

The wrapped network always lives at ``self.net``, so a checkpoint's parameter names
read ``net.encoder.weight``, ``net.mask_generator....``, whether the network is the
built-in ConvTasNet or a user model brought in by the ``separation`` adapter.
"""

from __future__ import annotations

from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchaudio.models import ConvTasNet

from raytrain.export import ExportSpec


def fit_length(x: Tensor, time: int) -> Tensor:
    """Trim or right-zero-pad the last axis of ``x`` to ``time`` samples."""
    if x.shape[-1] > time:
        return x[..., :time]
    if x.shape[-1] < time:
        return F.pad(x, (0, time - x.shape[-1]))
    return x


def zero_beyond(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Zero ``x`` ``(batch, ..., time)`` at and beyond each row's ``lengths`` ``(batch,)``."""
    if lengths is None:
        return x
    mask = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths.to(x.device)[:, None]
    return x * mask.reshape(x.shape[0], *([1] * (x.ndim - 2)), x.shape[-1]).to(x.dtype)


class _Separator(nn.Module):
    """Shared batch-dict ``forward`` on top of a subclass's ``separate``."""

    reads: ClassVar[tuple[str, ...]] = ("mix",)  # the batch keys forward reads (raytrain.data.columns)
    net: nn.Module
    sample_rate: int | None

    def separate(self, mix: Tensor) -> Tensor:
        """``(batch, time) -> (batch, sources, time)``."""
        raise NotImplementedError

    @property
    def export_spec(self) -> ExportSpec:
        """For `raytrain.export`: ``mix`` (batch, time) in, ``est_sources`` (batch, sources, time) out."""
        return ExportSpec(inputs=("mix",), outputs=("est_sources",), time_axes={"mix": 1, "est_sources": 2},
                          time_multiple=self.export_time_multiple)

    @property
    def export_time_multiple(self) -> int:
        """Time lengths an exported graph holds for (ConvTasNet: its encoder stride, see `raytrain.export`)."""
        return 1

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        mix = batch["mix"]  # (batch, time)
        if mix.ndim != 2:
            raise ValueError(f"batch['mix'] must be (batch, time), got shape {tuple(mix.shape)}")
        est = self.separate(mix)  # (batch, sources, time)
        return {"est_sources": zero_beyond(est, batch.get("lengths"))}


class SeparationModel(_Separator):
    """ConvTasNet (Luo & Mesgarani, 2019) from ``torchaudio.models``.

    Arguments are those of :class:`torchaudio.models.ConvTasNet` (same defaults, the
    paper's large configuration) plus the required ``sample_rate``.
    """

    def __init__(
        self,
        *,
        sample_rate: int,
        num_sources: int = 2,
        enc_kernel_size: int = 16,
        enc_num_feats: int = 512,
        msk_kernel_size: int = 3,
        msk_num_feats: int = 128,
        msk_num_hidden_feats: int = 512,
        msk_num_layers: int = 8,
        msk_num_stacks: int = 3,
        msk_activate: str = "sigmoid",
    ) -> None:
        super().__init__()
        if enc_kernel_size % 2:
            raise ValueError(
                f"convtasnet: enc_kernel_size must be even (stride is half of it), got {enc_kernel_size}"
            )
        self.sample_rate = int(sample_rate)
        self.num_sources = num_sources
        self.net = ConvTasNet(
            num_sources=num_sources,
            enc_kernel_size=enc_kernel_size,
            enc_num_feats=enc_num_feats,
            msk_kernel_size=msk_kernel_size,
            msk_num_feats=msk_num_feats,
            msk_num_hidden_feats=msk_num_hidden_feats,
            msk_num_layers=msk_num_layers,
            msk_num_stacks=msk_num_stacks,
            msk_activate=msk_activate,
        )

    @property
    def export_time_multiple(self) -> int:
        # ConvTasNet pads to its stride by an amount that depends on the length; a graph holds for one branch
        return int(cast(ConvTasNet, self.net).enc_stride)

    def separate(self, mix: Tensor) -> Tensor:
        """``(batch, time) -> (batch, sources, time)``; ConvTasNet pads to its stride internally."""
        return fit_length(self.net(mix.unsqueeze(1)), mix.shape[-1])


class SeparationAdapter(_Separator):
    """Give a plain separator ``(batch, time) -> (batch, sources, time)`` the batch-dict interface.

    Used as ``model: {name: "mypkg.models:MossFormer2", adapter: separation,
    args: {..., sample_rate: 8000}}``. ``sample_rate`` belongs to the adapter; it is also
    passed to the user's class only when its constructor accepts it. An output of
    shape ``(batch, time)`` is taken as one source.
    """

    def __init__(self, inner: nn.Module, sample_rate: int | None = None) -> None:
        super().__init__()
        self.net = inner
        self.sample_rate = None if sample_rate is None else int(sample_rate)

    def separate(self, mix: Tensor) -> Tensor:
        est = self.net(mix)
        if not isinstance(est, Tensor):
            raise TypeError(
                f"{type(self.net).__name__}.forward must return a Tensor (batch, sources, time) for the "
                f"'separation' adapter, got {type(est).__name__}"
            )
        if est.ndim == 2:
            est = est.unsqueeze(1)
        if est.ndim != 3 or est.shape[0] != mix.shape[0]:
            raise ValueError(
                f"{type(self.net).__name__} returned shape {tuple(est.shape)} for input {tuple(mix.shape)}; "
                "the 'separation' adapter expects (batch, sources, time)"
            )
        return fit_length(est, mix.shape[-1])
