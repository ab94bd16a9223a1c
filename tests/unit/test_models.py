"""Model registry, ConvTasNet separation model and the adapter for plain user separators."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch

from raytrain.losses import LOSSES
from raytrain.models import MODELS, SeparationModel, build_model, count_parameters

TINY = dict(
    sample_rate=8000,
    enc_kernel_size=16,
    enc_num_feats=32,
    msk_num_feats=32,
    msk_num_hidden_feats=64,
    msk_num_layers=2,
    msk_num_stacks=1,
)


def test_convtasnet_is_registered() -> None:
    assert MODELS.get("convtasnet") is SeparationModel


@pytest.mark.parametrize("time", [777, 1001, 1600])
def test_output_matches_input_length(time: int) -> None:
    model = build_model("convtasnet", {**TINY, "num_sources": 3})
    out = model({"mix": torch.randn(2, time)})
    assert set(out) == {"est_sources"}
    assert out["est_sources"].shape == (2, 3, time)
    assert model.sample_rate == 8000


def test_output_is_zero_beyond_lengths() -> None:
    model = build_model("convtasnet", TINY)
    mix = torch.randn(2, 900)
    mix[1, 500:] = 0.0
    est = model({"mix": mix, "lengths": torch.tensor([900, 500])})["est_sources"]
    assert est[1, :, 500:].abs().max() == 0
    assert est[1, :, :500].abs().max() > 0


def test_parameter_names_are_readable() -> None:
    names = [n for n, _ in build_model("convtasnet", TINY).named_parameters()]
    assert names[0] == "net.encoder.weight"
    assert any(n.startswith("net.mask_generator.") for n in names)
    assert "net.decoder.weight" in names


def test_loss_falls_on_a_toy_mixture() -> None:
    torch.manual_seed(0)
    t = torch.arange(2000) / 8000
    sources = torch.stack(
        [0.5 * torch.sin(2 * math.pi * 440 * t), 0.3 * torch.sin(2 * math.pi * 1250 * t + 1)]
    )
    batch = {"mix": sources.sum(0)[None], "sources": sources[None], "lengths": torch.tensor([2000])}
    model = build_model("convtasnet", TINY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = LOSSES.get("separation")
    losses = []
    for _ in range(30):
        loss = loss_fn(model(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 10.0, losses  # at least 10 dB better SI-SDR


def test_unknown_argument_names_model_and_accepted_args() -> None:
    with pytest.raises(TypeError, match="convtasnet") as err:
        build_model("convtasnet", {**TINY, "num_source": 3})
    message = str(err.value)
    assert "'num_source'" in message and "did you mean 'num_sources'" in message
    assert "msk_num_layers=8" in message


def test_missing_sample_rate_is_reported() -> None:
    with pytest.raises(TypeError, match="missing required argument 'sample_rate'"):
        build_model("convtasnet", {"num_sources": 2})


def test_count_parameters_respects_trainable_only() -> None:
    model = build_model("convtasnet", TINY)
    total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    model.get_submodule("net.encoder").requires_grad_(False)
    frozen = model.get_parameter("net.encoder.weight").numel()
    assert count_parameters(model, trainable_only=True) == total - frozen


USER_MODULE = """
import torch
from torch import nn

class TinySeparator(nn.Module):
    def __init__(self, num_sources: int = 2, hidden: int = 8):
        super().__init__()
        self.proj = nn.Conv1d(1, hidden, 5, padding=2)
        self.out = nn.Conv1d(hidden, num_sources, 5, padding=2)

    def forward(self, mix):  # (batch, time) -> (batch, sources, time + 3): adapter trims
        y = self.out(torch.tanh(self.proj(mix.unsqueeze(1))))
        return nn.functional.pad(y, (0, 3))

class RateAware(TinySeparator):
    def __init__(self, sample_rate: int, num_sources: int = 2):
        super().__init__(num_sources)
        self.rate_seen = sample_rate
"""


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pkg = tmp_path / "userpkg_sep"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "userpkg_sep.models"


def test_dotted_user_model_through_separation_adapter(user_package: str) -> None:
    args = {"num_sources": 3, "sample_rate": 16000}
    model = build_model(f"{user_package}:TinySeparator", args, adapter="separation")
    assert args == {"num_sources": 3, "sample_rate": 16000}  # caller's dict untouched
    assert model.sample_rate == 16000
    out = model({"mix": torch.randn(2, 123)})
    assert out["est_sources"].shape == (2, 3, 123)
    assert [n for n, _ in model.named_parameters()][0] == "net.proj.weight"
    loss = LOSSES.get("separation")(out, {"sources": torch.randn(2, 3, 123)})
    loss.backward()
    assert model.get_parameter("net.proj.weight").grad is not None


def test_adapter_passes_sample_rate_to_classes_that_take_it(user_package: str) -> None:
    model = build_model(f"{user_package}:RateAware", {"sample_rate": 8000}, adapter="separation")
    assert model.sample_rate == 8000 and model.get_submodule("net").rate_seen == 8000


def test_adapter_reports_unknown_user_argument(user_package: str) -> None:
    with pytest.raises(TypeError, match="TinySeparator.*'hiden'.*did you mean 'hidden'"):
        build_model(f"{user_package}:TinySeparator", {"hiden": 4}, adapter="separation")


def test_unknown_adapter_is_reported(user_package: str) -> None:
    with pytest.raises(KeyError, match="unknown model adapter 'separaton'.*'separation'"):
        build_model(f"{user_package}:TinySeparator", {}, adapter="separaton")
