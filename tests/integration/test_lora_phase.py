"""A LoRA phase on local Ray: only the adapters train, model.pt holds them merged under the base model's names,
adapter.pt loads back onto the base weights and gives the same outputs, and `raytrain plan` counts them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from raytrain.checkpoints import load_weights
from raytrain.config import load_config
from raytrain.lora import ADAPTER_FILE, load_adapter
from raytrain.models import build_model
from raytrain.pipeline import PipelineRunner
from raytrain.plan import check_pipeline, fmt_count, format_plan

from .conftest import pipeline_dict

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODEL = {"name": "tests.toys:FrameTransformer", "adapter": "separation", "args": {"sample_rate": 8000}}
TARGETS = ["net.inp", "net.enc.linear*", "net.out"]


def test_a_lora_phase_trains_adapters_writes_merged_weights_and_an_adapter_that_loads_back(
        corpus: Path, ray_local: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)  # the base weights: a fresh model saved as a user's model.pt
    base_file = tmp_path / "base.pt"
    torch.save(build_model(MODEL["name"], dict(MODEL["args"]), MODEL["adapter"]).state_dict(), base_file)
    raw = pipeline_dict(corpus, tmp_path)
    raw["model"] = MODEL
    raw["phases"] = [{"name": "ft", "init_from": {"path": str(base_file)}, "max_steps": 4, "eval_every": 4,
                      "checkpoint_every": 4, "optim": {"lr": 1e-2},
                      "lora": {"rank": 2, "alpha": 4, "target_modules": TARGETS}}]
    cfg = load_config(raw=raw)
    (plan,) = check_pipeline(cfg)
    n_lora = plan.n_trainable
    assert 0 < n_lora < 0.10 * (n_lora + plan.n_frozen)
    assert f"params   {fmt_count(n_lora)} trainable, {fmt_count(plan.n_frozen)} frozen" in format_plan(cfg, [plan])

    summary = PipelineRunner(cfg, progress=False).run()
    assert summary["status"] == "finished", summary.get("error")
    base, merged = load_weights(base_file), load_weights(summary["phases"]["ft"]["best_checkpoint"])
    assert set(merged) == set(base)  # the base model's own names: later phases and infer load it as is
    for key in base:  # the adapted Linear weights moved, everything else is the base's, bitwise
        adapted = key.endswith(".weight") and key.rsplit(".", 1)[0] in {"net.inp", "net.enc.linear1",
                                                                        "net.enc.linear2", "net.out"}
        assert torch.equal(base[key], merged[key]) != adapted, key

    adapter = torch.load(Path(summary["phases"]["ft"]["best_checkpoint"]).parent / ADAPTER_FILE, weights_only=True)
    assert adapter["base"] == str(base_file) and adapter["lora"]["rank"] == 2
    assert sum(v.numel() for v in adapter["weights"].values()) == n_lora
    with torch.no_grad():
        mix = torch.randn(2, 4000, generator=torch.Generator().manual_seed(0))
        unmerged = load_adapter(build_model(MODEL["name"], dict(MODEL["args"]), MODEL["adapter"]), adapter, base)
        plain = build_model(MODEL["name"], dict(MODEL["args"]), MODEL["adapter"])
        plain.load_state_dict(merged)
        got, want = unmerged.eval()({"mix": mix})["est_sources"], plain.eval()({"mix": mix})["est_sources"]
    assert (got - want).abs().max() < 1e-5
