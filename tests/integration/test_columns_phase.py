"""A train phase on an audio-visual dataset written by DatasetWriter: roles decoded, aligned crops, lengths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from datasets_prep.dummies import write_av_dataset
from raytrain.config import load_config
from raytrain.pipeline import PipelineRunner

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_train_phase_reads_av_columns_cropped_in_step(ray_local: Any, tmp_path: Path) -> None:
    write_av_dataset(tmp_path / "av", rows_per_shard=3)
    runs = tmp_path / "runs"
    raw = {
        "name": "it_av", "seed": 3, "runs_dir": str(runs), "tracking": {"uri": f"sqlite:///{runs / 'mlflow.db'}"},
        "data": {"av": {"shards": str(tmp_path / "av")}},
        "model": {"name": "tests.integration._toy:AVToy"},
        "scaling": {"num_workers": 1},
        "phases": [{"name": "av", "train": ["av"], "batch_size": 2, "max_steps": 4, "log_every": 1,
                    "eval_every": 4, "checkpoint_every": 4, "optim": {"name": "adam", "lr": 1e-2},
                    "transforms": [{"name": "aligned_crop", "args": {"seconds": 1.0}}],
                    "losses": {"tests.integration._toy:toy_loss": 1.0}}],
    }
    runner = PipelineRunner(load_config(raw=raw), progress=False)
    runner.run()  # AVToy.forward asserts the crops' shapes, lengths and alignment on every batch
    summary = json.loads((runner.run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["phases"]["av"]["steps"] == 4


def test_a_phase_reads_only_the_columns_asked_for(ray_local: Any, tmp_path: Path) -> None:
    from raytrain.data.datasets import phase_datasets

    write_av_dataset(tmp_path / "av", rows_per_shard=3)
    data = {"av": (str(tmp_path / "av"), "stream")}
    datasets, _, specs = phase_datasets(data, ["av"], "av", columns={"train:av": ["tokens"], "eval": ["video"]})
    assert datasets["train:av"].schema().names == ["id", "tokens"] and set(specs["train:av"]["roles"]) == {"id", "tokens"}
    assert datasets["eval"].schema().names == ["id", "video"] and specs["eval"]["columns"] == []
    whole, _, _ = phase_datasets(data, ["av"], None)
    assert whole["train:av"].schema().names == ["id", "audio", "video", "latents", "tokens", "text"]
