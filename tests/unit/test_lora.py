"""LoRA through peft (raytrain.lora): what trains, what the adapter changes, merging, the fast-path trap, and
what a pipeline's plan says of a LoRA phase."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from raytrain.checkpoints import apply_freeze
from raytrain.config import load_config
from raytrain.config.schema import TrainPhaseConfig
from raytrain.lora import (
    LoraError,
    adapter_file,
    adapters_disabled,
    add_lora,
    base_state,
    count_params,
    load_adapter,
    merged_state,
)

TARGETS = ["enc.linear1", "enc.linear2", "head"]


class TinyTransformer(nn.Module):
    """A PyTorch TransformerEncoderLayer (its eval fast path is the trap) and a Linear head."""

    def __init__(self, dim: int = 32, out: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(4, dim)
        self.enc = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, out)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"y": self.head(self.enc(self.inp(batch["x"])))}


def _phase(**lora: object) -> TrainPhaseConfig:
    return TrainPhaseConfig.model_validate({"name": "ft", "train": ["t"], "losses": {"l": 1.0},
                                            "lora": {"rank": 4, "alpha": 8, "target_modules": TARGETS, **lora}})


def _model(seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer()


@pytest.fixture(autouse=True)
def _fastpath() -> Iterator[None]:
    """add_lora turns PyTorch's attention fast path off for the process; other tests get it back."""
    was = torch.backends.mha.get_fastpath_enabled()
    yield
    torch.backends.mha.set_fastpath_enabled(was)


def _adapted(seed: int = 0) -> tuple[torch.Tensor, TinyTransformer]:
    """(the base model's outputs on _x(), the same model with adapters whose B is not zero). The base model
    runs as inference loads it, frozen (requires_grad off: nn.MultiheadAttention picks another attention
    kernel, 1e-7 apart, when its weights require grad) and with the kernels of the adapted model (fast path
    off)."""
    model = _model(seed).eval().requires_grad_(False)
    torch.backends.mha.set_fastpath_enabled(False)
    with torch.no_grad():
        want = model(_x())["y"]
    add_lora(model, _phase().lora)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return want, model.eval()


def _x() -> dict[str, torch.Tensor]:
    return {"x": torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(2))}


def test_a_lora_phase_trains_the_adapters_only_and_train_all_trains_everything() -> None:
    model = add_lora(_model(), _phase().lora)
    n_train, n_frozen = apply_freeze(model, _phase())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert {n.split(".lora_")[0] for n in trained} == set(TARGETS)
    lora, other = count_params(model)
    assert (n_train, n_frozen) == (lora, other) and n_train / (n_train + n_frozen) < 0.10
    model = add_lora(_model(), _phase(train_all=True).lora)
    assert apply_freeze(model, _phase(train_all=True)) == (sum(p.numel() for p in model.parameters()), 0)


def test_disabled_adapters_give_the_base_outputs_bitwise_and_merging_matches_in_eval() -> None:
    want, model = _adapted()
    with torch.no_grad():
        with adapters_disabled(model):
            off = model(_x())["y"]
        on = model(_x())["y"]
        merged_model = _model(99)
        merged_model.load_state_dict(merged_state(_model(5), _phase().lora, model.state_dict()))
        merged = merged_model.eval()(_x())["y"]
    assert torch.equal(off, want)
    assert (on - want).abs().max() > 0.1  # the adapter changes the outputs...
    assert (merged - on).abs().max() < 1e-5  # ...and merged weights give the same outputs in eval mode


def test_eval_hears_the_adapters_inside_a_transformer_layer_though_its_fast_path_would_skip_them() -> None:
    _, model = _adapted()
    merged_model = _model(99)
    merged_model.load_state_dict(merged_state(_model(5), _phase().lora, model.state_dict()))
    merged_model.eval()
    with torch.no_grad():
        assert (model(_x())["y"] - merged_model(_x())["y"]).abs().max() < 1e-5
        # What add_lora turned off: the fast path reads linear1/linear2's base weights and skips their adapters.
        torch.backends.mha.set_fastpath_enabled(True)
        try:
            skipped = model(_x())["y"]
        finally:
            torch.backends.mha.set_fastpath_enabled(False)
        assert (skipped - merged_model(_x())["y"]).abs().max() > 1e-3


def test_the_adapter_file_loads_back_with_weights_only_and_gives_the_same_outputs() -> None:
    _, model = _adapted()
    for train_all in (False, True):
        buf = io.BytesIO()
        torch.save(adapter_file(model.state_dict(), _phase(train_all=train_all).lora, "runs/x/gen/best/model.pt"), buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        assert saved["base"] == "runs/x/gen/best/model.pt" and ("base_weights" in saved) == train_all
        assert set(saved["weights"]) == {n for n in model.state_dict() if ".lora_" in n}
        base = None if train_all else base_state(model.state_dict())  # the weights the adapter was trained on
        loaded = load_adapter(_model(7), saved, base).eval()
        with torch.no_grad():
            assert torch.equal(loaded(_x())["y"], model(_x())["y"])
    without = {k: v for k, v in saved.items() if k != "base_weights"}
    with pytest.raises(LoraError, match="needs its base weights: load runs/x/gen/best/model.pt"):
        load_adapter(_model(7), without)


def test_target_modules_that_cannot_take_an_adapter_are_refused_with_the_fix() -> None:
    for targets, says in ((["dec.*"], "'dec.*' matches no Linear layer of the model; its Linear layers are e.g. inp"),
                          (["enc.norm1"], "'enc.norm1' matches enc.norm1 (LayerNorm), not Linear layers"),
                          (["enc.self_attn.out_proj"], "enc.self_attn.out_proj is the output projection of an "
                                                       "nn.MultiheadAttention")):
        with pytest.raises(LoraError) as err:
            add_lora(_model(), _phase(target_modules=targets).lora, "phases.ft.lora")
        assert str(err.value).startswith("phases.ft.lora.target_modules: ") and says in str(err.value)
    with pytest.raises(ValueError, match="trainable'/'freeze' apply with lora.train_all: true"):
        TrainPhaseConfig.model_validate({"name": "ft", "train": ["t"], "losses": {"l": 1.0}, "trainable": ["head.*"],
                                         "lora": {"target_modules": ["head"]}})


def test_plan_counts_a_lora_phase_adapters_as_its_only_trainable_parameters(tmp_path: Path) -> None:
    from raytrain.plan import check_pipeline, fmt_count, format_plan

    (tmp_path / "d").mkdir()
    raw = {"name": "p", "data": {"t": {"shards": str(tmp_path / "d")}},
           "model": {"name": "tests.unit.test_lora:TinyTransformer"},
           "defaults": {"train": ["t"], "losses": {"si_sdr_pit": 1.0}},
           "phases": [{"name": "base", "max_steps": 2},
                      {"name": "ft", "init_from": "base", "max_steps": 2,
                       "lora": {"rank": 4, "alpha": 8, "target_modules": TARGETS}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "p.yaml")
    plans = {p.phase.name: p for p in check_pipeline(cfg)}
    lora, other = count_params(add_lora(_model(), _phase().lora))
    assert (plans["ft"].n_trainable, plans["ft"].n_frozen) == (lora, other)
    text = format_plan(cfg, list(plans.values()))
    assert f"params   {fmt_count(lora)} trainable, {fmt_count(other)} frozen" in text
    assert "lora     rank 4, alpha 8, dropout 0 on 3 Linear layers: enc.linear1, enc.linear2, head; base weights " \
           "frozen" in text
    assert plans["base"].n_frozen == 0 and plans["base"].n_trainable == other
