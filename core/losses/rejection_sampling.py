"""Rejection-sampling selection math: best-of-K's KL-penalised score and ReST's threshold filter. Imports torch
and the standard library only."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

ThresholdKind = Literal["score", "quantile"]


def standardise_per_prompt(scores: Tensor, eps: float = 1e-6) -> Tensor:
    """Each prompt's K scores z-scored: (score - their mean) / (their population std + eps), (b, k) -> (b, k), as
    GRPO standardises a group. A prompt whose K scores are all equal gets zeros."""
    return (scores - scores.mean(-1, keepdim=True)) / (scores.std(-1, unbiased=False, keepdim=True) + eps)


def kl_penalised_scores(scores: Tensor, log_ratio: Tensor | None, kl_coef: float, standardise: bool = False,
                        eps: float = 1e-6) -> Tensor:
    """What best-of-K selects on: score - kl_coef * (log pi(y|x) - log pi_ref(y|x)), all (b, k).

    log_ratio is each sample's summed response log-prob under the sampling policy minus that under the frozen
    initial policy (None: no penalty). The KL-regularised optimum is pi* = pi_ref * exp(r / kl_coef) / Z, and a
    sample y ~ pi carries the importance weight pi*(y) / pi(y), whose log is (r - kl_coef * log(pi / pi_ref)) /
    kl_coef - log Z: the best of this selection score is the sample of largest weight toward pi*. A sample the
    reference finds unlikely (text the reward model never saw, where its errors lie) pays for it, so the policy
    cannot drift to it.

    standardise: first z-score each prompt's K scores (standardise_per_prompt), so kl_coef is in standard
    deviations per nat whatever the reward model's scale, and where the reward model hardly separates a prompt's
    samples the KL term decides."""
    if standardise:
        scores = standardise_per_prompt(scores, eps)
    if kl_coef == 0 or log_ratio is None:
        return scores
    return scores - kl_coef * log_ratio


def check_thresholds(thresholds: Sequence[float], kind: ThresholdKind = "score") -> list[float]:
    """ReST's Improve schedule tau_1 <= tau_2 <= ...: a non-empty list of finite, non-decreasing numbers (quantiles:
    each in [0, 1]); returns it as floats, raises ValueError naming the first offending entry."""
    if kind not in ("score", "quantile"):
        raise ValueError(f"threshold_kind must be 'score' or 'quantile', got {kind!r}")
    values = [float(t) for t in thresholds]
    if not values:
        raise ValueError("thresholds must hold at least one threshold (None turns ReST off)")
    for i, t in enumerate(values):
        if not math.isfinite(t):
            raise ValueError(f"thresholds[{i}] is {t}: every threshold must be finite")
        if kind == "quantile" and not 0.0 <= t <= 1.0:
            raise ValueError(f"thresholds[{i}] is {t}: a quantile threshold must lie in [0, 1]")
        if i and t < values[i - 1]:
            raise ValueError(f"thresholds must not decrease (ReST raises the bar each Improve step): thresholds[{i}] "
                             f"= {t} < thresholds[{i - 1}] = {values[i - 1]}")
    return values


def threshold_keep(scores: Tensor, threshold: float, kind: ThresholdKind = "score", valid: Tensor | None = None,
                   standardise: bool = False, eps: float = 1e-6) -> Tensor:
    """ReST's Improve filter (Gulcehre et al. 2023, arXiv 2308.08998): scores (n, k), K samples of n prompts ->
    keep (n, k) bool, every sample whose score reaches the bar, not only each prompt's best.

    standardise: the scores are first z-scored per prompt (standardise_per_prompt, over all K samples), so a
    threshold counts standard deviations above the prompt's mean. kind "score": the bar is `threshold` itself;
    "quantile": the bar is the threshold-quantile of the valid (standardised) scores, taking the higher of the
    two neighbours (sorted ascending v_0 .. v_{m-1}, the bar is v_ceil(threshold * (m - 1))), so 0 keeps every
    valid sample and 1 the highest ones (ties included). valid (n, k) bool: samples that may be kept (False: a blank
    response); None: all."""
    if standardise:
        scores = standardise_per_prompt(scores, eps)
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.bool()
    if kind == "quantile":
        pool = scores[valid].sort().values  # (m,) ascending
        if pool.numel() == 0:
            return torch.zeros_like(valid)
        # 1e-9: 0.7 * 10 is 7.000000000000001 in floats, whose ceiling would skip a sample
        bar = pool[min(math.ceil(threshold * (pool.numel() - 1) - 1e-9), pool.numel() - 1)]
    else:
        bar = threshold
    return (scores >= bar) & valid
