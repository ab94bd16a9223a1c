"""init_from load rules, the load report, weight files, atomic saves and freezing."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch
from torch import nn

from raytrain.checkpoints import (
    CheckpointError,
    LoadReport,
    PatternError,
    apply_freeze,
    atomic_torch_save,
    load_into,
    load_weights,
    plan_load,
)
from raytrain.config.schema import InitFromConfig, TrainPhaseConfig
from raytrain.models import build_model

TINY = dict(sample_rate=8000, enc_kernel_size=16, enc_num_feats=32, msk_num_feats=32, msk_num_hidden_feats=64,
            msk_num_layers=2, msk_num_stacks=1)


class Net(nn.Module):
    def __init__(self, head_out: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Linear(2, 4)
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        self.head = nn.Linear(4, head_out)


def phase(**kw: Any) -> TrainPhaseConfig:
    return TrainPhaseConfig(name="x", train=["tr"], losses={"si_sdr_pit": 1.0}, **kw)


def rules(**kw: Any) -> InitFromConfig:
    return InitFromConfig(phase="a", **kw)


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CKPT = {"enc.weight": [4, 2], "enc.bias": [4], "head.weight": [3, 4], "old.x": [2], "aux.w": [7]}
MODEL = {"enc.weight": [4, 2], "enc.bias": [4], "head.weight": [5, 4], "new.x": [2], "extra": [1]}


# -- plan_load ------------------------------------------------------------------------------


def test_plan_load_default_rules_load_matching_keys() -> None:
    report, mapping = plan_load({"a": [2], "b": [3]}, {"a": [2], "b": [3], "c": [1]}, rules(), "phase a")
    assert mapping == {"a": "a", "b": "b"}
    assert report.loaded == ["a", "b"] and report.renamed == []
    assert report.not_initialised == ["c"] and report.skipped_by_name == [] and report.skipped_by_shape == []


def test_plan_load_include_exclude_rename_skip() -> None:
    report, mapping = plan_load(CKPT, MODEL, rules(include=["enc.*", "head.*", "old.*"], exclude=["enc.bias"],
                                                   rename={"old.": "new."}, on_shape_mismatch="skip"),
                                "phase a")
    assert mapping == {"enc.weight": "enc.weight", "new.x": "old.x"}
    assert report.loaded == ["enc.weight", "new.x"]
    assert report.renamed == [("new.x", "old.x")]
    assert report.skipped_by_name == [("enc.bias", "excluded"), ("aux.w", "not in include")]
    assert report.skipped_by_shape == [("head.weight", [3, 4], [5, 4])]
    assert report.not_initialised == ["enc.bias", "head.weight", "extra"]


def test_plan_load_reports_keys_missing_from_model() -> None:
    report, mapping = plan_load({"a": [1], "old.b": [1]}, {"z": [1]}, rules(rename={"old.": "new."}), "s")
    assert mapping == {}
    assert report.skipped_by_name == [("a", "not in model"), ("old.b", "no model key 'new.b'")]


def test_plan_load_shape_mismatch_error_names_key_shapes_and_fix() -> None:
    with pytest.raises(CheckpointError) as info:
        plan_load(CKPT, MODEL, rules(), "phase a")
    msg = str(info.value)
    assert msg.startswith("init_from phase a: head.weight has shape (3, 4) in the checkpoint but (5, 4) in the model")
    assert "on_shape_mismatch: skip" in msg and "exclude it" in msg


def test_plan_load_accepts_torch_sizes() -> None:
    report, mapping = plan_load({"w": torch.Size([2, 3])}, {"w": torch.Size([2, 3])}, rules(), "s")
    assert mapping == {"w": "w"} and report.loaded == ["w"]


# -- load_into ------------------------------------------------------------------------------


def test_load_into_copies_selected_tensors_only() -> None:
    torch.manual_seed(0)
    src, dst = Net(), Net()
    before = clone_state(dst)
    report = load_into(dst, src.state_dict(), rules(include=["encoder.*", "body.*"], exclude=["body.2.*"]),
                       "phase a")
    after = dst.state_dict()
    for key in ["encoder.weight", "encoder.bias", "body.0.weight", "body.0.bias"]:
        assert torch.equal(after[key], src.state_dict()[key]), key
        assert not torch.equal(after[key], before[key]), key
    for key in ["body.2.weight", "body.2.bias", "head.weight", "head.bias"]:
        assert torch.equal(after[key], before[key]), key
    assert report.loaded == ["encoder.weight", "encoder.bias", "body.0.weight", "body.0.bias"]
    assert sorted(report.not_initialised) == ["body.2.bias", "body.2.weight", "head.bias", "head.weight"]
    # the parameters themselves changed, not a copy of the state dict
    assert torch.equal(dst.encoder.weight.detach(), src.encoder.weight.detach())


def test_load_into_with_rename_and_shape_skip() -> None:
    torch.manual_seed(0)
    src, dst = Net(head_out=3), Net(head_out=5)
    ckpt = {k.replace("encoder.", "enc."): v for k, v in src.state_dict().items()}
    before = clone_state(dst)
    report = load_into(dst, ckpt, rules(rename={"enc.": "encoder."}, on_shape_mismatch="skip"), "x")
    assert torch.equal(dst.encoder.weight.detach(), src.encoder.weight.detach())
    assert torch.equal(dst.head.weight.detach(), before["head.weight"])
    assert ("encoder.weight", "enc.weight") in report.renamed
    assert ("head.weight", [3, 4], [5, 4]) in report.skipped_by_shape
    assert torch.equal(dst.head.bias.detach(), before["head.bias"])


def test_load_into_convtasnet_round_trip() -> None:
    torch.manual_seed(0)
    src = build_model("convtasnet", TINY)
    torch.manual_seed(1)
    dst = build_model("convtasnet", TINY)
    before = clone_state(dst)
    report = load_into(dst, src.state_dict(), rules(include=["net.encoder.*", "net.decoder.*"]), "phase a")
    assert report.loaded == ["net.encoder.weight", "net.decoder.weight"]
    assert torch.equal(dst.state_dict()["net.encoder.weight"], src.state_dict()["net.encoder.weight"])
    key = "net.mask_generator.input_conv.weight"
    assert torch.equal(dst.state_dict()[key], before[key])
    assert not torch.equal(dst.state_dict()[key], src.state_dict()[key])


# -- the report -----------------------------------------------------------------------------


def _report() -> LoadReport:
    report, _ = plan_load(CKPT, MODEL, rules(exclude=["enc.bias"], rename={"old.": "new."},
                                             on_shape_mismatch="skip"), "phase a (best)")
    return report


def test_report_table_lists_every_action() -> None:
    lines = _report().to_table().splitlines()
    assert lines[0] == ("load report (phase a (best)): 2 loaded, 1 renamed, 2 skipped by name, 1 skipped by shape, "
                        "3 left at init")
    rows = [line.split() for line in lines[1:]]
    assert rows[0] == ["key", "action", "detail"]
    text = "\n".join(lines)
    assert any(r[:2] == ["enc.weight", "loaded"] and len(r) == 2 for r in rows)
    assert ["new.x", "loaded", "from", "old.x"] in rows
    assert ["enc.bias", "skipped", "(name)", "excluded"] in rows
    assert ["aux.w", "skipped", "(name)", "not", "in", "model"] in rows
    assert "head.weight  skipped (shape)  checkpoint (3, 4) vs model (5, 4)" in text
    assert ["extra", "fresh", "init", "not", "in", "checkpoint", "or", "not", "selected"] in rows
    assert all(line == line.rstrip() for line in lines)


def test_report_save_writes_json_and_text(tmp_path) -> None:
    report = _report()
    js, txt = report.save(tmp_path / "phase")
    assert js == tmp_path / "phase" / "load_report.json" and txt == tmp_path / "phase" / "load_report.txt"
    data = json.loads(js.read_text())
    assert data["source"] == "phase a (best)"
    assert data["loaded"] == ["enc.weight", "new.x"]
    assert data["renamed"] == [["new.x", "old.x"]]
    assert data["skipped_by_shape"] == [["head.weight", [3, 4], [5, 4]]]
    assert data["not_initialised"] == ["enc.bias", "head.weight", "extra"]
    assert txt.read_text() == report.to_table() + "\n"
    assert sorted(p.name for p in (tmp_path / "phase").iterdir()) == ["load_report.json", "load_report.txt"]


# -- weight files ---------------------------------------------------------------------------


def test_load_weights_from_folder_with_model_pt(tmp_path) -> None:
    net = Net()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    state = load_weights(tmp_path)
    assert set(state) == set(net.state_dict())
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_load_weights_from_state_pt_dict_and_strips_module(tmp_path) -> None:
    net = Net()
    ddp = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"model": ddp, "optimizer": {}, "step": 12}, tmp_path / "state.pt")
    for source in (tmp_path, tmp_path / "state.pt", str(tmp_path / "state.pt")):
        state = load_weights(source)
        assert set(state) == set(net.state_dict())
        assert torch.equal(state["head.weight"], net.head.weight.detach())


def test_load_weights_folder_prefers_model_pt(tmp_path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "state.pt")
    assert torch.equal(load_weights(tmp_path)["w"], torch.ones(2))


def test_load_weights_missing_path_is_helpful(tmp_path) -> None:
    missing = tmp_path / "runs" / "nope" / "model.pt"
    with pytest.raises(CheckpointError) as info:
        load_weights(missing)
    msg = str(info.value)
    assert msg.startswith(f"checkpoint {missing} does not exist.")
    assert "Give init_from a phase that has finished, or an existing model.pt/state.pt path" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=f"checkpoint {empty / 'state.pt'} does not exist"):
        load_weights(empty)


def test_load_weights_rejects_non_state_dict(tmp_path) -> None:
    torch.save([1, 2, 3], tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="not a state dict checkpoint"):
        load_weights(tmp_path / "model.pt")


# -- atomic saves ---------------------------------------------------------------------------


def test_atomic_torch_save_writes_and_leaves_no_temp(tmp_path) -> None:
    path = tmp_path / "deep" / "er" / "model.pt"
    atomic_torch_save({"w": torch.arange(3)}, path)
    assert torch.equal(torch.load(path)["w"], torch.arange(3))
    assert os.listdir(path.parent) == ["model.pt"]
    atomic_torch_save({"w": torch.arange(5)}, path)  # overwrite
    assert torch.equal(torch.load(path)["w"], torch.arange(5))
    assert os.listdir(path.parent) == ["model.pt"]


def test_atomic_torch_save_of_equal_weights_writes_equal_bytes(tmp_path) -> None:
    """A cache phase keys its output on the weights file's sha256: the same weights saved by two runs must
    make the same file (torch.save names its zip records after the file it writes, so not a random temp name)."""
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    a, b = tmp_path / "run1" / "model.pt", tmp_path / "run2" / "model.pt"
    atomic_torch_save(state, a)
    atomic_torch_save({k: v.clone() for k, v in state.items()}, b)
    assert a.read_bytes() == b.read_bytes()


def test_atomic_torch_save_failure_keeps_old_file(tmp_path) -> None:
    path = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.ones(4)}, path)
    old_bytes = path.read_bytes()
    # a big tensor goes first so the failing pickle has already written part of the temp file
    with pytest.raises(Exception):  # noqa: B017 - pickling errors differ across Python versions
        atomic_torch_save({"big": torch.zeros(100_000), "bad": lambda: 0}, path)
    assert path.read_bytes() == old_bytes
    assert torch.equal(torch.load(path)["w"], torch.ones(4))
    assert os.listdir(tmp_path) == ["model.pt"]


def test_atomic_torch_save_failure_on_new_path_leaves_nothing(tmp_path) -> None:
    with pytest.raises(Exception):  # noqa: B017
        atomic_torch_save({"bad": lambda: 0}, tmp_path / "model.pt")
    assert os.listdir(tmp_path) == []


# -- freezing -------------------------------------------------------------------------------


def _requires_grad(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_apply_freeze_with_freeze_patterns() -> None:
    net = Net()
    n_train, n_frozen = apply_freeze(net, phase(freeze=["encoder.*", "body.0.*"]))
    assert n_frozen == (4 * 2 + 4) + (4 * 4 + 4)
    assert n_train == (4 * 4 + 4) + (4 * 3 + 3)
    flags = _requires_grad(net)
    assert [n for n, g in flags.items() if not g] == ["encoder.weight", "encoder.bias", "body.0.weight",
                                                      "body.0.bias"]


def test_apply_freeze_with_trainable_patterns() -> None:
    net = Net()
    n_train, n_frozen = apply_freeze(net, phase(trainable=["head.*"]))
    assert (n_train, n_frozen) == (4 * 3 + 3, sum(p.numel() for p in net.parameters()) - 15)
    assert [n for n, g in _requires_grad(net).items() if g] == ["head.weight", "head.bias"]


def test_apply_freeze_all_or_unset_trains_everything_and_unfreezes() -> None:
    net = Net()
    total = sum(p.numel() for p in net.parameters())
    apply_freeze(net, phase(freeze=["encoder.*"]))
    assert apply_freeze(net, phase(trainable="all")) == (total, 0)
    assert all(_requires_grad(net).values())
    apply_freeze(net, phase(freeze=["encoder.*"]))
    assert apply_freeze(net, phase()) == (total, 0)
    assert all(_requires_grad(net).values())


def test_apply_freeze_on_convtasnet_encoder() -> None:
    model = build_model("convtasnet", TINY)
    total = sum(p.numel() for p in model.parameters())
    n_train, n_frozen = apply_freeze(model, phase(freeze=["net.encoder.*"]))
    assert n_frozen == 32 * 1 * 16 and n_train == total - n_frozen
    assert not model.net.encoder.weight.requires_grad and model.net.decoder.weight.requires_grad


@pytest.mark.parametrize("kw, key", [({"freeze": ["encoder.*", "decoder.*"]}, "phases.x.freeze"),
                                     ({"trainable": ["decoder.*"]}, "phases.x.trainable")])
def test_pattern_matching_nothing_names_key_pattern_and_prefixes(kw: dict[str, Any], key: str) -> None:
    net = Net()
    with pytest.raises(PatternError) as info:
        apply_freeze(net, phase(**kw), "phases.x")
    msg = str(info.value)
    assert msg.startswith(f"{key}: pattern 'decoder.*' matches no parameter.")
    assert "Top-level prefixes: body.*, encoder.*, head.*" in msg
    assert "e.g. encoder.weight, encoder.bias, body.0.weight" in msg
    assert all(p.requires_grad for p in net.parameters())  # nothing changed on error


def test_patterns_are_case_sensitive_globs() -> None:
    with pytest.raises(PatternError, match="pattern 'Encoder.\\*'"):
        apply_freeze(Net(), phase(freeze=["Encoder.*"]))
    n_train, n_frozen = apply_freeze(Net(), phase(freeze=["body.[02].weight"]))
    assert n_frozen == 32


def test_pattern_error_default_key_is_phase() -> None:
    with pytest.raises(PatternError, match=r"^phase\.freeze: pattern 'nothing' matches no parameter"):
        apply_freeze(Net(), phase(freeze=["nothing"]))



def test_plan_load_names_exclude_when_a_key_is_both_excluded_and_outside_include() -> None:
    report, _ = plan_load(CKPT, MODEL, rules(include=["head.*"], exclude=["enc.*"], on_shape_mismatch="skip"), "p")
    reasons = dict(report.skipped_by_name)
    assert reasons["enc.weight"] == reasons["enc.bias"] == "excluded" and reasons["aux.w"] == "not in include"
