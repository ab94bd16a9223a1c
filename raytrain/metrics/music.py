"""Metrics of the `music_lora` recipe: per-row latent error of the generator, reconstruction of the
autoencoder."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from raytrain.data.columns import reads_keys


def _row_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum((1, 2)).double() / (m.sum((1, 2)) * x.shape[-1]).clamp_min(1.0).double()


@reads_keys("latent")
def latent_mse(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Any]:
    """``latent_mse`` (batch,): mean squared error of each row's generated latent frames against its own."""
    pred = outputs["latent_pred"]
    return {"latent_mse": _row_mean((pred - batch["latent"][:, : pred.shape[1]]) ** 2, outputs["frame_mask"])}


@reads_keys()
def mel_l1(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Any]:
    """``mel_l1`` (batch,): the autoencoder's L1 log-mel error per row (normalised log-mel units)."""
    return {"mel_l1": _row_mean((outputs["mel_hat"] - outputs["mel"]).abs(), outputs["frame_mask"])}
