"""Optimizers with per-pattern parameter groups, and warmup + decay schedules."""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import torch

from raytrain.checkpoints import check_patterns
from raytrain.config.schema import OptimConfig, ScheduleConfig, TrainPhaseConfig


def param_groups(model: torch.nn.Module, phase: TrainPhaseConfig, where: str = "phase") -> list[dict]:
    """Trainable parameters split by `param_groups` (first matching pattern wins); the rest
    use the phase's `optim` values. Frozen parameters never enter the optimizer."""
    named = [(n.removeprefix("module."), p) for n, p in model.named_parameters()]
    names = [n for n, _ in named]
    groups: list[dict[str, Any]] = []
    for i, cfg in enumerate(phase.param_groups):
        check_patterns(names, cfg.patterns, f"{where}.param_groups[{i}].params")
        groups.append({"params": [], "names": [], "lr": cfg.lr or phase.optim.lr,
                       "weight_decay": phase.optim.weight_decay if cfg.weight_decay is None else cfg.weight_decay,
                       "pattern": cfg.params})
    rest: dict[str, Any] = {"params": [], "names": [], "lr": phase.optim.lr, "weight_decay": phase.optim.weight_decay,
            "pattern": "(default)"}
    for name, p in named:
        if not p.requires_grad:
            continue
        g = next((grp for grp, pg in zip(groups, phase.param_groups, strict=True)
                  if any(fnmatch.fnmatchcase(name, pat) for pat in pg.patterns)), rest)
        g["params"].append(p)
        g["names"].append(name)
    out = [g for g in [*groups, rest] if g["params"]]
    if not out:
        raise ValueError(f"{where}: no trainable parameters (check trainable/freeze)")
    return out


def build_optimizer(model: torch.nn.Module, phase: TrainPhaseConfig, where: str = "phase") -> torch.optim.Optimizer:
    groups = param_groups(model, phase, where)
    for g in groups:
        g.pop("names")
    return make_optimizer(groups, phase.optim)


def make_optimizer(groups: list[dict[str, Any]], o: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer `o` names over parameter `groups` (each may set its own lr and weight_decay)."""
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def lr_factor(step: int, sched: ScheduleConfig, max_steps: int) -> float:
    """Multiplier of each group's base LR at optimizer step `step` (0-based)."""
    if sched.warmup_steps and step < sched.warmup_steps:
        return (step + 1) / sched.warmup_steps
    if sched.decay == "constant":
        return 1.0
    span = max(1, max_steps - sched.warmup_steps)
    progress = min(1.0, (step - sched.warmup_steps) / span)
    floor = sched.min_lr_ratio
    if sched.decay == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, phase: TrainPhaseConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, phase.schedule, phase.max_steps))
