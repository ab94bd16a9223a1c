"""Small models and losses for tests, plugged in by dotted path (`tests.toys:FrameEncoder`) as a user's
own code would be."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FrameEncoder(nn.Module):
    """``mix`` (batch, time) at 8 kHz -> ``latents`` (batch, frames, dims) at 100 frames/s (hop 80)."""

    reads = ("mix",)

    def __init__(self, dims: int = 8, hop: int = 80, sample_rate: int = 8000) -> None:
        super().__init__()
        self.hop, self.sample_rate = hop, sample_rate
        self.conv = nn.Conv1d(1, dims, kernel_size=hop, stride=hop)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        mix = batch["mix"]
        z = self.conv(mix[:, None, : mix.shape[-1] // self.hop * self.hop]).transpose(1, 2)
        out = {"latents": z}
        if "lengths" in batch:
            out["latents_lengths"] = batch["lengths"] // self.hop
        return out


class LatentProbe(nn.Module):
    """``latents`` -> ``recon`` of the same shape (a linear map): a model a later phase trains on cached latents."""

    reads = ("latents",)

    def __init__(self, dims: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(dims, dims)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"recon": self.proj(batch["latents"])}


def recon_mse(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    """Mean squared error of ``recon`` against ``latents`` over the valid frames."""
    x, y = outputs["recon"], batch["latents"]
    lengths = batch.get("latents_lengths")
    if lengths is None:
        return torch.mean((x - y) ** 2)
    mask = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).to(x.dtype)[..., None]
    return torch.sum(mask * (x - y) ** 2) / torch.clamp(mask.sum() * x.shape[-1], min=1.0)


recon_mse.reads = ("latents",)  # type: ignore[attr-defined]
