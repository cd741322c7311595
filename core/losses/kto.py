"""Kahneman-Tversky optimisation (KTO) on unpaired, labelled completions.
Imports torch and the standard library only."""

from __future__ import annotations

from typing import NamedTuple

import torch


class KTOLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, with grad
    rewards: torch.Tensor  # (n,) detached: beta * (policy - ref)
    kl: torch.Tensor  # detached scalar: z0, the clamped KL estimate the rewards are compared with


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_logratios: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossOutput:
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306, eq. 8), mean over the n completions of lambda_y - v(x, y):

        r(x, y) = log pi(y|x) - log pi_ref(y|x)          (sums over completion tokens)
        z0      = max(0, mean(kl_logratios)), detached   (a batch estimate of KL(pi || pi_ref))
        v(x, y) = lambda_D * sigmoid(beta (r - z0))  if y is desirable
                  lambda_U * sigmoid(beta (z0 - r))  if y is undesirable

    so a desirable row costs lambda_D (1 - sigmoid(beta (r - z0))) and an undesirable one
    lambda_U (1 - sigmoid(beta (z0 - r))). The paper estimates z0 from mismatched pairs of the same batch
    (x_i with the completion y_j of another row, j != i): `kl_logratios` are their log-ratios
    log pi(y_j|x_i) - log pi_ref(y_j|x_i). No gradient flows through z0 (the paper's and TRL's choice). The paper
    advises lambda_D n_D / (lambda_U n_U) in [1, 4/3] for n_D desirable and n_U undesirable examples.

    Args:
        policy_logps: policy log-probs of the completions, (n,).
        ref_logps: reference log-probs of the completions, (n,); pass them detached.
        desirable: (n,) bool, True for a desirable completion.
        kl_logratios: (m,) policy minus reference log-probs of mismatched prompt/completion pairs.
        beta: strength of the implicit KL penalty (> 0).
        desirable_weight: lambda_D (> 0).
        undesirable_weight: lambda_U (> 0).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not (desirable_weight > 0 and undesirable_weight > 0):
        raise ValueError(f"desirable_weight and undesirable_weight must be > 0, got {desirable_weight}, "
                         f"{undesirable_weight}")
    if policy_logps.dim() != 1 or policy_logps.shape != ref_logps.shape or desirable.shape != policy_logps.shape:
        raise ValueError(f"policy_logps, ref_logps and desirable must be (n,) with the same n, got "
                         f"{tuple(policy_logps.shape)}, {tuple(ref_logps.shape)}, {tuple(desirable.shape)}")
    if kl_logratios.dim() != 1 or kl_logratios.numel() == 0:
        raise ValueError(f"kl_logratios must be (m,) with m >= 1, got {tuple(kl_logratios.shape)}")
    desirable = desirable.bool()
    z0 = kl_logratios.detach().mean().clamp(min=0)
    r = policy_logps - ref_logps  # (n,)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),
    )  # (n,)
    return KTOLossOutput(losses.mean(), beta * r.detach(), z0)
