"""Sweep YAML validation, the checks `raytrain tune` makes before Ray starts, and its outputs (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raytrain.config import load_config
from raytrain.config.loader import ConfigError, with_values
from raytrain.config.sweep import SweepConfig, load_sweep
from raytrain.tune import (
    asha_rungs,
    asha_scheduler,
    best_yaml,
    check_sweep,
    plot_sweep,
    trial_scaling,
    trials_table,
)

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "configs/pipelines/separation_tiny.yaml"
SWEEP = ROOT / "configs/sweeps/separation_tiny.yaml"


def _sweep(**over) -> SweepConfig:
    raw = yaml.safe_load(SWEEP.read_text())
    raw.update(over)
    return SweepConfig.model_validate(raw)


def test_the_shipped_sweep_is_valid_against_its_pipeline() -> None:
    sweep = load_sweep(SWEEP)
    check_sweep(load_config(PIPELINE), sweep)
    assert sweep.trials_expected() == 6 and sweep.scheduler.name == "asha"


def test_unknown_sweep_keys_name_the_path_and_the_nearest_key(tmp_path: Path) -> None:
    raw = yaml.safe_load(SWEEP.read_text())
    raw["scheduler"]["grace"] = 10
    raw["params"]["phases.long.optim.lr"] = {"logunifrom": [1e-4, 1e-3]}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_sweep(bad)
    text = str(err.value)
    assert "scheduler.grace: unknown key. Did you mean 'grace_period'?" in text
    assert "params.phases.long.optim.lr.logunifrom: unknown key. Did you mean 'loguniform'?" in text


@pytest.mark.parametrize(("dist", "message"), [
    ({"uniform": [1.0, 0.5]}, "low bound must be below"),
    ({"loguniform": [0.0, 1.0]}, "must be positive"),
    ({"uniform": [0.1, 1.0], "choice": [1]}, "exactly one of"),
    ({}, "exactly one of"),
])
def test_bad_distributions_are_refused(dist: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _sweep(params={"phases.long.optim.lr": dist})


def test_grid_searcher_needs_grid_params_and_counts_the_grid() -> None:
    with pytest.raises(ValueError, match="every param must be"):
        _sweep(searcher={"name": "grid"})
    sweep = _sweep(searcher={"name": "grid"}, num_samples=2,
                   params={"phases.long.optim.lr": {"grid": [1e-4, 1e-3, 1e-2]},
                           "phases.long.max_steps": {"grid": [170, 255]}})
    assert sweep.trials_expected() == 2 * 3 * 2


@pytest.mark.parametrize(("change", "message"), [
    ({"phase": "lng"}, "no phase named 'lng'"),
    ({"params": {"phases.short.optim.lr": {"uniform": [1e-4, 1e-3]}}}, "runs once before the swept phase"),
    ({"params": {"phases.0.optim.lr": {"uniform": [1e-4, 1e-3]}}}, "runs once before the swept phase"),
    ({"params": {"phases.long.optim.lrr": {"uniform": [1e-4, 1e-3]}}}, "Did you mean 'lr'"),
    ({"params": {"phases.long.optim.lr": {"uniform": [-1.0, 1e-3]}}}, "phases[1](long).optim.lr"),
    ({"scheduler": {"name": "asha", "grace_period": 50, "reduction_factor": 2}}, "evaluates every 85 steps"),
    ({"scheduler": {"name": "asha", "grace_period": 170, "reduction_factor": 2}}, "would never compare"),
])
def test_check_sweep_refuses_what_would_fail_later(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_sweep(load_config(PIPELINE), _sweep(**change))
    assert message in str(err.value)


def test_sampled_values_are_validated_like_a_normal_run() -> None:
    cfg = load_config(PIPELINE)
    out = with_values(cfg, {"phases.long.optim.lr": 3e-4, "phases.long.transforms.0.args.crop_seconds": 1.5})
    assert out.phase("long").optim.lr == 3e-4 and out.phase("long").transforms[0].args["crop_seconds"] == 1.5
    assert cfg.phase("long").optim.lr == 5e-4  # the base config is untouched
    with pytest.raises(ConfigError, match="batch_size"):
        with_values(cfg, {"phases.long.batch_size": 0})


def test_trial_scaling_shares_the_cpus_between_concurrent_trials() -> None:
    cfg = load_config(PIPELINE)
    one = trial_scaling(cfg, _sweep(max_concurrent_trials=1), total_cpus=2)
    two = trial_scaling(cfg, _sweep(max_concurrent_trials=2), total_cpus=2)
    assert one["cpus_per_worker"] == 0.99 and two["cpus_per_worker"] == 0.49  # a whole CPU stays with Ray Data
    assert two["threads_per_worker"] >= 1
    fixed = trial_scaling(cfg, _sweep(trial_scaling={"num_workers": 1, "cpus_per_worker": 0.3}), total_cpus=8)
    assert fixed["cpus_per_worker"] == 0.3


def _rows() -> list[dict]:
    return [
        {"trial": "t2", "values": {"phases.long.optim.lr": 1e-3, "phases.long.transforms.0.args.crop_seconds": 1.5},
         "status": "finished", "steps": 170, "metric": 6.2},
        {"trial": "t1", "values": {"phases.long.optim.lr": 2e-4, "phases.long.transforms.0.args.crop_seconds": 1.0},
         "status": "stopped early", "steps": 85, "metric": 5.1},
        {"trial": "t3", "values": {"phases.long.optim.lr": 3e-3, "phases.long.transforms.0.args.crop_seconds": 2.0},
         "status": "failed", "steps": 0, "metric": None},
    ]


def test_trials_table_best_yaml_and_plot(tmp_path: Path) -> None:
    sweep = load_sweep(SWEEP)
    table = trials_table(_rows(), sweep).splitlines()
    assert table[0] == "trials by eval/si_sdri (max):"
    assert table[1].split() == ["trial", "lr", "crop_seconds", "status", "steps", "eval/si_sdri"]
    assert table[2].split()[0] == "t2" and table[2].split()[-1] == "6.2000"
    assert "stopped early" in table[3] and table[4].split()[-1] == "-"
    text = best_yaml(load_config(PIPELINE), _rows()[0]["values"])
    best = load_config(raw=yaml.safe_load(text))
    assert best.phase("long").optim.lr == 1e-3 and best.phase("long").transforms[0].args["crop_seconds"] == 1.5
    assert best.data["train"].shards == "data/shards/espeak_sep_tiny/train"  # the user's own relative paths
    plot_sweep(_rows(), sweep, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_base_run_gives_the_phases_before_the_swept_one_when_they_ran_with_this_config(tmp_path: Path) -> None:
    """`raytrain tune --base-run RUN`: the early phases' entries come from a finished run of the same config; a
    run of another config, an unfinished phase or a folder that is no run is refused, naming the phase or the
    folder."""
    from raytrain.pipeline import resolve_paths
    from raytrain.runs import PhaseEntry, RunSummary, write_summary
    from raytrain.tune import reuse_base

    pipe = resolve_paths(load_config(PIPELINE))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(pipe.model_dump(mode="json")))
    short = PhaseEntry(status="finished", steps=800, best_checkpoint=str(run / "short" / "best" / "model.pt"))
    write_summary(run, RunSummary(pipeline=pipe.name, run_id="run", status="finished", phases={"short": short}))
    assert reuse_base(pipe, run, ["short"])["short"]["best_checkpoint"] == short.best_checkpoint
    other = resolve_paths(load_config(PIPELINE, ["phases.short.optim.lr=5.0e-3"]))
    with pytest.raises(ConfigError, match=r"phase 'short' ran otherwise \(config: optim differ\)"):
        reuse_base(other, run, ["short"])
    elsewhere = resolve_paths(load_config(PIPELINE, [f"data.train.shards={tmp_path / 'other'}"]))
    with pytest.raises(ConfigError, match=r"phase 'short' ran otherwise \(datasets: train differ\)"):
        reuse_base(elsewhere, run, ["short"])
    write_summary(run, RunSummary(pipeline=pipe.name, run_id="run", phases={"short": PhaseEntry(status="failed")}))
    with pytest.raises(ConfigError, match="phase 'short' is failed, not finished"):
        reuse_base(pipe, run, ["short"])
    with pytest.raises(ConfigError, match="not a run folder"):
        reuse_base(pipe, tmp_path, ["short"])


@pytest.mark.parametrize(("max_steps", "grace", "rf"), [(400, 200, 2), (8, 2, 2), (9, 2, 2), (100, 10, 3), (5, 4, 2)])
def test_asha_compares_trials_below_the_last_step_only(max_steps: int, grace: int, rf: int) -> None:
    """A rung at the phase's last step would stop a trial that ran every step before it wrote its weights."""
    sweep = SweepConfig.model_validate({"phase": "b", "metric": "eval/loss", "mode": "min",
                                        "params": {"phases.b.optim.lr": {"loguniform": [1e-4, 1e-2]}},
                                        "scheduler": {"name": "asha", "grace_period": grace, "reduction_factor": rf}})
    rungs = asha_rungs(sweep, max_steps)
    assert rungs and max(rungs) < max_steps
    scheduler = asha_scheduler(sweep, max_steps)
    milestones = sorted(int(m) for bracket in scheduler._brackets for m, _ in bracket._rungs)
    assert milestones == rungs
