"""Hand-computed checks of core/losses/reward.py."""

import math

import pytest
import torch

from core.losses.reward import (
    ensemble_scores,
    llama2_combine,
    pairwise_loss,
    ranking_loss,
    weighted_sum,
    whiten_scores,
)


def nls(x: float) -> float:
    """-log sigmoid(x) = log(1 + exp(-x)), by hand."""
    return math.log(1 + math.exp(-x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def t(*xs, **kw):
    return torch.tensor(xs, dtype=torch.float64, **kw)


# ---------------------------------------------------------------- pairwise


def test_pairwise_hand_values():
    chosen, rejected = t(2.0, 0.5, 1.0), t(0.5, 1.0, 1.0)  # diffs 1.5, -0.5, 0.0
    out = pairwise_loss(chosen, rejected)
    expected = (nls(2.0 - 0.5) + nls(0.5 - 1.0) + nls(1.0 - 1.0)) / 3
    assert out.loss.item() == pytest.approx(expected)
    assert nls(0.0) == pytest.approx(math.log(2))
    assert out.accuracy.item() == pytest.approx(1 / 3)  # the tie counts as wrong
    assert out.margin.item() == pytest.approx((1.5 - 0.5 + 0.0) / 3)
    assert out.num_pairs == 3
    assert not out.accuracy.requires_grad and not out.margin.requires_grad


def test_pairwise_margin_variant():
    chosen, rejected, m = t(2.0, 0.5, 1.0), t(0.5, 1.0, 1.0), t(1.0, 0.0, 0.5)
    out = pairwise_loss(chosen, rejected, margin=m)
    expected = (nls(2.0 - 0.5 - 1.0) + nls(0.5 - 1.0 - 0.0) + nls(1.0 - 1.0 - 0.5)) / 3
    assert out.loss.item() == pytest.approx(expected)
    # metrics describe the rewards, not the margin-shifted logits
    assert out.margin.item() == pytest.approx((1.5 - 0.5 + 0.0) / 3)


def test_pairwise_centering_term():
    chosen, rejected = t(1.0, -0.5), t(0.0, -1.0)
    base = (nls(1.0 - 0.0) + nls(-0.5 + 1.0)) / 2
    center = ((1.0 + 0.0) ** 2 + (-0.5 - 1.0) ** 2) / 2  # (1 + 2.25) / 2
    out = pairwise_loss(chosen, rejected, center_coef=0.01)
    assert out.loss.item() == pytest.approx(base + 0.01 * center)


def test_pairwise_gradient_one_pair():
    sw, sl = t(0.7, requires_grad=True), t(-0.2, requires_grad=True)
    pairwise_loss(sw, sl).loss.backward()
    assert sw.grad.item() == pytest.approx(-sig(-(0.7 + 0.2)))
    assert sl.grad.item() == pytest.approx(sig(-(0.7 + 0.2)))


def test_pairwise_rejects_bad_shapes():
    with pytest.raises(ValueError):
        pairwise_loss(t(1.0, 2.0), t(1.0))


# ---------------------------------------------------------------- K-wise ranking


def test_ranking_k4_six_pairs():
    scores, ranks = t(1.0, 2.0, 0.5, -1.0), torch.tensor([0, 1, 2, 3])
    out = ranking_loss(scores, torch.zeros(4, dtype=torch.long), ranks)
    # pairs (better, worse): (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    diffs = [1.0 - 2.0, 1.0 - 0.5, 1.0 + 1.0, 2.0 - 0.5, 2.0 + 1.0, 0.5 + 1.0]
    assert out.loss.item() == pytest.approx(sum(nls(d) for d in diffs) / 6)
    assert out.num_pairs == 6
    assert out.accuracy.item() == pytest.approx(5 / 6)  # only (0,1) is misordered
    assert out.margin.item() == pytest.approx((-1.0 + 0.5 + 2.0 + 1.5 + 3.0 + 1.5) / 6)


def two_groups():
    # group 7 (K=2): rows 0, 3; group 3 (K=3): rows 1, 2, 4. Interleaved and non-contiguous ids.
    scores = t(1.0, 0.5, -0.5, 0.0, 1.0)
    group = torch.tensor([7, 3, 3, 7, 3])
    ranks = torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0])
    return scores, group, ranks


def test_ranking_two_groups_per_group_average():
    scores, group, ranks = two_groups()
    out = ranking_loss(scores, group, ranks)
    loss_a = nls(1.0 - 0.0)  # 1 pair
    loss_b = (nls(1.0 - 0.5) + nls(1.0 + 0.5) + nls(0.5 + 0.5)) / 3  # 3 pairs: (4,1) (4,2) (1,2)
    assert out.loss.item() == pytest.approx((loss_a + loss_b) / 2)
    assert out.num_pairs == 4
    assert out.accuracy.item() == pytest.approx(1.0)
    assert out.margin.item() == pytest.approx((1.0 + 0.5 + 1.5 + 1.0) / 4)  # plain mean over pairs


def test_ranking_centering_per_group():
    scores, group, ranks = two_groups()
    base = ranking_loss(scores, group, ranks).loss.item()
    center_a = (1.0 + 0.0) ** 2
    center_b = ((1.0 + 0.5) ** 2 + (1.0 - 0.5) ** 2 + (0.5 - 0.5) ** 2) / 3
    out = ranking_loss(scores, group, ranks, center_coef=0.1)
    assert out.loss.item() == pytest.approx(base + 0.1 * (center_a + center_b) / 2)


def test_ranking_gradients_per_pair_weights():
    scores, group, ranks = two_groups()
    scores.requires_grad_(True)
    ranking_loss(scores, group, ranks).loss.backward()
    # group A pair weight 1/(1 pair * 2 groups); group B pair weight 1/(3 pairs * 2 groups)
    expected = [
        -sig(-1.0) / 2,  # row 0, better in A
        (sig(-0.5) - sig(-1.0)) / 6,  # row 1: worse vs row 4 (d=0.5), better vs row 2 (d=1.0)
        (sig(-1.5) + sig(-1.0)) / 6,  # row 2: worst in B
        sig(-1.0) / 2,  # row 3, worse in A
        -(sig(-0.5) + sig(-1.5)) / 6,  # row 4: best in B
    ]
    assert scores.grad.tolist() == pytest.approx(expected)
    assert scores.grad[0] < 0 < scores.grad[3]


def test_ranking_tie_from_ratings():
    ratings = [7, 5, 5, 2]  # ranks [0, 1, 1, 2]: the two 5s form no pair -> 5 pairs, not 6
    scores, group = t(2.0, 1.0, 0.0, -1.0), torch.zeros(4, dtype=torch.long)
    out = ranking_loss(scores, group, torch.tensor([0, 1, 1, 2]))
    diffs = [2.0 - 1.0, 2.0 - 0.0, 2.0 + 1.0, 1.0 + 1.0, 0.0 + 1.0]
    assert out.num_pairs == 5
    assert out.loss.item() == pytest.approx(sum(nls(d) for d in diffs) / 5)
    # negated ratings order the same way as ranks
    same = ranking_loss(scores, group, -torch.tensor(ratings, dtype=torch.float64))
    assert same.loss.item() == pytest.approx(out.loss.item())


def test_ranking_shuffle_invariant():
    scores, group, ranks = two_groups()
    ref = ranking_loss(scores, group, ranks).loss
    for perm in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        perm = torch.tensor(perm)
        assert torch.allclose(ranking_loss(scores[perm], group[perm], ranks[perm]).loss, ref)


def test_ranking_all_tied_group_excluded():
    scores = t(3.0, -3.0, 0.5, 0.0, requires_grad=True)
    group = torch.tensor([0, 0, 1, 1])
    ranks = torch.tensor([1, 1, 0, 1])  # group 0 all tied
    out = ranking_loss(scores, group, ranks)
    assert out.loss.item() == pytest.approx(nls(0.5 - 0.0))  # not halved by the empty group
    assert out.num_pairs == 1
    out.loss.backward()
    assert scores.grad[:2].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        ranking_loss(t(1.0, 2.0), torch.tensor([0, 0]), torch.tensor([1, 1]))


# ---------------------------------------------------------------- combining reward models


def test_llama2_combine():
    helpful = t(1.0, 2.0, 3.0, 4.0)
    safety = t(0.5, -2.0, -1.0, 3.0)
    unsafe = torch.tensor([True, False, False, False])
    assert sig(-2.0) < 0.15 < sig(-1.0)  # row 1 falls under the threshold, row 2 does not
    out = llama2_combine(helpful, safety, unsafe)
    # row 0: flagged -> safety; row 1: sigmoid(-2) < 0.15 -> safety; rows 2, 3 -> helpful
    assert out.tolist() == [0.5, -2.0, 3.0, 4.0]
    assert llama2_combine(helpful, safety, unsafe, threshold=0.5).tolist() == [0.5, -2.0, -1.0, 4.0]


def test_weighted_sum():
    out = weighted_sum([t(1.0, 2.0), t(-1.0, 4.0)], [0.5, 2.0])
    assert out.tolist() == pytest.approx([0.5 * 1.0 + 2.0 * -1.0, 0.5 * 2.0 + 2.0 * 4.0])
    with pytest.raises(ValueError):
        weighted_sum([t(1.0)], [1.0, 2.0])


def test_whiten_scores():
    x = t(1.0, 2.0, 3.0)  # mean 2, unbiased std sqrt(((1)+(0)+(1))/2) = 1
    assert whiten_scores(x).tolist() == pytest.approx([-1.0, 0.0, 1.0])
    assert whiten_scores(x, mean=1.0, std=2.0).tolist() == pytest.approx([0.0, 0.5, 1.0])


# ---------------------------------------------------------------- reward-model ensembles


def test_ensemble_mean_min_mean_minus_std():
    scores = t(1.0, 4.0, 2.0, 0.0, 6.0, 2.0).view(3, 2)  # 3 members x 2 pairs: columns [1, 2, 6] and [4, 0, 2]
    assert ensemble_scores(scores, "mean").tolist() == pytest.approx([(1 + 2 + 6) / 3, (4 + 0 + 2) / 3])  # [3, 2]
    assert ensemble_scores(scores, "min").tolist() == [1.0, 0.0]
    # population std: column 0 deviations from 3 are -2, -1, 3 -> (4 + 1 + 9) / 3 = 14/3;
    # column 1 deviations from 2 are 2, -2, 0 -> (4 + 4 + 0) / 3 = 8/3
    expected = [3 - 0.5 * math.sqrt(14 / 3), 2 - 0.5 * math.sqrt(8 / 3)]
    assert ensemble_scores(scores, "mean_minus_std", lam=0.5).tolist() == pytest.approx(expected)
    assert ensemble_scores(scores, "mean_minus_std", lam=0.0).tolist() == pytest.approx([3.0, 2.0])
    # two members, lam 1: mean - |a - b| / 2 = min(a, b)
    two = t(1.0, 5.0, 3.0, -1.0).view(2, 2)  # columns [1, 3] and [5, -1]
    assert ensemble_scores(two, "mean_minus_std").tolist() == pytest.approx([2 - 1, 2 - 3]) == [1.0, -1.0]
    with pytest.raises(ValueError, match="members, b"):
        ensemble_scores(t(1.0, 2.0), "mean")
    with pytest.raises(ValueError, match="unknown ensemble"):
        ensemble_scores(scores, "median")
