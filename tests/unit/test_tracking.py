"""MLflow tracking helpers against a real sqlite store: the tracking URI, phase models logged and registered."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from raytrain.config import PipelineConfig, load_config
from raytrain.models import build_model
from raytrain.runs import PhaseEntry
from raytrain.tracking import Tracker, log_phase_model, tracking_uri

MODEL = {"name": "convtasnet", "args": {
    "sample_rate": 8000, "num_sources": 2, "enc_kernel_size": 16, "enc_num_feats": 8, "msk_kernel_size": 3,
    "msk_num_feats": 8, "msk_num_hidden_feats": 16, "msk_num_layers": 1, "msk_num_stacks": 1}}


def pipe(**tracking: Any) -> PipelineConfig:
    return load_config(raw={
        "name": "unit", "data": {"tr": {"shards": "nowhere"}}, "model": MODEL, "tracking": tracking,
        "defaults": {"train": ["tr"], "losses": {"si_sdr_pit": 1.0}},
        "phases": [{"name": "a"}, {"name": "b", "init_from": "a"},
                   {"name": "score", "kind": "evaluate", "init_from": "b", "eval": "tr", "metrics": ["si_sdri"]}],
    })


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps run artifacts under ./mlruns of the working directory
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    torch.manual_seed(3)
    weights = tmp_path / "best" / "model.pt"
    weights.parent.mkdir()
    state = build_model(MODEL["name"], dict(MODEL["args"])).state_dict()
    torch.save(state, weights)
    return {"uri": uri, "weights": weights, "state": state}


def test_environment_uri_wins_and_relative_sqlite_paths_become_absolute(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(None, tmp_path / "runs") == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert tracking_uri("sqlite:///x/m.db", tmp_path) == f"sqlite:///{tmp_path / 'x' / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(None, tmp_path) == "http://127.0.0.1:5999"
    assert tracking_uri("sqlite:///x/m.db", tmp_path) == "http://127.0.0.1:5999"


def test_train_phases_are_logged_and_only_the_final_one_registered(store: dict[str, Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pytorch

    cfg = pipe(uri=store["uri"], register_as="unit_sep")
    tracker = Tracker(store["uri"], "unit")
    entries: dict[str, dict[str, Any]] = {}
    for phase in cfg.phases:
        run_id = tracker.start(phase.name)
        entry = PhaseEntry(best_checkpoint=str(store["weights"]), steps=4)
        log_phase_model(tracker, cfg, phase, entry, run_id)
        entries[phase.name] = {**entry.model_dump(exclude_defaults=True), "run_id": run_id}
    a, b, score = entries["a"], entries["b"], entries["score"]
    assert a["mlflow_model_uri"].startswith("models:/") and "mlflow_registered_model" not in a
    assert b["mlflow_registered_model"] == {"name": "unit_sep", "version": "1"}  # b: the last train phase
    assert set(score) == {"best_checkpoint", "steps", "run_id"}  # an evaluate phase trains no model
    (version,) = tracker.client.search_model_versions("name='unit_sep'")
    assert version.run_id == b["run_id"] and version.source == b["mlflow_model_uri"]
    logged = tracker.client.get_logged_model(b["mlflow_model_uri"].removeprefix("models:/"))
    assert logged.experiment_id == tracker.experiment_id and logged.source_run_id == b["run_id"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    model = mlflow.pytorch.load_model(a["mlflow_model_uri"])
    assert all(torch.equal(v, store["state"][k]) for k, v in model.state_dict().items())


def test_logging_leaves_the_process_tracking_uri_as_it_was(store: dict[str, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    other = f"sqlite:///{Path(store['uri'].removeprefix('sqlite:///')).with_name('other.db')}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    cfg = pipe(uri=store["uri"])
    tracker = Tracker(store["uri"], "unit")
    entry = PhaseEntry(best_checkpoint=str(store["weights"]), steps=1)
    log_phase_model(tracker, cfg, cfg.phases[0], entry, tracker.start("a"))
    assert entry.mlflow_model_uri and entry.mlflow_model_uri.startswith("models:/")
    assert mlflow.get_tracking_uri() == other
    assert os.environ["MLFLOW_TRACKING_URI"] == other


def test_a_model_that_cannot_be_logged_is_recorded_and_warned_about(store: dict[str, Any],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    cfg = pipe(uri=store["uri"])
    tracker = Tracker(store["uri"], "unit")
    missing = Path(store["weights"]).parent / "gone" / "model.pt"
    entry = PhaseEntry(best_checkpoint=str(missing), steps=4, mlflow_model_uri="models:/stale")
    with caplog.at_level(logging.WARNING, logger="raytrain"):
        log_phase_model(tracker, cfg, cfg.phases[0], entry, tracker.start("a"))  # does not raise
    assert (entry.mlflow_model_error or "").startswith(f"CheckpointError: checkpoint {missing} does not exist")
    assert entry.mlflow_model_uri is None  # nothing stale left behind
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    text = record.getMessage()
    assert "phase 'a' finished, but its model could not be logged in MLflow" in text
    assert str(missing) in text and "mlflow_model_error" in text


def test_log_model_false_and_disabled_tracking_log_nothing(store: dict[str, Any]) -> None:
    for cfg, tracker in ((pipe(uri=store["uri"], log_model=False), Tracker(store["uri"], "unit")),
                         (pipe(enabled=False), Tracker(store["uri"], "unit", enabled=False))):
        entry = PhaseEntry(best_checkpoint=str(store["weights"]), steps=4)
        log_phase_model(tracker, cfg, cfg.phases[0], entry, tracker.start("a"))
        assert set(entry.model_dump(exclude_defaults=True)) == {"best_checkpoint", "steps"}


def test_a_sweep_of_the_final_phase_registers_only_its_best_finished_trial(store: dict[str, Any],
                                                                           tmp_path: Path) -> None:
    import json

    from raytrain.config.loader import with_values
    from raytrain.config.sweep import SweepConfig
    from raytrain.tune import TRIAL_TRACKING, Sweep

    cfg = load_config(raw={
        "name": "unit", "runs_dir": str(tmp_path / "runs"), "data": {"tr": {"shards": "nowhere"}}, "model": MODEL,
        "tracking": {"uri": store["uri"], "register_as": "unit_sep"},
        "defaults": {"train": ["tr"], "eval": "tr", "losses": {"si_sdr_pit": 1.0}, "metrics": ["si_sdri"]},
        "phases": [{"name": "a"}, {"name": "b", "init_from": "a"}]})
    sweep_of = {"metric": "eval/si_sdri", "mode": "max", "num_samples": 2,
                "params": {"phases.b.optim.lr": {"choice": [1e-3, 3e-3]}}, "scheduler": {"name": "fifo"}}
    sweep = Sweep(cfg, SweepConfig.model_validate({**sweep_of, "phase": "b"}), sweep_dir=tmp_path / "sweep")
    trial_cfg = with_values(cfg, {"phases.b.optim.lr": 3e-3, **TRIAL_TRACKING})
    assert trial_cfg.tracking.register_as is None  # what a trial runs with: it logs its model, registers none
    rows = {}
    for tid in ("t1", "t2"):  # two trials of b, logged as a trial logs them; their rows as the sweep collects them
        entry = PhaseEntry(best_checkpoint=str(store["weights"]), steps=4)
        log_phase_model(sweep.tracker, trial_cfg, trial_cfg.phase("b"), entry, sweep.tracker.start(f"trial {tid}"))
        assert entry.mlflow_registered_model is None
        rows[tid] = {"trial": tid, "status": "finished", "mlflow_model_uri": entry.mlflow_model_uri}
    assert sweep.tracker.client.search_model_versions("name='unit_sep'") == []
    sweep.state["best_finished"] = rows["t2"]
    assert sweep.register_best() == {"name": "unit_sep", "version": "1", "trial": "t2"}
    assert sweep.register_best() == {"name": "unit_sep", "version": "1", "trial": "t2"}  # a resumed sweep: once
    (version,) = sweep.tracker.client.search_model_versions("name='unit_sep'")
    assert version.source == rows["t2"]["mlflow_model_uri"]
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["registered_model"]["trial"] == "t2"
    earlier = Sweep(cfg, SweepConfig.model_validate({**sweep_of, "phase": "a", "params": {
        "phases.a.optim.lr": {"choice": [1e-3, 3e-3]}}}), sweep_dir=tmp_path / "sweep_a")
    earlier.state["best_finished"] = rows["t1"]
    assert earlier.register_best() is None  # not the final phase: the run that continues from it registers
