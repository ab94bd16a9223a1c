"""Phase kinds. `train` runs `train_loop_per_worker` inside Ray Train workers."""

from __future__ import annotations

from typing import Any


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """A phase on one Ray Train worker (`raytrain.phases.train.PhaseRunner`).

    Ray pickles this function by reference and Ray Train's controller unpickles it before it asks
    for the workers: importing the training code here, in the worker only, keeps torchmetrics,
    torchaudio and the rest out of the controller's start-up (about 4 s of every phase)."""
    from raytrain.phases.train import PhaseRunner

    PhaseRunner(config).run()


__all__ = ["train_loop_per_worker"]
