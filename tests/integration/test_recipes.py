"""Each recipe's configs/pipelines/<recipe>_tiny.yaml trains to its quality bar on a CPU.

These are the slowest tests (minutes each); `pytest -m "not slow"` leaves them out locally.
CI runs them: a recipe is only done when this passes on a 2-core machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from datasets_prep.prep import run_prep
from raytrain.config import load_config
from raytrain.pipeline import PipelineRunner

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]


def test_separation_tiny_yaml_reaches_5db_si_sdri_on_unseen_voices(tmp_path: Path, ray_local: Any) -> None:
    t0 = time.time()
    run_prep(ROOT / "configs/prep/separation_tiny.yaml",
             overrides={"raw_dir": str(tmp_path / "raw"), "output_dir": str(tmp_path / "shards")})
    t_prep = time.time() - t0
    shards = tmp_path / "shards"
    cfg = load_config(ROOT / "configs/pipelines/separation_tiny.yaml", [
        f"data.train.shards={shards / 'train'}", f"data.dev.shards={shards / 'dev'}",
        f"runs_dir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"])
    summary = PipelineRunner(cfg, progress=False).run()  # the config's gate raises below 5 dB
    long = summary["phases"]["long"]
    print(f"\nprep {t_prep:.0f} s; short {summary['phases']['short']['wall_s']} s, long {long['wall_s']} s; "
          f"dev SI-SDRi {long['final_metrics']['eval/si_sdri']:.2f} dB")
    assert summary["status"] == "finished"
    assert long["gates"] == [{"metric": "eval/si_sdri", "value": long["final_metrics"]["eval/si_sdri"],
                              "min": 5.0, "max": None, "passed": True}]
    assert long["final_metrics"]["eval/si_sdri"] >= 5.0
