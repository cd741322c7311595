"""Throughput of a real `rlhf <stage> fit`, added on the command line (benchmarks/gpu_check.sh):

    python -m recipes.cli sft fit ... --trainer.callbacks+=benchmarks.throughput.Throughput

At the end of fit, rank 0 prints one JSON line `THROUGHPUT {...}`: training tokens/s (real tokens of the batches,
summed over ranks: padding excluded) over the steps after `warmup`, and for ppo / rs the rollout's generated
tokens/s; model FLOP utilisation against the GPU's dense bf16 peak times the number of processes. FLOPs are the
usual estimates, not counts: training 6 N per token (forward 2 N, backward 4 N), 4 N with a frozen base (LoRA,
no weight gradients for the base), sampling 2 N per generated token (attention over the cache left out); N is the
policy's parameter count without embeddings.
"""

from __future__ import annotations

import json
import os
import time

import torch
from lightning.pytorch import Callback

from core.batches import token_rows

# dense bf16 tensor-core peaks, FLOP/s (vendor datasheets; sparsity excluded)
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}


def peak_flops() -> float | None:
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAKS.items() if k in name), None)


def real_tokens(batch) -> int:
    """Tokens of a training batch that are not padding."""
    if isinstance(batch, dict):  # prompt batches (ppo, rs): the prompts only; generation is timed apart
        return int(batch["attention_mask"].sum())
    rows = token_rows(batch)
    if hasattr(rows, "tree_ids"):
        return int((rows.tree_ids >= 0).sum())
    if hasattr(rows, "sequence_ids"):
        return int((rows.sequence_ids >= 0).sum())
    return int(rows.attention_mask.sum())


class Throughput(Callback):
    """Args:
        warmup: optimizer steps left out of the timing (compilation, allocator warm-up).
    """

    _trainer = None

    def __init__(self, warmup: int = 3):
        self.warmup = warmup
        self.params = 0  # N, counted when the model is built (before a strategy shards it)
        self.frozen_base = False
        self.tokens = 0
        self.seconds = 0.0
        self.gen_tokens = 0
        self.gen_seconds = 0.0
        self._t0 = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        import modules.ppo
        import modules.rejection_sampling

        for module in (modules.ppo, modules.rejection_sampling):  # time sampling where the stage calls it
            module.generate = self._timed(module.generate)
        build = pl_module.configure_model

        def configure_model() -> None:
            build()
            self.count(pl_module)

        pl_module.configure_model = configure_model

    def count(self, pl_module) -> None:
        model = next(getattr(pl_module, name) for name in ("policy", "backbone") if getattr(pl_module, name, None))
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        embeddings = {id(p) for p in base.get_input_embeddings().parameters()}
        # a 4-bit weight packs two values per byte; ZeRO-3 keeps the full size in ds_numel
        self.params = sum(getattr(p, "ds_numel", p.numel()) * (2 if type(p).__name__ == "Params4bit" else 1)
                          for p in base.parameters() if id(p) not in embeddings)
        self.frozen_base = any(not p.requires_grad for p in base.parameters() if id(p) not in embeddings)

    def _timed(self, generate):
        def timed(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            out = generate(*args, **kwargs)
            self._sync()
            if self._counting:
                self.gen_seconds += time.perf_counter() - start
                self.gen_tokens += int(out.response_mask.sum())
            return out

        return timed

    @property
    def _counting(self) -> bool:
        return self._trainer is not None and self._trainer.global_step >= self.warmup

    def on_train_start(self, trainer, pl_module) -> None:
        self._trainer = trainer
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._sync()
        if self._counting:
            self.seconds += time.perf_counter() - self._t0
            self.tokens += real_tokens(batch)

    def on_fit_end(self, trainer, pl_module) -> None:
        totals = torch.tensor([self.tokens, self.seconds, self.gen_tokens, self.gen_seconds], dtype=torch.float64,
                              device=pl_module.device)
        tokens, _, gen_tokens, _ = trainer.strategy.reduce(totals, reduce_op="sum").tolist()  # all ranks
        if not trainer.is_global_zero:
            return
        n, frozen_base = self.params, self.frozen_base
        world, peak = trainer.world_size, peak_flops()
        row = {"stage": pl_module.stage, "world_size": world, "params_no_embeddings": n,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "precision": str(trainer.precision), "strategy": type(trainer.strategy).__name__,
               "timed_steps": trainer.global_step - self.warmup}
        if self.seconds > 0:
            row["train_tokens_per_s"] = round(tokens / self.seconds, 1)  # rank 0's time: ranks step together
            if peak:
                row["train_mfu"] = round((4 if frozen_base else 6) * n * row["train_tokens_per_s"] / (peak * world), 4)
        if self.gen_seconds > 0:
            row["rollout_tokens_per_s"] = round(gen_tokens / self.gen_seconds, 1)
            if peak:
                row["rollout_mfu"] = round(2 * n * row["rollout_tokens_per_s"] / (peak * world), 4)
        if torch.cuda.is_available():
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print("THROUGHPUT " + json.dumps(row), flush=True)
