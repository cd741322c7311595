"""The forward layer: what a model says about a batch, whatever its token layout (core/batches.py).

`completion_logps(model, batch)`: a causal LM's log-probs of the completion tokens, per token and summed per
sequence (SFT, DPO, evaluation). `sequence_scores(model, batch)`: a reward model's scalar per sequence (reward
training, RewardSpec). Both take a layout (PaddedRows, PackedRows, SharedPromptRows) or a PairBatch /
RankingBatch holding one; this module is the one place the layouts are told apart.

Both run only the parts of a model they need: the vocabulary head on completion positions only, the score
head on each sequence's last token only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from core.batches import PackedResponses, PackedRows, PaddedRows, SharedPromptRows, token_rows
from core.models import unwrap_peft
from core.ops import IGNORE_INDEX, last_true_index, positions_from_mask, prefix_tree_mask, token_logprobs


class CompletionLogps(NamedTuple):
    """Log-probs of a batch's completion tokens: tokens (n,) in batch order (row-major; target order for
    prompt-shared rows), and per sequence (s,): sums and counts (number of completion tokens)."""

    tokens: torch.Tensor
    sums: torch.Tensor
    counts: torch.Tensor

    @property
    def means(self) -> torch.Tensor:
        """Mean token log-prob per sequence (s,); 0 for a sequence without completion tokens."""
        return self.sums / self.counts.clamp(min=1)


def completion_logps(model, batch, temperature: float = 1.0) -> CompletionLogps:
    """A causal LM's log-probs of the completion tokens of `batch` (labels != -100, or the targets of
    prompt-shared rows), at `temperature`. Sequences are rows (padded), sequence ids (packed) or the trees'
    sequences (prompt-shared); for pairs, chosen 0..b-1 then rejected b..2b-1."""
    rows = token_rows(batch)
    if isinstance(rows, SharedPromptRows):
        if rows.target_ids is None:
            raise ValueError("prompt-shared rows without completion targets (see collate_shared_prefix)")
        logits, targets = tree_completion_logits(model, rows)  # (n, v), (n,)
        sequence = rows.target_seq  # (n,)
        num_sequences = rows.score_index.numel()
    else:
        if rows.labels is None:
            raise ValueError("padded rows without labels have no completion tokens")
        keep = rows.labels[:, 1:] != IGNORE_INDEX  # (rows, t-1): position i predicts token i + 1
        if isinstance(rows, PackedRows):
            inputs = {"input_ids": rows.input_ids, "position_ids": rows.position_ids}
            sequence = rows.sequence_ids[:, 1:][keep]  # (n,)
            num_sequences = int(rows.sequence_ids.max()) + 1
        else:
            inputs = {"input_ids": rows.input_ids, "attention_mask": rows.attention_mask}
            sequence = keep.nonzero(as_tuple=True)[0]  # (n,) the row of each target, row-major like x[keep]
            num_sequences = rows.input_ids.shape[0]
        logits, targets = completion_logits(model, rows.labels, **inputs)  # (n, v), (n,)
    logps = token_logprobs(logits.unsqueeze(0), targets.unsqueeze(0), temperature)[0]  # (n,)
    zeros = logps.new_zeros(num_sequences)
    sums = zeros.index_add(0, sequence, logps)  # (s,)
    counts = zeros.index_add(0, sequence, torch.ones_like(logps))  # (s,)
    return CompletionLogps(logps, sums, counts)


def sequence_scores(model, batch) -> torch.Tensor:
    """A reward model's scalar score per sequence of `batch`, float32 (s,): one per row (padded, left or right),
    per sequence id (packed) or in score_index order (prompt-shared); for pairs, chosen 0..b-1 then rejected.

    The score head is applied at each sequence's LAST REAL token, found from the attention mask / sequence ids /
    score_index, never from pad_token_id (pad == EOS is common and would make the EOS look like padding).
    Decoder classifiers (`score` head on a base model: Llama, Qwen, GPT-2, ..., also inside a peft wrapper):
    run the base model, take the hidden state at the last real token, apply the head. Anything else (an
    encoder that pools its first token) is called whole on padded rows and its (b, 1) logits are the scores.
    """
    rows = token_rows(batch)
    inner = unwrap_peft(model)  # LoRA layers stay active in place
    prefix = getattr(inner, "base_model_prefix", "")
    if not (hasattr(inner, "score") and prefix and hasattr(inner, prefix)):
        if not isinstance(rows, PaddedRows):
            raise ValueError("packed batches need a decoder reward model (a `score` head on a base model)")
        return model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits[:, 0].float()
    trunk = getattr(inner, prefix)
    if isinstance(rows, SharedPromptRows):  # a tree mask instead of a padding mask
        attention_mask, position_ids = tree_attention_mask(inner, rows), rows.position_ids
    elif isinstance(rows, PackedRows):  # no mask: the position restarts bound the sequences
        attention_mask, position_ids = None, rows.position_ids
    else:  # right padding keeps positions 0..n-1; left padding needs them restarted
        attention_mask, position_ids = rows.attention_mask, positions_from_mask(rows.attention_mask)
    hidden = trunk(
        input_ids=rows.input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # (rows, t, h)
    if isinstance(rows, SharedPromptRows):
        picked = hidden.flatten(0, 1)[rows.score_index]  # (n_seq, h)
    elif isinstance(rows, PackedRows):
        picked = hidden.flatten(0, 1)[last_flat_positions(rows.sequence_ids)]  # (n_seq, h)
    else:
        last = last_true_index(rows.attention_mask)  # (b,): the score goes on the last real token
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (b, h)
    return inner.score(picked).squeeze(-1).float()


def last_flat_positions(sequence_ids: torch.Tensor) -> torch.Tensor:
    """Packed rows' sequence ids (rows, t), -1 on padding -> the flat position of each sequence's last token."""
    flat = sequence_ids.flatten()
    where = torch.arange(flat.numel(), device=flat.device)
    real = flat >= 0
    last = torch.full((int(flat.max()) + 1,), -1, device=flat.device)
    return last.scatter_reduce(0, flat[real], where[real], "amax")


def lm_parts(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder trunk, vocabulary head) of a causal LM, peft-wrapped or not; None when it has no separate
    trunk or post-processes its logits (soft-capping, scaling): such a model takes the padded path."""
    inner = unwrap_peft(model)
    config, decoder, head = inner.config, getattr(inner, inner.base_model_prefix, None), inner.get_output_embeddings()
    if (decoder is None or head is None or getattr(config, "final_logit_softcapping", None)
            or getattr(config, "logit_scale", None)):
        return None
    return decoder, head


def completion_logits(model, labels: torch.Tensor, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the labelled (completion) positions only: (n, v) and their targets (n,).

    The decoder runs on every token, but the vocabulary head only where a label follows: prompt tokens
    (often most of a conversation) cost no (t, v) logits, which is most of the memory and a fifth of the
    FLOPs of a small model. Models that post-process logits (soft-capping, scaling) get a full forward.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # (b, t-1): position i predicts token i + 1
    parts = lm_parts(model)
    if parts is None:
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        return logits[keep], targets[keep]
    hidden = parts[0](**inputs, use_cache=False).last_hidden_state[:, :-1]  # (b, t-1, h)
    return parts[1](hidden[keep]), targets[keep]  # (n, v), (n,)


def tree_attention_mask(model, rows: SharedPromptRows):
    """The mask of prompt-shared rows (core/packing.py) in the form the model's attention takes (transformers
    passes a 4D mask or a BlockMask through as is): boolean (rows, 1, t, t) for sdpa, additive (0 / lowest value)
    for eager, a FlexAttention BlockMask of the same rule for flex_attention (tree_block_mask)."""
    impl = str(getattr(model.config, "_attn_implementation", "eager"))
    if impl == "flex_attention":
        return tree_block_mask(rows.tree_ids, rows.branch_ids)
    allowed = prefix_tree_mask(rows.tree_ids, rows.branch_ids)  # (rows, 1, t, t)
    if impl == "sdpa":
        return allowed
    if impl != "eager":
        raise ValueError(f"share_prompt needs sdpa, eager or flex_attention attention, not {impl!r}")
    device = allowed.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else model.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device), torch.finfo(dtype).min)


def tree_block_mask(tree_ids: Tensor, branch_ids: Tensor):
    """core.ops.prefix_tree_mask's rule as a FlexAttention BlockMask (rows, 1, t, t): the kernel skips the blocks
    no query may see instead of reading a dense (t, t) mask. Built on the ids' device."""
    from torch.nn.attention.flex_attention import create_block_mask

    def allowed(b, h, q, k):  # query q of row b may see key k
        q_tree, k_tree, q_branch, k_branch = tree_ids[b, q], tree_ids[b, k], branch_ids[b, q], branch_ids[b, k]
        same = (q_tree == k_tree) & (q_tree >= 0) & ((k_branch == 0) | (k_branch == q_branch)) & (k <= q)
        return same | (q == k)  # the padding tail sees only itself, so no row of the softmax is empty

    rows, t = tree_ids.shape
    return create_block_mask(allowed, B=rows, H=None, Q_LEN=t, KV_LEN=t, device=tree_ids.device)


def tree_completion_logits(model, rows: SharedPromptRows) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt-shared rows: logits (n, v) at each completion token's predicting position (`source_index`) and
    the targets (n,). The vocabulary head runs on those n positions only."""
    parts = lm_parts(model)
    if parts is None:
        raise ValueError("share_prompt needs a plain decoder + vocabulary head (no logit soft-capping or scaling)")
    decoder, head = parts
    hidden = decoder(input_ids=rows.input_ids, position_ids=rows.position_ids,
                     attention_mask=tree_attention_mask(decoder, rows), use_cache=False).last_hidden_state
    return head(hidden.flatten(0, 1)[rows.source_index]), rows.target_ids  # (n, v), (n,)


# ----- rollouts (PPO, rejection sampling): b left-padded prompt + response rows, p prompt columns -----


def response_slice(x: Tensor, prompt_length: int) -> Tensor:
    """Per-position outputs (b, p + r, ...) -> the r positions whose next token is a response token:
    position p - 1 + i predicts response token i, so take p - 1 .. p + r - 2."""
    return x[:, prompt_length - 1 : -1]


def response_hidden(
    trunk, sequences: Tensor, attention_mask: Tensor, p: int, packed: PackedResponses | None = None
) -> Tensor:
    """A decoder trunk's last hidden state at the r positions that predict response tokens: (b, r, h), from the
    packed rows if given (attention_mask None: the restarts of position_ids bound the sequences), else padded."""
    if packed is None:
        positions = positions_from_mask(attention_mask)
        hidden = trunk(input_ids=sequences, attention_mask=attention_mask, position_ids=positions,
                       use_cache=False).last_hidden_state  # (b, p + r, h)
        return response_slice(hidden, p)
    hidden = trunk(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).last_hidden_state
    return hidden.flatten(0, 1)[packed.index]  # (R, T, h) -> (b, r, h)


def response_values(
    classifier, sequences: Tensor, attention_mask: Tensor, p: int, packed: PackedResponses | None = None
) -> Tensor:
    """A sequence classifier's scalar head (`score`) read at every position predicting a response token: (b, r)."""
    inner = unwrap_peft(classifier)
    hidden = response_hidden(getattr(inner, inner.base_model_prefix), sequences, attention_mask, p, packed)
    return inner.score(hidden).squeeze(-1).float()


def response_logits(
    model, sequences: Tensor, attention_mask: Tensor, p: int, packed: PackedResponses | None = None,
    hidden: bool = False,
) -> tuple[Tensor, Tensor | None]:
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
