"""Critic-free advantages for the PPO stage: GRPO, RLOO, REINFORCE++, the k3 KL loss term, loss aggregation.

Per-token tensors cover RESPONSE positions only, as in ppo.py: (b, t) with `mask` 1 on real response tokens
(through the first EOS). Groups: rows i*n .. i*n+n-1 are the n samples of prompt i (generate's repeat_interleave).
Papers: GRPO https://arxiv.org/abs/2402.03300 (DeepSeekMath), Dr. GRPO https://arxiv.org/abs/2503.20783,
DAPO https://arxiv.org/abs/2503.14476, RLOO https://arxiv.org/abs/2402.14740,
REINFORCE++ https://arxiv.org/abs/2501.03262.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from core.losses.ppo import clipped_surrogate, kl_estimate
from core.ops import masked_mean, masked_whiten

LossAgg = Literal["token_mean", "seq_mean"]


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(b,) -> (b / n, n): one row per prompt."""
    if group_size < 1 or x.shape[0] % group_size:
        raise ValueError(f"{x.shape[0]} rows do not split into groups of {group_size} samples per prompt")
    return x.reshape(-1, group_size)


@torch.no_grad()
def grpo_advantages(scores: torch.Tensor, group_size: int, scale_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO outcome advantage per response: (r_i - mean(group)) / (std(group) + eps); (b,) -> (b,).

    std is the sample std (Bessel-corrected, as torch.std and TRL); scale_std=False drops it (Dr. GRPO: the std
    up-weights groups that are nearly all right or all wrong). A group of equal scores gets 0.
    """
    g = _groups(scores.float(), group_size)  # (b / n, n)
    centred = g - g.mean(-1, keepdim=True)
    if scale_std:
        centred = centred / (g.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: R_i - mean_{j != i} R_j over the group (the other samples are the baseline); (b,) -> (b,).

    Needs group_size >= 2. Equals n / (n - 1) * (R_i - mean(group)).
    """
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt (the leave-one-out baseline)")
    g = _groups(rewards.float(), group_size)  # (b / n, n)
    others = (g.sum(-1, keepdim=True) - g) / (group_size - 1)  # (b / n, n): mean of the other n - 1
    return (g - others).reshape(-1)


def per_token(sequence_advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same advantage on every real token of a response, 0 on padding: (b,), (b, t) -> (b, t)."""
    return sequence_advantages[:, None].to(torch.float32) * mask.bool()


@torch.no_grad()
def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = r_t + gamma G_{t+1}, the episode ending at the last real token; (b, t) -> (b, t), 0 on padding."""
    r = rewards.detach().masked_fill(~mask.bool(), 0.0)
    out, running = torch.zeros_like(r), torch.zeros_like(r[:, 0])
    for i in reversed(range(r.shape[-1])):
        running = r[:, i] + gamma * running
        out[:, i] = running
    return out.masked_fill(~mask.bool(), 0.0)


@torch.no_grad()
def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            whiten: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: returns = discounted future token rewards (the KL-shaped rewards of ppo.token_rewards),
    advantages = returns whitened over all real tokens of the batch (global batch normalisation, no critic).
    rewards, mask (b, t) -> advantages, returns (b, t), 0 on padding."""
    returns = discounted_returns(rewards, mask, gamma)
    return (masked_whiten(returns, mask) if whiten else returns), returns


def kl_loss_term(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 KL to the reference as a loss term (GRPO): exp(ref - logp) - (ref - logp) - 1, >= 0 and
    unbiased; grad reaches logp only. (b, t) -> (b, t), 0 on padding (zeroed before the exp)."""
    m = mask.bool()
    kl = kl_estimate(logp.masked_fill(~m, 0.0), ref_logp.detach().masked_fill(~m, 0.0), "k3")
    return kl.masked_fill(~m, 0.0)


def aggregate(x: torch.Tensor, mask: torch.Tensor, how: LossAgg = "token_mean") -> torch.Tensor:
    """(b, t) per-token values -> scalar.

    token_mean: mean over all real tokens of the batch (DAPO, Dr. GRPO): every token weighs the same.
    seq_mean: mean over each response's tokens, then over responses (the GRPO paper); rows without a real
    token are left out.
    """
    if how == "token_mean":
        return masked_mean(x, mask)
    if how == "seq_mean":
        rows = mask.bool().any(-1)
        return masked_mean(masked_mean(x, mask, dim=-1), rows)
    raise ValueError(f"unknown loss aggregation {how!r}; expected token_mean or seq_mean")


class CriticFreeLossOutput(NamedTuple):
    loss: torch.Tensor
    policy_loss: torch.Tensor  # the clipped surrogate, aggregated
    kl_loss: torch.Tensor  # the k3 KL term before kl_coef, aggregated (0 without ref_logp)
    entropy: torch.Tensor  # token entropy, aggregated
    clipfrac: torch.Tensor  # token-level fraction where the clipped term was active
    approxkl: torch.Tensor  # token-level mean of 0.5 (logp - old_logp)^2


def critic_free_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     entropy: torch.Tensor, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
                     clip_eps: float = 0.2, entropy_coef: float = 0.0,
                     loss_agg: LossAgg = "token_mean") -> CriticFreeLossOutput:
    """loss = agg(clipped surrogate + kl_coef * k3 KL - entropy_coef * entropy); (b, t) inputs, entropy per token.

    ref_logp given (GRPO): the KL is this loss term; None (RLOO, REINFORCE++): the KL is already in the reward.
    """
    surrogate, clipped, log_ratio = clipped_surrogate(logp, old_logp, advantages, mask, clip_eps)  # (b, t)
    kl = kl_loss_term(logp, ref_logp, mask) if ref_logp is not None else torch.zeros_like(surrogate)
    pg, kl_term, ent = (aggregate(x, mask, loss_agg) for x in (surrogate, kl, entropy.masked_fill(~mask.bool(), 0.0)))
    total = pg + kl_coef * kl_term - entropy_coef * ent
    clipfrac = masked_mean(clipped.to(surrogate.dtype), mask)
    approxkl = masked_mean(0.5 * log_ratio.square(), mask)
    return CriticFreeLossOutput(total, pg.detach(), kl_term.detach(), ent.detach(), clipfrac.detach(),
                                approxkl.detach())
