"""Hand-computed checks of core/losses/kto.py."""

import math

import pytest
import torch

from core.losses.kto import kto_loss

BETA = 0.5


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def rows(requires_grad=False):
    """r = policy - ref = [1, -1, 0]; rows 0 and 2 desirable, row 1 undesirable."""
    policy = torch.tensor([-3.0, -5.0, -4.0], dtype=torch.float64, requires_grad=requires_grad)
    ref = torch.tensor([-4.0, -4.0, -4.0], dtype=torch.float64)
    return policy, ref, torch.tensor([True, False, True])


def test_kto_by_hand():
    # z0 = max(0, mean(0.4, 0.8)) = 0.6
    # row 0 (desirable):   1 - sigmoid(0.5 (1 - 0.6))    = 1 - sigmoid(0.2)  = 0.450166
    # row 1 (undesirable): 1 - sigmoid(0.5 (0.6 - -1))   = 1 - sigmoid(0.8)  = 0.310026
    # row 2 (desirable):   1 - sigmoid(0.5 (0 - 0.6))    = 1 - sigmoid(-0.3) = 0.574443
    out = kto_loss(*rows(), torch.tensor([0.4, 0.8], dtype=torch.float64), beta=BETA)
    assert 1 - sig(0.2) == pytest.approx(0.450166, abs=1e-6)
    assert out.loss.item() == pytest.approx((0.450166 + 0.310026 + 0.574443) / 3, abs=1e-6)
    assert out.kl.item() == pytest.approx(0.6)
    assert out.rewards.tolist() == pytest.approx([0.5, -0.5, 0.0])  # beta * r
    assert not out.rewards.requires_grad and not out.kl.requires_grad


def test_kto_weights():
    # undesirable_weight 1.5 scales row 1 only: 1.5 * 0.310026 = 0.465039
    out = kto_loss(*rows(), torch.tensor([0.4, 0.8], dtype=torch.float64), beta=BETA, undesirable_weight=1.5)
    assert out.loss.item() == pytest.approx((0.450166 + 0.465039 + 0.574443) / 3, abs=1e-6)
    out = kto_loss(*rows(), torch.tensor([0.4, 0.8], dtype=torch.float64), beta=BETA, desirable_weight=2.0)
    assert out.loss.item() == pytest.approx((2 * 0.450166 + 0.310026 + 2 * 0.574443) / 3, abs=1e-6)


def test_negative_kl_estimate_is_clamped_to_zero():
    # mean(-1.0, 0.2) = -0.4 -> z0 = 0: rows 1 - sigmoid(0.5), 1 - sigmoid(0.5), 1 - sigmoid(0)
    out = kto_loss(*rows(), torch.tensor([-1.0, 0.2], dtype=torch.float64), beta=BETA)
    assert out.kl.item() == 0.0
    assert out.loss.item() == pytest.approx((2 * (1 - sig(0.5)) + 0.5) / 3)


def test_policy_equal_to_reference_costs_half_of_each_weight():
    logps = torch.tensor([-2.0, -7.0])
    out = kto_loss(logps, logps.clone(), torch.tensor([True, False]), torch.zeros(2), desirable_weight=1.0,
                   undesirable_weight=3.0)
    assert out.loss.item() == pytest.approx((0.5 + 3 * 0.5) / 2)  # 1 - sigmoid(0) = 0.5 per row


def test_gradient_reaches_the_policy_only():
    policy, ref, desirable = rows(requires_grad=True)
    kl = torch.tensor([0.4, 0.8], dtype=torch.float64, requires_grad=True)
    kto_loss(policy, ref, desirable, kl, beta=BETA).loss.backward()
    # desirable: d/dr (1 - sigmoid(b (r - z0))) / n = -b s (1 - s) / n with s = sigmoid(b (r - z0))
    # undesirable: d/dr (1 - sigmoid(b (z0 - r))) / n = +b s (1 - s) / n with s = sigmoid(b (z0 - r))
    s0, s1, s2 = sig(0.2), sig(0.8), sig(-0.3)
    expected = [-BETA * s0 * (1 - s0) / 3, BETA * s1 * (1 - s1) / 3, -BETA * s2 * (1 - s2) / 3]
    assert policy.grad.tolist() == pytest.approx(expected)
    assert kl.grad is None  # z0 is detached


def test_validation():
    policy, ref, desirable = rows()
    kl = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(policy, ref, desirable, kl, beta=0.0)
    with pytest.raises(ValueError, match="undesirable_weight"):
        kto_loss(policy, ref, desirable, kl, undesirable_weight=0.0)
    with pytest.raises(ValueError, match="same n"):
        kto_loss(policy, ref[:2], desirable, kl)
    with pytest.raises(ValueError, match="kl_logratios"):
        kto_loss(policy, ref, desirable, torch.zeros(0))
