"""Every YAML under configs/ validates, and every pipeline passes `raytrain plan`'s checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from datasets_prep.prep import load_prep_config
from raytrain.config import load_config
from raytrain.plan import check_pipeline, format_plan

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_pipeline_configs_pass_plan(path: Path) -> None:
    cfg = load_config(path)
    plans = check_pipeline(cfg)
    text = format_plan(cfg, plans)
    assert all(f"] {p.name}" in text for p in cfg.phases)


@pytest.mark.parametrize("path", sorted((CONFIGS / "prep").glob("*.yaml")), ids=lambda p: p.name)
def test_prep_configs_validate(path: Path) -> None:
    assert load_prep_config(path).name


def test_every_pipeline_has_a_tiny_variant_that_the_recipe_test_runs_and_the_bench_scores() -> None:
    from bench.recipes import BARS
    from tests.integration._recipes import RECIPES

    pipelines = {p.stem for p in (CONFIGS / "pipelines").glob("*.yaml")}
    for name in pipelines - {n for n in pipelines if n.endswith("_tiny")}:
        assert f"{name}_tiny" in pipelines, f"{name}.yaml has no {name}_tiny.yaml"
    tiny = {n for n in pipelines if n.endswith("_tiny")}
    assert tiny == set(RECIPES), "tests/integration/test_recipes.py RECIPES must name every *_tiny.yaml"
    assert tiny == set(BARS), "bench/recipes.py BARS must name every *_tiny.yaml"
    for name in tiny:
        assert (CONFIGS / "prep" / f"{name}.yaml").is_file(), f"{name}.yaml has no configs/prep/{name}.yaml"


def test_the_bench_bars_are_the_gates_of_the_committed_tiny_configs() -> None:
    """A recipe's run stops at the bar `bench/recipes.py` scores it by, so a user sees the same verdict."""
    from bench.recipes import BARS

    for name, bars in BARS.items():
        cfg = load_config(CONFIGS / "pipelines" / f"{name}.yaml")
        gated = [p for p in cfg.phases if getattr(p, "gates", [])]
        assert {p.name for p in gated} == {b.phase for b in bars}, name
        for phase in gated:
            mine = [b for b in bars if b.phase == phase.name]
            assert [(g.metric, g.min, g.max, g.relative_to, g.ratio_to) for g in phase.gates] == [
                (b.metric, b.min, b.max, b.relative_to, b.ratio_to) for b in mine], (name, phase.name)
            for bar in mine:  # a metric of the phase's own (secs_gain: of secs; mcd_ratio: of mcd)
                assert any(bar.metric.removeprefix("eval/").startswith(m.split("_")[0]) for m in phase.metrics), bar
