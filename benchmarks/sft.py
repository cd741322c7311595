"""SFT throughput and memory on the standard workload (see benchmarks/README.md).

512 HH-RLHF prompts + chosen completions, max length 512 (prompt cut from the left), batch 8, 20 optimizer
steps timed after 3 warm-up steps, through the real SFTDataModule + SFTModule + Lightning Trainer.

    python benchmarks/sft.py              # padded batches (like TRL's default)
    python benchmarks/sft.py --packing    # packed rows of 512 tokens
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import build_standard_model, hh_pairs, peak_rss_gib, report, setup_threads  # noqa: E402


class StepTimer:
    """Lightning callback: wall time and non-pad tokens of the steps after the warm-up."""

    def __init__(self, warmup: int):
        from lightning.pytorch.callbacks import Callback

        timer = self

        class _CB(Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if batch_idx == warmup:
                    timer.start = time.perf_counter()
                if batch_idx >= warmup:  # <pad> is a special token that never occurs in text
                    timer.tokens += int((batch.input_ids != trainer.datamodule.tokenizer.pad_token_id).sum())

            def on_train_end(self, trainer, module):
                timer.seconds = time.perf_counter() - timer.start

        self.callback, self.start, self.tokens, self.seconds = _CB(), 0.0, 0, 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    setup_threads(2)
    from lightning.pytorch import Trainer

    from core.models import ModelSpec
    from datamodules.sft import SFTDataModule
    from modules.sft import SFTModule
    from recipes.common import quiet

    quiet()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    pairs = hh_pairs(512)
    data = tmp / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": p["prompt"], "completion": p["chosen"]}) + "\n" for p in pairs))
    model_dir = build_standard_model(tmp / "model", [p["prompt"] + p["chosen"] for p in pairs])
    dm = SFTDataModule(
        train_file=str(data), val_file=str(data), tokenizer=str(model_dir), max_length=512, max_prompt_length=256,
        batch_size=8, packing=args.packing,
    )
    module = SFTModule(ModelSpec(path=str(model_dir)), save_dir=str(tmp / "out"))
    timer = StepTimer(args.warmup)
    trainer = Trainer(
        accelerator="cpu", precision="32-true", max_steps=args.warmup + args.steps, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer.callback],
    )
    trainer.fit(module, dm)
    report(
        "sft" + ("-packed" if args.packing else ""),
        {
            "pairs": len(pairs),
            "steps_timed": args.steps,
            "non_pad_tokens": timer.tokens,
            "seconds": round(timer.seconds, 2),
            "tokens_per_s": round(timer.tokens / timer.seconds, 1),
            "peak_rss_gib": round(peak_rss_gib(), 2),
        },
    )


if __name__ == "__main__":
    main()
