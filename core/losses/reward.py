"""Reward-model losses (pairwise, K-wise ranking) and ways to combine several reward models.

Imports torch and the standard library only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class RewardLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, with grad
    accuracy: torch.Tensor  # detached scalar: fraction of pairs with r_w > r_l (ties count as wrong)
    margin: torch.Tensor  # detached scalar: mean(r_w - r_l)
    num_pairs: int  # pairs that entered the loss


def pairwise_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> RewardLossOutput:
    """Bradley-Terry pairwise loss: mean of -log sigmoid(r_w - r_l - m).

    InstructGPT (arXiv 2203.02155) with K=2; the margin m is the Llama 2 variant (arXiv 2307.09288,
    eq. 2). center_coef adds center_coef * mean((r_w + r_l)**2), the reward-centering term of
    Eisenstein et al. 2023 (arXiv 2312.09244), which pins the free offset of the rewards near 0.

    Args:
        chosen: rewards r_w of the preferred responses, (n,).
        rejected: rewards r_l of the other responses, (n,).
        margin: optional per-pair margin m, (n,), larger for more clearly separated pairs.
        center_coef: weight of the centering term; 0 turns it off.
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(
            f"chosen and rejected must both be (n,), got {tuple(chosen.shape)}, {tuple(rejected.shape)}"
        )
    diff = chosen - rejected  # (n,)
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    diff = diff.detach()
    return RewardLossOutput(loss, (diff > 0).float().mean(), diff.mean(), diff.numel())


def ranking_loss(
    scores: torch.Tensor, group: torch.Tensor, ranks: torch.Tensor, center_coef: float = 0.0
) -> RewardLossOutput:
    """InstructGPT K-wise ranking loss (arXiv 2203.02155, eq. 1), with ties.

    Each group (one prompt, K responses scored once each) gives every pair (i, j) with
    rank_i < rank_j (lower rank = better) a term -log sigmoid(s_i - s_j). Terms are averaged within a
    group (1/C(K,2) without ties), then over groups, so a 9-response prompt weighs as much as a
    2-response one. Equal ranks form no pair; groups with no pair are left out of the mean.

    Args:
        scores: rewards, (N,).
        group: prompt index per row, (N,) long; need not be sorted or contiguous.
        ranks: rank per row within its group, (N,) float or long; lower is better.
        center_coef: weight of center_coef * mean over pairs of (s_i + s_j)**2, averaged the same
            way (per group, then over groups).

    Raises:
        ValueError: when no group holds a pair.
    """
    if not (scores.dim() == group.dim() == ranks.dim() == 1) or not (len(scores) == len(group) == len(ranks)):
        raise ValueError("scores, group and ranks must all be (N,) with the same N")
    # pair[i, j]: i and j answer the same prompt and i is ranked strictly better than j
    pair = (group[:, None] == group[None, :]) & (ranks[:, None] < ranks[None, :])  # (N, N)
    _, gid = torch.unique(group, return_inverse=True)  # (N,) contiguous group ids
    pairs_per_group = scores.new_zeros(int(gid.max()) + 1)  # (G,)
    pairs_per_group.index_add_(0, gid, pair.sum(1).to(pairs_per_group.dtype))
    num_groups = int((pairs_per_group > 0).sum())
    if num_groups == 0:
        raise ValueError("ranking_loss: no group has two responses with different ranks")
    # each pair weighs 1 / (pairs in its group * groups with a pair); row i fixes the group
    row_weight = 1.0 / (pairs_per_group[gid].clamp(min=1) * num_groups)  # (N,)
    weight = pair.to(scores.dtype) * row_weight[:, None]  # (N, N), 0 off-pair
    diff = scores[:, None] - scores[None, :]  # (N, N): s_i - s_j
    loss = (weight * -F.logsigmoid(diff)).sum()
    if center_coef:
        loss = loss + center_coef * (weight * (scores[:, None] + scores[None, :]) ** 2).sum()
    picked = diff.detach()[pair]  # (P,)
    return RewardLossOutput(loss, (picked > 0).float().mean(), picked.mean(), picked.numel())


def weighted_sum(scores: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_k weights[k] * scores[k]: K tensors of shape (b,) -> (b,)."""
    if not scores or len(scores) != len(weights):
        raise ValueError(
            f"need one weight per score tensor, got {len(scores)} scores and {len(weights)} weights"
        )
    return sum(w * s for w, s in zip(weights, scores, strict=True))


def ensemble_scores(scores: torch.Tensor, how: str, lam: float = 1.0) -> torch.Tensor:
    """One score per pair from a reward-model ensemble: (members, b) -> (b,).

    "mean": the members' mean. "min": the worst case over members (Coste et al. 2023, arXiv 2310.02743, WCO).
    "mean_minus_std": mean - lam * std over members, uncertainty-weighted (their UWO penalises the variance;
    the std keeps the penalty in reward units). The std is the POPULATION std (divide by members, not
    members - 1): the ensemble is the whole set being combined, as in the paper's 1/k variance, and with two
    members and lam = 1 it equals "min" (mean - |a - b| / 2), which makes lam easy to read.
    """
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"ensemble scores must be (members, b), got {tuple(scores.shape)}")
    if how == "mean":
        return scores.mean(0)
    if how == "min":
        return scores.min(0).values
    if how == "mean_minus_std":
        return scores.mean(0) - lam * scores.std(0, correction=0)
    raise ValueError(f"unknown ensemble combination {how!r}: expected 'mean', 'min' or 'mean_minus_std'")


def llama2_combine(
    helpful: torch.Tensor, safety: torch.Tensor, unsafe: torch.Tensor, threshold: float = 0.15
) -> torch.Tensor:
    """Llama 2 piecewise reward (arXiv 2307.09288, sec. 3.2.2, eq. 4).

    R_c = R_s where the prompt is flagged unsafe or sigmoid(R_s) < threshold, else R_h. Inputs are raw
    reward-model outputs (logits); the paper then uses WHITEN(LOGIT(R_c)), and since R_c here is
    already a logit, LOGIT(sigmoid(chosen)) is the chosen logit itself, which is what comes back.
    Whiten it with `whiten_scores`.

    Args:
        helpful: helpfulness RM logits, (b,).
        safety: safety RM logits, (b,).
        unsafe: (b,) bool, the prompt is tagged as possibly unsafe.
        threshold: safety probability below which the safety reward takes over.
    """
    use_safety = unsafe.bool() | (torch.sigmoid(safety) < threshold)  # (b,)
    return torch.where(use_safety, safety, helpful)


def whiten_scores(
    x: torch.Tensor, mean: float | None = None, std: float | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / (std + eps), (b,) -> (b,).

    Uses the batch mean and (Bessel-corrected; population for b == 1) std when not given; pass running
    statistics from the reward model's training data to keep rewards comparable across batches.
    """
    if mean is None:
        mean = x.mean()
    if std is None:
        std = x.std(correction=1 if x.numel() > 1 else 0)
    return (x - mean) / (std + eps)
