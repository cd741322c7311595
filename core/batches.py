"""Typed training batches: how the tokens are laid out, and what the sequences mean.

Token layouts (built by core/packing.py and datamodules/sft.py; read by the forward layer, core/forward.py,
which is the one place that tells them apart):

- `PaddedRows`: one right-padded row per sequence.
- `PackedRows`: sequences back to back in rows, position ids restarting per sequence, `sequence_ids` mapping
  each token to its sequence.
- `SharedPromptRows`: the K sequences of one prompt as a tree [common prefix, rest of 1, ..., rest of K] under a
  tree attention mask, so the prompt is encoded once.

On-policy stages (PPO) build their rows on the device from a rollout: b left-padded prompt + response rows
(sequences, attention_mask, prompt length p), or those packed padding-free (`PackedResponses`, built by
core/packing.pack_sequences); core/forward.py reads both (response_logits, response_values).

What the sequences mean: SFT batches are a layout alone (every sequence is a demonstration); `PairBatch`
holds 2b sequences (chosen 0..b-1, rejected b..2b-1) with a margin and an index per pair; `RankingBatch` holds
N sequences in groups (one per prompt) with their ranks and a margin per group; `UnpairedBatch` holds b labelled
completions (KTO) and b mismatched prompt/completion sequences for its KL estimate.

Plain (non-frozen) dataclasses: Lightning moves them to the device field by field (`apply_to_collection`
rebuilds a dataclass with setattr, which a frozen one refuses); None fields stay None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor


@dataclass
class PaddedRows:
    """One right-padded row per sequence: input_ids, attention_mask (rows, t); labels (rows, t), -100 except on
    completion tokens, or None for rows that are only scored (a reward model reads prompt + response whole).
    Left padding is allowed for scoring: positions are then taken from the mask."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor | None = None


@dataclass
class PackedRows:
    """Sequences packed into rows without padding between them, all (rows, t): input_ids; labels (-100 except on
    completion tokens); position_ids restarting at 0 per sequence (and on the padding tail), which is how the
    model tells sequences apart (no attention mask); sequence_ids, the sequence of each token (-1 on the tail)."""

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    sequence_ids: Tensor


@dataclass
class SharedPromptRows:
    """Prompt-shared trees (core/packing.collate_shared_prefix), all (rows, t) but the last four: input_ids,
    position_ids, tree_ids (-1 on the padding tail), branch_ids (0 = shared prefix, k = the rest of sequence k);
    score_index (n_seq,): each sequence's last token as a flat position into rows * t. With completion targets
    (log-probs, DPO): target_ids (n,) the completion tokens, source_index (n,) the flat position predicting each,
    target_seq (n,) its sequence; None when the rows are only scored."""

    input_ids: Tensor
    position_ids: Tensor
    tree_ids: Tensor
    branch_ids: Tensor
    score_index: Tensor
    target_ids: Tensor | None = None
    source_index: Tensor | None = None
    target_seq: Tensor | None = None


TokenRows = PaddedRows | PackedRows | SharedPromptRows


@dataclass
class PairBatch:
    """b preference pairs: `tokens` holds 2b sequences, chosen 0..b-1 then rejected b..2b-1 (in any layout);
    margin (b,) float32; index (b,) long, each pair's number in its split."""

    tokens: TokenRows
    margin: Tensor
    index: Tensor

    @property
    def num_pairs(self) -> int:
        return int(self.margin.shape[0])


@dataclass
class RankingBatch:
    """g prompts' ranked responses: `tokens` holds N sequences (padded or prompt-shared), group (N,) long the
    prompt of each, ranks (N,) float32 (lower = better, ties allowed), margin (g,) float32."""

    tokens: PaddedRows | SharedPromptRows
    group: Tensor
    ranks: Tensor
    margin: Tensor


@dataclass
class UnpairedBatch:
    """b labelled completions (KTO): `tokens` b padded sequences; `kl_tokens` b mismatched ones, prompt i with the
    completion of another row (datamodules/unpaired.mismatched_rows), for the KL estimate; desirable (b,) bool;
    index (b,) long, each row's number in its split."""

    tokens: PaddedRows
    kl_tokens: PaddedRows
    desirable: Tensor
    index: Tensor


PreferenceBatch = PairBatch | RankingBatch  # what reward models train on


class PackedResponses(NamedTuple):
    """b left-padded prompt + response rows packed padding-free (pack_sequences).

    input_ids, position_ids (R, T): sequences back to back, positions restarting at 0 per sequence;
    index (b, r): flat positions into R * T predicting response token i of row j (the token before it).
    """

    input_ids: Tensor
    position_ids: Tensor
    index: Tensor


def token_rows(batch) -> TokenRows:
    """The token layout of a batch: the batch itself (SFT), or the `tokens` of a pairs, rankings or unpaired batch."""
    if isinstance(batch, (PairBatch, RankingBatch, UnpairedBatch)):
        return batch.tokens
    if isinstance(batch, (PaddedRows, PackedRows, SharedPromptRows)):
        return batch
    raise TypeError(f"not a batch layout of core.batches: {type(batch).__name__}")
