"""DPO throughput and memory on the standard workload (see benchmarks/README.md).

512 HH-RLHF pairs, sigmoid loss, beta 0.1, batch 8 pairs, max length 512, 20 optimizer steps timed after 3
warm-up steps, through the real PreferenceDataModule + DPOModule + Lightning Trainer.

    python benchmarks/dpo.py                          # reference = frozen copy
    python benchmarks/dpo.py --reference precomputed  # one pass stores reference log-probs, one model held
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", default="copy", choices=["copy", "precomputed"])
    parser.add_argument("--packing", action="store_true", help="padding-free packed rows")
    parser.add_argument("--share-prompt", action="store_true", help="prompt-shared packed rows (prompt encoded once)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    setup_threads(2)
    from lightning.pytorch import Callback, Trainer

    from datamodules.preference import PreferenceDataModule
    from modules.dpo import DPOModule
    from modules.models import ModelSpec
    from recipes.common import quiet

    quiet()
    tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    pairs = hh_pairs(512)
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    model_dir = build_standard_model(tmp / "model", [p["prompt"] + p["chosen"] for p in pairs])
    clock = {"pairs": 0}

    class Timer(Callback):
        def on_train_start(self, trainer, module):
            clock["fit_start"] = clock.get("fit_start", time.perf_counter())

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == args.warmup:
                clock["start"] = time.perf_counter()
            if batch_idx >= args.warmup:
                clock["pairs"] += batch["margin"].shape[0]

        def on_train_end(self, trainer, module):
            clock["end"] = time.perf_counter()

    dm = PreferenceDataModule(
        train_file=str(data), val_file=str(data), tokenizer=str(model_dir), max_length=512, max_prompt_length=256,
        batch_size=8, packing=args.packing, share_prompt=args.share_prompt,
    )
    module = DPOModule(ModelSpec(path=str(model_dir)), reference=args.reference, beta=0.1, save_dir=str(tmp / "out"))
    trainer = Trainer(
        accelerator="cpu", precision="32-true", max_steps=args.warmup + args.steps, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Timer()],
    )
    started = time.perf_counter()
    trainer.fit(module, dm)
    seconds = clock["end"] - clock["start"]
    report(
        f"dpo-{args.reference}" + ("-packed" if args.packing else "") + ("-shared-prompt" if args.share_prompt else ""),
        {
            "pairs_timed": clock["pairs"],
            "seconds": round(seconds, 2),
            "pairs_per_s": round(clock["pairs"] / seconds, 2),
            "fit_seconds_total": round(clock["end"] - started, 1),
            "peak_rss_gib": round(peak_rss_gib(), 2),
        },
    )


if __name__ == "__main__":
    main()
