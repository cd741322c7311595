"""Small tensor helpers for on-policy stages (PPO): response slices, minibatch order, experience, and
padding-free packing of prompt + response rows for the scoring and training forwards."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from core.forward import lm_parts
from core.models import unwrap_peft
from core.ops import first_fit, positions_from_mask


class Experience(NamedTuple):
    """One PPO rollout, everything fixed before the updates; b rows, p prompt and r response columns.

    sequences, attention_mask (b, p + r); mask (b, r) over response tokens (through EOS);
    old_logp, ref_logp, old_values, advantages, returns (b, r); prompt_length p.
    """

    sequences: Tensor
    attention_mask: Tensor
    mask: Tensor
    old_logp: Tensor
    ref_logp: Tensor
    old_values: Tensor
    advantages: Tensor
    returns: Tensor
    prompt_length: int


def response_slice(x: Tensor, prompt_length: int) -> Tensor:
    """Per-position outputs (b, p + r, ...) -> the r positions whose next token is a response token:
    position p - 1 + i predicts response token i, so take p - 1 .. p + r - 2."""
    return x[:, prompt_length - 1 : -1]


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


def repeat_each(items: list, n: int) -> list:
    """[a, b], 2 -> [a, a, b, b]: prompts/meta for rows i*n .. i*n+n-1 sampled from prompt i."""
    return [x for x in items for _ in range(n)]


class Packed(NamedTuple):
    """b left-padded prompt + response rows packed padding-free (pack_sequences).

    input_ids, position_ids (R, T): sequences back to back, positions restarting at 0 per sequence;
    index (b, r): flat positions into R * T predicting response token i of row j (the token before it).
    """

    input_ids: Tensor
    position_ids: Tensor
    index: Tensor


def pack_sequences(sequences: Tensor, attention_mask: Tensor, prompt_length: int, row_length: int | None = None,
                   pad_id: int = 0) -> Packed:
    """Strip each row's left padding and pack the b sequences first-fit (longest first) into rows of row_length.

    A sequence keeps its real prompt tokens and all r response columns: tokens after EOS stay (masked in every
    loss, and causal attention keeps them from earlier positions). Called with attention_mask=None and these
    position_ids, transformers (5.x masking_utils.find_packed_sequence_indices) starts a new sequence wherever a
    position is not the previous one + 1, so attention stays inside each sequence; the tail of a short row is
    a pseudo-sequence of its own (positions 0, 1, ...).

    Args:
        sequences: (b, p + r) token ids, prompts left-padded to p, responses in the last r columns.
        attention_mask: (b, p + r), 1 on real prompt tokens (each row needs at least one).
        prompt_length: p.
        row_length: packed row capacity; default p + r (never more tokens than the padded rows). Raised to the
            longest sequence if shorter.
        pad_id: token id of the row tails (never read).
    """
    b, width = sequences.shape
    p, device = prompt_length, sequences.device
    prompt_lens = attention_mask[:, :p].sum(-1)  # (b,) real prompt tokens
    lengths = (prompt_lens + width - p).tolist()
    if p < 1 or min(lengths) <= width - p:
        raise ValueError("pack_sequences: every row needs at least one real prompt token")
    capacity = max(row_length or width, max(lengths))
    order = sorted(range(b), key=lambda j: -lengths[j])  # first fit, longest first
    used: list[int] = []
    row, start = [0] * b, [0] * b
    for k, bin_ in enumerate(first_fit([lengths[j] for j in order], capacity)):
        used.append(0)
        for j in (order[i] for i in bin_):
            row[j], start[j] = k, used[k]
            used[k] += lengths[j]
    rows, t = len(used), max(used)
    cols = torch.arange(width, device=device)
    local = cols[None] - (p - prompt_lens)[:, None]  # (b, p + r) position in its sequence, < 0 on left padding
    keep = local >= 0
    base = torch.tensor(row, device=device) * t + torch.tensor(start, device=device)  # (b,) flat start
    dest = base[:, None] + local  # (b, p + r) flat position in the packed rows
    input_ids = sequences.new_full((rows * t,), pad_id)
    input_ids[dest[keep]] = sequences[keep]
    pos = torch.arange(t, device=device)[None] - torch.tensor(used, device=device)[:, None]  # (R, T) tails: 0, 1, ..
    pos = pos.flatten()
    pos[dest[keep]] = local[keep]
    return Packed(input_ids.view(rows, t), pos.view(rows, t), dest[:, p - 1 : -1])  # column p-1+i predicts token i


def response_hidden(trunk, sequences: Tensor, attention_mask: Tensor, p: int, packed: Packed | None = None) -> Tensor:
    """A decoder trunk's last hidden state at the r positions that predict response tokens: (b, r, h), from the
    packed rows if given (attention_mask None: the restarts of position_ids bound the sequences), else padded."""
    if packed is None:
        hidden = trunk(input_ids=sequences, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask),
                       use_cache=False).last_hidden_state  # (b, p + r, h)
        return response_slice(hidden, p)
    hidden = trunk(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).last_hidden_state
    return hidden.flatten(0, 1)[packed.index]  # (R, T, h) -> (b, r, h)


def response_values(classifier, sequences: Tensor, attention_mask: Tensor, p: int, packed: Packed | None = None) -> Tensor:
    """A sequence classifier's scalar head (`score`) read at every position predicting a response token: (b, r)."""
    inner = unwrap_peft(classifier)
    hidden = response_hidden(getattr(inner, inner.base_model_prefix), sequences, attention_mask, p, packed)
    return inner.score(hidden).squeeze(-1).float()


def response_logits(model, sequences: Tensor, attention_mask: Tensor, p: int, packed: Packed | None = None,
                    hidden: bool = False) -> tuple[Tensor, Tensor | None]:
    """A causal LM's logits (b, r, v) at the positions predicting the r response tokens, and its last hidden
    state there (b, r, h) if `hidden`. Packed: the head runs on the gathered hidden states; padded (packed None,
    or logits lm_parts cannot reproduce): the head runs on the last r + 1 positions only."""
    parts = lm_parts(model) if packed is not None else None
    if parts is not None:
        h = response_hidden(parts[0], sequences, attention_mask, p, packed)
        return parts[1](h), (h if hidden else None)
    out = model(input_ids=sequences, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask),
                use_cache=False, logits_to_keep=sequences.shape[1] - p + 1, output_hidden_states=hidden)
    return out.logits[:, :-1], (response_slice(out.hidden_states[-1], p) if hidden else None)
