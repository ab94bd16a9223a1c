"""The `cache` and `distill` kinds end to end on local Ray (the `export` kind runs in every recipe with an
export phase: test_recipes.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from datasets_prep.shards import read_manifest
from raytrain.checkpoints import load_weights
from raytrain.config import load_config
from raytrain.pipeline import PipelineRunner
from tests.toys import FrameEncoder

from .conftest import TINY_MODEL, pipeline_dict

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


# ---- cache ---------------------------------------------------------------------------------------------
def cache_pipeline(corpus: Path, runs: Path, encoder: Path) -> dict[str, Any]:
    """encode: a frozen frame encoder over dev's mixtures -> latents_dev; probe: a model trained on them."""
    return {
        "name": "it_cache", "seed": 3, "runs_dir": str(runs), "tracking": {"uri": f"sqlite:///{runs / 'mlflow.db'}"},
        "data": {"dev": {"shards": str(corpus / "dev")}},
        "model": {"name": "tests.toys:FrameEncoder"},
        "phases": [
            {"name": "encode", "kind": "cache", "init_from": {"path": str(encoder)}, "batch_size": 3,
             "datasets": {"dev": "latents_dev"}, "columns": {"latents": {"role": "features", "frame_rate": 100}},
             "carry": ["speakers"], "cache_dir": str(runs / "cache")},
            {"name": "probe", "model": {"name": "tests.toys:LatentProbe"}, "train": ["latents_dev"],
             "eval": "latents_dev", "losses": {"tests.toys:recon_mse": 1.0}, "batch_size": 2, "max_steps": 4,
             "eval_every": 4, "checkpoint_every": 4},
        ],
    }


def test_cache_runs_once_per_key_and_later_phases_read_it(corpus: Path, ray_local: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = tmp_path / "encoder.pt"
    torch.save(FrameEncoder().state_dict(), encoder)
    runs = tmp_path / "runs"
    cfg = load_config(raw=cache_pipeline(corpus, runs, encoder))
    rows = read_manifest(corpus / "dev")["rows"]
    calls = math.ceil(rows / 3)

    runs_made: list[int] = []

    def run(**kw: Any) -> dict[str, Any]:  # a new run each time (run ids have a 1 s resolution)
        runs_made.append(len(runs_made))
        return PipelineRunner(cfg, progress=False, run_dir=runs / f"run{len(runs_made)}", **kw).run()

    first = run()
    assert first["status"] == "finished", first.get("error")
    enc = first["phases"]["encode"]
    assert enc["forward_passes"] == calls > 0
    folder = Path(enc["datasets"]["latents_dev"])
    manifest = read_manifest(folder)
    assert manifest["rows"] == rows and manifest["prep"]["cache_key"]
    cols = manifest["roles"]
    assert cols["latents"]["role"] == "features" and cols["latents"]["frame_rate"] == 100
    assert set(cols) >= {"id", "latents", "speakers"}
    probe = first["phases"]["probe"]
    assert probe["status"] == "finished" and probe["steps"] == 4 and math.isfinite(probe["final_metrics"]["eval/loss"])

    again = run(only=["encode"])["phases"]["encode"]
    assert again["forward_passes"] == 0 and again["datasets"]["latents_dev"] == str(folder)
    rebuilt = run(only=["encode"], rebuild_cache=True)["phases"]["encode"]
    assert rebuilt["forward_passes"] == calls and rebuilt["datasets"]["latents_dev"] == str(folder)
    torch.save({k: v + 1.0 for k, v in FrameEncoder().state_dict().items()}, encoder)  # another checkpoint
    other = run(only=["encode"])["phases"]["encode"]
    assert other["forward_passes"] == calls and other["datasets"]["latents_dev"] != str(folder)


# ---- distill -------------------------------------------------------------------------------------------
STUDENT = {**TINY_MODEL, "args": {**TINY_MODEL["args"], "msk_num_hidden_feats": 16, "msk_num_layers": 1}}


def test_a_small_student_distils_a_trained_teacher(corpus: Path, ray_local: Any, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    raw = pipeline_dict(corpus, runs)
    raw["phases"] = [
        {"name": "teacher", "max_steps": 100, "eval_every": 100, "checkpoint_every": 100},
        {"name": "fresh", "kind": "evaluate", "model": STUDENT, "init_from": {"path": str(tmp_path / "fresh.pt")}},
        {"name": "student", "kind": "distill", "model": STUDENT, "teacher": {"phase": "teacher"},
         "losses": {"distill_si_sdr_pit": 1.0}, "max_steps": 100, "eval_every": 100, "checkpoint_every": 50},
    ]
    from raytrain.models import build_model

    torch.manual_seed(0)
    torch.save(build_model(STUDENT["name"], STUDENT["args"]).state_dict(), tmp_path / "fresh.pt")
    cfg = load_config(raw=raw)
    first = PipelineRunner(cfg, progress=False, only=["teacher", "fresh"])
    first.run()
    teacher_file = Path(first.summary.phases["teacher"].best_checkpoint or "")
    before = load_weights(teacher_file)
    runner = PipelineRunner(cfg, progress=False, run_dir=first.run_dir)  # the same run: student next
    summary = runner.run()
    assert summary["status"] == "finished", summary.get("error")
    ph = summary["phases"]
    teacher, fresh, student = (ph[n]["final_metrics"]["eval/si_sdri"] for n in ("teacher", "fresh", "student"))
    print(f"distill: teacher {teacher:.2f} dB, student before {fresh:.2f} dB, after {student:.2f} dB")
    assert teacher > fresh + 1.0  # a teacher worth learning from
    assert student - fresh >= 0.6 * (teacher - fresh), (teacher, fresh, student)  # most of the gap closed
    # the teacher: bitwise unchanged, and in none of the student's weights or checkpoints
    after = load_weights(teacher_file)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    s_keys = set(build_model(STUDENT["name"], STUDENT["args"]).state_dict())
    assert set(load_weights(ph["student"]["best_checkpoint"])) == s_keys
    assert set(load_weights(ph["student"]["last_checkpoint"])) == s_keys
    states = list((runner.run_dir / "student" / "ray").rglob("state.pt"))
    assert states
    for ckpt in states:
        state = torch.load(ckpt, weights_only=True)
        assert set(state["model"]) == s_keys and not any("teacher" in k for k in state)
