"""Hand-checked tests for core/losses/critic_free.py: GRPO / Dr. GRPO and RLOO group advantages, REINFORCE++
returns and whitening, the k3 KL loss term, token- and sequence-level aggregation, micro-batch weights."""

import math

import pytest
import torch

from core.losses.critic_free import (
    aggregate,
    critic_free_loss,
    discounted_returns,
    grpo_advantages,
    kl_loss_term,
    per_token,
    reinforce_pp_advantages,
    rloo_advantages,
)
from modules.rollout import micro_batch_weights


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


# ---------------------------------------------------------------- group advantages


def test_grpo_advantages_by_hand():
    scores = torch.tensor([1.0, 3.0, 2.0, 6.0])  # groups of 2: [1, 3] and [2, 6]
    # means 2 and 4 -> centred [-1, 1] and [-2, 2]
    close(grpo_advantages(scores, 2, scale_std=False), [-1.0, 1.0, -2.0, 2.0])
    # sample stds (Bessel): sqrt(((-1)^2 + 1^2) / (2 - 1)) = sqrt(2); sqrt((4 + 4) / 1) = sqrt(8)
    eps = 1e-4
    s1, s2 = math.sqrt(2.0), math.sqrt(8.0)
    close(grpo_advantages(scores, 2, eps=eps), [-1 / (s1 + eps), 1 / (s1 + eps), -2 / (s2 + eps), 2 / (s2 + eps)])
    # one group of 4: mean 3, centred [-2, 0, -1, 3], var (4 + 0 + 1 + 9) / 3 = 14 / 3
    s = math.sqrt(14 / 3)
    close(grpo_advantages(scores, 4, eps=eps), [-2 / (s + eps), 0.0, -1 / (s + eps), 3 / (s + eps)])
    # a group of equal scores carries no signal: 0, not NaN
    close(grpo_advantages(torch.tensor([5.0, 5.0, 0.0, 1.0]), 2)[:2], [0.0, 0.0])
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(scores, 3)


def test_rloo_advantages_by_hand():
    rewards = torch.tensor([1.0, 3.0, 2.0, 6.0])
    # groups of 2: the baseline of each is the other one: 1 - 3, 3 - 1, 2 - 6, 6 - 2
    close(rloo_advantages(rewards, 2), [-2.0, 2.0, -4.0, 4.0])
    # a group of 3 [1, 2, 6]: baselines (2 + 6) / 2 = 4, (1 + 6) / 2 = 3.5, (1 + 2) / 2 = 1.5
    close(rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3), [1 - 4.0, 2 - 3.5, 6 - 1.5])
    # = n / (n - 1) (R - mean): mean 3 -> 1.5 * [-2, -1, 3]
    close(rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3), [-3.0, -1.5, 4.5])
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(rewards, 1)


def test_sequence_advantage_on_every_real_token_and_zero_on_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    close(per_token(torch.tensor([0.5, -2.0]), mask), [[0.5, 0.5, 0.5, 0.0], [-2.0, 0.0, 0.0, 0.0]])


# ---------------------------------------------------------------- REINFORCE++


def test_discounted_returns_by_hand_and_padding_ignored():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 9.9], [0.5, 0.5, 0.5, 0.5]])  # 9.9: garbage on row 0's padding
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    # gamma 0.5, row 0: G2 = 1.0, G1 = -0.2 + 0.5 * 1.0 = 0.3, G0 = 0.1 + 0.5 * 0.3 = 0.25
    # row 1: G3 = 0.5, G2 = 0.5 + 0.25 = 0.75, G1 = 0.5 + 0.375 = 0.875, G0 = 0.5 + 0.4375 = 0.9375
    close(discounted_returns(rewards, mask, 0.5), [[0.25, 0.3, 1.0, 0.0], [0.9375, 0.875, 0.75, 0.5]])


def test_reinforce_pp_whitens_returns_over_all_real_tokens_of_the_batch():
    # gamma 1: row 0's score 2 on its last token -> returns [2, 2, 2]; row 1's -2 -> [-2, -2]
    rewards = torch.tensor([[0.0, 0.0, 2.0, 7.0], [0.0, -2.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, returns = reinforce_pp_advantages(rewards, mask, gamma=1.0)
    close(returns, [[2.0, 2.0, 2.0, 0.0], [-2.0, -2.0, 0.0, 0.0]])
    # 5 real tokens [2, 2, 2, -2, -2]: mean 0.4, deviations 1.6 x3 and -2.4 x2,
    # unbiased var (3 * 2.56 + 2 * 5.76) / 4 = 19.2 / 4 = 4.8 (masked_whiten adds eps 1e-8)
    std = math.sqrt(4.8 + 1e-8)
    close(adv, [[1.6 / std, 1.6 / std, 1.6 / std, 0.0], [-2.4 / std, -2.4 / std, 0.0, 0.0]])
    close(reinforce_pp_advantages(rewards, mask, gamma=1.0, whiten=False)[0], returns)


# ---------------------------------------------------------------- KL loss term, aggregation, the loss


def test_k3_kl_loss_term_by_hand_grad_to_logp_only():
    logp = torch.tensor([[-1.0, -2.0, 50.0]], requires_grad=True)  # position 2 is padding (garbage)
    ref = torch.tensor([[-1.5, -1.0, -50.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    kl = kl_loss_term(logp, ref, mask)
    # d = ref - logp: -0.5 and 1.0; k3 = exp(d) - d - 1
    close(kl, [[math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1, 0.0]])
    kl.sum().backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp); padding gets exactly 0
    close(logp.grad, [[1 - math.exp(-0.5), 1 - math.exp(1.0), 0.0]])
    assert ref.grad is None


def test_aggregate_token_mean_and_seq_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [10.0, 99.0, 99.0, 99.0], [99.0, 99.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # row 2: no real token
    close(aggregate(x, mask, "token_mean"), (1 + 2 + 3 + 10) / 4)  # 4 real tokens
    close(aggregate(x, mask, "seq_mean"), ((1 + 2 + 3) / 3 + 10 / 1) / 2)  # (2 + 10) / 2, row 2 left out
    with pytest.raises(ValueError, match="seq_sum"):
        aggregate(x, mask, "seq_sum")


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_critic_free_loss_at_ratio_one_by_hand(agg):
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    adv = per_token(torch.tensor([1.0, -2.0]), mask)
    logp = torch.tensor([[-1.0, -2.0, -1.0, 0.0], [-1.5, 0.0, 0.0, 0.0]], requires_grad=True)
    old = logp.detach().clone()  # first pass: ratio 1, the surrogate is -A per token
    ref = torch.tensor([[-1.5, -1.0, -1.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    entropy = torch.tensor([[0.5, 0.5, 0.5, 99.0], [2.0, 99.0, 99.0, 99.0]])
    out = critic_free_loss(logp, old, adv, mask, entropy, ref, kl_coef=0.1, entropy_coef=0.01, loss_agg=agg)
    # surrogate [[-1, -1, -1], [2]]; k3 with d = ref - logp: -0.5, 1.0, 0.0 and 0.5
    k = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 2, 0.0, math.exp(0.5) - 0.5 - 1]
    if agg == "token_mean":  # 4 real tokens
        pg, kl, ent = (-3 + 2) / 4, sum(k) / 4, (1.5 + 2.0) / 4
    else:  # per response, then over the 2 responses
        pg, kl, ent = (-1 + 2) / 2, (sum(k[:3]) / 3 + k[3]) / 2, (0.5 + 2.0) / 2
    close(out.policy_loss, pg)
    close(out.kl_loss, kl)
    close(out.entropy, ent)
    close(out.loss, pg + 0.1 * kl - 0.01 * ent)
    close(out.clipfrac, 0.0)
    close(out.approxkl, 0.0)
    out.loss.backward()
    assert (logp.grad[mask == 0] == 0).all() and (logp.grad[mask == 1] != 0).all()


def test_critic_free_loss_clips_and_has_no_kl_without_reference():
    mask = torch.tensor([[1, 1]])
    old = torch.tensor([[-1.0, -1.0]])
    logp = old + torch.tensor([[math.log(1.5), 0.0]])  # ratio 1.5 on token 0, 1 on token 1
    out = critic_free_loss(logp, old, torch.tensor([[1.0, 1.0]]), mask, torch.zeros(1, 2), clip_eps=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: -1
    close(out.policy_loss, (-1.2 - 1.0) / 2)
    close(out.clipfrac, 0.5)
    close(out.approxkl, 0.5 * math.log(1.5) ** 2 / 2)
    close(out.kl_loss, 0.0)
    close(out.loss, (-1.2 - 1.0) / 2)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_micro_batch_weights_make_the_minibatch_loss_its_aggregate(agg):
    # responses of 3, 1, 4 and 2 tokens; micro-batches [0, 1, 2] and [3] hold 8 and 2 tokens, 3 and 1 rows
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    x = torch.arange(16.0).view(4, 4)
    micro = [torch.tensor([0, 1, 2]), torch.tensor([3])]
    weights = micro_batch_weights(mask, micro, by_tokens=agg == "token_mean")
    close(weights, [8 / 10, 2 / 10] if agg == "token_mean" else [3 / 4, 1 / 4])
    total = sum(w * aggregate(x[idx], mask[idx], agg) for idx, w in zip(micro, weights))
    close(total, aggregate(x, mask, agg))
    # token mean of all 10 tokens: (0+1+2 + 4 + 8+9+10+11 + 12+13) / 10 = 70 / 10
    if agg == "token_mean":
        close(total, 7.0)
