"""PPO for RLHF: KL-shaped token rewards, GAE, clipped policy/value losses, entropy bonus.

Per-token tensors cover RESPONSE positions only: (b, t), t = max new tokens; `mask` (b, t) is 1 on real
response tokens up to and including the first EOS, 0 after. Padded positions may hold garbage: every
difference is zeroed there before a nonlinearity, so nothing (not even inf) leaks into real positions.
Papers: PPO https://arxiv.org/abs/1707.06347, GAE https://arxiv.org/abs/1506.02438,
RLHF PPO https://arxiv.org/abs/1909.08593, https://arxiv.org/abs/2203.02155. KL controllers: kl_control.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from core.ops import entropy_from_logits, last_true_index, masked_mean, masked_whiten


def _zero_pad(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(~mask.bool(), 0.0)  # applied to linear terms, so padded grads are exactly 0


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from sampled-token log-probs: (b, t), (b, t) -> (b, t).

    k1 = logp - ref; k3 = (r - 1) - log r with r = exp(ref - logp), unbiased and >= 0
    (http://joschu.net/blog/kl-approx.html); "abs" = |logp - ref|; "mse" = 0.5 (logp - ref)^2.
    """
    log_ratio = logp - ref_logp  # (b, t)
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # (r - 1) - log r, with log r = -log_ratio
    if kind == "abs":
        return log_ratio.abs()
    if kind == "mse":
        return 0.5 * log_ratio.square()
    raise ValueError(f"unknown KL estimator kind {kind!r}; expected one of k1, k3, abs, mse")


def shape_scores(scores: torch.Tensor, has_eos: torch.Tensor, missing_eos_penalty: float | None = None,
                 clip: float | None = None) -> torch.Tensor:
    """Add -missing_eos_penalty (given as a positive number) to rows without EOS, then clip to
    [-clip, clip]. scores (b,), has_eos (b,) bool -> (b,). Whitening happens outside (ops.masked_whiten)."""
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~has_eos.bool()).to(scores.dtype)
    return scores.clamp(-clip, clip) if clip is not None else scores


def token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, kl_kind: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards -kl_coef * kl, plus the sequence score on the last real token of each row.

    Args:
        scores: (b,) reward-model scores. logp, ref_logp, mask: (b, t).
    Returns:
        rewards (b, t) and kl (b, t), both 0 on padding (an all-padding row gets no score).
    """
    kl = _zero_pad(kl_estimate(_zero_pad(logp, mask), _zero_pad(ref_logp, mask), kl_kind), mask)  # (b, t)
    rewards = -kl_coef * kl
    last = last_true_index(mask).unsqueeze(-1)  # (b, 1): the score goes on the last real token
    score = (scores.to(rewards.dtype) * mask.bool().any(-1)).unsqueeze(-1)  # (b, 1)
    return rewards.scatter_add(-1, last, score), kl


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (https://arxiv.org/abs/1506.02438), no grad.

    delta_t = r_t + gamma V_{t+1} - V_t with V = 0 past the last real token (the episode ends at EOS);
    A_t = delta_t + gamma lam A_{t+1}. rewards, values, mask (b, t) -> advantages, returns (b, t),
    returns = advantages + values, both 0 on padding.
    """
    r, v = _zero_pad(rewards.detach(), mask), _zero_pad(values.detach(), mask)  # garbage on padding -> 0
    t = r.shape[-1]
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=-1)  # (b, t), 0 after the last token
    delta = r + gamma * next_v - v  # (b, t), exactly 0 on padding
    adv, running = torch.zeros_like(r), torch.zeros_like(r[:, 0])
    for i in reversed(range(t)):
        running = delta[:, i] + gamma * lam * running
        adv[:, i] = running
    return _zero_pad(adv, mask), _zero_pad(adv + v, mask)


def whiten_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero-mean, unit-variance advantages over all real tokens of the batch: (b, t) -> (b, t)."""
    return masked_whiten(advantages, mask)


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor
    clipfrac: torch.Tensor  # fraction of real tokens where the clipped term was the active one
    approxkl: torch.Tensor  # masked mean of 0.5 (logp - old_logp)^2


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      clip_eps: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped surrogate max(-A r, -A clip(r)): (b, t) inputs -> loss (b, t), clipped (b, t) bool
    (the clipped term was the active one), log_ratio (b, t), 0 on padding. Grad reaches logp only."""
    log_ratio = _zero_pad(logp - old_logp.detach(), mask)  # (b, t)
    ratio, adv = log_ratio.exp(), advantages.detach()
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped), clipped > unclipped, log_ratio


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float = 0.2) -> PolicyLossOutput:
    """PPO clipped surrogate, token-level mean over all real tokens; (b, t) inputs. Grad reaches logp only."""
    surrogate, clipped, log_ratio = clipped_surrogate(logp, old_logp, advantages, mask, clip_eps)
    loss = masked_mean(surrogate, mask)
    clipfrac = masked_mean(clipped.to(logp.dtype), mask)
    return PolicyLossOutput(loss, clipfrac.detach(), masked_mean(0.5 * log_ratio.square(), mask).detach())


class ValueLossOutput(NamedTuple):
    loss: torch.Tensor
    clipfrac: torch.Tensor  # fraction of real tokens where the clipped value error was the larger one


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_eps: float = 0.2) -> ValueLossOutput:
    """Clipped value loss 0.5 * mean(max((v - R)^2, (v_clip - R)^2)); (b, t) inputs. Grad reaches values only.

    v_clip = clamp(v, old - eps, old + eps) is v itself, bit for bit, inside the range, so clipfrac counts only
    real clipping (old + clamp(v - old) rounds differently from v and counted float noise as clipping).
    """
    v, old, ret = (_zero_pad(x, mask) for x in (values, old_values.detach(), returns.detach()))  # (b, t)
    v_clipped = v.clamp(old - clip_eps, old + clip_eps)  # (b, t)
    err, err_clipped = v - ret, v_clipped - ret  # v - R, v_clipped - R; 0 on padding
    loss = 0.5 * masked_mean(torch.maximum(err.square(), err_clipped.square()), mask)
    clipfrac = masked_mean((err_clipped.square() > err.square()).to(values.dtype), mask)
    return ValueLossOutput(loss, clipfrac.detach())


def entropy_bonus(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean token entropy: logits (b, t, v), mask (b, t) -> scalar (keeps grad)."""
    return masked_mean(_zero_pad(entropy_from_logits(logits), mask), mask)


class PPOLossOutput(NamedTuple):
    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    entropy: torch.Tensor
    clipfrac: torch.Tensor
    approxkl: torch.Tensor
    value_clipfrac: torch.Tensor


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, entropy: torch.Tensor,
             clip_eps: float = 0.2, value_clip_eps: float = 0.2, vf_coef: float = 0.1,
             entropy_coef: float = 0.0) -> PPOLossOutput:
    """loss = policy + vf_coef * value - entropy_coef * entropy; entropy is entropy_bonus's scalar."""
    pg = policy_loss(logp, old_logp, advantages, mask, clip_eps)
    vf = value_loss(values, old_values, returns, mask, value_clip_eps)
    total = pg.loss + vf_coef * vf.loss - entropy_coef * entropy
    return PPOLossOutput(total, pg.loss.detach(), vf.loss.detach(), entropy.detach(), pg.clipfrac,
                         pg.approxkl, vf.clipfrac)

