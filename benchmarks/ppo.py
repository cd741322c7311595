"""PPO and critic-free RL throughput and memory on HH prompts (see benchmarks/README.md).

64 prompts from the first 64 HH pairs (cut from the left to 448 tokens), 64 new tokens each at temperature 1,
rounds of 16 completions, each round trained on with 4 PPO epochs x 1 minibatch, kl_coef 0.05; the standard model
is the policy and the same architecture with a scalar head is the reward model (and, for gae in layout separate,
the value model's initialisation).

    python benchmarks/ppo.py                    # gae, layout separate: policy, frozen reference, value model
    python benchmarks/ppo.py --layout shared    # one base: LoRA policy, adapter-off reference, value head
    python benchmarks/ppo.py --padded           # score/train on left-padded rows instead of packed ones
    python benchmarks/ppo.py --value-top-layers 2   # gae: the value model trains only its top 2 blocks and head
    python benchmarks/ppo.py --advantage grpo   # 8 prompts x 2 samples a round, no value model (vs trl_grpo.py)
    python benchmarks/ppo.py --advantage rloo --layout shared   # LoRA policy, adapter-off reference (vs trl_rloo.py)
    python benchmarks/ppo.py --advantage grpo --episodes 32     # smoke run: 1 warm-up round, 1 timed

A round is 16 / group prompts x group samples (`--group`, sampling.num_samples; default 1 for gae, 2 for grpo and
rloo as in trl_grpo.py and trl_rloo.py). An episode = one completion generated, scored and trained on.
`--episodes E` (default 128) runs E / 16 rounds: the first half warms up, the second half is timed, exactly as
benchmarks/trl_online.py times TRL's trainers: the clock starts when the first timed round's batch starts (its
generation, scoring and 4 optimizer steps happen inside it) and stops at the end of training; episodes_timed counts
the completions of the timed rounds (E / 2). peak_rss_gib is the whole process's (the policy export after fit
included); grpo and rloo also report peak_rss_train_gib, the peak at the end of training, the one to set beside
TRL's (its scripts export nothing). For gae (group 1, 16 prompts a round) the default is two passes over
the 64 prompts with the second timed, as before; its prompts come in the loader's seeded shuffled order. grpo and
rloo read the prompts in file order (TRL's shuffle_dataset False in the TRL scripts), so with E = 128 and group 2
both sides train on prompts 0-31 in the warm-up rounds and prompts 32-63 in the timed ones, 8 per round.
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

ROUND, UPDATES = 16, 4  # completions per round, optimizer steps per round (ppo_epochs x num_minibatches); as TRL's


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", default="separate", choices=["separate", "shared"])
    parser.add_argument("--value-top-layers", type=int, default=None,
                        help="gae, layout separate: the value model trains only its top N blocks and head")
    parser.add_argument("--padded", action="store_true", help="left-padded rows (PPOModule packing=False)")
    parser.add_argument("--advantage", default="gae", choices=["gae", "grpo", "rloo"])
    parser.add_argument("--group", type=int, default=None, help="samples per prompt (default: 1 gae, 2 grpo/rloo)")
    parser.add_argument("--loss-agg", default="token_mean", choices=["token_mean", "seq_mean"],
                        help="grpo/rloo loss aggregation (TRL's GRPO default 'dapo' = token_mean)")
    parser.add_argument("--episodes", type=int, default=128, help="all completions; the first half warms up")
    args = parser.parse_args()
    critic = args.advantage == "gae"
    group = args.group or (1 if critic else 2)
    if args.episodes % (2 * ROUND) or ROUND % group:
        parser.error(f"--episodes must be a multiple of {2 * ROUND} and --group divide {ROUND}")
    if not critic and group < 2:
        parser.error(f"--advantage {args.advantage} compares samples of one prompt: --group >= 2")
    if not critic and args.value_top_layers:
        parser.error("--value-top-layers is for gae (grpo and rloo load no value model)")
    setup_threads(2)
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader

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
    rounds, warm_rounds = args.episodes // ROUND, args.episodes // ROUND // 2
    clock = {"episodes": 0, "rounds": 0, "round": 0}

    class Timer(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if clock["round"] == warm_rounds:
                clock["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if clock["round"] >= warm_rounds:  # the round's 4 updates are done
                clock["episodes"] += batch["input_ids"].shape[0] * group
                clock["rounds"] += 1
            clock["round"] += 1

        def on_train_end(self, trainer, module):
            clock["end"] = time.perf_counter()
            clock["rss"] = peak_rss_gib()  # before fit's export, which TRL's scripts do not do

    class InOrder(PromptDataModule):  # grpo/rloo: prompts in file order, as the TRL scripts read them
        def train_dataloader(self):
            return DataLoader(self.train_rows, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate)

    lora = LoraSpec(r=16, alpha=32, dropout=0.0) if args.layout == "shared" else None
    value_model = ModelSpec(path=str(tmp / "rm"), train_top_layers=args.value_top_layers) if critic else None
    module = PPOModule(
        ModelSpec(path=str(model_dir), lora=lora),
        RewardSpec(models=[ModelSpec(path=str(tmp / "rm"))]),
        SamplingSpec(max_new_tokens=64, temperature=1.0, num_samples=group),
        layout=args.layout, ppo_epochs=UPDATES, num_minibatches=1, save_dir=str(tmp / "out"),
        packing=not args.padded, value_model=value_model, advantage=args.advantage, loss_agg=args.loss_agg,
        kl_coef=0.05,
    )
    dm = (PromptDataModule if critic else InOrder)(
        train_file=str(data), val_file=str(data), tokenizer=str(model_dir), max_prompt_length=448,
        batch_size=ROUND // group,
    )
    trainer = Trainer(
        accelerator="cpu", precision="32-true", max_steps=rounds * UPDATES, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()],
    )
    trainer.fit(module, dm)
    assert clock["round"] == rounds and clock["episodes"] == args.episodes // 2, clock
    seconds = clock["end"] - clock["start"]
    name = f"ppo-{args.layout}" if critic else f"{args.advantage}-{args.layout}"
    name += "-padded" if args.padded else ""
    name += f"-value-top-{args.value_top_layers}" if args.value_top_layers else ""
    result = {"episodes_timed": clock["episodes"], "seconds": round(seconds, 2),
              "episodes_per_s": round(clock["episodes"] / seconds, 3), "peak_rss_gib": round(peak_rss_gib(), 2)}
    if not critic:
        result |= {"peak_rss_train_gib": round(clock["rss"], 2), "group": group, "loss_agg": args.loss_agg,
                   "rounds_timed": clock["rounds"], "optimizer_steps_timed": clock["rounds"] * UPDATES}
    report(name, result)


if __name__ == "__main__":
    main()
