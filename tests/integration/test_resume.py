"""`raytrain run --resume` after the driver is killed mid-phase ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from datasets_prep import faults
from raytrain.checkpoints import STATE_FILE, load_data, load_weights
from raytrain.config import load_config
from tests.toys import WaveCritic

from .conftest import checkpoints_of, crash, pipeline_dict, raytrain_cli, registered_checkpoints

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
# The second checkpoint (every 6 steps): paused there, a run has two registered checkpoints only once this
# step's is one of them, so the resumed run starts at exactly this step.
PAUSE_STEP = 12


def test_resume_after_killing_the_driver_matches_an_uninterrupted_run(
        corpus: Path, ray_local: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from raytrain.pipeline import PipelineRunner

    raw = pipeline_dict(corpus, tmp_path / "runs")
    # Beside the separator, a critic with its own optimizer, schedule and update ratio (2 updates on every
    # second step): the resumed run must match for both.
    critic = {"model": {"name": "tests.toys:WaveCritic"}, "losses": {"tests.toys:critic_lsgan": 1.0},
              "optim": {"name": "adam", "lr": 1e-3}, "schedule": {"decay": "linear", "min_lr_ratio": 0.5},
              "updates_per_step": 2, "every": 2}
    raw["phases"] = [{"name": "a", "max_steps": 24, "eval_every": 12, "checkpoint_every": 6,
                      "losses": {"si_sdr_pit": 1.0, "tests.toys:critic_adv": 0.1}, "modules": {"critic": critic}}]
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump(raw))

    # The uninterrupted run in this process (on the tests' Ray); the cut and resumed ones as a user's `raytrain run`
    assert PipelineRunner(load_config(raw=raw), run_dir=tmp_path / "full", progress=False).run()["status"] == "finished"

    cut_dir = tmp_path / "cut"
    monkeypatch.setenv(faults.ENV, f"step={PAUSE_STEP}")  # the run stops at the step: no race to kill it
    cut = raytrain_cli("run", str(cfg), "--run-dir", str(cut_dir), log=tmp_path / "cut.log")
    marker, deadline = faults.marker_path("step", PAUSE_STEP, cut_dir / "a"), time.monotonic() + 400
    while not (marker.exists() and len(registered_checkpoints(cut_dir / "a")) >= 2):
        assert cut.poll() is None and time.monotonic() < deadline, (
            f"no pause at step {PAUSE_STEP} with 2 registered checkpoints (exit code {cut.poll()}):\n"
            + (tmp_path / "cut.log").read_text()[-3000:])
        time.sleep(0.2)
    crash(cut)
    assert json.loads((cut_dir / "summary.json").read_text())["phases"]["a"]["status"] == "running"

    resumed = raytrain_cli("run", str(cfg), "--resume", "--run-dir", str(cut_dir), log=tmp_path / "resume.log")
    assert resumed.wait(timeout=400) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert f"resumed phase 'a' at step {PAUSE_STEP}" in (tmp_path / "resume.log").read_text()

    s_full = json.loads((tmp_path / "full" / "summary.json").read_text())["phases"]["a"]
    s_cut = json.loads((cut_dir / "summary.json").read_text())["phases"]["a"]
    assert s_cut["status"] == "finished" and s_cut["steps"] == s_full["steps"] == 24
    w_full, w_cut = load_weights(s_full["last_checkpoint"]), load_weights(s_cut["last_checkpoint"])
    assert w_full.keys() == w_cut.keys()
    for k in w_full:
        assert torch.equal(w_full[k], w_cut[k]), f"{k} differs after resume"
    c_full, c_cut = (load_weights(Path(s["last_checkpoint"]).parent / "modules" / "critic.pt") for s in (s_full, s_cut))
    assert c_full.keys() == c_cut.keys() == WaveCritic().state_dict().keys()
    for k in c_full:
        assert torch.equal(c_full[k], c_cut[k]), f"critic {k} differs after resume"
    state = load_data(checkpoints_of(cut_dir / "a")[-1] / STATE_FILE)
    assert state["modules"]["critic"]["updates"] == 24  # 12 of 24 steps x 2 updates
    assert state["modules"]["critic"]["scheduler"]["last_epoch"] == 24
    final = s_cut["final_metrics"]
    assert final["train/critic/lr"] == pytest.approx(1e-3 * 0.5)  # linear decay to its floor over its 24 updates
    assert final["train/critic/loss"] == pytest.approx(s_full["final_metrics"]["train/critic/loss"], abs=1e-6)
    assert s_cut["final_metrics"]["eval/si_sdri"] == pytest.approx(s_full["final_metrics"]["eval/si_sdri"], abs=1e-5)


def test_resume_and_init_from_refuse_a_checkpoint_whose_pickle_would_run_code(
        corpus: Path, ray_local: object, tmp_path: Path) -> None:
    """A hostile state.pt in the run folder (a resumed phase reads it in the worker) and a hostile
    `init_from: {path: ...}` (read on the driver for the load report): both refused, nothing run."""
    from raytrain.pipeline import PipelineRunner
    from tests.unit.test_safe_load import hostile

    from .conftest import checkpoints_of

    marker = tmp_path / "code-ran"
    raw = pipeline_dict(corpus, tmp_path / "runs")
    raw["phases"] = [{"name": "a", "max_steps": 4, "eval_every": 4, "checkpoint_every": 2}]
    runner = PipelineRunner(load_config(raw=raw), progress=False)
    assert runner.run()["status"] == "finished"
    run_dir = runner.run_dir
    # As a crash leaves it: the phase still running, its checkpoints on disk; then every one made hostile.
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["status"], summary["phases"]["a"]["status"] = "running", "running"
    (run_dir / "summary.json").write_text(json.dumps(summary))
    states = [c / "state.pt" for c in checkpoints_of(run_dir / "a")]
    assert states
    for state in states:
        hostile(state, marker)
    with pytest.raises(Exception) as resumed:
        PipelineRunner(load_config(raw=raw), resume=True, run_dir=run_dir, progress=False).run()
    assert "state.pt: refused" in str(resumed.value) and not marker.exists()

    raw["phases"] = [{"name": "b", "max_steps": 2, "init_from": {"path": str(hostile(tmp_path / "model.pt", marker))}}]
    with pytest.raises(Exception, match=r"model\.pt: refused"):
        PipelineRunner(load_config(raw=raw), progress=False).run()
    assert not marker.exists()
