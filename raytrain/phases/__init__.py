"""Phase kinds. `train` runs `train_loop_per_worker` inside Ray Train workers."""

from raytrain.phases.train import train_loop_per_worker

__all__ = ["train_loop_per_worker"]
