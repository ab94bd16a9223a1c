"""bench/recipes.py's verdict: a row passes only when the run exited 0 and every bar is met."""

from __future__ import annotations

from typing import Any

from bench.recipes import Bar, score


def _summary(**metrics: dict[str, float]) -> dict[str, Any]:
    return {"status": "finished", "phases": {
        name: {"status": "finished", "steps": 10, "wall_s": 12.5, "final_metrics": m} for name, m in metrics.items()}}


def test_bars_compare_in_their_direction() -> None:
    assert Bar("p", "eval/si_sdri", min=5.0).met(5.0) and not Bar("p", "eval/si_sdri", min=5.0).met(4.99)
    assert Bar("p", "eval/cer", max=0.25).met(0.25) and not Bar("p", "eval/cer", max=0.25).met(0.2501)
    assert not Bar("p", "eval/cer", max=0.25).met(None)


def test_a_row_passes_only_with_every_bar_met_and_a_clean_exit() -> None:
    good = _summary(test={"eval/cer": 0.2}, test_heldout={"eval/cer": 0.29})
    row = score("streaming_asr_tiny", 0, 100.0, 5.0, good)
    assert row["passed"] and [b["passed"] for b in row["bars"]] == [True, True]
    assert row["phases"] == [{"name": "test", "status": "finished", "steps": 10, "wall_s": 12.5},
                             {"name": "test_heldout", "status": "finished", "steps": 10, "wall_s": 12.5}]
    heldout_missed = _summary(test={"eval/cer": 0.2}, test_heldout={"eval/cer": 0.31})
    assert not score("streaming_asr_tiny", 0, 100.0, 5.0, heldout_missed)["passed"]
    stopped = _summary(test={"eval/cer": 0.3})  # the test gate failed: test_heldout never ran
    row = score("streaming_asr_tiny", 1, 100.0, 5.0, stopped)
    assert not row["passed"] and row["bars"][1]["value"] is None
    assert not score("separation_tiny", 1, 100.0, 5.0, _summary(long={"eval/si_sdri": 6.0}))["passed"]


def test_a_ratio_bar_divides_by_the_other_phase_and_a_slow_run_fails() -> None:
    bar = Bar("lora_ft", "eval/latent_mse", max=0.75, ratio_to="base_es")
    phases = _summary(base_es={"eval/latent_mse": 0.2}, lora_ft={"eval/latent_mse": 0.14})["phases"]
    assert abs(bar.value(phases) - 0.7) < 1e-12 and bar.met(bar.value(phases)) and "base_es" in bar.text()
    worse = _summary(base_es={"eval/latent_mse": 0.2}, lora_ft={"eval/latent_mse": 0.16})["phases"]
    assert not bar.met(bar.value(worse))
    good = _summary(base_es={"eval/latent_mse": 0.2}, lora_ft={"eval/latent_mse": 0.1})
    assert score("music_lora_tiny", 0, 1100.0, 5.0, good)["passed"]
    assert not score("music_lora_tiny", 0, 1300.0, 5.0, good)["passed"]  # over its 20 minutes
