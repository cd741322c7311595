"""The standard benchmark workload shared by benchmarks/*.py.

First N pairs of ../shared/data/hh-rlhf-harmless/train.jsonl; a byte-level BPE (vocab 8192) trained on them;
a randomly initialised Llama (hidden 384, 6 layers, 6 heads, intermediate 1024), fp32, 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
HH_TRAIN = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "train.jsonl"


def hh_pairs(n: int) -> list[dict]:
    """The first n HH-RLHF rows as {prompt, chosen, rejected} with the shared prompt split off by turns."""
    from datamodules.formats import split_hh

    rows = []
    with open(HH_TRAIN) as f:
        for i, line in enumerate(f):
            if len(rows) == n:
                break
            row = json.loads(line)
            prompt, chosen = split_hh(row["chosen"], f"{HH_TRAIN}:{i + 1}", allow_empty=True)
            prompt_r, rejected = split_hh(row["rejected"], f"{HH_TRAIN}:{i + 1}", allow_empty=True)
            if prompt == prompt_r and chosen.strip() and rejected.strip() and chosen != rejected:
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def build_standard_model(out: Path, texts: list[str]) -> Path:
    from core.models import build_tiny_model

    return build_tiny_model(
        out, texts, vocab_size=8192, hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1024,
        max_position_embeddings=1024, seed=0,
    )


def setup_threads(n: int = 2) -> None:
    torch.set_num_threads(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def machine() -> dict:
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": version("lightning"),
        "transformers": version("transformers"),
        "trl": version("trl"),
    }


def report(name: str, result: dict) -> None:
    print(json.dumps({"benchmark": name, **result, **machine()}))


def unpaired_rows(pairs: list[dict], seed: int = 0) -> list[dict]:
    """KTO's rows from pairs as TRL's unpair_preference_dataset makes them, {prompt, completion, label}: each pair
    gives a desirable row (its chosen) and an undesirable one (its rejected). TRL lists all chosen rows first and
    KTOTrainer reads them in order (train_sampling_strategy "sequential"), so its first batches would hold desirable
    rows only; here the 2n rows are shuffled once with `seed`, and both sides read them in this order."""
    rows = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"} for p in pairs
            for k in ("chosen", "rejected")]
    random.Random(seed).shuffle(rows)
    return rows


def cut_to_fit(tok, prompt: str, responses: list[str], max_length: int = 512, max_prompt: int = 256,
               eos: int = 1) -> tuple[str, list[str]]:
    """Texts cut on token ids the way our PreferenceDataModule cuts a record, for TRL trainers that cut differently
    (or drop long rows): the prompt cut from the left down to `max_prompt` tokens if the longest response does not
    fit, then the responses cut to fit `max_length` with `eos` tokens left for the EOS TRL appends."""
    ids = [tok(t)["input_ids"] for t in responses]
    p = tok(prompt)["input_ids"]
    room = max_length - eos - max(len(r) for r in ids)
    p = p[-max(room, max_prompt):] if len(p) > room else p
    keep = max_length - eos - len(p)
    return tok.decode(p), [tok.decode(r[:keep]) for r in ids]


def preference_parser() -> argparse.ArgumentParser:
    """Flags shared by the pairs benchmarks (reward.py, dpo.py)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--packing", action="store_true", help="padding-free packed rows")
    parser.add_argument("--share-prompt", action="store_true", help="prompt-shared packed rows (prompt encoded once)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    return parser


def run_preference(name: str, args: argparse.Namespace, make_module: Callable[[str, Path], object],
                   unpaired: bool = False, train_rss: bool = False) -> None:
    """The standard workload as pairs through PreferenceDataModule + `make_module(model_dir, out_dir)` + a
    Lightning Trainer: pairs/s over `args.steps` steps after `args.warmup`, whole-fit seconds, peak RSS.
    `unpaired`: KTO's rows instead (`unpaired_rows`, layout "unpaired", batch 8 rows), read in file order like
    TRL's KTOTrainer reads them, and counted as rows (rows_timed, rows_per_s). peak_rss_gib is the whole
    process's (fit's export included); `train_rss` adds peak_rss_train_gib, the peak at the end of training, the one
    to set beside the TRL scripts' (they export nothing)."""
    setup_threads(2)
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader

    from datamodules.preference import PreferenceDataModule
    from recipes.common import quiet

    quiet()
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    pairs = hh_pairs(512)
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in (unpaired_rows(pairs) if unpaired else pairs)))
    model_dir = build_standard_model(tmp / "model", [p["prompt"] + p["chosen"] for p in pairs])
    clock = {"n": 0}

    class Timer(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == args.warmup:
                clock["start"] = time.perf_counter()
            if batch_idx >= args.warmup:
                clock["n"] += (batch.desirable if unpaired else batch.margin).shape[0]

        def on_train_end(self, trainer, module):
            clock["end"] = time.perf_counter()
            clock["rss"] = peak_rss_gib()

    class InOrder(PreferenceDataModule):  # KTO: the rows in file order, as KTOTrainer's sequential sampler
        def train_dataloader(self):
            return DataLoader(self.train_rows, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate)

    dm = (InOrder if unpaired else PreferenceDataModule)(
        train_file=str(data), val_file=str(data), tokenizer=str(model_dir), max_length=512, max_prompt_length=256,
        batch_size=8, packing=args.packing, share_prompt=args.share_prompt,
        layout="unpaired" if unpaired else "pairs",
    )
    trainer = Trainer(
        accelerator="cpu", precision="32-true", max_steps=args.warmup + args.steps, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Timer()],
    )
    started = time.perf_counter()
    trainer.fit(make_module(str(model_dir), tmp / "out"), dm)
    seconds = clock["end"] - clock["start"]
    unit = "rows" if unpaired else "pairs"
    report(name + ("-packed" if args.packing else "") + ("-shared-prompt" if args.share_prompt else ""), {
        f"{unit}_timed": clock["n"], "seconds": round(seconds, 2), f"{unit}_per_s": round(clock["n"] / seconds, 2),
        "fit_seconds_total": round(clock["end"] - started, 1), "peak_rss_gib": round(peak_rss_gib(), 2),
        **({"peak_rss_train_gib": round(clock["rss"], 2)} if train_rss else {})})


def hf_step_timer(warmup: int, clock: dict):
    """A transformers TrainerCallback (for the TRL side-by-side scripts) that sets clock["start"] when optimizer
    step `warmup` begins and clock["end"] when training ends."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup:
                clock["start"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            clock["end"] = time.perf_counter()

    return Timer()


def run_trl_preference(name: str, make_trainer: Callable, unpaired: bool = False, warmup: int = 3,
                       steps: int = 20) -> None:
    """The standard workload through a TRL trainer (the side-by-side scripts, run from the trl venv): the 512 pairs
    cut as our PreferenceDataModule cuts them (`cut_to_fit`), or for KTO their `unpaired_rows` each cut alone;
    `make_trainer(model_dir, rows, out_dir, callback)` builds the trainer. Counts the examples collated for
    optimizer steps warmup .. warmup + steps - 1 (pairs, or rows if `unpaired`) over the wall time from step
    `warmup`'s start to the end of training; peak RSS of the process."""
    setup_threads(2)
    from transformers import AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    pairs = hh_pairs(512)
    model_dir = build_standard_model(tmp / "model", [p["prompt"] + p["chosen"] for p in pairs])
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for r in unpaired_rows(pairs) if unpaired else pairs:
        keys = ["completion"] if unpaired else ["chosen", "rejected"]
        prompt, texts = cut_to_fit(tok, r["prompt"], [r[k] for k in keys])
        rows.append({**r, "prompt": prompt, **dict(zip(keys, texts))})
    clock: dict = {}
    trainer = make_trainer(str(model_dir), rows, tmp / "out", hf_step_timer(warmup, clock))
    collate, per_step = trainer.data_collator, []

    def counting_collate(examples):
        per_step.append(len(examples))
        return collate(examples)

    trainer.data_collator = counting_collate
    trainer.train()
    n, seconds = sum(per_step[warmup : warmup + steps]), clock["end"] - clock["start"]
    unit = "rows" if unpaired else "pairs"
    report(name, {f"{unit}_timed": n, f"{unit}_kept": len(trainer.train_dataset), "seconds": round(seconds, 2),
                  f"{unit}_per_s": round(n / seconds, 2), "peak_rss_gib": round(peak_rss_gib(), 2)})
