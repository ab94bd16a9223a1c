"""CTC losses of the two heads of ``raytrain.models.asr.CTCASR``.

Each reads the head's log-probabilities (batch, frames, classes) and ``enc_lengths`` from the
model's outputs, and padded targets with their lengths from the batch (``asr_targets`` /
``phone_targets``, made by the ``ctc_targets`` transform). Averaged over the batch after
dividing each utterance's loss by its target length (``reduction="mean"``); an utterance too
short for its transcript contributes zero (``zero_infinity``) instead of an infinite loss.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from raytrain.data.columns import reads_keys


def _ctc(head: str, targets: str, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    if targets not in batch:
        raise KeyError(f"loss {head!r} needs batch[{targets!r}]: add the ctc_targets transform to the phase "
                       "and a text/phonemes column to its datasets")
    logp = outputs[head].float().transpose(0, 1)  # (frames, batch, classes)
    return F.ctc_loss(logp, batch[targets], outputs["enc_lengths"], batch[f"{targets}_lengths"], blank=0,
                      reduction="mean", zero_infinity=True)


@reads_keys("asr_targets")
def asr_ctc(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    """Character CTC loss."""
    return _ctc("asr_ctc", "asr_targets", outputs, batch)


@reads_keys("phone_targets")
def phone_ctc(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    """Phoneme CTC loss."""
    return _ctc("phone_ctc", "phone_targets", outputs, batch)
