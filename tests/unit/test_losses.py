"""PIT SI-SDR loss: matches a brute-force reference, ignores order and padding, stays finite."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from raytrain.losses import LOSSES, si_sdr_pit


def _ref_si_sdr(est: np.ndarray, ref: np.ndarray) -> float:
    """Textbook SI-SDR (Le Roux et al. 2019) on zero-mean signals, float64."""
    est = est - est.mean()
    ref = ref - ref.mean()
    target = (est @ ref) / (ref @ ref) * ref
    return float(10 * np.log10((target @ target) / ((target - est) @ (target - est))))


def _brute_force_loss(est: torch.Tensor, ref: torch.Tensor) -> float:
    e, r = est.double().numpy(), ref.double().numpy()
    best = []
    for b in range(e.shape[0]):
        scores = [
            np.mean([_ref_si_sdr(e[b, p[j]], r[b, j]) for j in range(r.shape[1])])
            for p in itertools.permutations(range(r.shape[1]))
        ]
        best.append(max(scores))
    return -float(np.mean(best))


@pytest.mark.parametrize("n_src", [2, 3])
def test_matches_brute_force_over_permutations(n_src: int) -> None:
    g = torch.Generator().manual_seed(n_src)
    ref = torch.randn(4, n_src, 800, generator=g)
    est = ref[:, torch.randperm(n_src, generator=g)] + 0.5 * torch.randn(4, n_src, 800, generator=g)
    loss = si_sdr_pit({"est_sources": est}, {"sources": ref})
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(_brute_force_loss(est, ref), abs=1e-3)


def test_registered_names() -> None:
    assert LOSSES.get("si_sdr_pit") is si_sdr_pit
    assert LOSSES.get("separation") is si_sdr_pit


def test_estimate_order_does_not_matter() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 3, 500, generator=g)
    est = ref + 0.3 * torch.randn(3, 3, 500, generator=g)
    base = si_sdr_pit({"est_sources": est}, {"sources": ref})
    for perm in ([1, 0, 2], [2, 1, 0], [1, 2, 0]):
        swapped = si_sdr_pit({"est_sources": est[:, perm]}, {"sources": ref})
        assert swapped.item() == pytest.approx(base.item(), abs=1e-5)


def test_padding_beyond_lengths_is_ignored() -> None:
    g = torch.Generator().manual_seed(1)
    lengths = [600, 350, 421]
    rows = [(torch.randn(2, n, generator=g), torch.randn(2, n, generator=g)) for n in lengths]
    per_row = [si_sdr_pit({"est_sources": e[None]}, {"sources": r[None]}).item() for e, r in rows]

    total = 700
    est = 5.0 * torch.randn(3, 2, total, generator=g)  # garbage beyond each length
    ref = torch.zeros(3, 2, total)
    for i, (e, r) in enumerate(rows):
        est[i, :, : lengths[i]] = e
        ref[i, :, : lengths[i]] = r
    loss = si_sdr_pit({"est_sources": est}, {"sources": ref, "lengths": torch.tensor(lengths)})
    assert loss.item() == pytest.approx(float(np.mean(per_row)), abs=1e-4)


def test_silent_target_gives_finite_loss_and_gradient() -> None:
    ref = torch.randn(2, 2, 400)
    ref[0, 1] = 0.0
    ref[1] = 0.0  # a fully silent example too
    est = torch.randn(2, 2, 400, requires_grad=True)
    loss = si_sdr_pit({"est_sources": est}, {"sources": ref})
    loss.backward()
    assert torch.isfinite(loss)
    assert est.grad is not None and torch.isfinite(est.grad).all()


def test_silent_estimate_and_target_give_finite_gradient() -> None:
    ref = torch.zeros(1, 2, 300)
    est = torch.zeros(1, 2, 300, requires_grad=True)
    loss = si_sdr_pit({"est_sources": est}, {"sources": ref, "lengths": torch.tensor([0])})
    loss.backward()
    assert torch.isfinite(loss) and est.grad is not None and torch.isfinite(est.grad).all()


def test_low_precision_estimates_are_scored_in_float32() -> None:
    ref = torch.randn(2, 2, 4000)
    est = (ref + 0.1 * torch.randn(2, 2, 4000)).to(torch.bfloat16)
    loss = si_sdr_pit({"est_sources": est}, {"sources": ref})
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(si_sdr_pit({"est_sources": est.float()}, {"sources": ref}).item())


def test_shape_mismatch_is_explained() -> None:
    with pytest.raises(ValueError, match="num_sources"):
        si_sdr_pit({"est_sources": torch.zeros(1, 3, 10)}, {"sources": torch.zeros(1, 2, 10)})


@pytest.mark.parametrize("n_src", [1, 2, 3, 4])
def test_values_permutations_and_gradients_equal_torchmetrics(n_src: int) -> None:
    """The permutation search over SI-SDR is raytrain's own (torchmetrics' import costs every phase ~2 s):
    it must give torchmetrics' values, permutations and gradients, silent rows included."""
    from torchmetrics.functional.audio import (
        permutation_invariant_training,
        scale_invariant_signal_distortion_ratio,
    )

    from raytrain.metrics.separation import mixture_si_sdr, pit_si_sdr

    g = torch.Generator().manual_seed(10 + n_src)
    ref = torch.randn(5, n_src, 640, generator=g)
    ref[1, 0] = 0.0  # a silent reference
    est = ref[:, torch.randperm(n_src, generator=g)] + 0.7 * torch.randn(5, n_src, 640, generator=g)
    est[2] = 0.0  # a silent estimate
    ours_in = est.clone().requires_grad_(True)
    theirs_in = est.clone().requires_grad_(True)
    best, perm = pit_si_sdr(ours_in, ref)
    center = lambda x: x - x.mean(-1, keepdim=True)  # noqa: E731 - pit_si_sdr centres over the valid samples
    want, want_perm = permutation_invariant_training(center(theirs_in), center(ref),
                                                     scale_invariant_signal_distortion_ratio,
                                                     mode="speaker-wise", eval_func="max")
    assert torch.equal(perm, want_perm)
    torch.testing.assert_close(best, want, rtol=1e-5, atol=1e-4)
    best.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-4, atol=1e-6)
    mix = ref.sum(1)
    torch.testing.assert_close(mixture_si_sdr(mix, ref), scale_invariant_signal_distortion_ratio(
        center(mix)[:, None].expand_as(ref), center(ref)).mean(1), rtol=1e-5, atol=1e-4)
