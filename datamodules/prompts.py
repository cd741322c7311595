"""PromptDataModule: prompts -> left-padded batches for generation (PPO, rejection sampling)."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from core.models import load_tokenizer
from core.tokenize import Cuts, render_prompt
from datamodules.formats import DataError, read_prompts
from datamodules.resumable import eval_loader, held_out, train_loader


class PromptDataModule(LightningDataModule):
    """Prompts to sample from.

    Args:
        train_file: jsonl/json/parquet/csv file, a `save_to_disk` dataset dir, or a hub dataset id. Rows:
            `prompt` (text or chat messages) or HH-RLHF `chosen` strings (the prompt part); other columns
            are kept as meta (e.g. `unsafe` for the Llama 2 reward combination, `target`).
        val_file: same formats; None holds out `val_fraction` of the training rows.
        tokenizer: tokenizer path (linked to the policy's path by the recipe).
        max_prompt_length: prompts longer than this many tokens are handled by `truncation`.
        batch_size: prompts per device per rollout.
        val_batch_size: prompts per device per validation batch (default: batch_size).
        skip_bad_rows: skip malformed rows (counted per reason) instead of stopping at the first.
        truncation: prompts over max_prompt_length: "left" cuts them from the left (a task header at the start
            is lost), "skip" drops them, "error" stops at the first. Counted and reported once per file.
        train_split: split to read from hub/saved datasets for training.
        val_split: split to read from hub/saved datasets for validation.
        val_fraction: fraction of training rows held out when val_file is None.
        num_workers: DataLoader worker processes.
        seed: seed of the held-out split.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        tokenizer: str = "",
        max_prompt_length: int = 256,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        skip_bad_rows: bool = False,
        truncation: Literal["error", "left", "skip"] = "left",
        train_split: str = "train",
        val_split: str = "validation",
        val_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        # kept in checkpoints and the CLI's config.yaml, but not merged into the logger's hparams: there this
        # `seed` (held-out split, batch order) would meet PPOModule's rollout `seed`, and Lightning stops a run
        # whose module and datamodule log one key with two values (`--data.seed 3` alone would never start)
        self._log_hyperparams = False
        self.train_file, self.val_file, self.tokenizer_path = train_file, val_file, tokenizer
        self.max_prompt_length, self.batch_size = max_prompt_length, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.skip_bad_rows, self.train_split, self.val_split = skip_bad_rows, train_split, val_split
        self.truncation = truncation
        self.val_fraction, self.num_workers, self.seed = val_fraction, num_workers, seed
        self.tokenizer = None
        self.train_rows: list = []
        self.val_rows: list = []

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_path, padding_side="left")
        train = self._encode(read_prompts(self.train_file, self.train_split, skip_bad_rows=self.skip_bad_rows))
        if self.val_file:
            val = self._encode(read_prompts(self.val_file, self.val_split, skip_bad_rows=self.skip_bad_rows))
        else:
            train, val = held_out(train, self.val_fraction, self.seed)
        self.train_rows, self.val_rows = train, val

    def _encode(self, records) -> list[dict]:
        texts = [render_prompt(r.prompt, self.tokenizer) for r in records]
        ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        cuts, n, rows = Cuts(self.truncation), self.max_prompt_length, []
        reason = f"prompt longer than max_prompt_length {n}"
        for i, t, r in zip(ids, texts, records):
            # cut from the left: the end of a conversation is what the response answers
            if len(i) <= n or cuts.keep(r.where, reason, "from the left", len(i), n):
                rows.append({"input_ids": i[-n:], "prompt": t, "meta": dict(r.meta)})
        cuts.report(len(records), "prompts")
        if not rows:
            raise DataError(records[0].where.rsplit(":", 1)[0], "no usable rows after tokenization")
        return rows

    def collate(self, rows: list[dict]) -> dict:
        return collate_prompts(rows, self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        return train_loader(self.train_rows, self.batch_size, self.seed, self.collate, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.val_rows, self.val_batch_size, self.collate, self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.train_rows, batch_size=self.val_batch_size, collate_fn=self.collate,
                          num_workers=self.num_workers)


def collate_prompts(rows: list[dict], pad_id: int) -> dict:
    """Left-padded input_ids, attention_mask (b, p), plus the prompt texts and meta dicts for scoring."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = [[pad_id] * (width - len(r["input_ids"])) + r["input_ids"] for r in rows]
    mask = [[0] * (width - len(r["input_ids"])) + [1] * len(r["input_ids"]) for r in rows]
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "prompts": [r["prompt"] for r in rows],
        "meta": [r["meta"] for r in rows],
    }
