"""Training losses by name.

A loss is ``fn(outputs: dict, batch: dict) -> Tensor``: a scalar, averaged over the
batch, to minimise. Phases combine several with weights (``losses: {name: weight}``).
Users plug in ``pkg.mod:fn`` through the same slot.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from raytrain.losses.asr import asr_ctc, phone_ctc
from raytrain.losses.distill import distill_mse, distill_si_sdr_pit
from raytrain.losses.music import ae_kl, ae_recon, latent_mse, vq_commit, vq_recon
from raytrain.losses.separation import si_sdr_pit
from raytrain.losses.vc import (
           dmd,
           dmd_fake_score,
           flow_matching,
           flow_trajectory,
           ir_consistency,
           mel_multires,
)
from raytrain.losses.voice import speaker_cosine
from raytrain.registry import Registry

LossFn = Callable[..., Tensor]  # (outputs, batch) -> scalar; distill losses also take `teacher`

LOSSES: Registry[LossFn] = Registry("loss")
LOSSES.register("si_sdr_pit")(si_sdr_pit)
LOSSES.register("separation")(si_sdr_pit)
LOSSES.register("asr_ctc")(asr_ctc)
LOSSES.register("phone_ctc")(phone_ctc)
LOSSES.register("distill_si_sdr_pit")(distill_si_sdr_pit)
LOSSES.register("distill_mse")(distill_mse)
LOSSES.register("speaker_cosine")(speaker_cosine)
LOSSES.register("flow_matching")(flow_matching)
LOSSES.register("mel_multires")(mel_multires)
LOSSES.register("ir_consistency")(ir_consistency)
LOSSES.register("flow_trajectory")(flow_trajectory)
LOSSES.register("dmd")(dmd)
LOSSES.register("dmd_fake_score")(dmd_fake_score)
LOSSES.register("ae_recon")(ae_recon)
LOSSES.register("ae_kl")(ae_kl)
LOSSES.register("vq_recon")(vq_recon)
LOSSES.register("vq_commit")(vq_commit)
LOSSES.register("latent_mse")(latent_mse)

__all__ = ["LOSSES", "LossFn", "ae_kl", "ae_recon", "asr_ctc", "distill_mse", "distill_si_sdr_pit", "dmd", "dmd_fake_score",
           "flow_matching", "flow_trajectory", "ir_consistency", "latent_mse", "mel_multires", "phone_ctc",
           "si_sdr_pit", "speaker_cosine", "vq_commit", "vq_recon"]
