"""Hand-computed checks of core/losses/reference_free.py (SimPO, ORPO, CPL)."""

import math

import pytest
import torch

from core.losses.dpo import dpo_loss
from core.losses.reference_free import cpl_loss, log1mexp, orpo_loss, simpo_loss


def f64(*xs, requires_grad=False):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=requires_grad)


# ---- SimPO: -log sigmoid(beta (a_w - a_l) - gamma), a = per-token-averaged log-prob ----


def test_simpo_by_hand():
    # row 0: 2 * (-1.0 - -2.0) - 0.5 = 1.5 -> log(1 + e^-1.5) = 0.2014
    # row 1: 2 * (-2.0 - -1.5) - 0.5 = -1.5 -> log(1 + e^1.5) = 1.7014
    out = simpo_loss(f64(-1.0, -2.0), f64(-2.0, -1.5), beta=2.0, gamma=0.5)
    assert math.log(1 + math.exp(-1.5)) == pytest.approx(0.2014, abs=1e-4)
    assert out.loss.item() == pytest.approx((0.201413 + 1.701413) / 2, abs=1e-6)
    assert out.chosen_rewards.tolist() == [-2.0, -4.0] and out.rejected_rewards.tolist() == [-4.0, -3.0]  # beta * a
    assert out.accuracy.item() == 0.5  # row 0 wins, row 1 loses
    assert out.margin.item() == pytest.approx((2.0 + -1.0) / 2)
    assert all(not m.requires_grad for m in out[1:])


def test_simpo_gamma_zero_is_reference_free_dpo_on_averages():
    # gamma 0, equal averages: -log sigmoid(0) = log 2
    out = simpo_loss(f64(-1.3), f64(-1.3), beta=2.5, gamma=0.0)
    assert out.loss.item() == pytest.approx(math.log(2))
    # gamma 0.5 on equal averages: log(1 + e^0.5) = 0.9741
    assert simpo_loss(f64(-1.3), f64(-1.3), beta=2.5).loss.item() == pytest.approx(math.log(1 + math.exp(0.5)))


def test_simpo_gradient_and_nll_term():
    chosen, rejected = f64(-1.0, requires_grad=True), f64(-2.0, requires_grad=True)
    simpo_loss(chosen, rejected, beta=2.0, gamma=0.5).loss.backward()
    # d/da_w of -log sigmoid(z) with z = 2 (a_w - a_l) - 0.5 = 1.5: -2 sigmoid(-1.5) = -2 / (1 + e^1.5) = -0.3648
    assert chosen.grad.item() == pytest.approx(-2 / (1 + math.exp(1.5)))
    assert rejected.grad.item() == pytest.approx(2 / (1 + math.exp(1.5)))
    base = simpo_loss(f64(-1.0, -2.0), f64(-2.0, -1.5), beta=2.0).loss.item()
    with_nll = simpo_loss(f64(-1.0, -2.0), f64(-2.0, -1.5), beta=2.0, chosen_nll=f64(1.0, 2.0), nll_weight=0.5)
    assert with_nll.loss.item() == pytest.approx(base + 0.5 * (1.0 + 2.0) / 2)
    with pytest.raises(ValueError, match="chosen_nll"):
        simpo_loss(f64(-1.0), f64(-2.0), nll_weight=0.5)


def test_simpo_validation():
    with pytest.raises(ValueError, match="beta"):
        simpo_loss(f64(-1.0), f64(-2.0), beta=0.0)
    with pytest.raises(ValueError, match="simpo_gamma"):
        simpo_loss(f64(-1.0), f64(-2.0), gamma=-0.1)
    with pytest.raises(ValueError, match="same n"):
        simpo_loss(f64(-1.0, -2.0), f64(-2.0))


# ---- ORPO: NLL_w + beta * -log sigmoid(log odds_w - log odds_l), log odds = a - log(1 - e^a) ----


def test_orpo_by_hand():
    # row 0: a_w = -ln 2 (p 1/2, odds 1, log odds 0); a_l = -ln 4 (p 1/4, odds 1/3, log odds -ln 3)
    #   ratio term -log sigmoid(ln 3) = -log(3/4) = ln(4/3) = 0.287682; NLL_w = ln 2 = 0.693147
    #   row loss = 0.693147 + 0.1 * 0.287682 = 0.721916
    # row 1: a_w = -ln(4/3) (p 3/4, log odds ln 3); a_l = -ln 4 (log odds -ln 3): difference ln 9
    #   -log sigmoid(ln 9) = -log(9/10) = 0.105361; NLL_w = ln(4/3) = 0.287682; row loss = 0.298218
    chosen, rejected = f64(-math.log(2), -math.log(4 / 3)), f64(-math.log(4), -math.log(4))
    out = orpo_loss(chosen, rejected, beta=0.1)
    assert out.loss.item() == pytest.approx((0.721916 + 0.298218) / 2, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([-0.1 * math.log(2), -0.1 * math.log(4 / 3)])
    assert out.accuracy.item() == 1.0


def test_orpo_gradient_reaches_both_sides():
    chosen, rejected = f64(-math.log(2), requires_grad=True), f64(-math.log(4), requires_grad=True)
    orpo_loss(chosen, rejected, beta=0.1).loss.backward()
    # d log odds / da = 1 + e^a / (1 - e^a) = 1 / (1 - p): 2 at p 1/2, 4/3 at p 1/4
    # d/da_w = -1 (NLL) - 0.1 * sigmoid(-ln 3) * 2 = -1 - 0.1 * 0.25 * 2 = -1.05
    # d/da_l = +0.1 * sigmoid(-ln 3) * 4/3 = 0.1 * 0.25 * 4/3 = 0.033333
    assert chosen.grad.item() == pytest.approx(-1.05)
    assert rejected.grad.item() == pytest.approx(0.1 * 0.25 * 4 / 3)


def test_log1mexp_is_stable_where_the_naive_form_is_not():
    # near 0 in float32: exp(-1e-10) rounds to 1, so log1p(-exp(x)) = -inf; log(-expm1(x)) = log(1e-10) = -23.0259
    x = torch.tensor([-1e-10], dtype=torch.float32)
    assert torch.isinf(torch.log1p(-torch.exp(x))).all()
    assert log1mexp(x).item() == pytest.approx(math.log(1e-10), rel=1e-5)
    # far below: log(1 - e^-50) = -e^-50 (to first order); 1 - e^-50 rounds to 1 in float64, log1p keeps it
    assert log1mexp(torch.tensor([-50.0], dtype=torch.float64)).item() == pytest.approx(-math.exp(-50), rel=1e-9)
    # both branches agree with the plain formula where it is accurate
    mid = torch.tensor([-0.1, -0.69, -0.7, -3.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(mid), torch.log(1 - torch.exp(mid)))
    # probability 1 (a = 0) stays finite instead of giving infinite log odds
    assert torch.isfinite(orpo_loss(torch.zeros(1), torch.tensor([-1.0])).loss)


def test_orpo_validation():
    with pytest.raises(ValueError, match="beta"):
        orpo_loss(f64(-1.0), f64(-2.0), beta=-1.0)


# ---- CPL: -log sigmoid(alpha S_w - lambda alpha S_l), S = SUMMED log-prob, alpha = beta ----


def test_cpl_by_hand():
    # row 0: S_w = -2, S_l = -3, alpha 0.5, lambda 0.5: 0.5 * -2 - 0.5 * 0.5 * -3 = -1 + 0.75 = -0.25
    #   -log sigmoid(-0.25) = log(1 + e^0.25) = 0.825939
    # row 1: S_w = -4, S_l = -1: 0.5 * -4 - 0.25 * -1 = -2 + 0.25 = -1.75 -> log(1 + e^1.75) = log(6.754603) = 1.910224
    out = cpl_loss(f64(-2.0, -4.0), f64(-3.0, -1.0), beta=0.5, cpl_lambda=0.5)
    row0 = -math.log(1 / (1 + math.exp(-(-1 + 0.75))))
    row1 = -math.log(1 / (1 + math.exp(-(-2 + 0.25))))
    assert row0 == pytest.approx(0.825939, abs=1e-6) and row1 == pytest.approx(1.910224, abs=1e-6)
    assert out.loss.item() == pytest.approx((row0 + row1) / 2)
    # rewards are beta * S (lambda is not in them): 0.5 * [-2, -4] and 0.5 * [-3, -1]
    assert out.chosen_rewards.tolist() == [-1.0, -2.0] and out.rejected_rewards.tolist() == [-1.5, -0.5]
    assert out.accuracy.item() == 0.5  # row 0 wins (-1 > -1.5), row 1 loses (-2 < -0.5)
    assert out.margin.item() == pytest.approx((0.5 + -1.5) / 2)
    assert all(not m.requires_grad for m in out[1:])


def test_cpl_lambda_one_is_dpo_sigmoid_with_zero_reference():
    chosen, rejected, zeros = f64(-2.0, -4.0, -0.5), f64(-3.0, -1.0, -7.0), f64(0.0, 0.0, 0.0)
    cpl = cpl_loss(chosen, rejected, beta=0.1, cpl_lambda=1.0)
    dpo = dpo_loss(chosen, rejected, zeros, zeros, beta=0.1, loss_type="sigmoid")
    for a, b in zip(cpl, dpo):
        torch.testing.assert_close(a, b)
    # row 0 by hand: 0.1 * (-2 - -3) = 0.1 -> log(1 + e^-0.1) = 0.644397
    assert cpl_loss(f64(-2.0), f64(-3.0), beta=0.1).loss.item() == pytest.approx(math.log(1 + math.exp(-0.1)))


def test_cpl_gradient_signs_and_lambda():
    # d/dS_w of -log sigmoid(z), z = a S_w - l a S_l: -a sigmoid(-z); d/dS_l: +l a sigmoid(-z)
    # S_w = -2, S_l = -3, a 0.5, l 0.5: z = -0.25, sigmoid(0.25) = 1 / (1 + e^-0.25) = 0.562177
    chosen, rejected = f64(-2.0, requires_grad=True), f64(-3.0, requires_grad=True)
    cpl_loss(chosen, rejected, beta=0.5, cpl_lambda=0.5).loss.backward()
    s = 1 / (1 + math.exp(-0.25))
    assert chosen.grad.item() == pytest.approx(-0.5 * s) and chosen.grad.item() < 0  # descent raises S_w
    assert rejected.grad.item() == pytest.approx(0.5 * 0.5 * s) and rejected.grad.item() > 0  # and lowers S_l
    # the rejected side pushes lambda times as hard as the chosen side: |dS_l| / |dS_w| = 0.5
    assert abs(rejected.grad.item() / chosen.grad.item()) == pytest.approx(0.5)
    # equal scores S_w = S_l = -2 (a 1): lambda 1 gives log 2; lambda 0.5 gives z = -2 + 1 = -1 -> log(1 + e^1),
    # so CPL(lambda < 1) still has a gradient to raise both when the pair is tied
    assert cpl_loss(f64(-2.0), f64(-2.0), beta=1.0).loss.item() == pytest.approx(math.log(2))
    assert cpl_loss(f64(-2.0), f64(-2.0), beta=1.0, cpl_lambda=0.5).loss.item() == pytest.approx(
        math.log(1 + math.exp(1)))


def test_cpl_nll_term():
    base = cpl_loss(f64(-2.0, -4.0), f64(-3.0, -1.0), beta=0.5, cpl_lambda=0.5).loss.item()
    with_nll = cpl_loss(f64(-2.0, -4.0), f64(-3.0, -1.0), beta=0.5, cpl_lambda=0.5, chosen_nll=f64(1.0, 3.0),
                        nll_weight=0.2)
    assert with_nll.loss.item() == pytest.approx(base + 0.2 * (1.0 + 3.0) / 2)
    with pytest.raises(ValueError, match="chosen_nll"):
        cpl_loss(f64(-1.0), f64(-2.0), nll_weight=0.5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=0.0), "beta must be > 0"),
    (dict(cpl_lambda=0.0), r"cpl_lambda must be in \(0, 1\], got 0.0"),
    (dict(cpl_lambda=-0.5), r"cpl_lambda must be in \(0, 1\]"),
    (dict(cpl_lambda=1.5), r"cpl_lambda must be in \(0, 1\], got 1.5"),
    (dict(cpl_lambda=float("nan")), r"cpl_lambda must be in \(0, 1\]"),
    (dict(nll_weight=-1.0), "nll_weight must be >= 0"),
])
def test_cpl_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cpl_loss(f64(-1.0), f64(-2.0), **kwargs)
    with pytest.raises(ValueError, match="same n"):
        cpl_loss(f64(-1.0, -2.0), f64(-2.0))
