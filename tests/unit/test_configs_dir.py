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


def test_every_pipeline_has_a_tiny_variant_and_a_test_runs_it() -> None:
    pipelines = {p.stem for p in (CONFIGS / "pipelines").glob("*.yaml")}
    for name in pipelines - {n for n in pipelines if n.endswith("_tiny")}:
        assert f"{name}_tiny" in pipelines, f"{name}.yaml has no {name}_tiny.yaml"
    tests = "".join(p.read_text() for p in (CONFIGS.parent / "tests/integration").glob("test_*.py"))
    for name in (n for n in pipelines if n.endswith("_tiny")):
        assert f"{name}.yaml" in tests, f"no integration test runs configs/pipelines/{name}.yaml"
