"""Modules trained beside a phase's model (`modules:`): config, plan rows and checks, and what a worker builds
(init_from weights, own optimizer and schedule, state through a weights-only checkpoint). The training loop
itself runs in tests/integration/test_resume.py (a critic beside the separator, resumed bitwise)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from raytrain.checkpoints import load_data
from raytrain.config import ConfigError, load_config
from raytrain.phases.train import build_modules
from raytrain.plan import check_pipeline, format_plan
from tests.toys import WaveCritic
from tests.unit.test_kinds import five_kinds

CRITIC = {"model": {"name": "tests.toys:WaveCritic", "args": {"channels": 4}},
          "losses": {"tests.toys:critic_lsgan": 1.0}, "optim": {"name": "adam", "lr": 2e-4},
          "schedule": {"decay": "cosine"}, "updates_per_step": 3, "every": 2}


def with_critic(tmp_path: Path, **critic: Any) -> dict[str, Any]:
    raw = five_kinds(tmp_path)
    student = raw["phases"][1]
    student["losses"] = {**student["losses"], "tests.toys:critic_adv": 0.1}
    student["modules"] = {"critic": {**copy.deepcopy(CRITIC), **critic}}
    return raw


def test_plan_shows_each_module_with_its_optimizer_ratio_and_source(tmp_path: Path) -> None:
    cfg = load_config(raw=with_critic(tmp_path, init_from="teacher"))
    text = format_plan(cfg, check_pipeline(cfg))
    n = sum(p.numel() for p in WaveCritic(channels=4).parameters())
    assert (f"module   critic: tests.toys:WaveCritic, {n} params, from phase teacher; tests.toys:critic_lsgan x1; "
            "adam lr 0.0002, cosine; 3 updates per step every 2 steps (30 updates)") in text, text


@pytest.mark.parametrize(("critic", "expect"), [
    ({"losses": {"critic_lsgn": 1.0}}, "phases[1](student).modules.critic.losses: unknown loss 'critic_lsgn'"),
    ({"init_from": "export"}, "phases[1](student).modules.critic.init_from: phase 'export' runs after 'student'"),
    ({"init_from": {"path": "missing/critic.pt"}}, "modules.critic.init_from.path: checkpoint missing/critic.pt "
                                                   "does not exist"),
    ({"model": {"name": "tests.toys:WaveCritic", "args": {"chanels": 4}}}, "phases[1](student).modules.critic.model:"),
])
def test_plan_names_the_module_key_at_fault(tmp_path: Path, critic: dict[str, Any], expect: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_pipeline(load_config(raw=with_critic(tmp_path, **critic)))
    assert expect in str(err.value)


@pytest.mark.parametrize(("critic", "expect"), [
    ({"losses": {}}, "losses"),
    ({"every": 0}, "every"),
    ({"optimizer": {"lr": 1e-3}}, "optimizer"),
])
def test_module_config_errors(tmp_path: Path, critic: dict[str, Any], expect: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(raw=with_critic(tmp_path, **critic))
    assert "modules.critic" in str(err.value) and expect in str(err.value)


def test_module_names_are_identifiers(tmp_path: Path) -> None:
    raw = with_critic(tmp_path)
    raw["phases"][1]["modules"] = {"my critic": raw["phases"][1]["modules"]["critic"]}
    with pytest.raises(ConfigError, match="'my critic' is not a module name"):
        load_config(raw=raw)


def test_a_module_loads_its_init_from_and_keeps_its_own_optimizer_schedule_and_state(tmp_path: Path) -> None:
    source = WaveCritic(channels=4)
    with torch.no_grad():
        for p in source.parameters():
            p.fill_(0.25)
    torch.save(source.state_dict(), tmp_path / "critic.pt")
    cfg = load_config(raw=with_critic(tmp_path, init_from={"path": str(tmp_path / "critic.pt")}))
    phase = cfg.phase("student")
    init = {"critic": {"path": str(tmp_path / "critic.pt"), "rules": phase.modules["critic"].init.model_dump()}}
    torch.manual_seed(0)
    m = build_modules(phase, init, fresh=True, device=torch.device("cpu"))["critic"]
    assert all(torch.equal(p, torch.full_like(p, 0.25)) for p in m.module.parameters())
    assert not build_modules(phase, init, fresh=False, device=torch.device("cpu"))["critic"].module.conv.bias.eq(0.25).all()
    assert [m.due(s) for s in (1, 2, 3, 4)] == [False, True, False, True]  # every 2
    assert m.opt.param_groups[0]["lr"] == pytest.approx(2e-4)
    horizon = phase.modules["critic"].total_updates(phase.max_steps)
    assert horizon == 30  # 20 steps / every 2 x 3 updates
    m.trainable(True)
    for _ in range(horizon):  # the cosine schedule spans the module's own updates
        m.opt.zero_grad()
        m.module(torch.randn(2, 64)).sum().backward()
        m.opt.step()
        m.sched.step()
        m.updates += 1
    assert m.sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    torch.save(m.state_dict(), tmp_path / "state.pt")
    state = load_data(tmp_path / "state.pt")  # weights_only: plain types and tensors
    fresh = build_modules(phase, {}, fresh=True, device=torch.device("cpu"))["critic"]
    fresh.load_state_dict(state)
    assert fresh.updates == horizon and fresh.sched.last_epoch == horizon
    for a, b in zip(fresh.module.parameters(), m.module.parameters(), strict=True):
        assert torch.equal(a, b)
    assert fresh.opt.state_dict()["state"][0]["step"] == m.opt.state_dict()["state"][0]["step"]


def test_module_keys_take_overrides_and_sweep_values(tmp_path: Path) -> None:
    from raytrain.config.loader import with_values

    cfg = with_values(load_config(raw=with_critic(tmp_path)), {"phases.student.modules.critic.optim.lr": 5e-3,
                                                               "phases.student.modules.critic.updates_per_step": 2})
    critic = cfg.phase("student").modules["critic"]
    assert (critic.optim.lr, critic.updates_per_step, critic.every) == (5e-3, 2, 2)
