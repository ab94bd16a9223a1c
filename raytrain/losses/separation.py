"""Separation losses: negative SI-SDR under permutation-invariant training (PIT).

Scoring follows :mod:`raytrain.metrics.separation`: estimate and target are zeroed
beyond each row's ``lengths`` and made zero-mean over the valid samples, then the
best speaker-wise permutation is found by trying every permutation (the sources of a
separation model are few: 3 sources, 6 permutations). Padding therefore never changes the loss.

A silent target (all zeros in its valid region) is a degenerate reference: SI-SDR
then measures only the estimate's energy, ``10 log10(eps / (|est|^2 + eps))``. It stays
finite with a finite gradient (epsilons guard both ratios) but is
very negative, so keep silent utterances out of training data.
"""

from __future__ import annotations

from torch import Tensor

from raytrain.data.columns import reads_keys
from raytrain.metrics.separation import pit_si_sdr


@reads_keys("sources")
def si_sdr_pit(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    """Scalar loss: ``-mean_b max_perm mean_src SI-SDR(est, ref)`` in dB.

    Reads ``outputs["est_sources"]`` and ``batch["sources"]`` (both
    ``(batch, sources, time)``) and optional ``batch["lengths"]`` ``(batch,)``.
    """
    best, _ = pit_si_sdr(outputs["est_sources"], batch["sources"], batch.get("lengths"))
    return -best.mean()
