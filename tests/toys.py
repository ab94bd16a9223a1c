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


class WaveCritic(nn.Module):
    """A small critic: waveforms ``(..., time)`` -> one score per waveform ``(...)`` (a GAN discriminator's
    shape, trained beside a phase's model as one of its `modules`)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, channels, kernel_size=16, stride=8)
        self.out = nn.Linear(channels, 1)

    def forward(self, wav: Tensor) -> Tensor:
        lead = wav.shape[:-1]
        h = torch.relu(self.conv(wav.reshape(-1, 1, wav.shape[-1]))).mean(-1)
        return self.out(h).reshape(lead)


def critic_adv(outputs: dict[str, Tensor], batch: dict[str, Tensor], modules: dict[str, nn.Module]) -> Tensor:
    """Least-squares GAN loss of the model: its separated sources should score 1 with the critic."""
    return torch.mean((modules["critic"](outputs["est_sources"]) - 1.0) ** 2)


def critic_lsgan(outputs: dict[str, Tensor], batch: dict[str, Tensor], modules: dict[str, nn.Module]) -> Tensor:
    """Least-squares GAN loss of the critic: reference sources score 1, the model's (detached) 0."""
    critic = modules["critic"]
    return torch.mean((critic(batch["sources"]) - 1.0) ** 2) + torch.mean(critic(outputs["est_sources"]) ** 2)


critic_adv.reads = ()  # type: ignore[attr-defined]
critic_lsgan.reads = ("sources",)  # type: ignore[attr-defined]


class FrameTransformer(nn.Module):
    """A plain separator ``(batch, time) -> (batch, sources, time)`` for the ``separation`` adapter, built from
    nn.Linear and nn.TransformerEncoderLayer (what LoRA adapts): frames of ``frame`` samples in, a transformer
    layer over them, each source's frames out."""

    def __init__(self, frame: int = 32, dim: int = 32, sources: int = 2) -> None:
        super().__init__()
        self.frame, self.sources = frame, sources
        self.inp = nn.Linear(frame, dim)
        self.enc = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
        self.out = nn.Linear(dim, sources * frame)

    def forward(self, mix: Tensor) -> Tensor:
        b, t = mix.shape
        n = -(-t // self.frame)
        x = torch.nn.functional.pad(mix, (0, n * self.frame - t)).view(b, n, self.frame)
        y = self.out(self.enc(self.inp(x))).view(b, n, self.sources, self.frame)
        return y.permute(0, 2, 1, 3).reshape(b, self.sources, n * self.frame)[..., :t]
