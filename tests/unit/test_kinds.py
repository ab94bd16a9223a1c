"""Phase kinds: each kind's own config keys, `defaults:` merged by kind, and the plan of a pipeline that
uses all five kinds (no Ray: `raytrain plan` runs before any worker)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from raytrain.cli import main
from raytrain.config import ConfigError, load_config
from raytrain.config.schema import CachePhaseConfig, DistillPhaseConfig, ExportPhaseConfig
from raytrain.plan import check_pipeline, format_plan
from tests.toys import FrameEncoder

TEACHER = dict(sample_rate=8000, enc_kernel_size=16, enc_num_feats=32, msk_num_feats=32, msk_num_hidden_feats=64,
               msk_num_layers=2, msk_num_stacks=1)
STUDENT = {**TEACHER, "msk_num_hidden_feats": 32, "msk_num_layers": 1}


def five_kinds(tmp_path: Path) -> dict[str, Any]:
    """train -> distill -> evaluate -> cache (a frame encoder's latents of dev) -> train on them -> export."""
    encoder = tmp_path / "encoder.pt"
    torch.save(FrameEncoder().state_dict(), encoder)
    return {
        "name": "five_kinds", "runs_dir": str(tmp_path / "runs"),
        "data": {"train": {"shards": str(tmp_path / "shards" / "train")},
                 "dev": {"shards": str(tmp_path / "shards" / "dev")}},
        "model": {"name": "convtasnet", "args": dict(TEACHER)},
        "defaults": {"train": ["train"], "eval": "dev", "metrics": ["si_sdri"],
                     "best_metric": "eval/si_sdri", "optim": {"name": "adam", "lr": 1e-3}, "batch_size": 4,
                     "max_steps": 20},
        "phases": [
            {"name": "teacher", "losses": {"si_sdr_pit": 1.0}},
            {"name": "student", "kind": "distill", "model": {"name": "convtasnet", "args": dict(STUDENT)},
             "teacher": {"phase": "teacher"}, "losses": {"distill_si_sdr_pit": 1.0, "si_sdr_pit": 0.5}},
            {"name": "score", "kind": "evaluate", "init_from": "student"},
            {"name": "encode", "kind": "cache", "model": {"name": "tests.toys:FrameEncoder"},
             "init_from": {"path": str(encoder)}, "datasets": {"dev": "latents_dev"},
             "columns": {"latents": {"role": "features", "frame_rate": 100}}},
            {"name": "probe", "model": {"name": "tests.toys:LatentProbe"}, "train": ["latents_dev"],
             "eval": "latents_dev", "losses": {"tests.toys:recon_mse": 1.0}, "metrics": [],
             "best_metric": "eval/loss"},
            {"name": "export", "kind": "export", "init_from": "student", "int8": True},
        ],
    }


def plan_error(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as err:
        check_pipeline(load_config(raw=raw))
    return str(err.value)


def test_each_kind_has_its_own_model_and_defaults_merge_only_its_keys(tmp_path: Path) -> None:
    cfg = load_config(raw=five_kinds(tmp_path))
    kinds = {p.name: type(p) for p in cfg.phases}
    assert kinds["student"] is DistillPhaseConfig and kinds["encode"] is CachePhaseConfig
    assert kinds["export"] is ExportPhaseConfig
    export = cfg.phase("export")
    assert not hasattr(export, "optim") and not hasattr(export, "train")  # defaults' optim/train not merged in
    assert export.metrics == ["si_sdri"] and export.batch_size == 4  # its own keys are
    assert not hasattr(cfg.phase("encode"), "metrics")
    assert cfg.phase("score").eval == "dev" and not hasattr(cfg.phase("score"), "max_steps")


def test_plan_of_all_five_kinds_prints_every_phase(tmp_path: Path) -> None:
    cfg = load_config(raw=five_kinds(tmp_path))
    text = format_plan(cfg, check_pipeline(cfg))
    for head in ("[0] teacher  (train)", "[1] student  (distill)", "[2] score  (evaluate)", "[3] encode  (cache)",
                 "[4] probe  (train)", "[5] export  (export)"):
        assert head in text, text
    assert "teacher  phase teacher (best): convtasnet" in text and "frozen" in text
    assert "writes   dev -> latents_dev: id, latents (features 100/s)" in text
    assert "train    latents_dev x1: written by encode" in text
    assert "exports  onnx fp32, onnx int8" in text


def test_plan_command_exits_non_zero_before_ray_naming_key_and_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def no_ray(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("raytrain plan started Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    raw = five_kinds(tmp_path)
    path = tmp_path / "five.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["plan", str(path)]) == 0
    bad = copy.deepcopy(raw)
    bad["phases"][5]["optim"] = {"lr": 1e-3}
    path.write_text(yaml.safe_dump(bad))
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert ("phases[5](export).optim: unknown key ('optim' is a key of train and distill phases, not of export "
            "phases).") in err


def test_a_distill_phase_without_teacher_says_what_to_give(tmp_path: Path) -> None:
    raw = five_kinds(tmp_path)
    del raw["phases"][1]["teacher"]
    with pytest.raises(ConfigError, match=r"phases\[1\]\(student\): a distill phase needs 'teacher': "
                                          r"\{phase: <an earlier phase>\} or \{path: <model.pt>"):
        load_config(raw=raw)


def test_a_teacher_must_be_an_earlier_phase(tmp_path: Path) -> None:
    raw = five_kinds(tmp_path)
    raw["phases"][1]["teacher"] = {"phase": "score"}
    msg = plan_error(raw)
    assert "phases[1](student).teacher: phase 'score' runs after 'student'; teacher must name an earlier phase" in msg


def test_a_cache_output_named_like_a_data_entry_is_an_error(tmp_path: Path) -> None:
    raw = five_kinds(tmp_path)
    raw["phases"][3]["datasets"] = {"dev": "train"}
    raw["phases"][4]["train"] = ["train"]
    msg = plan_error(raw)
    assert ("phases[3](encode).datasets.dev: the cache output 'train' is named like the 'data:' entry 'train'; "
            "give it another name") in msg


def test_a_dataset_read_before_the_phase_that_writes_it_is_an_error(tmp_path: Path) -> None:
    raw = five_kinds(tmp_path)
    raw["phases"].insert(0, raw["phases"].pop(4))  # probe first
    msg = plan_error(raw)
    assert ("phases[0](probe).train: dataset 'latents_dev' is written by phase 'encode', which runs after 'probe'; "
            "move that phase earlier") in msg


def test_an_unknown_kind_suggests_the_close_one(tmp_path: Path) -> None:
    raw = five_kinds(tmp_path)
    raw["phases"][5]["kind"] = "exprot"
    with pytest.raises(ConfigError, match=r"phases\[5\]\(export\).kind: unknown phase kind 'exprot'. Did you mean "
                                          r"'export'\? Kinds: train, evaluate, distill, cache, export"):
        load_config(raw=raw)


def test_a_defaults_key_no_kind_has_is_an_error(tmp_path: Path) -> None:
    raw = five_kinds(tmp_path)
    raw["defaults"]["max_step"] = 3
    with pytest.raises(ConfigError, match="defaults.max_step: no phase kind has this key. Did you mean 'max_steps'"):
        load_config(raw=raw)


def test_export_needs_a_model_with_an_export_spec(tmp_path: Path) -> None:
    raw = five_kinds(tmp_path)
    raw["phases"][5]["init_from"] = "probe"
    msg = plan_error(raw)
    assert "phases[5](export): model 'tests.toys:LatentProbe' has no export_spec" in msg


def test_a_column_the_cache_will_not_write_is_an_error_naming_both(tmp_path: Path) -> None:
    raw = five_kinds(tmp_path)
    raw["phases"][3]["columns"] = {"z": {"output": "latents", "role": "features", "frame_rate": 100}}
    msg = plan_error(raw)
    assert ("phases[4](probe).train: dataset 'latents_dev' has no column 'latents' (written by phase 'encode' lists "
            "id, z), needed by") in msg
