"""Unpaired, labelled completions for KTO (PreferenceDataModule layout "unpaired"): rows {prompt, completion, label}
-> Judgement records; a batch of them -> an UnpairedBatch with the mismatched rows KTO's KL estimate reads.

Row shape (TRL's unpaired preference format): `prompt` a string or chat messages; `completion` a string, or a
one-message chat list holding the assistant reply; `label` true (desirable) or false (undesirable): a JSON boolean,
0 / 1, or the strings "true" / "false" (csv cells, any case).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.batches import UnpairedBatch
from core.packing import pad_completions
from datamodules.formats import (
    DataError,
    ReadResult,
    Text,
    assistant_reply,
    has,
    messages_field,
    no_shape,
    prompt_field,
    read_records,
    text_field,
)

SHAPE = "expected fields prompt+completion+label"
LABELS = {"true": True, "false": False, "1": True, "0": False}


@dataclass(frozen=True)
class Judgement:
    prompt: Text
    completion: str
    desirable: bool
    where: str

    @property
    def responses(self) -> tuple[str]:
        """The completion as a one-response record, so PreferenceDataModule tokenizes it as it does rankings."""
        return (self.completion,)


def _label(row: dict, where: str) -> bool:
    value = row.get("label")
    if value is None:
        raise DataError(where, "field 'label' is null" if "label" in row else "missing field 'label'",
                        "true = desirable, false = undesirable")
    if isinstance(value, bool):
        return value
    key = value.strip().lower() if isinstance(value, str) else str(value) if isinstance(value, int) else None
    if key not in LABELS:
        raise DataError(where, "field 'label' is not true or false", f"got {value!r}")
    return LABELS[key]


def _completion(row: dict, where: str) -> str:
    value = row.get("completion")
    if not isinstance(value, list | tuple):
        return text_field(row, "completion", where)
    earlier, reply = assistant_reply(messages_field(value, "completion", where), "completion", where)
    if earlier:
        raise DataError(where, "field 'completion' holds more than the assistant reply",
                        f"{len(value)} messages; earlier turns belong in 'prompt'")
    return reply


def parse_judgement(row: dict, where: str) -> Judgement:
    """One {prompt, completion, label} row -> Judgement; else DataError naming the row."""
    if not (has(row, "prompt") or has(row, "completion")):
        raise no_shape(row, where, SHAPE, ("prompt", "completion", "label"))
    return Judgement(prompt_field(row, where), _completion(row, where), _label(row, where), where)


def read_judgements(source: str, split: str = "train", skip_bad_rows: bool = False) -> ReadResult:
    """Read {prompt, completion, label} rows into Judgement records (ReadResult: a list, plus skip counts)."""
    return read_records(source, parse_judgement, split, skip_bad_rows)


def mismatched_rows(encoded: list[tuple[list[int], list[int]]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """KTO's mismatched pairs: prompt i with the completion of the next row (cyclically) whose prompt differs, cut
    from the right to fit max_length; where every prompt of the batch is the same (or b = 1), the next row's."""
    b, out = len(encoded), []
    for i, (p, _) in enumerate(encoded):
        j = next((j for j in ((i + k) % b for k in range(1, b)) if encoded[j][0] != p), (i + 1) % b)
        out.append((p, encoded[j][1][: max_length - len(p)]))
    return out


def collate_unpaired(rows: list, pad_id: int, max_length: int) -> UnpairedBatch:
    """[((prompt_ids, completion_ids), desirable, index)] x b -> b right-padded rows; their b mismatched rows
    (`mismatched_rows`); the labels (b,) bool and indexes (b,) long."""
    encoded = [r[0] for r in rows]
    return UnpairedBatch(
        tokens=pad_completions(encoded, pad_id),
        kl_tokens=pad_completions(mismatched_rows(encoded, max_length), pad_id),
        desirable=torch.tensor([r[1] for r in rows], dtype=torch.bool),  # (b,)
        index=torch.tensor([r[2] for r in rows], dtype=torch.long),  # (b,)
    )
