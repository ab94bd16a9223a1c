"""The phase pipeline end to end on local Ray: summary, hand-off, freezing, MLflow, infer."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from raytrain.checkpoints import load_weights
from raytrain.config import load_config
from raytrain.pipeline import PipelineError, PipelineRunner

from .conftest import controller_probe, controller_records, pipeline_dict

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def finished_run(corpus: Path, ray_local: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    runs = tmp_path_factory.mktemp("runs")
    raw = pipeline_dict(corpus, runs, freeze=["net.encoder.*", "net.decoder.*"],
                        gates=[{"metric": "eval/si_sdri", "min": -100.0}])
    probe = runs / "controllers.jsonl"
    runner = PipelineRunner(load_config(raw=raw), progress=False, train_callbacks=[controller_probe(probe)])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = runner.run()
    sys.stdout.write(printed.getvalue())
    return {"summary": summary, "run_dir": runner.run_dir, "runs": runs, "printed": printed.getvalue(),
            "controllers": controller_records(probe)}


def test_summary_lists_every_phase_with_metrics_and_checkpoints(finished_run: dict[str, Any]) -> None:
    run_dir: Path = finished_run["run_dir"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert list(summary["phases"]) == ["a", "b"]
    for name, steps in (("a", 8), ("b", 6)):
        entry = summary["phases"][name]
        assert entry["status"] == "finished"
        assert entry["steps"] == steps
        assert np.isfinite(entry["final_metrics"]["eval/si_sdri"])
        assert np.isfinite(entry["final_metrics"]["train/loss"])
        assert Path(entry["best_checkpoint"]).is_file() and Path(entry["last_checkpoint"]).is_file()
        assert entry["mlflow_run_id"]
    gate = summary["phases"]["b"]["gates"][0]
    assert gate["passed"] and gate["metric"] == "eval/si_sdri"
    # The small corpus is read into memory by a, and b (same folder, columns and file order) takes it as held.
    printed = finished_run["printed"]
    assert printed.count("data train: read once") == 1 and printed.count("data dev: read once") == 1
    assert "data train: held in memory since an earlier phase" in printed


def test_the_train_controller_of_each_phase_never_imports_torch(finished_run: dict[str, Any]) -> None:
    # ~1.2 s of every phase's start (raytrain/phases/backend.py); the DDP test below checks 2 workers.
    records = finished_run["controllers"]
    assert len(records) == 2 and len({r["pid"] for r in records}) == 2 and os.getpid() not in {r["pid"] for r in records}
    assert not any(r["torch"] for r in records), records


def test_frozen_parameters_are_bitwise_unchanged_and_the_rest_trained(finished_run: dict[str, Any]) -> None:
    phases = finished_run["summary"]["phases"]
    start = load_weights(phases["a"]["best_checkpoint"])  # b starts from a's best checkpoint
    end = load_weights(phases["b"]["last_checkpoint"])
    frozen = [k for k in start if k.startswith(("net.encoder.", "net.decoder."))]
    trained = [k for k in start if k.startswith("net.mask_generator.") and "weight" in k]
    assert frozen and trained
    for k in frozen:
        assert torch.equal(start[k], end[k]), f"frozen {k} moved"
    assert any(not torch.equal(start[k], end[k]) for k in trained), "no trainable weight moved"


def test_load_report_is_written_and_complete(finished_run: dict[str, Any]) -> None:
    phase_dir = finished_run["run_dir"] / "b"
    report = json.loads((phase_dir / "load_report.json").read_text())
    state = load_weights(finished_run["summary"]["phases"]["a"]["best_checkpoint"])
    assert sorted(report["loaded"]) == sorted(state)
    assert report["skipped_by_shape"] == [] and report["not_initialised"] == []
    assert "loaded" in (phase_dir / "load_report.txt").read_text()


def test_mlflow_has_parent_nested_phase_runs_metrics_and_artifacts(finished_run: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    summary = finished_run["summary"]
    client = MlflowClient(tracking_uri=summary["mlflow_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["phases.a.max_steps"] == "8"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["a", "b"]
    b = next(r for r in children if r.info.run_name == "b")
    assert b.info.status == "FINISHED"
    history = client.get_metric_history(b.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 4, 6]
    evals = client.get_metric_history(b.info.run_id, "eval/si_sdri")
    assert [m.step for m in evals] == [3, 6]
    artifacts = {a.path for a in client.list_artifacts(b.info.run_id)}
    assert {"config.yaml", "load_report.json", "load_report.txt", "checkpoint"} <= artifacts
    assert [a.path for a in client.list_artifacts(b.info.run_id, "checkpoint")] == ["checkpoint/model.pt"]


def test_infer_separates_a_new_file_at_its_own_rate(finished_run: dict[str, Any], tmp_path: Path) -> None:
    from raytrain.cli import main

    t = np.arange(16000 * 1.2) / 16000
    mix = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sign(np.sin(2 * np.pi * 3 * t)) * np.sin(2 * np.pi * 900 * t)
    wav = tmp_path / "mix.wav"
    sf.write(wav, mix.astype(np.float32), 16000)
    assert main(["infer", str(finished_run["run_dir"]), str(wav), "-o", str(tmp_path / "out")]) == 0
    outs = sorted((tmp_path / "out").glob("mix_s*.wav"))
    assert [p.name for p in outs] == ["mix_s1.wav", "mix_s2.wav"]
    for p in outs:
        data, sr = sf.read(p)
        assert sr == 16000 and len(data) == len(mix) and np.abs(data).max() > 0


def test_unmet_gate_stops_the_pipeline_and_resume_rechecks_it_on_the_stored_metrics(
        corpus: Path, ray_local: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from mlflow.tracking import MlflowClient

    raw = pipeline_dict(corpus, tmp_path)
    raw["phases"][0].update(max_steps=2, checkpoint_every=2, eval_every=2,
                            gates=[{"metric": "eval/si_sdri", "min": 90.0}])
    raw["phases"][1].update(max_steps=2, checkpoint_every=2, eval_every=2)
    runner = PipelineRunner(load_config(raw=raw), progress=False)
    with pytest.raises(PipelineError, match=r"gate not met after phase 'a': eval/si_sdri = .* \(needs >= 90.0\)"):
        runner.run()
    summary = json.loads((runner.run_dir / "summary.json").read_text())
    assert summary["phases"]["a"]["status"] == "gate_failed" and "b" not in summary["phases"]
    assert summary["status"] == "gate_failed"
    client = MlflowClient(tracking_uri=summary["mlflow_uri"])
    assert client.get_run(summary["phases"]["a"]["mlflow_run_id"]).info.status == "FAILED"
    # cache: auto holds the small corpus in memory: read once per phase, not every epoch.
    assert capsys.readouterr().out.count("data train: read once") == 1
    value = summary["phases"]["a"]["final_metrics"]["eval/si_sdri"]
    best = Path(summary["phases"]["a"]["best_checkpoint"])
    stamp = best.stat().st_mtime_ns
    ignored_dir = tmp_path / "copies" / "ignored"  # outside runs_dir: --resume below must not pick it
    shutil.copytree(runner.run_dir, ignored_dir)

    # The threshold edited, --resume: the gate is checked again on the stored metrics (no retraining) and
    # the pipeline goes on with b.
    raw["phases"][0]["gates"] = [{"metric": "eval/si_sdri", "min": -100.0}]
    # b (a student of a, say) is held to a's score: at most 100 dB below it.
    raw["phases"][1]["gates"] = [{"metric": "eval/si_sdri", "min": -100.0, "relative_to": "a"}]
    resumed = PipelineRunner(load_config(raw=raw), resume=True, progress=False)
    assert resumed.run_dir == runner.run_dir
    summary = resumed.run()
    out = capsys.readouterr().out
    assert "phase a: gate_failed earlier; re-checking its gates on the stored metrics (no retraining)" in out
    assert out.count("data train: read once") == 1  # b's training only
    a = summary["phases"]["a"]
    assert a["status"] == "finished" and a["gates"][0]["passed"] and a["final_metrics"]["eval/si_sdri"] == value
    assert best.stat().st_mtime_ns == stamp
    b = summary["phases"]["b"]
    assert b["status"] == "finished" and b["steps"] == 2
    assert b["gates"] == [{"metric": "eval/si_sdri", "relative_to": "a", "reference": value, "min": -100.0,
                           "passed": True,
                           "value": pytest.approx(b["final_metrics"]["eval/si_sdri"] - value)}]
    assert summary["status"] == "finished"
    assert client.get_run(b["mlflow_run_id"]).data.tags["gate.eval/si_sdri-a"].startswith(
        f"eval/si_sdri - a's {value:.4g} = ")
    assert client.get_run(a["mlflow_run_id"]).info.status == "FINISHED"
    assert client.get_run(a["mlflow_run_id"]).data.tags["gate.eval/si_sdri"].startswith("eval/si_sdri = ")

    # --ignore-gates with the unmet threshold: the failure is recorded and the pipeline runs on.
    raw["phases"][0]["gates"] = [{"metric": "eval/si_sdri", "min": 90.0}]
    summary = PipelineRunner(load_config(raw=raw), run_dir=ignored_dir, only=["a"], ignore_gates=True,
                             progress=False).run()
    assert "phase a: gate not met: eval/si_sdri = " in capsys.readouterr().out
    a = summary["phases"]["a"]
    assert a["status"] == "finished" and a["gates_ignored"] and not a["gates"][0]["passed"]
    assert a["gates"][0]["value"] == value and best.stat().st_mtime_ns == stamp


def test_nan_guard_skips_steps_then_aborts_with_a_clear_error(corpus: Path, ray_local: Any, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    raw = pipeline_dict(corpus, tmp_path)
    raw["phases"] = [{"name": "a", "max_steps": 20, "max_bad_steps": 3,
                      "losses": {"tests.integration._faults:nan_loss": 1.0}}]
    runner = PipelineRunner(load_config(raw=raw), progress=False)
    with pytest.raises(PipelineError, match=r"phase 'a' failed: NonFiniteLossError: phase 'a': 3 non-finite "
                                            r"steps in a row at step 0\. Lower optim.lr"):
        runner.run()
    summary = json.loads((runner.run_dir / "summary.json").read_text())
    assert summary["phases"]["a"]["status"] == "failed"
    client = MlflowClient(tracking_uri=summary["mlflow_uri"])
    assert client.get_run(summary["phases"]["a"]["mlflow_run_id"]).info.status == "FAILED"
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FAILED"


def test_two_ddp_workers_with_frozen_params_and_grad_accum(corpus: Path, ray_local: Any, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    raw = pipeline_dict(corpus, tmp_path)
    raw["data"]["train"]["cache"] = "stream"  # the cluster-scale path: shards streamed, split across workers
    raw["scaling"] = {"num_workers": 2}  # 0.5 CPU each on 2 CPUs: one CPU stays free for Ray Data
    raw["phases"] = [{"name": "a", "max_steps": 4, "grad_accum": 2, "eval_every": 4, "checkpoint_every": 4,
                      "freeze": ["net.encoder.*"]}]
    probe = tmp_path / "controllers.jsonl"
    summary = PipelineRunner(load_config(raw=raw), progress=False, train_callbacks=[controller_probe(probe)]).run()
    entry = summary["phases"]["a"]
    assert entry["status"] == "finished" and entry["steps"] == 4
    assert [r["torch"] for r in controller_records(probe)] == [False]  # one controller, without torch
    # Eval sums and counts are all-reduced: the mean covers all 8 dev mixtures across both ranks.
    assert np.isfinite(entry["final_metrics"]["eval/si_sdri"])
    from raytrain.models import build_model

    from .conftest import TINY_MODEL

    torch.manual_seed(7 * 1000)  # rank 0's seed: the frozen encoder must still be its fresh init
    fresh = build_model(TINY_MODEL["name"], dict(TINY_MODEL["args"])).state_dict()
    end = load_weights(entry["last_checkpoint"])
    assert torch.equal(fresh["net.encoder.weight"], end["net.encoder.weight"])
    assert not torch.equal(fresh["net.mask_generator.output_conv.weight"], end["net.mask_generator.output_conv.weight"])
    out = capsys.readouterr().out
    assert "data train: read once" not in out and "data dev: read once" in out
