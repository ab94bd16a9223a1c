"""Optimizer parameter groups and warmup + decay LR schedules."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from raytrain.checkpoints import PatternError, apply_freeze
from raytrain.config.schema import ScheduleConfig, TrainPhaseConfig
from raytrain.optim import build_optimizer, build_scheduler, lr_factor, param_groups


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(2, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.encoder(x))))


def phase(**kw: Any) -> TrainPhaseConfig:
    return TrainPhaseConfig(name="x", train=["tr"], losses={"si_sdr_pit": 1.0}, **kw)


def ids(params: list[torch.Tensor]) -> set[int]:
    return {id(p) for p in params}


# -- lr_factor ------------------------------------------------------------------------------


def test_constant_without_warmup_is_one() -> None:
    sched = ScheduleConfig()
    assert [lr_factor(s, sched, 10) for s in (0, 5, 9, 50)] == [1.0, 1.0, 1.0, 1.0]


def test_warmup_is_linear_to_one() -> None:
    sched = ScheduleConfig(warmup_steps=4)
    assert [lr_factor(s, sched, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_decay_starts_at_one_after_warmup_and_ends_at_floor(decay: str) -> None:
    sched = ScheduleConfig(warmup_steps=10, decay=decay, min_lr_ratio=0.1)
    assert lr_factor(9, sched, 110) == pytest.approx(1.0)  # last warmup step
    assert lr_factor(10, sched, 110) == pytest.approx(1.0)  # first decay step
    assert lr_factor(110, sched, 110) == pytest.approx(0.1)
    assert lr_factor(500, sched, 110) == pytest.approx(0.1)  # stays at the floor
    values = [lr_factor(s, sched, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_linear_decay_is_linear() -> None:
    sched = ScheduleConfig(decay="linear", min_lr_ratio=0.2)
    for step in range(0, 101, 10):
        assert lr_factor(step, sched, 100) == pytest.approx(0.2 + 0.8 * (1 - step / 100))
    assert lr_factor(50, sched, 100) == pytest.approx(0.6)


def test_cosine_decay_shape() -> None:
    sched = ScheduleConfig(warmup_steps=0, decay="cosine", min_lr_ratio=0.0)
    assert lr_factor(0, sched, 100) == pytest.approx(1.0)
    assert lr_factor(50, sched, 100) == pytest.approx(0.5)
    assert lr_factor(25, sched, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(100, sched, 100) == pytest.approx(0.0, abs=1e-12)


def test_decay_with_warmup_as_long_as_training_does_not_divide_by_zero() -> None:
    sched = ScheduleConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.5)
    assert lr_factor(9, sched, 10) == pytest.approx(1.0)
    assert lr_factor(10, sched, 10) == pytest.approx(1.0)


# -- parameter groups -----------------------------------------------------------------------


def test_single_default_group_uses_optim_values() -> None:
    net = Net()
    opt = build_optimizer(net, phase(optim={"name": "adamw", "lr": 2e-3, "weight_decay": 0.05,
                                            "betas": [0.8, 0.9]}))
    assert isinstance(opt, torch.optim.AdamW)
    (group,) = opt.param_groups
    assert group["lr"] == 2e-3 and group["weight_decay"] == 0.05 and group["betas"] == (0.8, 0.9)
    assert ids(group["params"]) == ids(list(net.parameters()))


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("sgd", torch.optim.SGD)])
def test_optimizer_kind(name: str, cls: type) -> None:
    opt = build_optimizer(Net(), phase(optim={"name": name, "lr": 0.1, "momentum": 0.5}))
    assert type(opt) is cls
    if name == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.5


def test_param_groups_first_match_wins_with_their_lrs() -> None:
    net = Net()
    ph = phase(optim={"lr": 1e-3, "weight_decay": 0.01},
               param_groups=[{"params": "encoder.*", "lr": 1e-4},
                             {"params": ["encoder.weight", "head.*"], "lr": 5e-4, "weight_decay": 0.0}])
    groups = param_groups(net, ph)
    assert [g["names"] for g in groups] == [["encoder.weight", "encoder.bias"], ["head.weight", "head.bias"],
                                            ["body.weight", "body.bias"]]
    assert [g["lr"] for g in groups] == [1e-4, 5e-4, 1e-3]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0, 0.01]
    assert [g["pattern"] for g in groups] == ["encoder.*", ["encoder.weight", "head.*"], "(default)"]

    opt = build_optimizer(net, ph)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 5e-4, 1e-3]
    assert ids(opt.param_groups[0]["params"]) == ids([net.encoder.weight, net.encoder.bias])
    assert ids(opt.param_groups[1]["params"]) == ids([net.head.weight, net.head.bias])
    assert ids(opt.param_groups[2]["params"]) == ids([net.body.weight, net.body.bias])
    assert all("names" not in g for g in opt.param_groups)


def test_group_without_lr_uses_phase_lr() -> None:
    groups = param_groups(Net(), phase(optim={"lr": 3e-3}, param_groups=[{"params": "head.*", "weight_decay": 0.1}]))
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(3e-3, 0.1), (3e-3, 0.0)]


def test_frozen_parameters_never_enter_the_optimizer() -> None:
    net = Net()
    ph = phase(freeze=["encoder.*"], param_groups=[{"params": "head.*", "lr": 1e-4}])
    apply_freeze(net, ph)
    opt = build_optimizer(net, ph)
    in_opt = ids([p for g in opt.param_groups for p in g["params"]])
    assert in_opt == ids([net.body.weight, net.body.bias, net.head.weight, net.head.bias])
    assert id(net.encoder.weight) not in in_opt and id(net.encoder.bias) not in in_opt


def test_group_whose_params_are_all_frozen_is_dropped() -> None:
    net = Net()
    ph = phase(freeze=["encoder.*"], param_groups=[{"params": "encoder.*", "lr": 1e-4}])
    apply_freeze(net, ph)
    opt = build_optimizer(net, ph)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["pattern"] == "(default)"


def test_everything_frozen_is_an_error() -> None:
    net = Net()
    for p in net.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"phases\[0\]\(x\): no trainable parameters \(check trainable/freeze\)"):
        build_optimizer(net, phase(), "phases[0](x)")


def test_group_pattern_matching_nothing_is_an_error() -> None:
    ph = phase(param_groups=[{"params": "head.*"}, {"params": ["body.*", "decoder.*"], "lr": 1e-4}])
    with pytest.raises(PatternError) as info:
        build_optimizer(Net(), ph, "phases[2](ft)")
    msg = str(info.value)
    assert msg.startswith("phases[2](ft).param_groups[1].params: pattern 'decoder.*' matches no parameter.")
    assert "Top-level prefixes: body.*, encoder.*, head.*" in msg


def test_ddp_module_prefix_is_ignored_in_patterns() -> None:
    wrapper = nn.Module()
    wrapper.module = Net()
    groups = param_groups(wrapper, phase(param_groups=[{"params": "head.*", "lr": 1e-4}]))
    assert groups[0]["names"] == ["head.weight", "head.bias"]


# -- scheduler ------------------------------------------------------------------------------


def test_scheduler_drives_every_group_by_the_same_factor() -> None:
    net = Net()
    ph = phase(optim={"lr": 1e-3}, param_groups=[{"params": "head.*", "lr": 1e-4}],
               schedule={"warmup_steps": 2, "decay": "cosine", "min_lr_ratio": 0.1}, max_steps=10)
    opt = build_optimizer(net, ph)
    sched = build_scheduler(opt, ph)
    seen = []
    for step in range(12):
        factor = lr_factor(step, ph.schedule, ph.max_steps)
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * factor)
        assert opt.param_groups[1]["lr"] == pytest.approx(1e-3 * factor)
        seen.append(opt.param_groups[1]["lr"])
        net(torch.randn(3, 2)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert seen[0] == pytest.approx(0.5e-3) and seen[1] == pytest.approx(1e-3) and seen[2] == pytest.approx(1e-3)
    assert seen[10] == pytest.approx(1e-4) and seen[11] == pytest.approx(1e-4)
    assert [g["initial_lr"] for g in opt.param_groups] == [1e-4, 1e-3]


def test_scheduler_state_round_trip_resumes_same_lr() -> None:
    ph = phase(optim={"lr": 1e-3}, schedule={"decay": "linear"}, max_steps=10)
    net = Net()
    opt = build_optimizer(net, ph)
    sched = build_scheduler(opt, ph)
    for _ in range(4):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer(net, ph)
    sched2 = build_scheduler(opt2, ph)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"]) == pytest.approx(1e-3 * 0.5)
