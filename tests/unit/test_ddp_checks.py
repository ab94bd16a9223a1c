"""The DDP replica digest and its comparison, and the plan's effective batch as data (no Ray)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from raytrain.config import load_config
from raytrain.models import build_model
from raytrain.phases.train import digest_mismatches, param_digest
from raytrain.plan import check_pipeline, format_plan, phase_figures

from .test_plan import TINY, pipeline


def _extremes(*digests: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the all_reduce MAX/MIN over ranks yields."""
    stack = torch.stack(digests)
    return stack.amax(dim=0), stack.amin(dim=0)


def test_identical_replicas_match_and_a_nudged_one_is_named() -> None:
    torch.manual_seed(0)
    model = build_model("convtasnet", TINY)
    names, numels, digest = param_digest(model.named_parameters())
    assert names == [n for n, _ in model.named_parameters()]
    assert digest.shape == (len(names), 2) and digest.dtype == torch.float64
    twin = copy.deepcopy(model)
    assert digest_mismatches(names, numels, *_extremes(digest, param_digest(twin.named_parameters())[2])) == []

    with torch.no_grad():
        twin.net.mask_generator.output_conv.weight[3, 5, 0] += 1e-4  # one element of one tensor, barely
    bad = digest_mismatches(names, numels, *_extremes(digest, param_digest(twin.named_parameters())[2]))
    assert [name for name, _ in bad] == ["net.mask_generator.output_conv.weight"]
    assert bad[0][1].startswith("sum ") and ", norm " in bad[0][1]


def test_same_values_summed_in_another_order_are_not_a_divergence() -> None:
    torch.manual_seed(1)
    w = torch.randn(1000, 1000) * 0.02
    a = param_digest([("w", w)])
    b = param_digest([("w", w.flip(0).t().contiguous())])  # same values, another reduction order
    assert digest_mismatches(a[0], a[1], *_extremes(a[2], b[2])) == []


def test_non_finite_digests() -> None:
    names, numels = ["w"], [4]
    finite = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    nan = torch.tensor([[math.nan, math.nan]], dtype=torch.float64)
    inf = torch.tensor([[math.inf, math.inf]], dtype=torch.float64)
    assert [n for n, _ in digest_mismatches(names, numels, inf, finite)] == ["w"]  # on one rank only
    assert digest_mismatches(names, numels, nan, nan) == []  # every rank alike: not a DDP divergence


def test_effective_batch_is_the_number_the_plan_prints(tmp_path: Path) -> None:
    raw = pipeline(tmp_path, scaling={"num_workers": 3})
    raw["phases"].append({"name": "score", "kind": "evaluate", "init_from": "long", "eval_batch_size": 5})
    cfg = load_config(raw=raw)
    plans = check_pipeline(cfg)
    figures = [phase_figures(cfg, p) for p in plans]
    assert [(f.name, f.effective_batch) for f in figures] == [("short", 4 * 1 * 3), ("long", 4 * 2 * 3),
                                                               ("score", 5 * 3)]
    text = format_plan(cfg, plans)
    assert "batch    4 x accum 2 x 3 workers = 24; 100 steps" in text
    assert "batch    4 x accum 1 x 3 workers = 12; 200 steps" in text
    assert "batch    5 x 3 workers" in text
