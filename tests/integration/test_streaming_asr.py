"""configs/pipelines/streaming_asr_tiny.yaml end to end on local Ray with a tiny model and few steps:
the encoder swap's load report, frozen heads, per-group LR schedules, the evaluate phase, `ckpt diff`,
streaming `infer`, and a worker killed mid-phase that Ray Train restarts from the last checkpoint to the
uninterrupted weights (a killed driver continued by `raytrain run --resume`: tests/integration/test_resume.py,
the same checkpoints and data positions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from raytrain.checkpoints import load_weights
from raytrain.config import load_config
from raytrain.config.schema import ScheduleConfig
from raytrain.optim import lr_factor
from raytrain.pipeline import PipelineRunner

from ._recipes import base_overrides, yaml_of

YAML = yaml_of("streaming_asr_tiny")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def asr_corpus(recipe_data: Any) -> Path:
    """raw/ and shards/ (train, dev, test from a TSV manifest, test_heldout) of configs/prep/streaming_asr_tiny.yaml
    with a few voices and sentences."""
    return recipe_data("streaming_asr_tiny")


def _overrides(corpus: Path, runs: Path, steps: tuple[int, int, int]) -> list[str]:
    out = base_overrides("streaming_asr_tiny", corpus, runs) + ["defaults.log_every=1"]
    for name, n in zip(("conformer", "emformer_heads", "emformer_full"), steps, strict=True):
        out += [f"phases.{name}.max_steps={n}", f"phases.{name}.eval_every={n}",
                f"phases.{name}.checkpoint_every={n // 2}", f"phases.{name}.schedule.warmup_steps=2"]
    return out


@pytest.fixture(scope="module")
def asr_run(recipe_run: Any) -> dict[str, Any]:
    """The recipe cut short (tests/integration/_recipes.py), shared with test_recipes.py."""
    run = recipe_run("streaming_asr_tiny")
    return {**run, "corpus": run["root"]}


def test_every_phase_finishes_with_cer_after_each(asr_run: dict[str, Any]) -> None:
    s = asr_run["summary"]
    assert s["status"] == "finished"
    assert list(s["phases"]) == ["conformer", "emformer_heads", "emformer_full", "test", "test_heldout"]
    for name, entry in s["phases"].items():
        assert entry["status"] == "finished"
        assert 0.0 <= entry["final_metrics"]["eval/cer"] and "eval/wer" in entry["final_metrics"], name
    test = s["phases"]["test"]
    assert test["steps"] == 0 and test["gates"][0]["metric"] == "eval/cer" and test["gates"][0]["passed"]
    # The evaluate phase scored emformer_full's best weights, unchanged.
    scored, source = load_weights(test["last_checkpoint"]), load_weights(s["phases"]["emformer_full"]["best_checkpoint"])
    assert all(torch.equal(scored[k], source[k]) for k in source)


def test_load_report_of_the_swap_skips_the_encoder_and_loads_the_heads(asr_run: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    phase_dir = asr_run["run_dir"] / "emformer_heads"
    report = json.loads((phase_dir / "load_report.json").read_text())
    assert {"asr_ctc.weight", "asr_ctc.bias", "phone_ctc.weight", "phone_ctc.bias"} == set(report["loaded"])
    skipped = dict((k, why) for k, why in report["skipped_by_name"])
    assert skipped and all(k.startswith("encoder.") and why == "excluded" for k, why in skipped.items())
    assert any(k.startswith("encoder.body.conformer_layers") for k in skipped)  # the old encoder's keys
    assert all(k.startswith("encoder.") for k in report["not_initialised"])  # the Emformer starts fresh
    table = (phase_dir / "load_report.txt").read_text()
    assert "asr_ctc.weight" in table and "skipped (name)" in table
    run_id = asr_run["summary"]["phases"]["emformer_heads"]["mlflow_run_id"]
    client = MlflowClient(asr_run["summary"]["mlflow_uri"])
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"load_report.json", "load_report.txt"} <= arts
    text = Path(client.download_artifacts(run_id, "load_report.txt", str(asr_run["runs"]))).read_text()
    assert text.splitlines()[1].split() == ["key", "action", "detail"]  # a table under its header line


def test_frozen_heads_are_bitwise_unchanged_through_emformer_heads(asr_run: dict[str, Any]) -> None:
    phases = asr_run["summary"]["phases"]
    before = load_weights(phases["conformer"]["best_checkpoint"])
    after = load_weights(phases["emformer_heads"]["last_checkpoint"])
    for k in ("asr_ctc.weight", "asr_ctc.bias", "phone_ctc.weight", "phone_ctc.bias"):
        assert torch.equal(before[k], after[k]), k
    full = load_weights(phases["emformer_full"]["last_checkpoint"])
    assert not torch.equal(full["asr_ctc.weight"], after["asr_ctc.weight"])  # unfrozen in emformer_full


def test_both_lr_groups_follow_their_schedules_in_emformer_full(asr_run: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    phase = asr_run["cfg"].phase("emformer_full")
    client = MlflowClient(asr_run["summary"]["mlflow_uri"])
    run_id = asr_run["summary"]["phases"]["emformer_full"]["mlflow_run_id"]
    sched = ScheduleConfig(**phase.schedule.model_dump())
    groups = {g.patterns[0]: g.lr for g in phase.param_groups}
    assert groups["encoder.*"] > groups["*"]  # the encoder learns faster than the heads
    for label, base in (("encoder", groups["encoder.*"]), ("rest", groups["*"])):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, f"lr/{label}"))
        assert [s for s, _ in history] == list(range(1, phase.max_steps + 1))
        for step, value in history:  # logged after `step` optimizer steps: the LR of the next one
            assert value == pytest.approx(base * lr_factor(step, sched, phase.max_steps), rel=1e-6), (label, step)


def test_ckpt_diff_prints_what_init_from_would_load(asr_run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from raytrain.cli import main

    ckpt = asr_run["summary"]["phases"]["conformer"]["best_checkpoint"]
    args = ["ckpt", "diff", ckpt, str(YAML), "--phase", "emformer_heads"]
    for o in asr_run["overrides"]:
        args += ["-o", o]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4 loaded" in out and "asr_ctc.weight" in out and "excluded" in out
    assert main(["ckpt", "diff", ckpt, str(YAML), "--phase", "nope"]) == 2


def test_streaming_infer_transcribes_a_tsv_and_reports_agreement_latency_and_rtf(
        asr_run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from raytrain.cli import main

    tsv = asr_run["corpus"] / "raw" / "test.tsv"
    assert main(["infer", str(asr_run["run_dir"]), str(tsv), "--phase", "emformer_full", "--chunk-ms", "320"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    utterances = len(tsv.read_text().splitlines()) - 1  # under its header line
    assert utterances >= 4 and len([ln for ln in lines if "\t" in ln]) == utterances  # one transcript each
    assert "transcripts equal the full-utterance ones" in out and "real-time factor" in out
    assert "full: CER" in out and "streamed: CER" in out


CONFORMER_STEPS = 40
def _conformer_only(corpus: Path, runs: Path, *extra: str) -> list[str]:
    """Overrides for a 40-step conformer phase that checkpoints every 5 steps."""
    return _overrides(corpus, runs, steps=(CONFORMER_STEPS, 2, 2)) + ["phases.conformer.checkpoint_every=5",
                                                                      "phases.conformer.eval_every=20", *extra]


@pytest.fixture(scope="module")
def uninterrupted_conformer(asr_corpus: Path, ray_local: Any, tmp_path_factory: pytest.TempPathFactory) -> dict:
    runs = tmp_path_factory.mktemp("plain")
    cfg = load_config(YAML, _conformer_only(asr_corpus, runs))
    return PipelineRunner(cfg, progress=False, only=["conformer"]).run()["phases"]["conformer"]


def _same_weights(a_ckpt: str, b_ckpt: str) -> None:
    a, b = load_weights(a_ckpt), load_weights(b_ckpt)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"


def test_a_worker_killed_mid_phase_is_restarted_and_ends_with_the_uninterrupted_weights(
        asr_corpus: Path, uninterrupted_conformer: dict, tmp_path: Path) -> None:
    over = _conformer_only(asr_corpus, tmp_path, "phases.conformer.fail_at_step=22", "scaling.max_failures=1")
    faulted = PipelineRunner(load_config(YAML, over), progress=False, only=["conformer"]).run()["phases"]["conformer"]
    plain = uninterrupted_conformer
    assert faulted["status"] == plain["status"] == "finished"
    assert faulted["steps"] == plain["steps"] == CONFORMER_STEPS
    assert (Path(faulted["dir"]) / ".fail_at_step.done").exists()  # the worker did die at step 22
    _same_weights(plain["last_checkpoint"], faulted["last_checkpoint"])
    assert faulted["final_metrics"]["eval/cer"] == pytest.approx(plain["final_metrics"]["eval/cer"], abs=1e-9)
