"""Losses of the `music_lora` recipe (``raytrain.models.music``); each is a mean over the frames that hold
audio and over the values of a frame."""

from __future__ import annotations

import torch
from torch import Tensor

from raytrain.data.columns import reads_keys
from raytrain.losses.vc import _masked_mean, _need


@reads_keys()
def ae_recon(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    """L1 distance of the autoencoder's log-mel to its input's (normalised log-mel units)."""
    _need(outputs, ("mel", "mel_hat", "frame_mask"), "ae_recon", "the model must be music_ae in mode 'train'")
    return _masked_mean((outputs["mel_hat"] - outputs["mel"]).abs(), outputs["frame_mask"])


@reads_keys()
def ae_kl(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    """KL divergence of the latent Gaussian from a unit Gaussian, per latent value."""
    _need(outputs, ("latent_mean", "latent_logvar", "latent_mask"), "ae_kl", "the model must be music_ae")
    mean, logvar = outputs["latent_mean"], outputs["latent_logvar"]
    return _masked_mean(0.5 * (mean**2 + torch.exp(logvar) - 1.0 - logvar), outputs["latent_mask"])


@reads_keys()
def vq_recon(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    """Squared error of the melody feature rebuilt from its code against the feature."""
    _need(outputs, ("feature", "feature_hat", "sketch_mask"), "vq_recon", "the model must be sketch_vq")
    return _masked_mean((outputs["feature_hat"] - outputs["feature"]) ** 2, outputs["sketch_mask"])


@reads_keys()
def vq_commit(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    """The quantiser's commitment loss (the encoder's output kept near its code)."""
    _need(outputs, ("vq_commit",), "vq_commit", "the model must be sketch_vq")
    return outputs["vq_commit"]


@reads_keys("latent")
def latent_mse(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    """Squared error of the generated latent frames against the song's (the cached autoencoder latents)."""
    _need(outputs, ("latent_pred", "frame_mask"), "latent_mse", "the model must be music_generator")
    pred = outputs["latent_pred"]
    return _masked_mean((pred - batch["latent"][:, : pred.shape[1]]) ** 2, outputs["frame_mask"])
