"""Multi-worker correctness without GPUs: the same tiny phase on 1 and 2 CPU workers (gloo).

DDP must keep the replicas identical (the worker loop checks it at every checkpoint and fails the phase
when they differ), and every optimizer step must consume the effective batch `raytrain plan` prints:
batch_size x grad_accum x workers rows, counted from the batches actually drawn on every rank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from raytrain.cli import main
from raytrain.config import load_config
from raytrain.pipeline import PipelineError, PipelineRunner
from raytrain.plan import check_pipeline, phase_figures

from .conftest import TINY_MODEL, checkpoints_of, pipeline_dict

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def one_phase(corpus: Path, runs: Path, workers: int) -> dict[str, Any]:
    raw = pipeline_dict(corpus, runs)
    raw["data"]["train"]["cache"] = "stream"  # shards streamed and split across the workers
    raw["scaling"] = {"num_workers": workers}
    # A critic trained beside the model (its own DDP wrapper, accumulated over the same micro-batches): the
    # replica check covers its weights too.
    critic = {"model": {"name": "tests.toys:WaveCritic"}, "losses": {"tests.toys:critic_lsgan": 1.0},
              "optim": {"name": "adam", "lr": 1e-3}}
    raw["phases"] = [{"name": "a", "batch_size": 4, "grad_accum": 2, "max_steps": 4, "checkpoint_every": 2,
                      "eval_every": 4, "losses": {"si_sdr_pit": 1.0, "tests.toys:critic_adv": 0.1},
                      "modules": {"critic": critic}}]
    return raw


def planned_effective_batch(raw: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> int:
    """The effective batch of phase `a` as data, checked against what `raytrain plan` prints."""
    cfg = load_config(raw=raw)
    figures = phase_figures(cfg, check_pipeline(cfg, require_data=True)[0])
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["plan", str(path)]) == 0
    printed = capsys.readouterr().out
    workers = raw["scaling"]["num_workers"]
    assert f"batch    4 x accum 2 x {workers} workers = {figures.effective_batch}; 4 steps" in printed, printed
    return figures.effective_batch


@pytest.mark.parametrize(("workers", "expected"), [(1, 8), (2, 16)])
def test_each_step_consumes_the_planned_effective_batch(corpus: Path, ray_local: Any, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str], workers: int,
                                                        expected: int) -> None:
    raw = one_phase(corpus, tmp_path / "runs", workers)
    planned = planned_effective_batch(raw, tmp_path, capsys)
    assert planned == expected
    runner = PipelineRunner(load_config(raw=raw), progress=False)
    summary = runner.run()
    entry = summary["phases"]["a"]
    # With 2 workers the replicas were compared at steps 2 and 4 before each checkpoint was written:
    # a finished phase with both checkpoints means they were identical every time.
    assert summary["status"] == "finished" and entry["status"] == "finished" and entry["steps"] == 4
    assert len(checkpoints_of(runner.run_dir / "a")) == 2
    final = json.loads((runner.run_dir / "summary.json").read_text())["phases"]["a"]["final_metrics"]
    assert final["perf/samples_per_step"] == planned
    assert math.isfinite(final["train/loss"]) and math.isfinite(final["eval/si_sdri"])
    assert math.isfinite(final["train/critic/loss"])
    assert (runner.run_dir / "a" / "last" / "modules" / "critic.pt").is_file()


def test_replicas_that_drift_apart_fail_the_phase_at_the_first_checkpoint(corpus: Path, ray_local: Any,
                                                                          tmp_path: Path) -> None:
    raw = one_phase(corpus, tmp_path / "runs", 2)
    raw["model"] = {**TINY_MODEL, "name": "tests.integration._faults:RankSkewedSeparation"}
    runner = PipelineRunner(load_config(raw=raw), progress=False)
    with pytest.raises(PipelineError, match=r"phase 'a' failed: ReplicaDivergenceError: DDP replicas diverged at "
                                            r"step 2: parameter net\.mask_generator\.output_conv\.bias differs "
                                            r"between ranks \(sum .*, norm .*\); this is a bug or a "
                                            r"non-deterministic frozen/unused-parameter setup"):
        runner.run()
    summary = json.loads((runner.run_dir / "summary.json").read_text())
    assert summary["phases"]["a"]["status"] == "failed"
    assert checkpoints_of(runner.run_dir / "a") == []  # the diverged model was not checkpointed
