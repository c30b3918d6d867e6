"""kit.losses, competition part: the torch loss equals kit.evaluate.metrics.competition_score, has gradients, stays finite."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kit.constants import TARGETS, TRAIN_PREVALENCE
from kit.losses import combine_logits, competition_loss, patient_logit_from_vertebrae, slice_bce_loss
from kit.evaluate.metrics import competition_score


def batch(n: int = 64, seed: int = 0, scale: float = 4.0):
    """Labels with the train prevalences and float64 logits in a range where the metric's clip never bites."""
    rng = np.random.default_rng(seed)
    v = (rng.random((n, 7)) < np.array(TRAIN_PREVALENCE[1:])).astype(np.float64)
    y = np.c_[v.max(1), v]
    logits = rng.normal(0.0, scale, y.shape).clip(-30, 30)  # |logit| < 34.5: clipping at 1e-15 is inactive
    return torch.tensor(logits, dtype=torch.float64, requires_grad=True), torch.tensor(y)


@pytest.mark.parametrize("normalise", ["row", "global"])
def test_equals_competition_score(normalise):
    logits, y = batch()
    loss = competition_loss(logits, y, normalise=normalise)
    probs = torch.sigmoid(logits).detach().numpy()
    expected = competition_score(y.numpy(), probs, normalise=normalise)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert abs(loss.item() - expected) < 1e-9  # in fact far tighter than the promised 1e-6


def test_zero_logits_give_ln2():
    _, y = batch(8)
    assert competition_loss(torch.zeros(8, 8), y.float()).item() == pytest.approx(math.log(2), abs=1e-6)


def test_gradients_flow_and_match_the_weights():
    logits, y = batch(16)
    competition_loss(logits, y).backward()
    g = logits.grad
    assert torch.isfinite(g).all() and (g.abs() > 0).all()
    # d loss / d x_ij = w_ij * (p_ij - y_ij) / (W_i * B): the sign pushes p toward the label everywhere.
    p = torch.sigmoid(logits.detach())
    assert ((g > 0) == (p > y)).all()
    pos = torch.tensor([14.0, *[2.0] * 7], dtype=torch.float64)
    neg = torch.tensor([7.0, *[1.0] * 7], dtype=torch.float64)
    w = y * pos + (1 - y) * neg
    torch.testing.assert_close(g, w * (p - y) / w.sum(1, keepdim=True) / len(y))


def test_extreme_logits_stay_finite():
    # Beyond |logit| ~ 34.5 the metric caps each loss at -ln(1e-15); the loss keeps growing, finitely.
    y = torch.zeros(2, 8)
    y[0, :2] = 1
    x = torch.where(y > 0, torch.tensor(-200.0), torch.tensor(200.0)).requires_grad_()  # every label missed
    loss = competition_loss(x, y)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(200.0, rel=1e-4)
    assert torch.isfinite(x.grad).all()
    assert competition_score(y.numpy(), torch.sigmoid(x).detach().numpy()) == pytest.approx(-math.log(1e-15), rel=1e-3)


def test_shape_checks():
    with pytest.raises(ValueError, match=r"\(B, 8\).*got \(4, 7\)"):
        competition_loss(torch.zeros(4, 7), torch.zeros(4, 7))
    with pytest.raises(ValueError, match="normalise must be one of"):
        competition_loss(torch.zeros(4, 8), torch.zeros(4, 8), normalise="mean")


# --------------------------------------------------------------------------------------------------------- logits


def test_combine_logits_with_a_patient_head():
    v = torch.randn(5, 7)
    patient = torch.randn(5, 1)
    out = combine_logits(v, patient)
    assert out.shape == (5, 8)
    torch.testing.assert_close(out[:, :1], patient)
    torch.testing.assert_close(out[:, 1:], v)
    torch.testing.assert_close(combine_logits(v, patient.squeeze(1)), out)
    with pytest.raises(ValueError, match=r"vertebra_logits must be \(B, 7\)"):
        combine_logits(torch.zeros(5, 8))


def test_patient_from_vertebrae_is_any_fracture():
    v = torch.tensor([[0.0] * 7, [-3.0, 2.0, -1.0, -5.0, 0.5, -2.0, -4.0]], dtype=torch.float64)
    p_v = torch.sigmoid(v)
    expected = 1 - torch.prod(1 - p_v, dim=1)  # e.g. all p = 0.5: 1 - 0.5**7 = 0.9921875
    got = torch.sigmoid(combine_logits(v)[:, 0])
    torch.testing.assert_close(got, expected)
    assert got[0].item() == pytest.approx(1 - 0.5 ** 7)


def test_patient_from_vertebrae_is_finite_at_the_extremes():
    v = torch.tensor([[-120.0] * 7, [60.0] * 7, [-20.0] * 7], requires_grad=True)
    out = patient_logit_from_vertebrae(v)
    assert torch.isfinite(out).all()
    assert out[0].item() < -80 and out[1].item() > 50
    assert out[2].item() == pytest.approx(-20.0 + math.log(7), abs=1e-3)  # 7 small p's add: logit ~ ln(7 e^-20)
    out.sum().backward()
    assert torch.isfinite(v.grad).all()


# --------------------------------------------------------------------------------------------------------- slices


def test_slice_bce_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(3, 10, requires_grad=True)
    labels = (torch.rand(3, 10) > 0.7).float()
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False  # study 1 has 6 real slices, study 2 has 3
    mask[2, 3:] = False
    loss = slice_bce_loss(logits, labels, mask)
    real = torch.nn.functional.binary_cross_entropy_with_logits(logits[mask], labels[mask])
    torch.testing.assert_close(loss, real)
    # Whatever sits in the padding does not matter, and gets no gradient.
    junk = logits.detach().clone()
    junk[~mask] = 50.0
    torch.testing.assert_close(slice_bce_loss(junk, labels, mask), loss.detach())
    loss.backward()
    assert (logits.grad[~mask] == 0).all() and (logits.grad[mask] != 0).all()
    assert slice_bce_loss(logits, labels).item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).item())


def test_slice_bce_per_vertebra_channels():
    logits = torch.randn(2, 6, 7)
    labels = torch.zeros(2, 6, 7)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    loss = slice_bce_loss(logits, labels, mask, pos_weight=2.0)
    real = torch.nn.functional.binary_cross_entropy_with_logits(logits[mask], labels[mask])
    torch.testing.assert_close(loss, real)  # pos_weight has no effect on all-negative labels
    assert slice_bce_loss(logits, labels, torch.zeros(2, 6, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match=r"mask must be \(B, T\) = \(2, 6\)"):
        slice_bce_loss(logits, labels, mask[:, :5])


def test_targets_order_is_patient_first():
    assert TARGETS[0] == "patient_overall" and TARGETS[1:] == tuple(f"C{i}" for i in range(1, 8))
