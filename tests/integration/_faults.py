"""User-side parts reached by dotted path from test configs (workers import them by name)."""

from __future__ import annotations

import torch

from raytrain.models.separation import SeparationModel


def nan_loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A loss that is always NaN, as a diverged model's would be."""
    return outputs["est_sources"].sum() * float("nan")


class RankSkewedSeparation(SeparationModel):
    """ConvTasNet whose rank-1 replica nudges one weight outside autograd at every training forward, as a
    model that changes its own weights by rank would: DDP never sees it, so the replicas drift apart."""

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.training and torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            with torch.no_grad():
                self.net.mask_generator.output_conv.bias.add_(1e-3)
        return super().forward(batch)
