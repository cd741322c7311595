"""PreferenceDataModule: preference pairs / K-wise rankings / unpaired judgements -> right-padded batches (reward
models, DPO).

Layout "pairs": b pairs -> 2b rows, chosen rows [0, b) then rejected rows [b, 2b), so a step does
`.chunk(2)`. Layout "rankings": one group of K rows per prompt, each response scored once, and all
C(K, 2) non-tied pairs formed from the scores (InstructGPT, arXiv 2203.02155, section 3.5). Layout "unpaired"
(DPO's loss_type kto): one labelled completion per row, plus the mismatched rows of KTO's KL estimate
(datamodules/unpaired.py).
"""

from __future__ import annotations

import functools
import logging
import os
import random
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from core.batches import PairBatch, PreferenceBatch, RankingBatch, UnpairedBatch
from core.models import load_tokenizer
from core.packing import (
    collate_pairs_packed,
    collate_pairs_shared,
    collate_shared_prefix,
    pad_completions,
    pair_batch,
)
from core.tokenize import check_lengths, completion_text, encode_completions, encode_prompts, render_prompt
from datamodules.preference_formats import Ranking, read_preferences
from datamodules.prompts import collate_prompts
from datamodules.resumable import eval_loader, held_out, train_loader
from datamodules.unpaired import collate_unpaired, read_judgements

log = logging.getLogger(__name__)
Encoded = list[tuple[list[int], list[int]]]  # (prompt_ids, completion_ids: EOS-ended; a reward model's not)


class PreferenceDataModule(LightningDataModule):
    """Preference data for reward models and DPO.

    Args:
        train_file: jsonl/json/parquet/csv file, a `save_to_disk` dataset dir, or a hub dataset id. Rows:
            HH-RLHF chosen/rejected conversations, prompt/chosen/rejected (strings or chat messages),
            prompt/responses with ranks (lower = better, ties allowed) or ratings (higher = better) or
            listed best first; pairs may carry `margin` or a `strength` label. Layout "unpaired": prompt,
            completion, label (true = desirable; see datamodules/unpaired.py).
        val_file: same formats; None holds out `val_fraction` of the training prompts.
        tokenizer: tokenizer path (linked to the model's path by the recipe).
        max_length: tokens per row (prompt + response + EOS; a reward model's rows have no EOS).
        max_prompt_length: over max_length, the prompt is cut from the left but keeps this many tokens.
        batch_size: pairs (layout pairs: 2 * batch_size rows) or prompts (layout rankings) per device per step.
        layout: "pairs": every non-tied pair of a record (better first) is its own example; "rankings":
            each record is one group of its K responses; "unpaired": labelled single completions (KTO). Without
            a val_file, unpaired data holds out rows, not prompts: give a val_file to keep prompts apart.
        packing: layout pairs, for DPO: pack a batch's 2b sequences into as few rows of max_length as fit,
            with position ids restarting per sequence (no padding, no attention across sequences) and a
            `sequence_ids` map (rows, t) back to the 2b sequences.
        share_prompt: reward models (either layout) and DPO: the responses to one prompt are packed as one
            unit [common prefix, rest of response 1, ..., rest of response K] under a tree attention mask, so
            the prompt is encoded once per pair/group instead of once per response (same scores/log-probs).
        skip_bad_rows: skip malformed rows (counted per reason) instead of stopping at the first.
        truncation: responses over max_length: "left" cuts the prompt from the left (keeping
            max_prompt_length), then the response from the right (losing its EOS); "skip" drops their records;
            "error" stops at the first. Cut or dropped rows are counted per reason and reported once per file.
        strength_map: preference-strength label -> margin; None uses Llama 2's (significantly better 1.0 ...
            negligibly better 0.0).
        rating_scale: (lowest, highest) valid `ratings` value (InstructGPT's 1-7 Likert scale); a rating
            outside it, NaN or inf is a bad row.
        train_split: split to read from hub/saved datasets for training.
        val_split: split to read from hub/saved datasets for validation.
        val_fraction: fraction of training prompts held out when val_file is None.
        num_workers: DataLoader worker processes.
        seed: seed of the held-out split (and of the training order).
        bootstrap: train on a bootstrap resample: as many training records (prompts, each with all its
            pairs or its ranking) drawn with replacement as there are, seeded, after the held-out split, so
            validation rows are untouched and the same for every member of a reward-model ensemble.
        bootstrap_seed: seed of the resample; None uses the run's `--seed_everything` (PL_GLOBAL_SEED, else
            `seed`), so members trained with different seeds see different resamples.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        tokenizer: str = "",
        max_length: int = 512,
        max_prompt_length: int = 256,
        batch_size: int = 8,
        layout: Literal["pairs", "rankings", "unpaired"] = "pairs",
        packing: bool = False,
        share_prompt: bool = False,
        skip_bad_rows: bool = False,
        truncation: Literal["error", "left", "skip"] = "left",
        strength_map: dict[str, float] | None = None,
        rating_scale: tuple[float, float] = (1.0, 7.0),
        train_split: str = "train",
        val_split: str = "validation",
        val_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 0,
        bootstrap: bool = False,
        bootstrap_seed: int | None = None,
    ):
        super().__init__()
        check_lengths(max_length, max_prompt_length)
        if layout not in ("pairs", "rankings", "unpaired"):
            raise ValueError(f"layout must be 'pairs', 'rankings' or 'unpaired', got {layout!r}")
        if layout == "unpaired" and (packing or share_prompt):
            raise ValueError("layout 'unpaired' batches padded rows only: drop packing and share_prompt")
        self.save_hyperparameters()
        self.train_file, self.val_file, self.tokenizer_path = train_file, val_file, tokenizer
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        if packing and layout != "pairs":
            raise ValueError("packing is for layout 'pairs'; for rankings use share_prompt (reward models)")
        self.batch_size, self.layout, self.skip_bad_rows = batch_size, layout, skip_bad_rows
        self.packing, self.share_prompt = packing, share_prompt
        self.truncation, self.strength_map, self.rating_scale = truncation, strength_map, tuple(rating_scale)
        self.train_split, self.val_split, self.val_fraction = train_split, val_split, val_fraction
        self.num_workers, self.seed = num_workers, seed
        self.bootstrap, self.bootstrap_seed = bootstrap, bootstrap_seed
        self.tokenizer = None
        self.completion_eos = True  # responses end with EOS; a reward model's module says otherwise at setup
        self.train_rows: list = []
        self.val_rows: list = []
        self.predict_rows: list[dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_path, padding_side="right")
        module = self.trainer.lightning_module if self.trainer is not None else None
        if hasattr(module, "completion_eos") and not self.val_rows:  # a reward model: the text alone (see its doc)
            self.completion_eos = module.completion_eos(stage or "fit")
        need_train = stage in (None, "fit") or not self.val_file  # evaluating a val_file needs no train data
        if self.val_rows and (self.train_rows or not need_train):
            return
        train = []
        if need_train:
            train = self._encode(self._read(self.train_file, self.train_split))
        if self.val_file:
            val = self._encode(self._read(self.val_file, self.val_split))
        else:  # hold out whole prompts, so no pair of a held-out prompt is trained on
            train, val = held_out(train, self.val_fraction, self.seed)
        if self.bootstrap and train:
            train = self._resample(train)
        self.train_rows, self.val_rows = self._examples(train), self._examples(val)

    def _resample(self, records: list) -> list:
        """n records drawn with replacement from n (whole prompts: a record's pairs are not independent)."""
        seed = self.bootstrap_seed
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", self.seed))
        rng = random.Random(seed)
        drawn = [records[rng.randrange(len(records))] for _ in records]
        log.info(f"bootstrap resample (seed {seed}): {len({id(r) for r in drawn})} distinct of {len(records)} "
                 "training records")
        return drawn

    def _read(self, source: str, split: str) -> list:
        if self.layout == "unpaired":
            return read_judgements(source, split, self.skip_bad_rows)
        return read_preferences(source, split, self.skip_bad_rows, self.strength_map, self.rating_scale)

    def _encode(self, records: list[Ranking]) -> list[tuple[Ranking, Encoded]]:
        """Tokenize every response of every record, prompt and response from one tokenization."""
        prompts = [render_prompt(r.prompt, self.tokenizer) for r in records]
        # one call for all rows: a bad row raises DataError naming its file and line (or is None in skip modes)
        # each response as SFT reads a completion (after an HH-rendered "Assistant:", a space), and every response
        # of a record after the same prompt tokens (groups: one cut for the record)
        encoded = encode_completions(
            self.tokenizer, [p for p, r in zip(prompts, records) for _ in r.responses],
            [completion_text(r.prompt, x, self.tokenizer) for r in records for x in r.responses],
            [r.where for r in records for _ in r.responses],
            self.max_length, self.max_prompt_length, self.skip_bad_rows, self.truncation, aligned=True,
            eos=self.completion_eos, groups=[len(r.responses) for r in records],
        )
        groups, start = [], 0
        for r in records:  # skip modes: a record with a dropped response is dropped whole
            enc, start = encoded[start : start + len(r.responses)], start + len(r.responses)
            if None not in enc:
                groups.append((r, enc))
        if len(groups) < len(records):
            log.warning(f"dropped {len(records) - len(groups)} of {len(records)} records at tokenization")
        if self.layout == "unpaired":
            return groups
        kept = [(r, enc) for r, enc in groups if not _ties_after_truncation(r, enc)]
        if len(kept) < len(groups):
            log.warning(f"dropped {len(groups) - len(kept)} records whose differently ranked responses "
                        f"become identical after truncation to max_length {self.max_length}")
        return kept

    def _examples(self, groups: list[tuple[Ranking, Encoded]]) -> list:
        if self.layout == "rankings":
            return [(enc, [float(x) for x in r.ranks], float(r.margin)) for r, enc in groups]
        if self.layout == "unpaired":  # ((p, c), desirable, index)
            return [(enc[0], r.desirable, i) for i, (r, enc) in enumerate(groups)]
        pairs = []  # (chosen (p, c), rejected (p, c), margin, index): every non-tied pair, better first
        for r, enc in groups:
            for i, j in ranked_pairs(r.ranks):
                pairs.append((enc[i], enc[j], float(r.margin), len(pairs)))
        return pairs

    def collate(self, rows: list, padded: bool = False) -> PreferenceBatch | UnpairedBatch:
        """The configured batch layout; `padded` forces one padded row per response (predict)."""
        pad = self.tokenizer.pad_token_id
        if self.layout == "unpaired":
            return collate_unpaired(rows, pad, self.max_length)
        if self.layout == "rankings":
            if self.share_prompt and not padded:
                units = [[p + c for p, c in enc] for enc, _, _ in rows]
                return ranking_batch(collate_shared_prefix(units, pad, self.max_length), rows)
            return collate_rankings(rows, pad)
        if self.share_prompt and not padded:
            return collate_pairs_shared(rows, pad, self.max_length)
        if self.packing and not padded:
            return collate_pairs_packed(rows, pad, self.max_length)
        return collate_pairs(rows, pad)

    def _loader(self, rows, shuffle: bool, collate=None) -> DataLoader:
        return DataLoader(rows, batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate or self.collate,
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return train_loader(self.train_rows, self.batch_size, self.seed, self.collate, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.val_rows, self.batch_size, self.collate, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()  # `test --data.val_file FILE` evaluates FILE

    def predict_dataloader(self) -> DataLoader:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if getattr(module, "predict_input", "responses") == "prompts":  # a policy (DPO) samples from the prompts
            if self.predict_rows is None:
                self.predict_rows = self._prompt_rows()
            return DataLoader(self.predict_rows, batch_size=self.batch_size, collate_fn=self.collate_prompts,
                              num_workers=self.num_workers)
        # one padded row per response: predictions are written per (prompt, response) text
        return self._loader(self.val_rows, shuffle=False, collate=functools.partial(self.collate, padded=True))

    def _prompt_rows(self) -> list[dict]:
        """Every prompt of val_file; without one, those of the records setup held out (the same seeded shuffle of
        the records that tokenized). Encoded as PromptDataModule and `rlhf generate` encode prompts; "index" is
        the record's row in its file."""
        records = self._read(self.val_file or self.train_file, self.val_split if self.val_file else self.train_split)
        numbers = list(range(len(records)))  # each record's row in its file
        if not self.val_file:
            kept = {id(r) for r, _ in self._encode(records)}
            numbers = [n for n in numbers if id(records[n]) in kept]
            numbers = sorted(held_out(numbers, self.val_fraction, self.seed)[1])  # setup's split of the encoded records
        rows = encode_prompts([records[n] for n in numbers], self.tokenizer, self.max_prompt_length, self.truncation)
        return [{**row, "index": numbers[row["index"]]} for row in rows]

    def collate_prompts(self, rows: list[dict]) -> dict:
        return {**collate_prompts(rows, self.tokenizer.pad_token_id), "index": [r["index"] for r in rows]}


def ranked_pairs(ranks) -> list[tuple[int, int]]:
    """(i, j) for every pair with ranks[i] < ranks[j] (i better), ties left out; by i, then j."""
    return [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]


def _ties_after_truncation(record: Ranking, enc: Encoded) -> bool:
    return any(enc[i] == enc[j] for i, j in ranked_pairs(record.ranks))


def collate_pairs(rows: list, pad_id: int) -> PairBatch:
    """[(chosen (p, c), rejected (p, c), margin, index)] x b -> 2b padded rows (chosen first), margin (b,),
    index (b,)."""
    return pair_batch(pad_completions([r[0] for r in rows] + [r[1] for r in rows], pad_id), rows)


def collate_rankings(rows: list, pad_id: int) -> RankingBatch:
    """[(K x (p, c), ranks [K], margin)] x g -> N = sum K padded rows, group (N,), ranks (N,), margin (g,)."""
    return ranking_batch(pad_completions([e for enc, _, _ in rows for e in enc], pad_id), rows)


def ranking_batch(tokens, rows: list) -> RankingBatch:
    """The N sequences of `rows` [(K x (p, c), ranks [K], margin)] in any layout -> a RankingBatch."""
    return RankingBatch(
        tokens,
        group=torch.tensor([g for g, (enc, _, _) in enumerate(rows) for _ in enc], dtype=torch.long),  # (N,)
        ranks=torch.tensor([x for _, ranks, _ in rows for x in ranks], dtype=torch.float32),  # (N,)
        margin=torch.tensor([m for _, _, m in rows], dtype=torch.float32),  # (g,)
    )
