"""PPO throughput and memory: 64 HH-RLHF prompts, 64 new tokens each, batch 16 (see benchmarks/README.md).

The standard benchmark model is the policy; the reward model is the same architecture with a scalar head. An
episode = one prompt's response generated, scored and trained on (4 PPO epochs, 1 minibatch). Two passes
over the 64 prompts; the second is timed.

    python benchmarks/ppo.py                    # layout separate: policy, frozen reference, value model
    python benchmarks/ppo.py --layout shared    # one base: LoRA policy, adapter-off reference, value head
    python benchmarks/ppo.py --padded           # score/train on left-padded rows instead of packed ones
    python benchmarks/ppo.py --value-top-layers 2   # the value model trains only its top 2 blocks and head
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
    parser.add_argument("--layout", default="separate", choices=["separate", "shared"])
    parser.add_argument("--value-top-layers", type=int, default=None,
                        help="layout separate: the value model trains only its top N blocks and head")
    parser.add_argument("--padded", action="store_true", help="left-padded rows (PPOModule packing=False)")
    args = parser.parse_args()
    setup_threads(2)
    from lightning.pytorch import Callback, Trainer

    from core.generation import SamplingSpec
    from core.models import LoraSpec, ModelSpec, load_sequence_classifier, load_tokenizer, save_hf
    from core.reward_spec import RewardSpec
    from datamodules.prompts import PromptDataModule
    from modules.ppo import PPOModule
    from recipes.common import quiet

    quiet()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    pairs = hh_pairs(64)
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in pairs))
    model_dir = build_standard_model(tmp / "model", [p["prompt"] + p["chosen"] for p in hh_pairs(512)])
    tok = load_tokenizer(str(model_dir))
    save_hf(load_sequence_classifier(str(model_dir), tok.pad_token_id), tok, tmp / "rm")
    clock = {"episodes": 0}

    class Timer(Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                clock["start"] = time.perf_counter()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == 1:
                clock["episodes"] += batch["input_ids"].shape[0]

        def on_train_end(self, trainer, module):
            clock["end"] = time.perf_counter()

    lora = LoraSpec(r=16, alpha=32, dropout=0.0) if args.layout == "shared" else None
    module = PPOModule(
        ModelSpec(path=str(model_dir), lora=lora),
        RewardSpec(models=[ModelSpec(path=str(tmp / "rm"))]),
        SamplingSpec(max_new_tokens=64, temperature=1.0),
        layout=args.layout, ppo_epochs=4, num_minibatches=1, save_dir=str(tmp / "out"), packing=not args.padded,
        value_model=ModelSpec(path=str(tmp / "rm"), train_top_layers=args.value_top_layers),
    )
    dm = PromptDataModule(train_file=str(data), val_file=str(data), tokenizer=str(model_dir), max_prompt_length=448,
                          batch_size=16)
    trainer = Trainer(
        accelerator="cpu", precision="32-true", max_epochs=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()],
    )
    trainer.fit(module, dm)
    seconds = clock["end"] - clock["start"]
    name = f"ppo-{args.layout}" + ("-padded" if args.padded else "")
    name += f"-value-top-{args.value_top_layers}" if args.value_top_layers else ""
    report(name, {
        "episodes_timed": clock["episodes"], "seconds": round(seconds, 2),
        "episodes_per_s": round(clock["episodes"] / seconds, 3), "peak_rss_gib": round(peak_rss_gib(), 2)})


if __name__ == "__main__":
    main()
