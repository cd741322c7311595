"""`rlhf quickstart`: the pipeline on a built-in verifiable task, offline, on a CPU, in minutes.

Builds a tiny tokenizer and Llama in-process, writes the task's data (`--task reverse` or `sort`), runs each
stage through its real recipe and config (configs/<stage>/synthetic.yaml; with `--rl-reward model`, rejection
sampling and PPO optimise the reward model trained here through configs/{rs,ppo}/synthetic-rm.yaml, the defended
learned-reward configs), and prints the held-out oracle score after each stage; then each trained policy's win
rate against SFT judged by the oracle, and its KL to SFT (`rlhf eval` on the same samples). Writes OUT/report/
(`rlhf report` of the runs' metrics and the evaluations) and OUT/results.json (every number printed, and each
stage's wall time), which benchmarks/alignment.py gathers over seeds and tasks.

`--rounds N` runs the RLHF loop instead: the same data and base model, then `rlhf pipeline` with
configs/pipeline/quickstart.yaml (SFT, reward ensemble, rejection sampling, then N rounds of fresh samples of the
current policy labelled by a noisy oracle, a retrained ensemble and rejection sampling again, each evaluated on
the held-out prompts); `--rounds 0` writes the data (OUT/data, OUT/pool) and base model (OUT/base) only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import torch

from recipes.common import quiet
from recipes.reward import clear_members

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
MEMBERS = 3  # reward-model ensemble members


def oracle_eval(model_dir: str | Path, prompts_file: Path, samples: Path, seed: int = 0) -> float:
    """Mean oracle score of one response per held-out prompt sampled at T=1 (`rlhf generate`'s functions) into
    `samples`, a fresh generation file that `rlhf eval` reads later."""
    from core.generation import SamplingSpec
    from core.tasks import mean_oracle_score
    from datamodules.formats import read_prompts
    from recipes.generate import encode_prompts, load_policy, run

    cpu = torch.device("cpu")
    model, tok = load_policy(str(model_dir), None, cpu)
    samples.unlink(missing_ok=True)
    spec = SamplingSpec(max_new_tokens=16, temperature=1.0)
    with contextlib.redirect_stderr(io.StringIO()):  # its per-batch progress lines
        run(model, tok, encode_prompts(read_prompts(str(prompts_file)), tok, None), spec, samples, seed, 256, cpu)
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return mean_oracle_score([r["prompt"] for r in rows], [r["response"] for r in rows])


def against_sft(out: Path, policies: list[tuple[str, Path]], sft: Path) -> list[tuple[str, dict]]:
    """`rlhf eval` of each policy's samples against SFT's (paired by prompt) under the oracle, with the KL to SFT;
    writes OUT/eval/<stage>/eval.json."""
    from recipes.eval import evaluate, parse_args, write_outputs

    results = []
    for name, model in policies:
        args, judge = parse_args(["--policy", str(out / "samples" / f"{name}.jsonl"), "--baseline",
                                  str(out / "samples" / "sft.jsonl"), "--judge", "{oracle: synthetic}",
                                  "--policy_model", str(model), "--reference_model", str(sft),
                                  "--out", str(out / "eval" / name), "--batch_size", "50", "--device", "cpu"])
        result = evaluate(args, judge, "cpu")
        write_outputs(result, args.out)
        results.append((name, result))
    return results


def reward_accuracy(model_dir: Path, pairs_file: Path) -> float:
    """Fraction of held-out oracle-labelled pairs the reward model (a folder of ensemble members: their mean
    score) orders like the labels."""
    from core.models import ModelSpec
    from core.reward_spec import RewardSpec

    rows = [json.loads(line) for line in pairs_file.read_text().splitlines() if line.strip()]
    members = (model_dir / "member_0").is_dir()
    spec = RewardSpec(models=[ModelSpec(path=str(model_dir))], ensemble="mean" if members else "none").load("cpu")
    prompts = [r["prompt"] for r in rows]
    chosen = spec.score(prompts, [r["chosen"] for r in rows])
    rejected = spec.score(prompts, [r["rejected"] for r in rows])
    return (chosen > rejected).float().mean().item()


def run_stage(stage: str, config: str, overrides: list[str]) -> None:
    import importlib
    import sys

    from recipes.cli import STAGES

    sys.argv = [f"rlhf {stage}"]
    importlib.import_module(STAGES[stage]).main(["fit", "--config", str(CONFIGS / config), *overrides])


POOL = 3000  # prompts the rounds sample fresh comparisons from (a third per round in the pipeline file)
PIPELINE = CONFIGS / "pipeline" / "quickstart.yaml"


def prepare(out: Path, n_train: int, seed: int, task: str) -> dict[str, Path]:
    """The task's data (OUT/data), a pool of POOL distinct prompts found in none of its files
    (OUT/pool/prompts_train.jsonl) and the base model (OUT/base): a tiny tokenizer and Llama built on
    demonstrations."""
    from core.models import build_tiny_model
    from datamodules.synthetic import make_demonstrations, write_task

    files = write_task(out / "data", n_train=n_train, n_val=200, seed=seed, task=task)
    files["pool"] = write_pool(out / "pool" / "prompts_train.jsonl", files.values(), seed, task)
    texts = [r["prompt"] + r["completion"] for r in make_demonstrations(2000, seed=seed + 123, task=task)]
    build_tiny_model(out / "base", texts, vocab_size=320, hidden_size=64, num_layers=2, seed=seed)
    return files


def write_pool(path: Path, data_files, seed: int, task: str) -> Path:
    """POOL distinct prompts (in draw order) found in none of `data_files`."""
    from core.outputs import write_jsonl
    from datamodules.synthetic import make_prompts

    seen = {json.loads(line)["prompt"] for f in data_files for line in Path(f).read_text().splitlines() if line}
    pool = []
    for row in make_prompts(2 * POOL, seed + 5000, task=task, exclude=seen):  # draws repeat: keep the first
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            pool.append(row)
    return write_jsonl(path, pool[:POOL])


def run_rounds(out: Path, rounds: int, seed: int) -> None:
    """`rlhf pipeline` over configs/pipeline/quickstart.yaml in OUT, then its rounds table."""
    from recipes import pipeline

    pipeline.main(["--config", str(PIPELINE), "--out", str(out), "--rounds", str(rounds),
                   "--set", f"seed_everything={seed}"])
    print((out / "rounds.md").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlhf quickstart", description=__doc__)
    parser.add_argument("--out", default="runs/quickstart", help="folder for data, models and logs")
    parser.add_argument("--n-train", type=int, default=4000, help="training rows per data file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the base model and every stage")
    parser.add_argument("--task", choices=["reverse", "sort"], default="reverse", help="the built-in task")
    parser.add_argument("--stages", default="sft,reward,dpo,rs,ppo", help="comma-separated stages after SFT")
    parser.add_argument(
        "--rl-reward", choices=["oracle", "model"], default="oracle",
        help="what rejection sampling and PPO optimise: the task's oracle, or the reward model trained here",
    )
    parser.add_argument("--rounds", type=int, default=None, metavar="N",
                        help="the RLHF loop: rlhf pipeline with configs/pipeline/quickstart.yaml and N rounds of "
                             "fresh labelled samples (0: write the data and base model only)")
    args = parser.parse_args(argv)
    args.stages = set(args.stages.split(","))
    quiet()
    out = Path(args.out).resolve()
    start = time.time()
    files = prepare(out, args.n_train, args.seed, args.task)
    if args.rounds is not None:
        if args.rounds > 0:
            run_rounds(out, args.rounds, args.seed)
        return
    val_prompts = files["prompts_val"]
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)

    def sampled_score(name: str, model: Path) -> float:
        return oracle_eval(model, val_prompts, samples / f"{name}.jsonl", args.seed)

    results = [("base (random init)", sampled_score("base", out / "base"), str(out / "base"))]
    policies = []  # (name, model) of the trained policies compared with SFT
    common = [f"--trainer.logger.init_args.save_dir={out / 'logs'}", f"--trainer.default_root_dir={out / 'logs'}",
              "--trainer.enable_progress_bar=false", f"--seed_everything={args.seed}"]  # the tables say what matters
    wall: dict[str, float] = {}

    def stage(name: str, config: str, data: str, extra: list[str]) -> Path:
        saved, began = out / name, time.time()
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
        wall[name] = time.time() - began
        return saved

    sft = stage("sft", "sft/synthetic.yaml", "sft", [f"--model.policy.path={out / 'base'}"])
    results.append(("sft", sampled_score("sft", sft), str(sft)))
    if "reward" in args.stages:
        # an ensemble of 3 (seeds 0-2), each initialised from the SFT policy as InstructGPT's: far fewer errors on
        # the policy's own samples than any one member (benchmarks/alignment.md)
        clear_members(out / "reward")  # a rerun retrains them (--members would skip them)
        rm = stage("reward", "reward/synthetic.yaml", "rankings", [f"--model.backbone.path={sft}", f"--members={MEMBERS}"])
        accuracy = reward_accuracy(rm, files["pairs_val"])
        results.append(("reward model", accuracy, f"{rm}  ({MEMBERS} members' mean: held-out accuracy vs the oracle's preferences)"))
    if "dpo" in args.stages:
        dpo = stage("dpo", "dpo/synthetic.yaml", "pairs", [f"--model.policy.path={sft}"])
        results.append(("dpo", sampled_score("dpo", dpo), str(dpo)))
        policies.append(("dpo", dpo))
    # RS and PPO optimise the oracle by default (a verifiable reward); --rl-reward model optimises the learned
    # reward model as InstructGPT / Llama 2 do, through the configs that defend against over-optimising it
    learned = args.rl_reward == "model"
    variant = "synthetic-rm" if learned else "synthetic"
    reward = [f"--model.reward.models=[{{path: {out / 'reward'}}}]"] if learned else []
    if "rs" in args.stages and (not learned or "reward" in args.stages):
        short = [] if learned else ["--trainer.limit_train_batches=60"]  # the oracle: 60 batches reach its top
        rs = stage("rs", f"rs/{variant}.yaml", "prompts", [f"--model.policy.path={sft}", *short, *reward])
        results.append(("rejection sampling", sampled_score("rs", rs), str(rs)))
        policies.append(("rs", rs))
    if "ppo" in args.stages and (not learned or "reward" in args.stages):
        ppo = stage("ppo", f"ppo/{variant}.yaml", "prompts", [f"--model.policy.path={sft}", *reward])
        results.append(("ppo", sampled_score("ppo", ppo), str(ppo)))
        policies.append(("ppo", ppo))
    evals = against_sft(out, policies, sft)
    from recipes.report import write_report

    stages = [d for d in (out / "logs" / n for n in ("sft", "reward", "dpo", "rs", "ppo")) if d.is_dir()]
    report = write_report(stages + [out / "eval" / n for n, _ in policies], out / "report", "rlhf quickstart")

    total = time.time() - start
    summary = {
        "task": args.task, "seed": args.seed, "rl_reward": args.rl_reward, "wall_s": total, "stage_wall_s": wall,
        "scores": {name: score for name, score, _ in results},
        "versus_sft": {name: {"win_rate": r["win_rate"]["win_rate"], "kl": r["kl"]["kl"], "kl_stderr": r["kl"]["stderr"]}
                       for name, r in evals},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n== rlhf quickstart: held-out oracle score ({args.task} task, 200 prompts, one sample each at T=1) ==")
    print(f"   rejection sampling and PPO optimise: {'the reward model above' if learned else 'the oracle'}")
    for name, score, path in results:
        print(f"  {name:<20} {score:6.3f}   {path}")
    if evals:
        print("\n== win rate against SFT, judged by the oracle (the samples above, paired by prompt; ties count half) ==")
        print(f"  {'stage':<8} {'win rate [95% Wilson]':<24} {'wins/ties/losses':<18} KL to SFT, nats ± se")
    for name, result in evals:
        w, kl = result["win_rate"], result["kl"]
        rate, counts = f"{w['win_rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}]", f"{w['wins']} / {w['ties']} / {w['losses']}"
        print(f"  {name:<8} {rate:<24} {counts:<18} {kl['kl']:.2f} ± {kl['stderr']:.2f}")
    print(f"data: {out / 'data'}   logs: {out / 'logs'}   evals: {out / 'eval'}   report: {report.with_suffix('.html')}")
    print(f"wall time: {total:.0f} s")


if __name__ == "__main__":
    main()
