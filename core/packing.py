"""The typed layouts of core/batches.py built from (prompt_ids, completion_ids) rows: right-padded
(`pad_completions` -> PaddedRows: SFT, preference pairs and rankings, rejection sampling's kept samples,
`rlhf eval`), and padding-free ones for preference data: packed rows (PackedRows), and prompt-shared trees
(SharedPromptRows); pairs come wrapped in a PairBatch.

`collate_pairs_packed` (DPO, reward): a batch's 2b sequences packed first-fit into rows, position ids restarting
per sequence, a `sequence_ids` map back to the sequences.

`pack_sequences` (PPO): a rollout's left-padded prompt + response rows packed padding-free on the device.

`collate_shared_prefix` (reward models, DPO): the responses to one prompt share the prompt's computation. A unit
= the K token sequences of one pair/ranking group is laid out as [common prefix, rest of seq 1, ..., rest of
seq K]; positions restart at the prefix length for every branch, and a tree attention mask (built on the
model's device by `core.ops.prefix_tree_mask` from `tree_ids`/`branch_ids`) lets branch k see the prefix and
itself only. Every sequence's hidden states are then exactly those of its own padded row, but the prompt (most
of an HH-RLHF pair) is encoded once instead of K times. `score_index` holds each sequence's last token as a
flat position into (rows * t).
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.batches import PackedResponses, PackedRows, PaddedRows, PairBatch, SharedPromptRows
from core.ops import IGNORE_INDEX, first_fit
from core.tokenize import pad_right


def ids_and_labels(encoded: list[tuple[list[int], list[int]]]) -> tuple[list[list[int]], list[list[int]]]:
    """[(prompt_ids, completion_ids)] -> token rows and label rows (-100 on the prompt), unpadded."""
    return [p + c for p, c in encoded], [[IGNORE_INDEX] * len(p) + c for p, c in encoded]


def pad_completions(
    rows: list[tuple[list[int], list[int]]], pad_id: int, length: int | None = None
) -> PaddedRows:
    """[(prompt_ids, completion_ids)] -> right-padded input_ids, attention_mask, labels (rows, t), labels -100 on
    the prompt and on padding; t is the longest row, or `length`. Right padding: real tokens keep positions
    0..n-1, so no position_ids are needed."""
    ids, labels = ids_and_labels(rows)
    return PaddedRows(
        input_ids=torch.tensor(pad_right(ids, pad_id, length)),  # (rows, t)
        attention_mask=torch.tensor(pad_right([[1] * len(x) for x in ids], 0, length)),  # (rows, t)
        labels=torch.tensor(pad_right(labels, IGNORE_INDEX, length)),  # (rows, t)
    )


def pair_batch(tokens, rows: list) -> PairBatch:
    """The 2b sequences of `rows` [(chosen, rejected, margin, index)] in any layout -> a PairBatch."""
    margin = torch.tensor([r[2] for r in rows], dtype=torch.float32)  # (b,)
    index = torch.tensor([r[3] for r in rows], dtype=torch.long)  # (b,)
    return PairBatch(tokens, margin, index)


def collate_pairs_packed(rows: list, pad_id: int, max_length: int) -> PairBatch:
    """[(chosen (p, c), rejected (p, c), margin, index)] x b -> the 2b sequences (chosen first) packed first-fit
    into rows of max_length: input_ids, labels, position_ids (restarting per sequence) and sequence_ids (-1 on
    the padding tail), plus margin (b,) and index (b,)."""
    ids, labels = ids_and_labels([r[0] for r in rows] + [r[1] for r in rows])
    bins = first_fit([len(x) for x in ids], max_length)
    width = max(sum(len(ids[i]) for i in b) for b in bins)
    out = {"input_ids": [], "labels": [], "position_ids": [], "sequence_ids": []}
    for b in bins:
        n = sum(len(ids[i]) for i in b)
        out["input_ids"].append([t for i in b for t in ids[i]] + [pad_id] * (width - n))
        out["labels"].append([t for i in b for t in labels[i]] + [IGNORE_INDEX] * (width - n))
        out["position_ids"].append([k for i in b for k in range(len(ids[i]))] + list(range(width - n)))
        out["sequence_ids"].append([i for i in b for _ in ids[i]] + [-1] * (width - n))
    return pair_batch(PackedRows(**{k: torch.tensor(v) for k, v in out.items()}), rows)


def common_prefix_length(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix of all sequences, kept one short of the shortest sequence so that
    every sequence has at least its last token in its own branch (where its score is read)."""
    n = min(len(s) for s in seqs) - 1
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return max(n, 0)


def collate_shared_prefix(
    units: list[list[list[int]]], pad_id: int, max_length: int, prompt_lengths: list[list[int]] | None = None
) -> SharedPromptRows:
    """Units of token sequences (the K responses of one prompt, prompt included) -> prompt-shared packed rows.

    Returns input_ids, position_ids, tree_ids (-1 on the padding tail), branch_ids (0 = shared prefix, k = the
    rest of sequence k, 1-based) all (rows, t), and score_index (n_seq,): the flat position of each sequence's
    last token, sequences in unit order (unit 0's K, then unit 1's, ...). Rows hold at least max_length tokens,
    more when a single unit is longer. With `prompt_lengths` (same nesting as units), also the completion
    tokens for log-probs (DPO): target_ids (n,), source_index (n,) = the flat position whose output predicts
    that token (a branch's first token is predicted by the prefix's last), target_seq (n,) = its sequence.
    """
    layouts = []  # (prefix length, sequences) per unit
    for seqs in units:
        layouts.append((common_prefix_length(seqs), seqs))
    sizes = [L + sum(len(s) - L for s in seqs) for L, seqs in layouts]
    bins = first_fit(sizes, max(max_length, max(sizes)))
    width = max(sum(sizes[u] for u in b) for b in bins)
    out = {"input_ids": [], "position_ids": [], "tree_ids": [], "branch_ids": []}
    last = [0] * sum(len(seqs) for _, seqs in layouts)
    first_seq = [0]
    for _, seqs in layouts:
        first_seq.append(first_seq[-1] + len(seqs))
    targets: dict[str, list[int]] = {"target_ids": [], "source_index": [], "target_seq": []}
    for r, b in enumerate(bins):
        ids, pos, tree, branch = [], [], [], []
        for u in b:
            L, seqs = layouts[u]
            prefix_start = r * width + len(ids)
            ids += seqs[0][:L]
            pos += list(range(L))
            tree += [u] * L
            branch += [0] * L
            for k, s in enumerate(seqs):
                branch_start = r * width + len(ids) - L  # flat position of coordinate j >= L is branch_start + j
                ids += s[L:]
                pos += list(range(L, len(s)))
                tree += [u] * (len(s) - L)
                branch += [k + 1] * (len(s) - L)
                last[first_seq[u] + k] = r * width + len(ids) - 1
                if prompt_lengths is not None:
                    for j in range(max(prompt_lengths[u][k], 1), len(s)):  # token j is predicted by token j - 1
                        targets["target_ids"].append(s[j])
                        targets["source_index"].append((prefix_start if j - 1 < L else branch_start) + j - 1)
                        targets["target_seq"].append(first_seq[u] + k)
        pad = width - len(ids)
        out["input_ids"].append(ids + [pad_id] * pad)
        out["position_ids"].append(pos + list(range(pad)))
        out["tree_ids"].append(tree + [-1] * pad)
        out["branch_ids"].append(branch + [0] * pad)
    rows = SharedPromptRows(**{k: torch.tensor(v) for k, v in out.items()}, score_index=torch.tensor(last))
    if prompt_lengths is not None:
        rows.target_ids, rows.source_index, rows.target_seq = (
            torch.tensor(targets[k], dtype=torch.long) for k in ("target_ids", "source_index", "target_seq")
        )
    return rows


def collate_pairs_shared(rows: list, pad_id: int, max_length: int) -> PairBatch:
    """Pairs -> prompt-shared rows (with DPO's completion targets); sequences renumbered to the pairs layout
    (chosen 0..b-1, rejected b..2b-1) in score_index and target_seq."""
    ids = [ids_and_labels([r[0], r[1]])[0] for r in rows]
    tokens = collate_shared_prefix(ids, pad_id, max_length, [[len(r[0][0]), len(r[1][0])] for r in rows])
    b = len(rows)
    order = torch.tensor([2 * i for i in range(b)] + [2 * i + 1 for i in range(b)])
    tokens.score_index = tokens.score_index[order]
    tokens.target_seq = (tokens.target_seq % 2) * b + tokens.target_seq // 2  # unit-order (u, k) -> k*b + u
    return pair_batch(tokens, rows)


def pack_sequences(sequences: Tensor, attention_mask: Tensor, prompt_length: int, row_length: int | None = None,
                   pad_id: int = 0) -> PackedResponses:
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
    index = dest[:, p - 1 : -1]  # column p - 1 + i predicts response token i
    return PackedResponses(input_ids.view(rows, t), pos.view(rows, t), index)
