"""`raytrain plan` pre-flight checks and the phase table (no Ray, models on the meta device)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from datasets_prep.shards import ShardWriter
from raytrain.config import ConfigError, load_config
from raytrain.models import build_model
from raytrain.plan import check_pipeline, format_plan

TINY = dict(sample_rate=8000, enc_kernel_size=16, enc_num_feats=32, msk_num_feats=32, msk_num_hidden_feats=64,
            msk_num_layers=2, msk_num_stacks=1)
N_TOTAL = sum(p.numel() for p in build_model("convtasnet", TINY).parameters())
N_ENCODER = 32 * 1 * 16


MIX = [{"name": "dynamic_mix", "args": {"num_speakers": 2, "crop_seconds": 1.0}}]  # speech rows -> mix, s1, s2


def pipeline(tmp_path: Path, **top: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "plan_test",
        "seed": 7,
        "data": {"train": {"shards": str(tmp_path / "shards" / "train")},
                 "dev": {"shards": str(tmp_path / "shards" / "dev")}},
        "model": {"name": "convtasnet", "args": dict(TINY)},
        "defaults": {"train": ["train"], "eval": "dev", "losses": {"si_sdr_pit": 1.0},
                     "metrics": ["si_sdri"], "optim": {"name": "adam", "lr": 1e-3}, "batch_size": 4,
                     "transforms": MIX, "eval_transforms": MIX},
        "phases": [
            {"name": "short", "max_steps": 200, "schedule": {"warmup_steps": 10}},
            {"name": "long", "init_from": "short", "optim": {"lr": 5e-4},
             "schedule": {"decay": "cosine", "min_lr_ratio": 0.1}, "max_steps": 100, "grad_accum": 2},
        ],
    }
    raw.update(top)
    return raw


def plan_error(raw: dict[str, Any], **kw: Any) -> str:
    cfg = load_config(raw=raw)
    with pytest.raises(ConfigError) as info:
        check_pipeline(cfg, **kw)
    return str(info.value)


def write_speech(folder: Path, *, sample_rate: int = 8000, seconds: float = 9.0, rows: int = 4) -> None:
    n = int(seconds * sample_rate)
    with ShardWriter(folder, kind="speech", sample_rate=sample_rate, audio_columns=["audio"], rows_per_shard=2) as w:
        for i in range(rows):
            w.write({"id": f"spk{i % 2}/u{i}", "speaker": f"spk{i % 2}", "text": "hello",
                     "audio": np.zeros(n, dtype=np.float32)})


# -- data -----------------------------------------------------------------------------------


def test_unprepared_data_plans_without_require_data(tmp_path) -> None:
    cfg = load_config(raw=pipeline(tmp_path))
    plans = check_pipeline(cfg)
    assert [p.phase.name for p in plans] == ["short", "long"]
    assert [(role, name, m) for role, name, m in plans[0].datasets] == [("train", "train", None),
                                                                         ("eval", "dev", None)]
    text = format_plan(cfg, plans)
    assert text.startswith("pipeline plan_test (seed 7, 2 phases)\n")
    assert "    train    train x1: NOT PREPARED (no _manifest.json)" in text
    assert "    eval     dev: NOT PREPARED (no _manifest.json)" in text
    assert plans[0].sample_rate == 8000


def test_unprepared_data_fails_with_require_data(tmp_path) -> None:
    msg = plan_error(pipeline(tmp_path), require_data=True)
    assert msg.startswith("the pipeline has problems:\n")
    train = tmp_path / "shards" / "train"
    assert f"data.train.shards: {train} has no _manifest.json; prepare it first" in msg
    assert "raytrain prep configs/prep/<name>.yaml" in msg


def test_prepared_data_shows_rows_and_hours(tmp_path) -> None:
    write_speech(tmp_path / "shards" / "train", rows=4, seconds=9.0)  # 36 s = 0.01 h
    write_speech(tmp_path / "shards" / "dev", rows=2, seconds=1.0)
    cfg = load_config(raw=pipeline(tmp_path))
    plans = check_pipeline(cfg, require_data=True)
    manifest = plans[0].datasets[0][2]
    assert manifest is not None and manifest["rows"] == 4
    text = format_plan(cfg, plans)
    assert "    train    train x1: 4 rows, 0.01 h, 2 speakers, 8000 Hz, speech" in text
    assert "    eval     dev: 2 rows, 0.00 h, 2 speakers, 8000 Hz, speech" in text
    assert "NOT PREPARED" not in text


def test_train_weights_show_in_table(tmp_path) -> None:
    raw = pipeline(tmp_path)
    raw["phases"][0]["train"] = {"train": 3, "dev": 1}
    cfg = load_config(raw=raw)
    text = format_plan(cfg, check_pipeline(cfg))
    assert "    train    train x3: NOT PREPARED" in text
    assert "    train    dev x1: NOT PREPARED" in text


def test_unknown_dataset_name_suggests(tmp_path) -> None:
    raw = pipeline(tmp_path)
    raw["phases"][1]["eval"] = "devv"
    raw["phases"][0]["train"] = ["trian"]
    msg = plan_error(raw)
    assert ("phases[0](short).train: dataset 'trian' is not under 'data'. Did you mean 'train'? "
            "Defined: train, dev") in msg
    assert "phases[1](long).eval: dataset 'devv' is not under 'data'. Did you mean 'dev'?" in msg


def test_sample_rate_mismatch_between_model_and_data(tmp_path) -> None:
    write_speech(tmp_path / "shards" / "train", sample_rate=16000, seconds=0.5)
    write_speech(tmp_path / "shards" / "dev", sample_rate=16000, seconds=0.5)
    msg = plan_error(pipeline(tmp_path))
    assert "phases[0](short): model sample_rate 8000 but the data is 16000 Hz" in msg
    assert "set model.args.sample_rate or prepare the data at the model's rate" in msg
    assert "phases[1](long): model sample_rate 8000" in msg


def test_datasets_with_different_rates(tmp_path) -> None:
    write_speech(tmp_path / "shards" / "train", sample_rate=8000, seconds=0.5)
    write_speech(tmp_path / "shards" / "dev", sample_rate=16000, seconds=0.5)
    msg = plan_error(pipeline(tmp_path))
    assert "phases[0](short): datasets have different sample rates [8000, 16000]; resample them" in msg


def test_matching_sample_rate_is_fine(tmp_path) -> None:
    write_speech(tmp_path / "shards" / "train", sample_rate=8000, seconds=0.5)
    write_speech(tmp_path / "shards" / "dev", sample_rate=8000, seconds=0.5)
    plans = check_pipeline(load_config(raw=pipeline(tmp_path)), require_data=True)
    assert [p.sample_rate for p in plans] == [8000, 8000]


# -- init_from ------------------------------------------------------------------------------


def test_init_from_earlier_phase_is_shown(tmp_path) -> None:
    cfg = load_config(raw=pipeline(tmp_path))
    plans = check_pipeline(cfg)
    assert [p.init for p in plans] == ["fresh init", "phase short (best)"]
    text = format_plan(cfg, plans)
    assert "    init     fresh init" in text and "    init     phase short (best)" in text


def test_init_from_later_phase_is_an_error(tmp_path) -> None:
    raw = pipeline(tmp_path)
    raw["phases"][0]["init_from"] = "long"
    msg = plan_error(raw)
    assert ("phases[0](short).init_from: phase 'long' runs after 'short'; init_from must name an earlier phase"
            in msg)


def test_init_from_missing_phase_is_an_error(tmp_path) -> None:
    raw = pipeline(tmp_path)
    raw["phases"][1]["init_from"] = {"phase": "shrot", "checkpoint": "last"}
    msg = plan_error(raw)
    assert "phases[1](long).init_from: no phase named 'shrot'; earlier phases: ['short']" in msg


def test_init_from_missing_path_is_an_error(tmp_path) -> None:
    raw = pipeline(tmp_path)
    missing = tmp_path / "old" / "model.pt"
    raw["phases"][1]["init_from"] = {"path": str(missing)}
    msg = plan_error(raw)
    assert f"phases[1](long).init_from.path: checkpoint {missing} does not exist" in msg


def test_duplicate_phase_name(tmp_path) -> None:
    raw = pipeline(tmp_path)
    raw["phases"][1]["name"] = "short"
    raw["phases"][1]["init_from"] = None
    assert "phases[1](short).name: phase name 'short' is used twice" in plan_error(raw)


# -- model, freezing, registries ------------------------------------------------------------


def test_freeze_counts_on_convtasnet(tmp_path) -> None:
    raw = pipeline(tmp_path)
    raw["phases"][1]["freeze"] = ["net.encoder.*"]
    cfg = load_config(raw=raw)
    plans = check_pipeline(cfg)
    assert (plans[0].n_trainable, plans[0].n_frozen) == (N_TOTAL, 0)
    assert (plans[1].n_trainable, plans[1].n_frozen) == (N_TOTAL - N_ENCODER, N_ENCODER)
    text = format_plan(cfg, plans)
    assert f"    params   {N_TOTAL - N_ENCODER:,} trainable, {N_ENCODER:,} frozen" in text


def test_trainable_counts_on_convtasnet(tmp_path) -> None:
    raw = pipeline(tmp_path)
    raw["phases"][1]["trainable"] = ["net.encoder.*", "net.decoder.*"]
    plans = check_pipeline(load_config(raw=raw))
    assert (plans[1].n_trainable, plans[1].n_frozen) == (2 * N_ENCODER, N_TOTAL - 2 * N_ENCODER)


def test_freeze_pattern_matching_nothing(tmp_path) -> None:
    raw = pipeline(tmp_path)
    raw["phases"][1]["freeze"] = ["encoder.*"]
    msg = plan_error(raw)
    assert "phases[1](long).freeze: pattern 'encoder.*' matches no parameter. Top-level prefixes: net.*" in msg


def test_param_group_pattern_matching_nothing(tmp_path) -> None:
    raw = pipeline(tmp_path)
    raw["phases"][0]["param_groups"] = [{"params": "net.encoder.*", "lr": 1e-4}, {"params": "net.decoderr.*"}]
    msg = plan_error(raw)
    assert "phases[0](short).param_groups[1].params: pattern 'net.decoderr.*' matches no parameter" in msg


def test_everything_frozen_is_an_error(tmp_path) -> None:
    raw = pipeline(tmp_path)
    raw["phases"][0]["freeze"] = ["*"]
    assert "phases[0](short): every parameter is frozen; nothing to train" in plan_error(raw)


def test_bad_model_argument_names_phase_and_argument(tmp_path) -> None:
    raw = pipeline(tmp_path)
    raw["phases"][1]["model"] = {"name": "convtasnet", "args": {**TINY, "enc_num_feat": 16}}
    msg = plan_error(raw)
    assert "phases[1](long).model: model 'convtasnet': unknown argument 'enc_num_feat'" in msg
    assert "did you mean 'enc_num_feats'?" in msg


def test_unknown_loss_metric_and_transform(tmp_path) -> None:
    raw = pipeline(tmp_path)
    raw["phases"][0].update(losses={"si_sdr_pti": 1.0}, metrics=["si_sdrr"],
                            transforms=[{"name": "dynamic_mx"}])
    msg = plan_error(raw)
    assert "phases[0](short).losses: unknown loss 'si_sdr_pti'. Did you mean 'si_sdr_pit'?" in msg
    assert "phases[0](short).metrics: unknown metric 'si_sdrr'." in msg
    assert "phases[0](short).transforms: unknown transform 'dynamic_mx'. Did you mean 'dynamic_mix'?" in msg


def test_gate_on_eval_metric_needs_eval(tmp_path) -> None:
    raw = pipeline(tmp_path)
    raw["defaults"].pop("eval")
    raw["phases"][0]["gates"] = [{"metric": "eval/si_sdri", "min": 3}, {"metric": "si_sdri", "max": 1}]
    msg = plan_error(raw)
    assert "phases[0](short).gates: 'eval/si_sdri' needs an 'eval' dataset in this phase" in msg
    assert "phases[0](short).gates: metric 'si_sdri' should be 'eval/<name>' or 'train/<name>'" in msg


def test_a_relative_gate_names_an_earlier_phase(tmp_path) -> None:
    raw = pipeline(tmp_path)
    raw["phases"][0]["gates"] = [{"metric": "eval/si_sdri", "min": 0.0, "relative_to": "long"}]
    raw["phases"][1]["gates"] = [{"metric": "eval/si_sdri", "min": -0.5, "relative_to": "short"}]
    msg = plan_error(raw)
    assert "phases[0](short).gates: relative_to 'long' is not an earlier phase (earlier phases: none)" in msg
    assert "phases[1]" not in msg


def test_a_relative_gate_bounds_the_difference_from_the_other_phase() -> None:
    from raytrain.config.schema import GateConfig
    from raytrain.pipeline import check_gate, gate_text
    from raytrain.runs import PhaseEntry

    gate = GateConfig(metric="eval/secs", min=-0.03, relative_to="teacher")
    teacher = PhaseEntry(final_metrics={"eval/secs": 0.79})
    ok, low = check_gate(gate, {"eval/secs": 0.77}, teacher), check_gate(gate, {"eval/secs": 0.70}, teacher)
    assert ok.passed and ok.value == pytest.approx(-0.02) and ok.reference == 0.79
    assert not low.passed and gate_text(low) == "eval/secs - teacher's 0.79 = -0.09 (needs >= -0.03) FAILED"
    missing = check_gate(gate, {"eval/secs": 0.8}, PhaseEntry(final_metrics={}))
    assert not missing.passed and "teacher's missing = missing" in gate_text(missing)


def test_a_ratio_gate_bounds_the_ratio_to_the_other_phase() -> None:
    from raytrain.config.schema import GateConfig
    from raytrain.pipeline import check_gate, gate_text
    from raytrain.runs import PhaseEntry

    gate = GateConfig(metric="eval/latent_mse", max=0.75, ratio_to="base")
    base = PhaseEntry(final_metrics={"eval/latent_mse": 0.2})
    ok, high = check_gate(gate, {"eval/latent_mse": 0.1}, base), check_gate(gate, {"eval/latent_mse": 0.18}, base)
    assert ok.passed and ok.value == pytest.approx(0.5) and ok.reference == 0.2 and ok.key == "eval/latent_mse/base"
    assert not high.passed and gate_text(high) == "eval/latent_mse / base's 0.2 = 0.9 (needs <= 0.75) FAILED"
    assert not check_gate(gate, {"eval/latent_mse": 0.1}, PhaseEntry(final_metrics={"eval/latent_mse": 0.0})).passed
    with pytest.raises(ValueError, match="not both"):
        GateConfig(metric="eval/x", max=1.0, relative_to="a", ratio_to="a")


def test_all_problems_are_listed_together(tmp_path) -> None:
    raw = pipeline(tmp_path)
    raw["phases"][0]["freeze"] = ["nope.*"]
    raw["phases"][1]["eval"] = "devv"
    msg = plan_error(raw)
    lines = msg.splitlines()
    assert lines[0] == "the pipeline has problems:"
    assert len([line for line in lines if line.startswith("  - ")]) == 2


# -- the table ------------------------------------------------------------------------------


def test_format_plan_table(tmp_path) -> None:
    raw = pipeline(tmp_path)
    raw["phases"][1]["gates"] = [{"metric": "eval/si_sdri", "min": 5.0}]
    raw["phases"][1]["param_groups"] = [{"params": "net.encoder.*", "lr": 1e-4}]
    cfg = load_config(raw=raw)
    text = format_plan(cfg, check_pipeline(cfg))
    assert "[0] short  (train)" in text and "[1] long  (train)" in text
    assert f"    params   {N_TOTAL:,} trainable, 0 frozen" in text
    assert "    losses   si_sdr_pit x1; metrics si_sdri" in text
    assert "    optim    adam lr 0.001, warmup 10, constant" in text
    assert "    optim    adam lr 0.0005, cosine -> 5e-05; net.encoder.*: lr 0.0001" in text
    assert "    batch    4 x accum 1 x 1 workers = 4; 200 steps; eval every 500, checkpoint every 500" in text
    assert "    batch    4 x accum 2 x 1 workers = 8; 100 steps" in text
    assert "    gates    eval/si_sdri >=5" in text
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_plan_does_not_touch_the_config(tmp_path) -> None:
    raw = pipeline(tmp_path)
    cfg = load_config(raw=raw)
    before = copy.deepcopy(cfg.model_dump())
    check_pipeline(cfg)
    assert cfg.model_dump() == before


# -- columns ---------------------------------------------------------------------------------------------
def test_a_column_the_dataset_lacks_is_an_error_naming_both(tmp_path) -> None:
    write_speech(tmp_path / "shards" / "train", rows=4, seconds=2.0)
    write_speech(tmp_path / "shards" / "dev", rows=2, seconds=1.0)
    raw = pipeline(tmp_path)
    raw["phases"][1]["eval_transforms"] = []  # dev holds single-speaker speech: no `mix` without mixing
    msg = plan_error(raw)
    assert ("phases[1](long).eval: dataset 'dev' has no column 'mix' (its manifest lists id, speaker, text, audio, "
            "num_samples, sample_rate), needed by model convtasnet") in msg
    assert "phases[0](short)" not in msg  # short mixes its eval rows: it has what it reads
