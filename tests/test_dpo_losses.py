"""Hand-computed checks of core/losses/dpo.py."""

import math

import pytest
import torch

from core.losses.dpo import dpo_loss, uses_average_logprobs

BETA = 0.5


def logsig(x: float) -> float:
    """log sigmoid(x) = -log(1 + exp(-x)), by hand."""
    return -math.log(1 + math.exp(-x))


def rows(requires_grad: bool = False):
    """Two rows; h = (pc - rc) - (pr - rr)."""
    f = lambda *xs: torch.tensor(xs, dtype=torch.float64, requires_grad=requires_grad)  # noqa: E731
    pc, pr = f(-1.0, -3.0), f(-2.0, -2.5)
    rc, rr = torch.tensor([-1.5, -2.0], dtype=torch.float64), torch.tensor([-1.5, -2.0], dtype=torch.float64)
    return pc, pr, rc, rr


# h0 = (-1.0 + 1.5) - (-2.0 + 1.5) = 0.5 + 0.5 = 1.0 ; h1 = (-3.0 + 2.0) - (-2.5 + 2.0) = -1.0 + 0.5 = -0.5
H = (1.0, -0.5)


def test_sigmoid():
    out = dpo_loss(*rows(), beta=BETA)
    expected = (-logsig(BETA * H[0]) - logsig(BETA * H[1])) / 2
    assert out.loss.item() == pytest.approx(expected)


def test_sigmoid_label_smoothing():
    eps = 0.1
    out = dpo_loss(*rows(), beta=BETA, label_smoothing=eps)
    expected = sum(-(1 - eps) * logsig(BETA * h) - eps * logsig(-BETA * h) for h in H) / 2
    assert out.loss.item() == pytest.approx(expected)
    plain = dpo_loss(*rows(), beta=BETA)
    assert dpo_loss(*rows(), beta=BETA, label_smoothing=0.0).loss.item() == pytest.approx(plain.loss.item())


def test_robust():
    eps = 0.2
    out = dpo_loss(*rows(), beta=BETA, loss_type="robust", label_smoothing=eps)
    expected = sum((-(1 - eps) * logsig(BETA * h) + eps * logsig(-BETA * h)) / (1 - 2 * eps) for h in H) / 2
    assert out.loss.item() == pytest.approx(expected)
    # eps = 0 is plain DPO
    robust0 = dpo_loss(*rows(), beta=BETA, loss_type="robust").loss.item()
    assert robust0 == pytest.approx(dpo_loss(*rows(), beta=BETA).loss.item())


def test_hinge():
    out = dpo_loss(*rows(), beta=BETA, loss_type="hinge")
    expected = (max(0.0, 1 - 0.5 * 1.0) + max(0.0, 1 - 0.5 * -0.5)) / 2  # (0.5 + 1.25) / 2
    assert out.loss.item() == pytest.approx(expected)


def test_ipo():
    out = dpo_loss(*rows(), beta=BETA, loss_type="ipo")
    target = 1 / (2 * BETA)  # 1.0
    expected = ((1.0 - target) ** 2 + (-0.5 - target) ** 2) / 2  # (0 + 2.25) / 2
    assert out.loss.item() == pytest.approx(expected)


def test_uses_average_logprobs():
    assert uses_average_logprobs("ipo")
    assert not any(uses_average_logprobs(k) for k in ("sigmoid", "robust", "hinge"))


def test_reference_equal_to_policy_gives_log2():
    pc, pr = torch.tensor([-4.0, -1.0]), torch.tensor([-2.0, -7.0])
    out = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=BETA)
    assert out.loss.item() == pytest.approx(math.log(2))
    assert out.margin.item() == 0.0 and out.accuracy.item() == 0.0  # equal rewards are not wins


def test_rewards_accuracy_margin():
    out = dpo_loss(*rows(), beta=BETA)
    chosen = [BETA * (-1.0 + 1.5), BETA * (-3.0 + 2.0)]  # [0.25, -0.5]
    rejected = [BETA * (-2.0 + 1.5), BETA * (-2.5 + 2.0)]  # [-0.25, -0.25]
    assert out.chosen_rewards.tolist() == pytest.approx(chosen)
    assert out.rejected_rewards.tolist() == pytest.approx(rejected)
    assert out.accuracy.item() == pytest.approx(0.5)  # row 0 wins, row 1 loses
    assert out.margin.item() == pytest.approx(((0.25 + 0.25) + (-0.5 + 0.25)) / 2)
    for metric in out[1:]:
        assert not metric.requires_grad


def test_gradients_policy_only():
    pc, pr, rc, rr = rows(requires_grad=True)
    rc_leaf = rc.clone().requires_grad_(True)
    out = dpo_loss(pc, pr, rc_leaf.detach(), rr, beta=BETA)
    out.loss.backward()
    n = 2
    # d/d pc_i of -log sigmoid(beta h_i) / n = -beta * sigmoid(-beta h_i) / n
    expected = [-BETA * (1 / (1 + math.exp(BETA * h))) / n for h in H]
    assert pc.grad.tolist() == pytest.approx(expected)
    assert pr.grad.tolist() == pytest.approx([-g for g in expected])
    assert rc_leaf.grad is None and rr.grad is None
    # with only refs (no grad) the loss carries no graph
    _, _, rc2, rr2 = rows()
    assert not dpo_loss(rc2, rr2, rc2, rr2).loss.requires_grad


def test_nll_term_adds_exactly():
    nll = torch.tensor([2.0, 1.0], dtype=torch.float64)
    base = dpo_loss(*rows(), beta=BETA).loss.item()
    out = dpo_loss(*rows(), beta=BETA, chosen_nll=nll, nll_weight=0.3)
    assert out.loss.item() == pytest.approx(base + 0.3 * (2.0 + 1.0) / 2)
    # weight 0 ignores chosen_nll
    assert dpo_loss(*rows(), beta=BETA, chosen_nll=nll).loss.item() == pytest.approx(base)
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo_loss(*rows(), beta=BETA, nll_weight=0.3)


def test_validation():
    with pytest.raises(ValueError, match="sigmoid, robust, hinge, ipo"):
        dpo_loss(*rows(), loss_type="kto")
    with pytest.raises(ValueError, match="kto"):
        uses_average_logprobs("kto")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*rows(), beta=0.0)
    with pytest.raises(ValueError):
        dpo_loss(*rows(), loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError):
        dpo_loss(*rows(), loss_type="ipo", label_smoothing=0.1)
    pc, pr, rc, rr = rows()
    with pytest.raises(ValueError):
        dpo_loss(pc, pr[:1], rc, rr)
