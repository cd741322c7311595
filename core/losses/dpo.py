"""Direct preference optimisation losses. Imports torch and the standard library only."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


class DPOLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, with grad
    chosen_rewards: torch.Tensor  # (n,) detached: beta * (policy_chosen - ref_chosen)
    rejected_rewards: torch.Tensor  # (n,) detached: beta * (policy_rejected - ref_rejected)
    accuracy: torch.Tensor  # detached scalar: mean(chosen_rewards > rejected_rewards)
    margin: torch.Tensor  # detached scalar: mean(chosen_rewards - rejected_rewards)


def uses_average_logprobs(loss_type: str) -> bool:
    """True when loss_type expects per-token-averaged sequence log-probs (ipo only); else sums."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    return loss_type == "ipo"


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_nll: torch.Tensor | None = None,
    nll_weight: float = 0.0,
) -> DPOLossOutput:
    """Preference loss on h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected), mean over rows.

    - ``sigmoid``: DPO (Rafailov et al. 2023, arXiv 2305.18290) with conservative-DPO label smoothing
      eps: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    - ``robust``: robust DPO (Chowdhury et al. 2024, arXiv 2403.00409), unbiased under label flips
      with rate eps: (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps), eps < 0.5.
    - ``hinge``: SLiC (Zhao et al. 2023, arXiv 2305.10425): relu(1 - beta h).
    - ``ipo``: IPO (Azar et al. 2023, arXiv 2310.12036): (h - 1 / (2 beta))**2. IPO's paper scores
      sequences by per-token-averaged log-probs, so for ipo the caller passes averaged log-probs;
      every other variant takes sums over completion tokens (see `uses_average_logprobs`).

    With nll_weight > 0 the RPO-style SFT term nll_weight * mean(chosen_nll) is added.

    Args:
        policy_chosen: policy log-probs of the chosen completions, (n,).
        policy_rejected: policy log-probs of the rejected completions, (n,).
        ref_chosen: reference log-probs of the chosen completions, (n,); pass them detached.
        ref_rejected: reference log-probs of the rejected completions, (n,); pass them detached.
        beta: strength of the implicit KL penalty (> 0).
        loss_type: one of "sigmoid", "robust", "hinge", "ipo".
        label_smoothing: assumed preference-flip rate eps, for sigmoid (0 <= eps <= 0.5) and robust
            (0 <= eps < 0.5) only.
        chosen_nll: per-row mean token NLL of the chosen completion, (n,); needed when nll_weight > 0.
        nll_weight: weight of the NLL term; 0 turns it off.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    eps = label_smoothing
    if eps and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to sigmoid and robust only, not {loss_type!r}")
    if not 0.0 <= eps <= 0.5 or (loss_type == "robust" and eps >= 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5] ([0, 0.5) for robust), got {eps}")
    if nll_weight < 0:
        raise ValueError(f"nll_weight must be >= 0, got {nll_weight}")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or policy_chosen.dim() != 1:
        raise ValueError(f"all log-prob inputs must be (n,) with the same n, got shapes {sorted(shapes)}")

    chosen_logratio = policy_chosen - ref_chosen  # (n,)
    rejected_logratio = policy_rejected - ref_rejected  # (n,)
    h = chosen_logratio - rejected_logratio  # (n,)
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2
    loss = losses.mean()

    if nll_weight > 0:
        if chosen_nll is None:
            raise ValueError(
                "nll_weight > 0 needs chosen_nll (per-row mean token NLL of the chosen completion)"
            )
        loss = loss + nll_weight * chosen_nll.mean()

    chosen_rewards = beta * chosen_logratio.detach()  # (n,)
    rejected_rewards = beta * rejected_logratio.detach()  # (n,)
    return DPOLossOutput(
        loss,
        chosen_rewards,
        rejected_rewards,
        (chosen_rewards > rejected_rewards).float().mean(),
        (chosen_rewards - rejected_rewards).mean(),
    )
