"""Character and word error rates of greedy CTC transcripts (jiwer), scored against the targets.

References are the batch's ``asr_targets`` decoded with the default character vocabulary
(``raytrain.data.text.CHARS``: the normalized transcript); hypotheses are best-path decodes
of ``outputs["asr_ctc"]``. Each metric returns per-utterance ``(errors, reference length)`` so
the loop divides the sums over the whole eval set (corpus CER/WER, as jiwer and sclite
report it), not a mean of per-utterance rates.
"""

from __future__ import annotations

import jiwer
import torch
from torch import Tensor

from raytrain.data.columns import reads_keys
from raytrain.data.text import CHARS, Vocab

_VOCAB = Vocab(CHARS)


def transcripts(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """(references, greedy hypotheses) of a batch."""
    best = outputs["asr_ctc"].argmax(-1).cpu()
    lengths = outputs["enc_lengths"].cpu()
    targets, t_lengths = batch["asr_targets"].cpu(), batch["asr_targets_lengths"].cpu()
    refs = [_VOCAB.decode(targets[i, : int(t_lengths[i])].tolist()) for i in range(len(targets))]
    hyps = [_VOCAB.greedy(best[i, : int(lengths[i])].tolist()) for i in range(len(best))]
    return refs, hyps


def _counts(refs: list[str], hyps: list[str], words: bool) -> tuple[Tensor, Tensor]:
    errors, sizes = [], []
    for ref, hyp in zip(refs, hyps, strict=True):
        out = jiwer.process_words(ref, hyp) if words else jiwer.process_characters(ref, hyp)
        errors.append(out.substitutions + out.deletions + out.insertions)
        sizes.append(len(ref.split()) if words else len(ref))
    return torch.tensor(errors, dtype=torch.float64), torch.tensor(sizes, dtype=torch.float64)


@reads_keys("asr_targets")
@torch.no_grad()
def cer(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"cer": (character edits, reference characters)}`` per utterance."""
    return {"cer": _counts(*transcripts(outputs, batch), words=False)}


@reads_keys("asr_targets")
@torch.no_grad()
def wer(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"wer": (word edits, reference words)}`` per utterance."""
    return {"wer": _counts(*transcripts(outputs, batch), words=True)}
