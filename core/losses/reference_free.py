"""Reference-free preference losses: no reference model. SimPO and ORPO score a completion by its per-token-AVERAGED
log-prob, CPL by its SUMMED log-prob. Imports torch and the standard library only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.losses.dpo import DPOLossOutput

REFERENCE_FREE = ("simpo", "orpo", "cpl")
AVERAGED = ("simpo", "orpo")  # take per-token-averaged sequence log-probs; cpl takes sums


def _check(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected log-probs must be (n,) with the same n, got "
                         f"{tuple(chosen.shape)} and {tuple(rejected.shape)}")


def _output(loss: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> DPOLossOutput:
    return DPOLossOutput(loss, chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float().mean(),
                         (chosen_rewards - rejected_rewards).mean())


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    chosen_nll: torch.Tensor | None = None,
    nll_weight: float = 0.0,
) -> DPOLossOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734): mean over rows of -log sigmoid(beta (a_w - a_l) - gamma), with
    a = a sequence's per-token-AVERAGED log-prob (length-normalised; no reference model) and gamma the target
    reward margin. The paper's beta is ~2-2.5 (not DPO's 0.1) and gamma in (0, 1.5] (TRL and torchtune default
    0.5). Rewards are beta * a. nll_weight > 0 adds nll_weight * mean(chosen_nll) (CPO's SFT term, TRL cpo_alpha).

    Args:
        policy_chosen: per-token-averaged log-probs of the chosen completions, (n,).
        policy_rejected: per-token-averaged log-probs of the rejected completions, (n,).
        beta: reward scale (> 0).
        gamma: target reward margin (>= 0).
        chosen_nll: per-row mean token NLL of the chosen completion, (n,); needed when nll_weight > 0.
        nll_weight: weight of the NLL term; 0 turns it off.
    """
    _check(policy_chosen, policy_rejected, beta)
    if not gamma >= 0:
        raise ValueError(f"simpo_gamma must be >= 0, got {gamma}")
    if nll_weight < 0:
        raise ValueError(f"nll_weight must be >= 0, got {nll_weight}")
    loss = -F.logsigmoid(beta * (policy_chosen - policy_rejected) - gamma).mean()
    if nll_weight > 0:
        if chosen_nll is None:
            raise ValueError("nll_weight > 0 needs chosen_nll (per-row mean token NLL of the chosen completion)")
        loss = loss + nll_weight * chosen_nll.mean()
    return _output(loss, beta * policy_chosen.detach(), beta * policy_rejected.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stably (Maechler 2012): log(-expm1(x)) near 0, log1p(-exp(x)) below -log 2.
    x >= 0 (a probability of 1) is clamped just below 0 so the result stays finite."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    beta: float = 0.1,
) -> DPOLossOutput:
    """ORPO (Hong et al. 2024, arXiv 2403.07691): mean over rows of
    NLL(y_w) + beta * -log sigmoid(log odds(y_w) - log odds(y_l)), where for a per-token-AVERAGED log-prob a,
    p = exp(a) and log odds = log p - log(1 - p) = a - log1mexp(a). beta is the paper's lambda (TRL's ORPOConfig
    beta likewise; the paper uses 0.1-0.25). NLL(y_w) = -a_w, the chosen completion's mean token NLL per row,
    averaged over rows (TRL pools the chosen tokens of the whole batch instead). Rewards are beta * a, as TRL's.

    Args:
        policy_chosen: per-token-averaged log-probs of the chosen completions, (n,), all < 0.
        policy_rejected: per-token-averaged log-probs of the rejected completions, (n,).
        beta: weight lambda of the odds-ratio term (> 0).
    """
    _check(policy_chosen, policy_rejected, beta)
    log_odds = (policy_chosen - log1mexp(policy_chosen)) - (policy_rejected - log1mexp(policy_rejected))  # (n,)
    loss = (-policy_chosen - beta * F.logsigmoid(log_odds)).mean()
    return _output(loss, beta * policy_chosen.detach(), beta * policy_rejected.detach())


def cpl_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    beta: float = 0.1,
    cpl_lambda: float = 1.0,
    chosen_nll: torch.Tensor | None = None,
    nll_weight: float = 0.0,
) -> DPOLossOutput:
    """Contrastive Preference Learning (Hejna et al. 2023, arXiv 2310.13639) for a language model: a completion's
    score is S = sum over its response tokens of log pi(y_t | x, y_<t) (the paper's discounted sum of alpha log pi
    with gamma = 1), and P(y_w > y_l) = exp(alpha S_w) / (exp(alpha S_w) + exp(lambda alpha S_l)), so the loss is
    the mean over rows of -log sigmoid(alpha S_w - lambda alpha S_l), alpha = beta. lambda = 1 is DPO's sigmoid loss
    with zero reference log-probs; lambda < 1 is the paper's conservative CPL(lambda): the rejected segment weighs
    less, so the loss also pushes up the likelihood of the preferred, in-distribution one. Rewards are beta * S.
    nll_weight > 0 adds nll_weight * mean(chosen_nll), the paper's behaviour-cloning term (CPL + BC).

    The scores are SUMS over tokens, as the paper's: a shorter completion has fewer negative terms, so sums favour
    short completions; simpo is the length-normalised (per-token-average) choice.

    Args:
        policy_chosen: summed log-probs of the chosen completions, (n,).
        policy_rejected: summed log-probs of the rejected completions, (n,).
        beta: the temperature alpha (> 0).
        cpl_lambda: the conservative bias lambda, in (0, 1].
        chosen_nll: per-row mean token NLL of the chosen completion, (n,); needed when nll_weight > 0.
        nll_weight: weight of the NLL term; 0 turns it off.
    """
    _check(policy_chosen, policy_rejected, beta)
    if not 0 < cpl_lambda <= 1:
        raise ValueError(f"cpl_lambda must be in (0, 1], got {cpl_lambda}")
    if nll_weight < 0:
        raise ValueError(f"nll_weight must be >= 0, got {nll_weight}")
    loss = -F.logsigmoid(beta * policy_chosen - cpl_lambda * beta * policy_rejected).mean()
    if nll_weight > 0:
        if chosen_nll is None:
            raise ValueError("nll_weight > 0 needs chosen_nll (per-row mean token NLL of the chosen completion)")
        loss = loss + nll_weight * chosen_nll.mean()
    return _output(loss, beta * policy_chosen.detach(), beta * policy_rejected.detach())
