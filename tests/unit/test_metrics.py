"""SI-SDR and SI-SDRi metrics: per-example values with the meaning users expect."""

from __future__ import annotations

import pytest
import torch

from raytrain.metrics import METRICS, MetricTotals, si_sdr, si_sdri


def _batch(n_src: int = 2, batch: int = 3, time: int = 1600) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sources = torch.randn(batch, n_src, time, generator=g)
    return {"mix": sources.sum(1), "sources": sources, "lengths": torch.full((batch,), time)}


def test_registered_names() -> None:
    assert METRICS.get("si_sdr") is si_sdr
    assert METRICS.get("si_sdri") is si_sdri


def test_perfect_estimate_in_any_order_scores_high() -> None:
    batch = _batch()
    out = {"est_sources": batch["sources"].flip(1)}
    sdr = si_sdr(out, batch)["si_sdr"]
    sdri = si_sdri(out, batch)["si_sdri"]
    assert sdr.shape == sdri.shape == (3,)
    assert (sdr > 50).all() and (sdri > 50).all()


def test_mixture_as_estimate_gives_zero_improvement() -> None:
    batch = _batch(n_src=3)
    out = {"est_sources": batch["mix"][:, None].expand(-1, 3, -1)}
    sdri = si_sdri(out, batch)["si_sdri"]
    assert torch.allclose(sdri, torch.zeros(3), atol=1e-4)
    # and the mixture itself is a poor estimate of each of 3 equal-power sources (about -3 dB)
    assert (si_sdr(out, batch)["si_sdr"] < 0).all()


def test_improvement_is_sdr_minus_mixture_sdr() -> None:
    batch = _batch()
    est = batch["sources"] + 0.5 * torch.randn_like(batch["sources"])
    out = {"est_sources": est}
    mix_sdr = si_sdr({"est_sources": batch["mix"][:, None].expand(-1, 2, -1)}, batch)["si_sdr"]
    expected = si_sdr(out, batch)["si_sdr"] - mix_sdr
    assert torch.allclose(si_sdri(out, batch)["si_sdri"], expected, atol=1e-4)


def test_padding_is_ignored_per_example() -> None:
    batch = _batch(batch=2, time=1000)
    est = batch["sources"] + 0.3 * torch.randn_like(batch["sources"])
    short = {k: v[..., :700] if v.ndim > 1 else torch.full_like(v, 700) for k, v in batch.items()}
    padded = {k: torch.nn.functional.pad(v, (0, 300)) if v.ndim > 1 else v for k, v in short.items()}
    est_padded = torch.cat([est[..., :700], 9.0 * torch.ones(2, 2, 300)], dim=-1)
    for fn, key in ((si_sdr, "si_sdr"), (si_sdri, "si_sdri")):
        a = fn({"est_sources": est[..., :700]}, short)[key]
        b = fn({"est_sources": est_padded}, padded)[key]
        assert torch.allclose(a, b, atol=1e-4), key


def test_metrics_do_not_track_gradients() -> None:
    batch = _batch()
    est = batch["sources"].clone().requires_grad_(True)
    assert not si_sdr({"est_sources": est}, batch)["si_sdr"].requires_grad
    assert si_sdri({"est_sources": est}, batch)["si_sdri"].dtype == torch.float32


@pytest.mark.parametrize("name", ["si_sdr", "si_sdri"])
def test_values_sum_across_batches_to_the_full_batch_mean(name: str) -> None:
    batch = _batch(batch=4)
    out = {"est_sources": batch["sources"] + torch.randn_like(batch["sources"])}
    fn = METRICS.get(name)
    full = fn(out, batch)[name]
    halves = [
        fn({"est_sources": out["est_sources"][s]}, {k: v[s] for k, v in batch.items()})[name]
        for s in (slice(0, 1), slice(1, 4))
    ]
    assert torch.allclose(torch.cat(halves).sum() / 4, full.mean(), atol=1e-4)


def test_totals_average_rows_divide_rates_and_leave_out_empty_rates() -> None:
    totals = MetricTotals()
    totals.add({"secs": torch.tensor([0.5, 0.7]), "cer": (torch.tensor([1.0, 3.0]), torch.tensor([10.0, 10.0])),
                "secs_cross": (torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0]))})
    totals.add({"secs": torch.tensor([0.9]), "cer": (torch.tensor([0.0]), torch.tensor([20.0])),
                "secs_cross": (torch.tensor([0.0]), torch.tensor([0.0]))})
    means = totals.means(3)
    assert means == pytest.approx({"eval/secs": 0.7, "eval/cer": 0.1})  # a corpus rate: 4 / 40, not a row mean
    keys, den_keys, values = totals.flat()  # what ranks all-reduce: two ranks with the same totals
    doubled = MetricTotals.from_flat(keys, den_keys, [2 * v for v in values])
    assert doubled.means(6) == pytest.approx(means)
