"""Phase kinds (`base.PhaseKind`): train, evaluate, distill, cache, export.

Kinds that run in Ray Train workers run `train_loop_per_worker` there."""

from __future__ import annotations

from typing import Any


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """A phase on one Ray Train worker: the runner of the phase's kind (`PhaseKind.worker`).

    Ray pickles this function by reference and Ray Train's controller unpickles it before it asks
    for the workers: importing the training code here, in the worker only, keeps torchaudio,
    the models and the rest out of the controller's start-up (about 4 s of every phase)."""
    from raytrain.phases.base import phase_kind

    phase_kind(config.get("kind", "train")).worker(config).run()  # type: ignore[attr-defined]


__all__ = ["train_loop_per_worker"]
