"""The online RL workload of benchmarks/ppo.py through a TRL 1.16 online trainer (GRPOTrainer, RLOOTrainer): the
code shared by benchmarks/trl_grpo.py and benchmarks/trl_rloo.py. Runs in the trl venv only.

Workload: the 64 prompts of the first 64 HH pairs cut from the left to 448 tokens (the configs have no
max_prompt_length, so the cut is done here on the token ids), the standard model as policy, a frozen copy of it as
reference (beta 0.05), the same architecture with a scalar head as reward model, 64 new tokens at temperature 1,
16 completions per generation round = 16 / group prompts x group completions (num_generations = group), each round
trained on 4 times (num_iterations = 4, steps_per_generation = 1: one optimizer step on all 16 each time, like our
4 PPO epochs x 1 minibatch), lr 1e-5 constant, fp32, no gradient checkpointing, 2 threads. The prompts are read in
file order (shuffle_dataset False), as ppo.py reads them for grpo and rloo, so both sides train on the same prompts
in the same rounds.

Episode accounting, the same in ppo.py: an episode = one completion generated, scored and trained on. `--episodes E`
runs E / 16 rounds; the first half of the rounds warm up and the second half is timed: the clock starts when the
first timed round's first optimizer step begins (its generation and scoring happen inside that step) and stops at
the end of training; episodes_timed counts the completions of the rounds whose 4th update finished in the window
(E / 2). With the default E = 128 and group 2 that is one pass over the 64 prompts, prompts 32-63 timed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import build_standard_model, hh_pairs, peak_rss_gib, report, setup_threads

ROUND, UPDATES = 16, 4  # completions per generation round, optimizer updates per round
MAX_PROMPT, MAX_NEW = 448, 64


def online_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--episodes", type=int, default=128, help="all completions; the first half warms up")
    parser.add_argument("--group", type=int, default=2, help="completions per prompt (num_generations)")
    return parser


def check_episodes(parser: argparse.ArgumentParser, episodes: int, group: int) -> None:
    """Shared with ppo.py: whole rounds of 16 in both halves, whole prompt groups in a round."""
    if episodes % (2 * ROUND):
        parser.error(f"--episodes must be a multiple of {2 * ROUND} (whole rounds of {ROUND} in both halves)")
    if group < 1 or ROUND % group:
        parser.error(f"--group must divide the round of {ROUND} completions")


def run_trl_online(name: str, trainer_cls: Callable, config_cls: Callable, args: argparse.Namespace,
                   **config: object) -> None:
    """Build the workload, run `trainer_cls` with `config_cls(..., **config)` and report one JSON line."""
    setup_threads(2)
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
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

    group = args.group
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

    cfg = config_cls(
        output_dir=str(tmp / "out"), per_device_train_batch_size=ROUND, gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=group, num_iterations=UPDATES, beta=0.05,
        max_completion_length=MAX_NEW, temperature=1.0, max_steps=rounds * UPDATES, shuffle_dataset=False,
        learning_rate=1e-5, lr_scheduler_type="constant", gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=True, dataloader_num_workers=0, logging_steps=10**6, save_strategy="no", report_to=[],
        disable_tqdm=True, seed=0, **config,
    )
    data = Dataset.from_list([{"prompt": p} for p in prompts])
    trainer = trainer_cls(
        model=policy, reward_funcs=reward_model, args=cfg, train_dataset=data, processing_class=tok,
        reward_processing_classes=tok, callbacks=[Timer()],
    )
    generate = trainer._generate_and_score_completions
    seen: list[str] = []

    def counting_generate(inputs):
        out = generate(inputs)
        # RepeatSampler hands over 16 / group prompts, each `group` times in a row
        assert len(inputs) == ROUND
        assert all(inputs[i]["prompt"] == inputs[i + j]["prompt"] for i in range(0, ROUND, group) for j in range(group))
        seen.extend(inputs[i]["prompt"] for i in range(0, ROUND, group))
        length = out["prompt_ids"].shape[1] + out["completion_ids"].shape[1]
        pending.append(("start" in clock, out["completion_ids"].shape[0], length))
        return out

    trainer._generate_and_score_completions = counting_generate
    trainer.train()
    assert not pending and clock["rounds"] * UPDATES == clock["steps"], "a round was not trained on 4 times"
    assert seen == [prompts[i % len(prompts)] for i in range(len(seen))], "prompts not read in file order"
    seconds = clock["end"] - clock["start"]
    report(name, {
        "episodes_timed": clock["episodes"], "seconds": round(seconds, 2),
        "episodes_per_s": round(clock["episodes"] / seconds, 3), "peak_rss_gib": round(peak_rss_gib(), 2),
        "group": group, "rounds_timed": clock["rounds"], "optimizer_steps_timed": clock["steps"],
        "mean_padded_length": round(sum(clock["padded"]) / max(1, len(clock["padded"])), 1)})
