"""Tensor helpers shared by two or more stages. Imports torch and the standard library only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(tokens) under logits, gathered without materialising a (b, t, v) log-softmax copy.

    logits (b, t, v), tokens (b, t) -> (b, t). Tokens equal to IGNORE_INDEX are gathered at index 0;
    mask them yourself.
    """
    if temperature != 1.0:
        logits = logits / temperature
    safe = tokens.clamp(min=0).unsqueeze(-1)
    picked = logits.gather(-1, safe).squeeze(-1).float()  # (b, t)
    # logsumexp row by row keeps peak memory at one (t, v) float32 slab instead of (b, t, v)
    lse = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])  # (b, t)
    return picked - lse


def shifted_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probs of labels: logits (b, t, v), labels (b, t) -> logps (b, t-1), mask (b, t-1).

    Position i of the output scores labels[:, i + 1] from logits[:, i]; mask is labels != -100.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logps = token_logprobs(logits[:, :-1], targets, temperature)
    return torch.where(mask, logps, torch.zeros_like(logps)), mask


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    # where(), not x * mask: inf/NaN in padding must not turn into NaN
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is true; 0 where nothing is masked in (never NaN)."""
    count = mask.to(x.dtype)
    if dim is None:
        return masked_sum(x, mask) / count.sum().clamp(min=1)
    return masked_sum(x, mask, dim) / count.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked-in elements (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            return var
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over masked-in elements; masked-out elements come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dim: (..., v) -> (...)."""
    logits = logits.float()
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a (b, t) 0/1 mask (0 for an all-zero row). Works for left or
    right padding: the score goes on the last real token."""
    t = mask.shape[-1]
    positions = torch.arange(t, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(-1).values


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 on each row's first real token: (b, t) 0/1 mask -> (b, t). Left padding
    gets 0 on its pad columns; right padding keeps 0..n-1 on its real tokens (and repeats n-1 on the pad tail)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prefix_tree_mask(tree_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask (rows, 1, t, t), True = may attend, for prompt-shared packed rows
    (core/packing.py).

    Query i may see key j <= i of the same unit (tree id) when j is in the shared prefix (branch 0) or in
    i's own branch; the padding tail (tree id -1) sees only itself, so no row of the softmax is empty.
    """
    t = tree_ids.shape[-1]
    q_tree, k_tree = tree_ids[:, :, None], tree_ids[:, None, :]  # (rows, t, 1), (rows, 1, t)
    q_branch, k_branch = branch_ids[:, :, None], branch_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=tree_ids.device).tril()  # (t, t)
    allowed = (q_tree == k_tree) & (q_tree >= 0) & ((k_branch == 0) | (k_branch == q_branch)) & causal
    return (allowed | torch.eye(t, dtype=torch.bool, device=tree_ids.device)).unsqueeze(1)  # (rows, 1, t, t)


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Item indices grouped into bins of at most `capacity` total length, first fit in the given order; an
    item longer than capacity gets a bin of its own."""
    bins: list[list[int]] = []
    used: list[int] = []
    for i, n in enumerate(lengths):
        fit = next((k for k, u in enumerate(used) if u + n <= capacity), None)
        if fit is None:
            bins.append([i])
            used.append(n)
        else:
            bins[fit].append(i)
            used[fit] += n
    return bins
