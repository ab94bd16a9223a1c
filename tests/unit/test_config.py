"""Pipeline YAML -> PipelineConfig: defaults merge, strict keys with readable paths, -o overrides."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from raytrain.config import ConfigError, InitFromConfig, load_config, parse_override
from raytrain.config.loader import validate_update

BASE: dict[str, Any] = {
    "name": "tiny",
    "data": {"tr": {"shards": "data/tr"}, "dev": {"shards": "data/dev"}},
    "model": {"name": "convtasnet", "args": {"sample_rate": 8000}},
    "defaults": {
        "train": ["tr"],
        "eval": "dev",
        "losses": {"si_sdr_pit": 1.0},
        "optim": {"name": "adam", "lr": 1.0e-3, "weight_decay": 0.01},
        "batch_size": 8,
    },
    "phases": [
        {"name": "p1", "optim": {"lr": 2.0e-3}, "max_steps": 100},
        {"name": "long", "init_from": "p1", "batch_size": 4},
    ],
}


def raw(**top: Any) -> dict[str, Any]:
    out = copy.deepcopy(BASE)
    out.update(top)
    return out


def load_error(r: dict[str, Any], overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(raw=r, overrides=overrides)
    return str(info.value)


# -- loading and defaults ---------------------------------------------------------------


def test_minimal_pipeline_loads_from_yaml(tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "name": "minimal",
        "data": {"tr": {"shards": "somewhere"}},
        "model": {"name": "convtasnet"},
        "phases": [{"name": "only", "train": ["tr"], "losses": {"si_sdr_pit": 1.0}}],
    }))
    cfg = load_config(path)
    assert cfg.name == "minimal"
    (phase,) = cfg.phases
    assert phase.name == "only" and [s.name for s in phase.train] == ["tr"]
    assert phase.losses == {"si_sdr_pit": 1.0}
    assert phase.optim.name == "adamw" and phase.optim.lr == 1e-3  # schema defaults
    assert cfg.phase_model(phase).name == "convtasnet"
    assert cfg.phase("only") is phase


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    twice = tmp_path / "twice.yaml"  # PyYAML would keep the second silently
    twice.write_text("name: x\nphases:\n  - name: a\n    max_steps: 3\n    gates: []\n    max_steps: 4\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML: key 'max_steps' is given twice \(first at line 4\)"):
        load_config(twice)
    top_list = tmp_path / "list.yaml"
    top_list.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top_list)


def test_yaml_merge_keys(tmp_path) -> None:
    """`<<: *anchor` merges a mapping (a phase's model args from the top-level ones); its own keys win, and a
    key given twice by hand is still an error."""
    from raytrain.config.loader import read_yaml

    f = tmp_path / "merge.yaml"
    f.write_text("base: &b {x: 1, y: 2}\nphase: {<<: *b, y: 3, z: 4}\n")
    assert read_yaml(f, "config")["phase"] == {"x": 1, "y": 3, "z": 4}
    f.write_text("base: &b {x: 1}\nphase: {<<: *b, z: 4, z: 5}\n")
    with pytest.raises(ConfigError, match="key 'z' is given twice"):
        read_yaml(f, "config")


def test_defaults_merge_into_phases() -> None:
    cfg = load_config(raw=raw())
    p1, long = cfg.phases
    # a phase that sets only optim.lr keeps optim.name / weight_decay from defaults
    assert p1.optim.lr == 2e-3 and p1.optim.name == "adam" and p1.optim.weight_decay == 0.01
    assert long.optim.lr == 1e-3 and long.optim.name == "adam"
    # plain keys: the phase wins, otherwise the default applies
    assert p1.batch_size == 8 and long.batch_size == 4
    assert p1.max_steps == 100 and long.max_steps == 1000
    assert p1.eval == long.eval == "dev"
    assert [s.name for s in long.train] == ["tr"]


def test_phase_list_replaces_default_list() -> None:
    r = raw()
    r["phases"][0]["train"] = ["dev"]
    cfg = load_config(raw=r)
    assert [s.name for s in cfg.phases[0].train] == ["dev"]
    assert [s.name for s in cfg.phases[1].train] == ["tr"]


# -- strict keys with paths ---------------------------------------------------------------


def test_unknown_top_level_key_names_it_and_suggests() -> None:
    msg = load_error(raw(sede=1))
    assert "sede: unknown key. Did you mean 'seed'?" in msg
    assert "Valid keys here: data, defaults, model, name, phases" in msg


def test_unknown_phase_key_has_phase_path() -> None:
    r = raw()
    r["phases"][1]["max_step"] = 3
    msg = load_error(r)
    assert "phases[1](long).max_step: unknown key. Did you mean 'max_steps'?" in msg


def test_unknown_optim_key_has_full_path() -> None:
    r = raw()
    r["phases"][0]["optim"]["lrr"] = 1e-3
    msg = load_error(r)
    assert msg.startswith("<config>: invalid config (1 problem)")
    assert "phases[0](p1).optim.lrr: unknown key. Did you mean 'lr'?" in msg
    assert "Valid keys here: betas, lr, momentum, name, weight_decay" in msg


def test_unknown_init_from_key_has_full_path() -> None:
    r = raw()
    r["phases"][1]["init_from"] = {"phase": "p1", "incldue": ["net.*"]}
    msg = load_error(r)
    assert "(1 problem)" in msg
    assert "phases[1](long).init_from.incldue: unknown key. Did you mean 'include'?" in msg


def test_error_names_the_yaml_file(tmp_path) -> None:
    r = raw()
    r["phases"][0]["optim"]["lrr"] = 1e-3
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(r))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: invalid config")


def test_unknown_capitalised_key_is_a_config_error() -> None:
    msg = load_error(raw(Seed=1))
    assert "Seed: unknown key. Did you mean 'seed'?" in msg


def test_tracking_logs_models_by_default_and_registers_only_when_named() -> None:
    tracking = load_config(raw=raw()).tracking
    assert tracking.log_model is True and tracking.register_as is None
    cfg = load_config(raw=raw(tracking={"register_as": "separator"}), overrides=["tracking.experiment=exp"])
    assert cfg.tracking.register_as == "separator" and cfg.tracking.experiment == "exp"
    assert load_config(raw=raw(), overrides=["tracking.log_model=false"]).tracking.log_model is False


def test_tracking_typo_and_bad_registered_model_names_are_errors() -> None:
    msg = load_error(raw(tracking={"log_modle": False}))
    assert "tracking.log_modle: unknown key. Did you mean 'log_model'?" in msg
    assert "Valid keys here: enabled, experiment, log_model, register_as, uri" in msg
    msg = load_error(raw(tracking={"register_as": "team/separator"}))
    assert "tracking.register_as: 'team/separator' is not a registered model name" in msg
    assert "is not a registered model name" in load_error(raw(tracking={"register_as": " "}))
    msg = load_error(raw(tracking={"register_as": "separator", "log_model": False}))
    assert "tracking: register_as needs log_model: true" in msg


def test_trainable_and_freeze_together_is_an_error() -> None:
    r = raw()
    r["phases"][0].update(trainable=["net.*"], freeze=["net.encoder.*"])
    msg = load_error(r)
    assert "phases[0](p1): set either 'trainable' or 'freeze', not both" in msg


def test_missing_losses_is_an_error_per_phase() -> None:
    r = raw()
    del r["defaults"]["losses"]
    r["phases"][1]["losses"] = {"si_sdr_pit": 1.0}
    msg = load_error(r)
    assert "(1 problem)" in msg
    assert "phases[0](p1): a train phase needs 'losses'" in msg and "{si_sdr_pit: 1.0}" in msg


def test_missing_train_and_missing_name() -> None:
    r = raw()
    del r["defaults"]["train"]
    assert "a train phase needs 'train'" in load_error(r)
    r = raw()
    del r["phases"][0]["name"]
    assert "phases[0].name: required key is missing" in load_error(r)


def test_bad_value_reports_path_and_value() -> None:
    r = raw()
    r["phases"][0]["batch_size"] = 0
    msg = load_error(r)
    assert "phases[0](p1).batch_size: Input should be greater than or equal to 1 (got 0)" in msg


def test_init_from_needs_exactly_one_source() -> None:
    r = raw()
    r["phases"][1]["init_from"] = {"phase": "p1", "path": "x/model.pt"}
    msg = load_error(r)
    assert "phases[1](long).init_from: init_from needs exactly one of 'phase'" in msg


# -- shorthand forms and derived properties -----------------------------------------------


def test_init_from_string_form() -> None:
    long = load_config(raw=raw()).phase("long")
    assert long.init_from == "p1"
    init = long.init
    assert isinstance(init, InitFromConfig)
    assert init.phase == "p1" and init.path is None and init.checkpoint == "best"
    assert init.include == ["*"] and init.exclude == [] and init.on_shape_mismatch == "error"
    assert load_config(raw=raw()).phase("p1").init is None


def test_init_from_mapping_form() -> None:
    r = raw()
    r["phases"][1]["init_from"] = {"path": "ckpt/model.pt", "exclude": ["net.decoder.*"],
                                   "on_shape_mismatch": "skip"}
    init = load_config(raw=r).phase("long").init
    assert init is not None and init.path == "ckpt/model.pt" and init.phase is None
    assert init.exclude == ["net.decoder.*"] and init.on_shape_mismatch == "skip"


@pytest.mark.parametrize("train, expected", [
    ("tr", [("tr", 1.0)]),
    (["tr"], [("tr", 1.0)]),
    (["tr", "dev"], [("tr", 1.0), ("dev", 1.0)]),
    ({"tr": 2, "dev": 1}, [("tr", 2.0), ("dev", 1.0)]),
    ([{"name": "tr", "weight": 3}, "dev"], [("tr", 3.0), ("dev", 1.0)]),
])
def test_train_source_forms(train: Any, expected: list[tuple[str, float]]) -> None:
    r = raw()
    r["phases"][0]["train"] = train
    phase = load_config(raw=r).phases[0]
    assert [(s.name, s.weight) for s in phase.train] == expected


def test_train_weight_must_be_positive() -> None:
    r = raw()
    r["phases"][0]["train"] = {"tr": 0}
    assert "phases[0](p1).train[0].weight: Input should be greater than 0" in load_error(r)


def test_freeze_string_becomes_list() -> None:
    r = raw()
    r["phases"][0]["freeze"] = "net.encoder.*"
    r["phases"][1]["trainable"] = "all"
    cfg = load_config(raw=r)
    assert cfg.phases[0].freeze == ["net.encoder.*"]
    assert cfg.phases[1].trainable == "all"


def test_best_defaults() -> None:
    r = raw()
    del r["defaults"]["eval"]
    r["phases"][1]["eval"] = "dev"
    r["phases"].append({"name": "sdr", "eval": "dev", "best_metric": "eval/si_sdri"})
    r["phases"].append({"name": "forced", "eval": "dev", "best_metric": "eval/si_sdri", "best_mode": "min"})
    cfg = load_config(raw=r)
    assert cfg.phase("p1").best == ("train/loss", "min")  # no eval set
    assert cfg.phase("long").best == ("eval/loss", "min")
    assert cfg.phase("sdr").best == ("eval/si_sdri", "max")
    assert cfg.phase("forced").best == ("eval/si_sdri", "min")


@pytest.mark.parametrize("metric", ["eval/cer", "eval/wer", "eval/WER", "eval/phone_per", "train/asr_ctc_loss"])
def test_error_rates_and_losses_are_minimised_by_default(metric: str) -> None:
    r = raw()
    r["phases"].append({"name": "asr", "eval": "dev", "best_metric": metric})
    assert load_config(raw=r).phase("asr").best == (metric, "min")


# -- overrides ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, parts, value", [
    ("phases.1.optim.lr=3e-4", ["phases", "1", "optim", "lr"], 0.0003),
    ("phases.0.max_steps=50", ["phases", "0", "max_steps"], 50),
    ("seed=-3", ["seed"], -3),
    ("tracking.enabled=false", ["tracking", "enabled"], False),
    ("scaling.use_gpu=true", ["scaling", "use_gpu"], True),
    ("phases.0.metrics=[si_sdr, si_sdri]", ["phases", "0", "metrics"], ["si_sdr", "si_sdri"]),
    ("x=[1,2]", ["x"], [1, 2]),
    ("name=some_name", ["name"], "some_name"),
    ("phases.0.grad_clip=null", ["phases", "0", "grad_clip"], None),
    ("phases.0.eval=a=b", ["phases", "0", "eval"], "a=b"),
])
def test_parse_override(text: str, parts: list[str], value: Any) -> None:
    got_parts, got_value = parse_override(text)
    assert got_parts == parts
    assert got_value == value and type(got_value) is type(value)


@pytest.mark.parametrize("text", ["nokey", "=5", " =5"])
def test_parse_override_bad_form(text: str) -> None:
    with pytest.raises(ConfigError, match=r"is not KEY=VALUE \(e.g. phases.1.optim.lr=3e-4\)"):
        parse_override(text)


def test_override_by_index_and_by_phase_name() -> None:
    cfg = load_config(raw=raw(), overrides=["phases.1.optim.lr=3e-4", "phases.p1.max_steps=5",
                                            "phases.-1.batch_size=2"])
    assert cfg.phase("long").optim.lr == pytest.approx(3e-4)
    assert cfg.phase("long").optim.name == "adam"  # defaults still merge after the override
    assert cfg.phase("long").batch_size == 2
    assert cfg.phase("p1").max_steps == 5


def test_override_creates_missing_section() -> None:
    cfg = load_config(raw=raw(), overrides=["phases.0.schedule.warmup_steps=3", "phases.long.scaling.num_workers=2"])
    assert cfg.phases[0].schedule.warmup_steps == 3
    assert cfg.phases[0].schedule.decay == "constant"
    assert cfg.phase_scaling(cfg.phases[1]).num_workers == 2
    assert cfg.phase_scaling(cfg.phases[0]).num_workers == 1


def test_override_defaults_applies_to_every_phase() -> None:
    cfg = load_config(raw=raw(), overrides=["defaults.optim.weight_decay=0.5"])
    assert [p.optim.weight_decay for p in cfg.phases] == [0.5, 0.5]


def test_override_into_an_inherited_default_changes_only_that_phase() -> None:
    r = raw()
    r["defaults"]["transforms"] = [{"name": "dynamic_mix", "args": {"num_speakers": 2, "crop_seconds": 1.0}}]
    cfg = load_config(raw=r, overrides=["phases.long.transforms.0.args.crop_seconds=2.0",
                                        "phases.long.optim.weight_decay=0.0"])
    p1, long = cfg.phases
    assert long.transforms[0].args == {"num_speakers": 2, "crop_seconds": 2.0}
    assert long.transforms[0].name == "dynamic_mix" and p1.transforms[0].args["crop_seconds"] == 1.0
    assert (long.optim.name, long.optim.lr, long.optim.weight_decay) == ("adam", 1.0e-3, 0.0)
    assert p1.optim.weight_decay == 0.01


def test_override_does_not_touch_the_callers_dict() -> None:
    r = raw()
    load_config(raw=r, overrides=["phases.0.max_steps=7", "phases.0.schedule.warmup_steps=3"])
    assert r == BASE


def test_override_index_out_of_range() -> None:
    msg = load_error(raw(), ["phases.5.max_steps=3"])
    assert msg == "override phases.5.max_steps: index 5 out of range (there are 2)"


def test_override_unknown_phase_name_suggests() -> None:
    msg = load_error(raw(), ["phases.lnog.max_steps=3"])
    assert "override phases.lnog.max_steps: no list entry named 'lnog'; did you mean 'long'?" in msg
    assert "(names: ['p1', 'long'])" in msg


def test_override_through_a_value_is_an_error() -> None:
    msg = load_error(raw(), ["name.sub=3"])
    assert msg == "override name.sub: name is a value, not a section"


def test_override_introducing_unknown_key_fails_with_path() -> None:
    msg = load_error(raw(), ["phases.0.optim.lrr=3e-4"])
    assert "phases[0](p1).optim.lrr: unknown key. Did you mean 'lr'?" in msg
    msg = load_error(raw(), ["phases.long.max_step=3"])
    assert "phases[1](long).max_step: unknown key. Did you mean 'max_steps'?" in msg


def test_override_bad_value_fails_validation() -> None:
    msg = load_error(raw(), ["phases.0.optim.name=adagrad"])
    assert "phases[0](p1).optim.name:" in msg and "'adagrad'" in msg


def test_validate_update_applies_and_revalidates() -> None:
    cfg = load_config(raw=raw())
    new = validate_update(cfg, ["phases.long.optim.lr=3e-4", "phases.0.max_steps=9"])
    assert new.phase("long").optim.lr == pytest.approx(3e-4) and new.phase("p1").max_steps == 9
    assert new.phase("long").optim.name == "adam" and new.phase("long").init is not None
    assert new.phase("long").init.phase == "p1"
    assert cfg.phase("long").optim.lr == 1e-3  # the original is untouched
    with pytest.raises(ConfigError, match=r"phases\[0\]\(p1\).batch_size: Input should be greater than or equal to 1"):
        validate_update(cfg, ["phases.0.batch_size=0"])
    with pytest.raises(ConfigError, match=r"phases\[1\]\(long\).optim.lrr: unknown key. Did you mean 'lr'\?"):
        validate_update(cfg, ["phases.1.optim.lrr=1"])


def test_validate_update_defaults_override_reaches_phases() -> None:
    cfg = load_config(raw=raw())
    new = validate_update(cfg, ["defaults.optim.weight_decay=0.5"])
    assert [p.optim.weight_decay for p in new.phases] == [0.5, 0.5]


def test_evaluate_phase_needs_eval_init_from_and_metrics_and_scores_its_source_model() -> None:
    r = raw()
    r["phases"].append({"name": "score", "kind": "evaluate", "init_from": "long", "metrics": ["si_sdri"]})
    r["phases"][1]["model"] = {"name": "convtasnet", "args": {"sample_rate": 8000, "msk_num_layers": 2}}
    cfg = load_config(raw=r)
    score = cfg.phase("score")
    assert score.kind == "evaluate" and score.eval == "dev"  # eval comes from the defaults
    assert cfg.phase_model(score).args["msk_num_layers"] == 2  # the model of the phase it scores
    no_init = raw()
    no_init["phases"].append({"name": "score", "kind": "evaluate", "metrics": ["si_sdri"]})
    assert "needs 'init_from'" in load_error(no_init)
    bare = raw()
    bare["defaults"].pop("losses")
    bare["phases"] = [{"name": "score", "kind": "evaluate", "init_from": {"path": "x.pt"}}]
    assert "needs 'metrics'" in load_error(bare)
    assert "kind" in load_error(raw(), ["phases.p1.kind=evaluat"])
