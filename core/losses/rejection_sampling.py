"""Rejection-sampling selection math. Imports torch only."""

from __future__ import annotations

from torch import Tensor


def kl_penalised_scores(scores: Tensor, log_ratio: Tensor | None, kl_coef: float, standardise: bool = False,
                        eps: float = 1e-6) -> Tensor:
    """What best-of-K selects on: score - kl_coef * (log pi(y|x) - log pi_ref(y|x)), all (b, k).

    log_ratio is each sample's summed response log-prob under the sampling policy minus that under the frozen
    initial policy (None: no penalty). The KL-regularised optimum is pi* = pi_ref * exp(r / kl_coef) / Z, and a
    sample y ~ pi carries the importance weight pi*(y) / pi(y), whose log is (r - kl_coef * log(pi / pi_ref)) /
    kl_coef - log Z: the best of this selection score is the sample of largest weight toward pi*. A sample the
    reference finds unlikely (text the reward model never saw, where its errors lie) pays for it, so the policy
    cannot drift to it.

    standardise: first z-score each prompt's K scores, (score - their mean) / (their population std + eps), as
    GRPO standardises a group, so kl_coef is in standard deviations per nat whatever the reward model's scale,
    and where the reward model hardly separates a prompt's samples the KL term decides."""
    if standardise:
        scores = (scores - scores.mean(-1, keepdim=True)) / (scores.std(-1, unbiased=False, keepdim=True) + eps)
    if kl_coef == 0 or log_ratio is None:
        return scores
    return scores - kl_coef * log_ratio
