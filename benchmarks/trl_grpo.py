"""The PPO workload through TRL's GRPOTrainer, for a side-by-side number (TRL 1.16 has no PPOTrainer; GRPOTrainer
is its flagship online RL trainer). Run it from a separate venv that has trl (never a dependency of this project):

    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl
    /tmp/trlvenv/bin/python benchmarks/trl_grpo.py                  # 128 episodes, the last 64 timed
    /tmp/trlvenv/bin/python benchmarks/trl_grpo.py --episodes 32    # smoke run: 1 warm-up round, 1 timed

Mirrors benchmarks/ppo.py where TRL allows: the 64 prompts of the first 64 HH pairs cut from the left to 448
tokens (GRPOConfig 1.16 has no max_prompt_length, so the cut is done here on the token ids), the standard model as
policy, a frozen copy of it as reference (beta 0.05), the same architecture with a scalar head as reward model,
64 new tokens at temperature 1, 16 completions per generation round, each round trained on 4 times (num_iterations
= 4, one optimizer step on all 16 each time, like 4 PPO epochs x 1 minibatch), lr 1e-5 constant, fp32, no
gradient checkpointing, 2 threads. An episode = one completion generated, scored and trained on.

What differs from ours: GRPO has no value model (the baseline is the mean reward of the prompt's group), so each
round runs one trainable model instead of two; the group size is 2 (num_generations = 2, the smallest GRPO allows),
so a round of 16 is 8 prompts x 2 completions instead of 16 prompts x 1. One pass over the 64 prompts therefore
gives 128 episodes: the run is 8 rounds (one pass), the first 4 (64 episodes) warm up and the last 4 (64 episodes,
32 prompts) are timed, where ours times its second pass of 4 rounds over all 64 prompts. Prompts are left-padded to
the longest in each round, so which prompts land in the timed rounds moves the time; `mean_padded_length` in the
output says how long the timed rounds' rows were. `--episodes 256` times a whole second pass over all 64 prompts.
TRL's own choices are kept: its default loss ("dapo", token-level clipped surrogate + k3 KL to the reference), and
its fused LM head, which projects only the completion positions through the vocabulary head. As in ours, the
rollout's old log-probs come from one extra no-grad forward (TRL does it whenever a round is trained on > 1 time).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import build_standard_model, hh_pairs, peak_rss_gib, report, setup_threads  # noqa: E402

# completions per generation round, completions per prompt (GRPO group), optimizer updates per round
ROUND, GROUP, UPDATES = 16, 2, 4
MAX_PROMPT, MAX_NEW = 448, 64


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--episodes", type=int, default=128, help="all episodes; the first half warms up")
    args = parser.parse_args()
    if args.episodes % (2 * ROUND):
        parser.error(f"--episodes must be a multiple of {2 * ROUND} (whole rounds of {ROUND} in both halves)")
    setup_threads(2)
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl import GRPOConfig, GRPOTrainer

    tmp = Path(tempfile.mkdtemp(prefix="bench-trl-grpo-"))
    model_dir = build_standard_model(tmp / "model", [p["prompt"] + p["chosen"] for p in hh_pairs(512)])
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = []
    for p in hh_pairs(64):
        ids = tok(p["prompt"])["input_ids"][-MAX_PROMPT:]  # cut from the left, as PromptDataModule does
        text = tok.decode(ids)
        assert tok(text)["input_ids"] == ids, "prompt cut does not survive TRL's re-tokenisation"
        prompts.append(text)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    reward_model.config.pad_token_id = tok.pad_token_id  # the score is read at the last non-pad token

    rounds, warm_rounds = args.episodes // ROUND, args.episodes // ROUND // 2
    warm_steps = warm_rounds * UPDATES
    clock = {"episodes": 0, "rounds": 0, "padded": []}
    pending: list[tuple[bool, int, int]] = []  # per generated round: (timed, completions, padded row length)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warm_steps:  # generation for the first timed round happens inside this step
                clock["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % UPDATES == 0:  # a round's 4th update is done: its completions are trained on
                timed, n, length = pending.pop(0)
                if timed:
                    clock["episodes"] += n
                    clock["rounds"] += 1
                    clock["padded"].append(length)

        def on_train_end(self, args, state, control, **kw):
            clock["end"] = time.perf_counter()
            clock["steps"] = state.global_step - warm_steps

    config = GRPOConfig(
        output_dir=str(tmp / "out"), per_device_train_batch_size=ROUND, gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=GROUP, num_iterations=UPDATES, beta=0.05,
        max_completion_length=MAX_NEW, temperature=1.0, max_steps=rounds * UPDATES,
        learning_rate=1e-5, lr_scheduler_type="constant", gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=True, dataloader_num_workers=0, logging_steps=10**6, save_strategy="no", report_to=[],
        disable_tqdm=True, seed=0,
    )
    data = Dataset.from_list([{"prompt": p} for p in prompts])
    trainer = GRPOTrainer(
        model=policy, reward_funcs=reward_model, args=config, train_dataset=data, processing_class=tok,
        reward_processing_classes=tok, callbacks=[Timer()],
    )
    generate = trainer._generate_and_score_completions

    def counting_generate(inputs):
        out = generate(inputs)
        # RepeatSampler hands over 8 prompts, each twice in a row
        assert len(inputs) == ROUND
        assert all(inputs[i]["prompt"] == inputs[i + 1]["prompt"] for i in range(0, ROUND, GROUP))
        length = out["prompt_ids"].shape[1] + out["completion_ids"].shape[1]
        pending.append(("start" in clock, out["completion_ids"].shape[0], length))
        return out

    trainer._generate_and_score_completions = counting_generate
    trainer.train()
    assert not pending and clock["rounds"] * UPDATES == clock["steps"], "a round was not trained on 4 times"
    seconds = clock["end"] - clock["start"]
    report("trl-grpo", {
        "episodes_timed": clock["episodes"], "seconds": round(seconds, 2),
        "episodes_per_s": round(clock["episodes"] / seconds, 3), "peak_rss_gib": round(peak_rss_gib(), 2),
        "rounds_timed": clock["rounds"], "optimizer_steps_timed": clock["steps"],
        "mean_padded_length": round(sum(clock["padded"]) / max(1, len(clock["padded"])), 1)})


if __name__ == "__main__":
    main()
