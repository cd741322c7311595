"""SFTDataModule: demonstrations -> right-padded batches with the loss on completion tokens only."""

from __future__ import annotations

import random
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from core.batches import PackedRows, PaddedRows
from core.models import load_tokenizer
from core.ops import IGNORE_INDEX, first_fit
from core.packing import pad_completions
from core.tokenize import (
    check_lengths,
    completion_text,
    encode_completions,
    encode_prompts,
    pad_right,
    render_prompt,
)
from datamodules.formats import read_demonstrations
from datamodules.prompts import collate_prompts
from datamodules.resumable import eval_loader, held_out, train_loader


class SFTDataModule(LightningDataModule):
    """Prompt/completion demonstrations for supervised fine-tuning.

    Args:
        train_file: jsonl/json/parquet/csv file, a `save_to_disk` dataset dir, or a hub dataset id. Rows:
            prompt+completion, chat `messages`, or HH-RLHF `chosen` strings.
        val_file: same formats; None holds out `val_fraction` of the training rows.
        tokenizer: tokenizer path (linked to the policy's path by the recipe).
        max_length: tokens per example (prompt + completion + EOS).
        max_prompt_length: over max_length, the prompt is cut from the left but keeps this many tokens.
        batch_size: examples (or packed rows) per device per step.
        packing: concatenate examples into rows of max_length; position ids restart per example, so
            attention does not cross examples.
        skip_bad_rows: skip malformed rows (counted per reason) instead of stopping at the first.
        truncation: rows over max_length: "left" cuts the prompt from the left (keeping max_prompt_length),
            then the completion from the right (losing its EOS); "skip" drops them; "error" stops at the first.
            Cut or dropped rows are counted per reason and reported once per file.
        train_split: split to read from hub/saved datasets for training.
        val_split: split to read from hub/saved datasets for validation.
        val_fraction: fraction of training rows held out when val_file is None.
        num_workers: DataLoader worker processes.
        seed: seed of the held-out split and of packing's order.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        tokenizer: str = "",
        max_length: int = 512,
        max_prompt_length: int = 256,
        batch_size: int = 8,
        packing: bool = False,
        skip_bad_rows: bool = False,
        truncation: Literal["error", "left", "skip"] = "left",
        train_split: str = "train",
        val_split: str = "validation",
        val_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        check_lengths(max_length, max_prompt_length)
        self.save_hyperparameters()
        self.train_file, self.val_file, self.tokenizer_path = train_file, val_file, tokenizer
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.batch_size, self.packing, self.skip_bad_rows = batch_size, packing, skip_bad_rows
        self.truncation = truncation
        self.train_split, self.val_split, self.val_fraction = train_split, val_split, val_fraction
        self.num_workers, self.seed = num_workers, seed
        self.tokenizer = None
        self.train_rows: list = []
        self.val_rows: list = []
        self.predict_rows: list[dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_path, padding_side="right")
        train = self._encode(read_demonstrations(self.train_file, self.train_split, skip_bad_rows=self.skip_bad_rows))
        if self.val_file:
            val = self._encode(read_demonstrations(self.val_file, self.val_split, skip_bad_rows=self.skip_bad_rows))
        else:
            train, val = held_out(train, self.val_fraction, self.seed)
        if self.packing:
            train, val = pack(train, self.max_length, self.seed), pack(val, self.max_length, self.seed)
        self.train_rows, self.val_rows = train, val

    def _encode(self, records, aligned: bool = False) -> list[tuple[list[int], list[int]]]:
        prompts = [render_prompt(r.prompt, self.tokenizer) for r in records]
        return encode_completions(
            self.tokenizer,
            prompts,
            [completion_text(r.prompt, r.completion, self.tokenizer) for r in records],
            [r.where for r in records],
            self.max_length,
            self.max_prompt_length,
            self.skip_bad_rows,
            self.truncation,
            aligned=aligned,
        )

    def collate(self, rows: list) -> PaddedRows | PackedRows:
        if self.packing:
            return collate_packed(rows, self.tokenizer.pad_token_id)
        return pad_completions(rows, self.tokenizer.pad_token_id)  # labels -100 on prompt and padding

    def train_dataloader(self) -> DataLoader:
        return train_loader(self.train_rows, self.batch_size, self.seed, self.collate, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.val_rows, self.batch_size, self.collate, self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        # `predict` samples from the policy: the validation split's prompts alone, left-padded
        if self.predict_rows is None:
            self.predict_rows = self._prompt_rows()
        return DataLoader(self.predict_rows, batch_size=self.batch_size, collate_fn=self.collate_prompts,
                          num_workers=self.num_workers)

    def _prompt_rows(self) -> list[dict]:
        """Every prompt of val_file; without one, those of the rows setup held out (the same seeded shuffle of the
        records that tokenized). Encoded as PromptDataModule and `rlhf generate` encode prompts; "index" is the
        record's row in its file."""
        records = read_demonstrations(self.val_file or self.train_file, self.val_split if self.val_file
                                      else self.train_split, skip_bad_rows=self.skip_bad_rows)
        numbers = list(range(len(records)))  # each record's row in its file
        if not self.val_file:
            numbers = [n for n, enc in zip(numbers, self._encode(records, aligned=True)) if enc is not None]
            numbers = sorted(held_out(numbers, self.val_fraction, self.seed)[1])  # setup's split of the encoded rows
        rows = encode_prompts([records[n] for n in numbers], self.tokenizer, self.max_prompt_length, self.truncation)
        return [{**row, "index": numbers[row["index"]]} for row in rows]

    def collate_prompts(self, rows: list[dict]) -> dict:
        return {**collate_prompts(rows, self.tokenizer.pad_token_id), "index": [r["index"] for r in rows]}


def pack(rows: list, max_length: int, seed: int) -> list[list[tuple[list[int], list[int]]]]:
    """Greedy first-fit of shuffled examples into bins of at most max_length tokens."""
    order = list(rows)
    random.Random(seed).shuffle(order)
    return [[order[i] for i in b] for b in first_fit([len(p) + len(c) for p, c in order], max_length)]


def collate_packed(bins: list[list[tuple[list[int], list[int]]]], pad_id: int) -> PackedRows:
    """Packed rows -> input_ids, labels, position_ids (restarting at 0 per example, and for the padding
    tail), sequence_ids (examples numbered across the batch, -1 on the tail). No attention_mask: transformers
    reads the position restarts as example boundaries."""
    ids, labels, pos, seq = [], [], [], []
    first = 0  # number of the row's first example
    for b in bins:
        ids.append([t for p, c in b for t in p + c])
        labels.append([t for p, c in b for t in [IGNORE_INDEX] * len(p) + c])
        pos.append([i for p, c in b for i in range(len(p) + len(c))])
        seq.append([first + k for k, (p, c) in enumerate(b) for _ in range(len(p) + len(c))])
        first += len(b)
    width = max(len(x) for x in ids)
    pos = [x + list(range(width - len(x))) for x in pos]
    return PackedRows(
        input_ids=torch.tensor(pad_right(ids, pad_id, width)),
        labels=torch.tensor(pad_right(labels, IGNORE_INDEX, width)),
        position_ids=torch.tensor(pos),
        sequence_ids=torch.tensor(pad_right(seq, -1, width)),
    )
