"""A tiny audio-visual model reached by dotted path (``tests.integration._toy:AVToy``) from a test config.

Its forward checks what ``aligned_crop`` and the collate promise: every time column cropped to the
same second (16,000 samples, 25 frames, 50 latent frames, 75 tokens) starting at the same instant,
each padded along time with its lengths. The data is ``datasets_prep.dummies``' counting dataset.
"""

from __future__ import annotations

from fractions import Fraction
from typing import ClassVar

import torch
from torch import Tensor, nn

from datasets_prep.dummies import AV_RATES, time_index
from raytrain.data.columns import reads_keys


class AVToy(nn.Module):
    reads: ClassVar[tuple[str, ...]] = ("audio", "video", "latents", "tokens")

    def __init__(self, seconds: float = 1.0) -> None:
        super().__init__()
        self.steps = {c: round(seconds * r) for c, r in AV_RATES.items()}
        self.proj = nn.Linear(8 + 1 + 1, 1)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        b = batch["audio"].shape[0]
        shapes = {"audio": (b, self.steps["audio"]), "video": (b, self.steps["video"], 24, 24, 1),
                  "latents": (b, self.steps["latents"], 8), "tokens": (b, self.steps["tokens"])}
        for col, shape in shapes.items():
            assert tuple(batch[col].shape) == shape, f"{col}: {tuple(batch[col].shape)} != {shape}"
        assert batch["video"].dtype == torch.uint8 and batch["tokens"].dtype == torch.int64
        assert batch["lengths"].tolist() == [self.steps["audio"]] * b
        for col in ("video", "latents", "tokens"):
            assert batch[f"{col}_lengths"].tolist() == [self.steps[col]] * b, col
        for i in range(b):
            starts = {c: Fraction(int(time_index(c, batch[c][i].cpu().numpy())[0]), r) for c, r in AV_RATES.items()}
            assert len(set(starts.values())) == 1, f"row {i}: crops start at different times {starts}"
        feats = torch.cat([batch["latents"].mean(1), batch["video"].float().mean((1, 2, 3, 4))[:, None],
                           batch["audio"].mean(1, keepdim=True)], dim=1)  # (batch, 10)
        return {"pred": self.proj(feats / 100.0)}


@reads_keys()
def toy_loss(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    return outputs["pred"].square().mean()
