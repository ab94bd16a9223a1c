"""`raytrain tune` end to end on local Ray: the phase before the swept one runs once, ASHA stops
trials, every trial is a nested MLflow run, a killed sweep resumes without re-running finished
trials, and `--then-continue` runs the later phase from the best trial's checkpoint. A stopped trial
gives its workers' CPUs back."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from datasets_prep import faults

from ._procs import local_head
from .conftest import checkpoints_of, crash, pipeline_dict, raytrain_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

SWEEP = {
    "phase": "b", "metric": "eval/si_sdri", "mode": "max", "num_samples": 3, "max_concurrent_trials": 1,
    "params": {"phases.b.optim.lr": {"loguniform": [3e-4, 3e-2]},
               "phases.b.transforms.0.args.crop_seconds": {"choice": [0.4, 0.6]}},
    "searcher": {"name": "random", "seed": 0},
    "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
}
B_STEPS = 8  # steps of the swept phase b: ASHA's rungs at 2, 4 and 8


def _started_trials(sweep_dir: Path) -> list[Path]:
    """Trial folders in the order their training started (one trial at a time)."""
    logs = sorted((sweep_dir / "trials").glob("*/starts.log"), key=lambda p: p.stat().st_mtime)
    return [p.parent for p in logs]


def test_sweep_runs_phase_a_once_resumes_without_rerunning_trials_and_continues_from_the_best(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    raw = pipeline_dict(corpus, tmp_path / "runs")
    raw["phases"] = [
        {"name": "a", "max_steps": 4, "eval_every": 4, "checkpoint_every": 4},
        {"name": "b", "init_from": "a", "max_steps": B_STEPS, "eval_every": 2, "checkpoint_every": 4},
        {"name": "c", "init_from": "b", "max_steps": 3, "eval_every": 3, "checkpoint_every": 3},
    ]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SWEEP))
    sweep_dir = tmp_path / "sweep"
    args = ["tune", str(tmp_path / "p.yaml"), "--sweep", str(tmp_path / "s.yaml"), "--sweep-dir", str(sweep_dir)]

    monkeypatch.setenv(faults.ENV, "trial=2")  # the second trial stops as it starts: no race to kill the sweep
    first = raytrain_cli(*args, log=tmp_path / "first.log")
    marker, deadline = faults.marker_path("trial", 2, sweep_dir), time.monotonic() + 500
    while not marker.exists():
        assert first.poll() is None and time.monotonic() < deadline, (
            f"the second trial did not pause (exit code {first.poll()}):\n" + (tmp_path / "first.log").read_text()[-3000:])
        time.sleep(0.2)
    done_before = _started_trials(sweep_dir)[:1]  # ended: the second has started
    assert len(_started_trials(sweep_dir)) == 2
    crash(first)
    assert json.loads((sweep_dir / "sweep.json").read_text())["status"] == "running"

    resumed = raytrain_cli(*args, "--resume", "--then-continue", log=tmp_path / "resume.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resume.log").read_text()[-4000:]
    log = (tmp_path / "resume.log").read_text()
    state = json.loads((sweep_dir / "sweep.json").read_text())
    assert state["status"] == "finished" and len(state["trials"]) == 3

    # Trials that had ended were not started again; the rest ran; ASHA stopped some.
    for t in done_before:
        assert len((t / "starts.log").read_text().splitlines()) == 1, t.name
    statuses = [r["status"] for r in state["trials"]]
    assert set(statuses) <= {"finished", "stopped early"} and "stopped early" in statuses, (
        statuses, [r["error"] for r in state["trials"]], log[-4000:])
    assert all(r["steps"] == B_STEPS for r in state["trials"] if r["status"] == "finished")
    assert all(r["steps"] < B_STEPS for r in state["trials"] if r["status"] == "stopped early")

    # The table is sorted by the metric and the best trial is its first row.
    metrics = [r["metric"] for r in state["trials"]]
    assert metrics == sorted(metrics, reverse=True) and state["best"]["trial"] == state["trials"][0]["trial"]
    assert "trials by eval/si_sdri (max):" in log and (sweep_dir / "sweep.png").stat().st_size > 1000
    best_cfg = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best_cfg["phases"][1]["optim"]["lr"] == pytest.approx(state["best"]["values"]["phases.b.optim.lr"])

    # Phase a ran once, in base/, and every trial started from that checkpoint.
    base_a = json.loads((sweep_dir / "base" / "summary.json").read_text())["phases"]["a"]
    assert len(checkpoints_of(sweep_dir / "base" / "a")) == 1
    for r in state["trials"]:
        trial = json.loads((Path(r["dir"]) / "summary.json").read_text())
        assert trial["phases"]["a"]["best_checkpoint"] == base_a["best_checkpoint"]
        assert not (Path(r["dir"]) / "a").exists()
        report = json.loads((Path(r["dir"]) / "b" / "load_report.json").read_text())
        assert report["source"] == base_a["best_checkpoint"]

    # --then-continue: one pipeline run whose phase c starts from the best finished trial's phase b.
    cont = json.loads((Path(state["continued"]) / "summary.json").read_text())
    best = state["best_finished"]
    assert cont["status"] == "finished" and cont["sweep"]["trial"] == best["trial"]
    assert cont["phases"]["b"]["from_trial"] == best["trial"]
    best_b = json.loads((Path(best["dir"]) / "summary.json").read_text())["phases"]["b"]["best_checkpoint"]
    assert json.loads((Path(state["continued"]) / "c" / "load_report.json").read_text())["source"] == best_b
    assert cont["phases"]["c"]["status"] == "finished" and cont["phases"]["c"]["steps"] == 3

    # MLflow: the sweep run, phase a's run once under it, one nested run per trial with its status.
    client = MlflowClient(state["mlflow_uri"])
    exp = client.get_experiment_by_name("it_sep")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    by_name: dict[str, list] = {}
    for run in runs:
        by_name.setdefault(run.info.run_name, []).append(run)
    sweep_run = by_name["sweep b"][0]
    assert sweep_run.info.status == "FINISHED" and sweep_run.info.run_id == state["mlflow_run_id"]
    assert len(by_name["a"]) == 1  # phase a: once for the whole sweep (the continued run reuses it)
    trial_runs = [r for name, rs in by_name.items() if name.startswith("trial ") for r in rs]
    finished_ids = {r["mlflow_run_id"] for r in state["trials"]}
    assert {r.info.run_id for r in trial_runs} >= finished_ids
    for r in state["trials"]:
        run = client.get_run(r["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == state["mlflow_run_id"]
        assert run.data.tags["raytrain.trial_status"] == r["status"]
        assert run.info.status == ("FINISHED" if r["status"] == "finished" else "KILLED")
        assert float(run.data.params["phase.optim.lr"]) == pytest.approx(r["values"]["phases.b.optim.lr"])
    assert {a.path for a in client.list_artifacts(state["mlflow_run_id"])} >= {"sweep.png", "best.yaml",
                                                                               "trials.txt"}


def test_a_trial_stopped_mid_phase_gives_its_workers_cpus_back(corpus: Path, tmp_path: Path, ray_local: Any) -> None:
    """A trial that ASHA stops is an actor killed while its phase trains. Ray removes a placement group only
    when both its creator (the phase's Train controller, which dies with the trial) and its job (the sweep's
    driver, which goes on) have ended: without Ray Train's placement-group cleaner each stopped trial kept its
    worker group's CPUs, and on 2 CPUs the sweep hung after two stops. Here an actor runs a long phase as a
    trial does and is killed once the phase trains: its placement group must go. With a second Ray on the
    machine (another user's, a test's): the cleaner must poll the State API of its own Ray, which it finds
    by `RAY_API_SERVER_ADDRESS` (raytrain.session), not by looking for "the" Ray on the machine."""
    import ray

    raw = pipeline_dict(corpus, tmp_path / "runs")
    raw["phases"] = [{"name": "a", "max_steps": 100_000, "eval_every": 100_000, "checkpoint_every": 2}]

    @ray.remote(num_cpus=0.01)  # what a trial's own function reserves (raytrain.tune.TRIAL_CPU)
    class TrialLike:
        def run(self, raw: dict[str, Any]) -> None:
            from raytrain.config import load_config
            from raytrain.pipeline import PipelineRunner

            PipelineRunner(load_config(raw=raw), progress=False).run()

    def live_groups() -> dict[str, float]:  # placement group -> CPUs it reserves
        return {pg_id: sum(b.get("CPU", 0.0) for b in info["bundles"].values())
                for pg_id, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"}

    with local_head(tmp_path):  # a second Ray on the machine
        before = set(live_groups())
        trial = TrialLike.remote()
        ref = trial.run.remote(raw)
        deadline = time.monotonic() + 120
        # Stopped once it trains (its first checkpoint is written), as ASHA stops a trial at an evaluation.
        while not list((tmp_path / "runs").glob("*/*/a/ray/checkpoint_*")):
            ready, _ = ray.wait([ref], timeout=0)
            assert not ready, f"the phase ended before it was stopped: {ray.get(ref)}"
            assert time.monotonic() < deadline, "the phase did not reach its first checkpoint"
            time.sleep(0.2)
        held = {k: v for k, v in live_groups().items() if k not in before and v > 0}
        assert held, "the phase trains without a placement group holding CPUs"
        ray.kill(trial, no_restart=True)  # the trial's actor ends (Tune stops it): its controller goes with it
        deadline = time.monotonic() + 60
        while set(held) & set(live_groups()):
            assert time.monotonic() < deadline, f"the stopped trial's placement group still holds its CPUs: {held}"
            time.sleep(0.5)
