"""What `predict` writes: response rows shared by `rlhf generate` and every policy stage, and the Lightning prediction
writer that gathers every process's rows into one jsonl.

A response row: {"prompt" (the text the model saw), "response", "sample" (0..K-1), "finish_reason" ("eos" | "stop" |
"length"), "tokens" (response tokens, EOS included), "index" (the prompt's row in its file), "meta"}.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from core.generation import Rollout, SamplingSpec, decode_responses, generate
from core.outputs import write_jsonl
from modules.stage import output_path


def batch_generator(seed: int, batch_index: int, device, rank: int = 0) -> torch.Generator:
    """The sampling stream of one batch: the same (seed, batch) always samples the same, resumed or not. Rank 0 (one
    process) uses (seed, batch), so a one-process `predict` samples what `rlhf generate` does with that seed and
    batch size; other ranks add their rank."""
    key = (seed, batch_index) if rank == 0 else (seed, rank, batch_index)
    return torch.Generator(device=device).manual_seed(zlib.crc32(repr(key).encode()))


def finish_reasons(rollout: Rollout, eos_token_id) -> list[str]:
    """Per row: "eos" (ended with EOS), "stop" (a stop string), "length" (max_new_tokens reached)."""
    r = rollout.response_mask.long()  # (b*n, r)
    last = (r.sum(-1) - 1).clamp(min=0)  # index of each row's last response token
    token = rollout.sequences[:, rollout.prompt_length:].gather(1, last[:, None]).squeeze(1)
    ids = [eos_token_id] if eos_token_id is not None else []
    eos = torch.isin(token, torch.tensor(ids, dtype=token.dtype, device=token.device))
    return ["eos" if e else "stop" if ended else "length" for e, ended in zip(eos.tolist(), rollout.has_eos.tolist())]


def response_rows(tokenizer, rollout: Rollout, prompts: list[str], indexes: list[int], metas: list[dict],
                  k: int) -> list[list[dict]]:
    """Rollout rows i*k .. i*k+k-1 answer prompt i -> per prompt, its k response rows."""
    eos = tokenizer.eos_token_id
    texts, reasons = decode_responses(tokenizer, rollout, eos), finish_reasons(rollout, eos)
    lengths = rollout.response_mask.sum(-1).tolist()
    return [
        [{"prompt": prompt, "response": texts[j * k + s], "sample": s, "finish_reason": reasons[j * k + s],
          "tokens": int(lengths[j * k + s]), "index": int(index), "meta": meta} for s in range(k)]
        for j, (prompt, index, meta) in enumerate(zip(prompts, indexes, metas))
    ]


def batch_indexes(module, batch: dict, batch_idx: int, size: int | None = None) -> list[int]:
    """Each prompt's row in its file: the batch's "index" (SFT, preference prompts), else its row in the loader's
    dataset: Lightning's batch indices (kept while a prediction writer writes per batch, as JsonlPredictionWriter
    does), else consecutive from batch_idx (one process, in order). `size`: dataset items in the batch (default:
    its prompts)."""
    if batch.get("index") is not None:  # the DataModule's own row numbers (SFT, preference prompts)
        return [int(i) for i in batch["index"]]
    b = len(batch["prompts"]) if size is None else size
    trainer = module._trainer
    seen = list(trainer.predict_loop.current_batch_indices) if trainer is not None else []
    return seen if len(seen) == b else [batch_idx * b + i for i in range(b)]


def sample_rows(module, batch: dict, spec: SamplingSpec, seed: int, batch_idx: int) -> list[dict]:
    """A policy stage's predict_step: spec.num_samples responses per prompt of a left-padded prompt batch from
    module.policy, as response rows; batch `batch_idx` samples from batch_generator(seed, batch_idx, rank)."""
    tokenizer = module.tokenizer
    generator = batch_generator(seed, batch_idx, batch["input_ids"].device, module.global_rank)
    with module.sampling_guard():
        rollout = generate(module.policy, batch["input_ids"], batch["attention_mask"], spec, tokenizer.eos_token_id,
                           tokenizer.pad_token_id, generator, tokenizer)
    metas = batch.get("meta") or [{} for _ in batch["prompts"]]
    rows = response_rows(tokenizer, rollout, batch["prompts"], batch_indexes(module, batch, batch_idx), metas,
                         spec.num_samples)
    return [row for prompt in rows for row in prompt]


def response_key(row: dict) -> tuple:
    return row["index"], row["sample"]


def response_writer(module) -> list:
    """A policy stage's configure_callbacks(): during predict, the writer of its response rows to
    module.predict_file (default <log dir>/predictions.jsonl); nothing otherwise."""
    if module._trainer is None or not module.trainer.predicting:
        return []
    path = lambda: output_path(module.trainer, module.predict_file, "predictions.jsonl")  # noqa: E731
    return [JsonlPredictionWriter(path, key=response_key, unique=True, noun="responses")]


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes every process's predict_step rows (lists of dicts) to ONE jsonl, atomically, from rank 0.

    Rows are kept per batch (so predict_step may return them without trainer.predict holding them), gathered to
    rank 0 at the epoch's end (torch.distributed all_gather_object when initialised), ordered by `key` (the file's
    row order; ranks interleave the loader's rows) with repeated keys dropped when `unique`, and written to
    `path()`. Modules return one from `configure_callbacks()` during predict.

    Args:
        path: called at the epoch's end for the output file (the module resolves it against its run folders).
        key: sort key of a row; None keeps rank 0's rows, then rank 1's, ...
        unique: drop rows whose key an earlier row has (a sampler that repeats rows to even out the ranks).
        noun: what a row is, for the closing message.
    """

    def __init__(self, path: Callable[[], Path], key: Callable[[dict], tuple] | None = None, unique: bool = False,
                 noun: str = "rows"):
        super().__init__(write_interval="batch_and_epoch")
        self.path, self.key, self.unique, self.noun = path, key, unique, noun
        self.rows: list[dict] = []

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.rows = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.rows.extend(prediction or [])

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        rows, self.rows = self.rows, []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not trainer.is_global_zero:
            return
        if self.key is not None:
            rows = sorted(rows, key=self.key)  # stable: rows of one key keep their order
            if self.unique:
                rows = [r for i, r in enumerate(rows) if i == 0 or self.key(r) != self.key(rows[i - 1])]
        out = write_jsonl(self.path(), rows)
        print(f"wrote {len(rows)} {self.noun} to {out}")
