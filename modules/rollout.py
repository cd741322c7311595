"""Small helpers for on-policy stages (PPO): the experience of a rollout, minibatch order, prompts repeated per
sample. The forwards over prompt + response rows (log-probs, values) are in core/forward.py, their padding-free
layout in core/packing.py (pack_sequences)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Experience(NamedTuple):
    """One PPO rollout, everything fixed before the updates; b rows, p prompt and r response columns.

    sequences, attention_mask (b, p + r); mask (b, r) over response tokens (through EOS);
    old_logp, ref_logp, old_values, advantages, returns (b, r); prompt_length p. Critic-free advantages have no
    old_values (None), and grpo and rloo no returns (None).
    """

    sequences: Tensor
    attention_mask: Tensor
    mask: Tensor
    old_logp: Tensor
    ref_logp: Tensor
    old_values: Tensor | None
    advantages: Tensor
    returns: Tensor | None
    prompt_length: int


def minibatches(n: int, num_minibatches: int, micro_batches: int, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> list[list[Tensor]]:
    """Shuffle rows 0..n-1 and split into num_minibatches minibatches of micro_batches index chunks each.

    Sizes differ by at most one (tensor_split). A short batch (e.g. an epoch's last) gets fewer minibatches
    and micro-batches rather than empty ones: at most n minibatches, at most n // minibatches chunks each.
    """
    num_minibatches = max(1, min(num_minibatches, n))
    micro_batches = max(1, min(micro_batches, n // num_minibatches))
    gen_device = generator.device if generator is not None else "cpu"
    order = torch.randperm(n, generator=generator, device=gen_device).to(device or gen_device)
    return [list(mb.tensor_split(micro_batches)) for mb in order.tensor_split(num_minibatches)]


def micro_batch_weights(mask: Tensor, micro: list[Tensor], by_tokens: bool = False) -> list[float]:
    """Weights of a minibatch's micro-batch losses (index chunks of the rows of mask (b, r)), summing to 1.

    Rows (default): each micro-batch's loss weighs its share of the minibatch's rows, so equal per-row losses
    average as over the whole minibatch. by_tokens: its share of the real response tokens, so micro-batch
    token means add up to the token mean over the whole minibatch.
    """
    sizes = [float(mask[idx].sum()) if by_tokens else float(len(idx)) for idx in micro]
    total = sum(sizes) or 1.0
    return [n / total for n in sizes]


def repeat_each(items: list, n: int) -> list:
    """[a, b], 2 -> [a, a, b, b]: prompts/meta for rows i*n .. i*n+n-1 sampled from prompt i."""
    return [x for x in items for _ in range(n)]
