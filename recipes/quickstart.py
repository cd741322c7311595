"""`rlhf quickstart`: the pipeline on the built-in reverse task, offline, on a CPU, in minutes.

Builds a tiny tokenizer and Llama in-process, writes the task's data, runs each stage through its real recipe
and config (configs/<stage>/synthetic.yaml), and prints the held-out oracle score after each stage.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from recipes.common import quiet

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def oracle_eval(model_dir: str | Path, prompts_file: Path, temperature: float = 1.0, seed: int = 0) -> float:
    """Mean oracle score of one sampled response per held-out prompt (temperature 0 = greedy)."""
    from datamodules.synthetic import mean_oracle_score
    from modules.generation import SamplingSpec, decode_responses, generate, prompt_batch
    from modules.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), trainable=False)
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines() if line.strip()]
    ids, mask = prompt_batch(tok, prompts)
    spec = SamplingSpec(max_new_tokens=16, temperature=temperature)
    rollout = generate(model, ids, mask, spec, tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(seed))
    return mean_oracle_score(prompts, decode_responses(tok, rollout))


def reward_accuracy(model_dir: Path, pairs_file: Path) -> float:
    """Fraction of held-out oracle-labelled pairs the reward model orders like the labels."""
    from modules.models import ModelSpec
    from modules.reward_spec import RewardSpec

    rows = [json.loads(line) for line in pairs_file.read_text().splitlines() if line.strip()]
    spec = RewardSpec(models=[ModelSpec(path=str(model_dir))]).load("cpu")
    prompts = [r["prompt"] for r in rows]
    chosen = spec.score(prompts, [r["chosen"] for r in rows])
    rejected = spec.score(prompts, [r["rejected"] for r in rows])
    return (chosen > rejected).float().mean().item()


def final_kl(log_root: Path) -> float:
    """The last val/kl a PPO run logged (mean summed KL of a sampled response to the SFT policy)."""
    import csv

    metrics = sorted(log_root.glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)[-1]
    values = [row["val/kl"] for row in csv.DictReader(metrics.open()) if row.get("val/kl")]
    return float(values[-1]) if values else float("nan")


def run_stage(stage: str, config: str, overrides: list[str]) -> None:
    import importlib
    import sys

    from recipes.cli import STAGES

    sys.argv = [f"rlhf {stage}"]
    importlib.import_module(STAGES[stage]).main(["fit", "--config", str(CONFIGS / config), *overrides])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlhf quickstart", description=__doc__)
    parser.add_argument("--out", default="runs/quickstart", help="folder for data, models and logs")
    parser.add_argument("--n-train", type=int, default=4000, help="training rows per data file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default="sft,reward,dpo,rs,ppo", help="comma-separated stages after SFT")
    parser.add_argument(
        "--rl-reward", choices=["oracle", "model"], default="oracle",
        help="what rejection sampling and PPO optimise: the task's oracle, or the reward model trained here",
    )
    args = parser.parse_args(argv)
    args.stages = set(args.stages.split(","))
    quiet()
    from datamodules.synthetic import make_demonstrations, write_task
    from modules.models import build_tiny_model

    out = Path(args.out).resolve()
    start = time.time()
    files = write_task(out / "data", n_train=args.n_train, n_val=200, seed=args.seed)
    texts = [r["prompt"] + r["completion"] for r in make_demonstrations(2000, seed=args.seed + 123)]
    build_tiny_model(out / "base", texts, vocab_size=320, hidden_size=64, num_layers=2, seed=args.seed)
    val_prompts = files["prompts_val"]
    results = [("base (random init)", oracle_eval(out / "base", val_prompts), str(out / "base"))]
    common = [f"--trainer.logger.init_args.save_dir={out / 'logs'}", f"--trainer.default_root_dir={out / 'logs'}"]

    def stage(name: str, config: str, data: str, extra: list[str]) -> Path:
        saved = out / name
        run_stage(
            config.split("/")[0],
            config,
            [
                f"--data.train_file={files[data + '_train']}",
                f"--data.val_file={files[data + '_val']}",
                f"--model.save_dir={saved}",
                *common,
                *extra,
            ],
        )
        return saved

    sft = stage("sft", "sft/synthetic.yaml", "sft", [f"--model.policy.path={out / 'base'}"])
    results.append(("sft", oracle_eval(sft, val_prompts), str(sft)))
    if "reward" in args.stages:
        rm = stage("reward", "reward/synthetic.yaml", "rankings", [f"--model.backbone.path={out / 'base'}"])
        accuracy = reward_accuracy(rm, files["pairs_val"])
        results.append(("reward model", accuracy, f"{rm}  (held-out accuracy vs the oracle's preferences)"))
    if "dpo" in args.stages:
        dpo = stage("dpo", "dpo/synthetic.yaml", "pairs", [f"--model.policy.path={sft}"])
        results.append(("dpo", oracle_eval(dpo, val_prompts), str(dpo)))
    # RS and PPO optimise the oracle by default (a verifiable reward); --rl-reward model optimises the learned
    # reward model as InstructGPT / Llama 2 do, where this small RM gets over-optimised (see README)
    learned = args.rl_reward == "model"
    reward = ["--model.reward.oracle=null", f"--model.reward.models=[{{path: {out / 'reward'}}}]"] if learned else []
    if "rs" in args.stages and (not learned or "reward" in args.stages):
        rs = stage("rs", "rs/synthetic.yaml", "prompts", [f"--model.policy.path={sft}", "--trainer.limit_train_batches=60", *reward])
        results.append(("rejection sampling", oracle_eval(rs, val_prompts), str(rs)))
    if "ppo" in args.stages and (not learned or "reward" in args.stages):
        ppo = stage("ppo", "ppo/synthetic.yaml", "prompts", [f"--model.policy.path={sft}", *reward])
        results.append(("ppo", oracle_eval(ppo, val_prompts), f"{ppo}  (KL to SFT: {final_kl(out / 'logs' / 'ppo'):.2f} nats)"))

    print("\n== rlhf quickstart: held-out oracle score (reverse task, 200 prompts, one sample each at T=1) ==")
    print(f"   rejection sampling and PPO optimise: {'the reward model above' if learned else 'the oracle'}")
    for name, score, path in results:
        print(f"  {name:<20} {score:6.3f}   {path}")
    print(f"data: {out / 'data'}   logs: {out / 'logs'}   wall time: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
