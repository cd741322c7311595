"""`rlhf quickstart`: the RLHF pipeline on a built-in verifiable task, offline, on a CPU, in minutes.

A thin wrapper over `rlhf pipeline --config configs/pipeline/quickstart.yaml`: it builds a tiny tokenizer and
Llama in-process (OUT/base), writes the task's data (`--task reverse` or `sort`; OUT/data) and a pool of fresh
prompts for the rounds (OUT/pool), then runs the pipeline file in OUT: SFT, a 3-member reward-model ensemble,
DPO, and rejection sampling and PPO against the learned ensemble, each evaluated on the held-out prompts by the
task's oracle (which no stage optimises); with `--rounds N`, N rounds of fresh samples of the current policy
labelled by a noisy oracle, the ensemble fine-tuned on them and rejection sampling again. Then it prints the
oracle scores and the win rates and KL against SFT, and writes OUT/report/ (`rlhf report` of the runs and
evaluations) and OUT/results.json (every number printed, and each stage's wall time), which
benchmarks/alignment.py gathers over seeds and tasks. Everything the pipeline does is in OUT/manifest.json, so
the same command again skips what is done and resumes what was interrupted. `--prepare-only` writes the data,
the pool and the base model and stops (for running the pipeline file by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from recipes.common import quiet

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


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


STAGES = (("dpo", "dpo"), ("rejection sampling", "rs"), ("ppo", "ppo"))  # (printed name, pipeline stage)


def check_same_data(out: Path, settings: dict) -> None:
    """A run folder holds one task's data: a re-run with another task, seed or size would mix its stages (the
    pipeline does not hash data files), so it stops here, naming both."""
    marker = out / "quickstart.json"
    if marker.is_file():
        before = json.loads(marker.read_text())
        if before != settings:
            raise SystemExit(f"rlhf quickstart: {out} holds a run of {before}, not {settings}: give another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(settings) + "\n")


def summarise(out: Path, files: dict[str, Path], settings: dict, wall: float) -> dict:
    """results.json from the pipeline's run folder: each policy's oracle score (its eval's policy side; SFT's is
    every eval's baseline), the ensemble's held-out accuracy, win rate and KL against SFT, stage wall times."""
    manifest = json.loads((out / "manifest.json").read_text())
    stages = {e["name"]: e for e in manifest["stages"]}
    evals = {name: json.loads((out / f"{stage}_eval" / "eval.json").read_text()) for name, stage in
             [("base", "base"), *((n, s) for n, s in STAGES)]}
    scores = {"base (random init)": evals["base"]["policy"]["score"]["mean"],
              "sft": evals["base"]["baseline"]["score"]["mean"],
              "reward model": reward_accuracy(out / "reward", files["pairs_val"])}
    scores.update({name: evals[name]["policy"]["score"]["mean"] for name, _ in STAGES})
    rounds = {f"round {e['round']}": e["metrics"]["score"] for n, e in stages.items()
              if e.get("round") and n.endswith(".eval") and e["status"] == "done"}
    return {
        **settings, "rl_reward": "model", "wall_s": wall,
        "stage_wall_s": {n: stages[n]["wall_s"] for n in ("sft", "reward", "dpo", "rs", "ppo")},
        "scores": {**scores, **rounds},
        "versus_sft": {stage: {"win_rate": evals[name]["win_rate"]["win_rate"], "kl": evals[name]["kl"]["kl"],
                               "kl_stderr": evals[name]["kl"]["stderr"]} for name, stage in STAGES},
    }


def show(out: Path, results: dict, report: Path) -> None:
    task = results["task"]
    print(f"\n== rlhf quickstart: held-out oracle score ({task} task, 200 prompts, one sample each at T=1) ==")
    print("   rejection sampling and PPO optimise the reward-model ensemble trained here; the oracle only scores")
    paths = {"base (random init)": out / "base", "sft": out / "sft", "dpo": out / "dpo",
             "rejection sampling": out / "rs", "ppo": out / "ppo"}
    for name, score in results["scores"].items():
        where = paths.get(name, "")
        if name == "reward model":
            where = f"{out / 'reward'}  (its members' mean: held-out accuracy vs the oracle's preferences)"
        elif name.startswith("round "):
            where = out / f"r{name.split()[1]}.policy"
        print(f"  {name:<20} {score:6.3f}   {where}")
    print("\n== win rate against SFT, judged by the oracle (the samples above, paired by prompt; ties count half) ==")
    print(f"  {'stage':<20} {'win rate [95% Wilson]':<24} {'wins/ties/losses':<18} KL to SFT, nats ± se")
    for name, stage in STAGES:
        result = json.loads((out / f"{stage}_eval" / "eval.json").read_text())
        w, kl = result["win_rate"], result["kl"]
        rate, counts = (f"{w['win_rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}]",
                        f"{w['wins']} / {w['ties']} / {w['losses']}")
        print(f"  {name:<20} {rate:<24} {counts:<18} {kl['kl']:.2f} ± {kl['stderr']:.2f}")
    if (out / "rounds.md").is_file():
        print("\n" + (out / "rounds.md").read_text())
    print(f"run folder: {out}   manifest: {out / 'manifest.json'}   report: {report.with_suffix('.html')}")
    print(f"wall time: {results['wall_s']:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlhf quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="the run folder: data, models, logs, manifest")
    parser.add_argument("--n-train", type=int, default=4000, help="training rows per data file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the base model and every stage")
    parser.add_argument("--task", choices=["reverse", "sort"], default="reverse", help="the built-in task")
    parser.add_argument("--rounds", type=int, default=0, metavar="N",
                        help="rounds of the RLHF loop after the chain (fresh labelled samples of the current policy, "
                             "the reward ensemble fine-tuned on them, rejection sampling again); default 0")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an argument for every training stage, passed to rlhf pipeline (e.g. --set "
                             "trainer.max_steps=2 for a smoke run); repeatable")
    parser.add_argument("--prepare-only", action="store_true",
                        help="write the data, the prompt pool and the base model into OUT, and stop")
    args = parser.parse_args(argv)
    if args.rounds < 0:
        parser.error(f"--rounds takes a whole number >= 0, got {args.rounds}")
    quiet()
    out = Path(args.out).resolve()
    settings = {"task": args.task, "seed": args.seed, "n_train": args.n_train}
    check_same_data(out, settings)
    start = time.time()
    files = prepare(out, args.n_train, args.seed, args.task)
    if args.prepare_only:
        print(f"rlhf quickstart: data in {out / 'data'}, prompt pool in {out / 'pool'}, base model in {out / 'base'}")
        return
    from recipes import pipeline
    from recipes.report import write_report

    here = os.getcwd()
    os.chdir(ROOT)  # the pipeline file names its stages' configs relative to the repository
    try:
        pipeline.main(["--config", str(PIPELINE), "--out", str(out), "--rounds", str(args.rounds),
                       "--set", f"seed_everything={args.seed}", *(f"--set={item}" for item in args.set)])
    finally:
        os.chdir(here)
    runs = [out / f"{name}.run" for name in ("sft", "reward", "dpo", "rs", "ppo")]
    report = write_report(runs + [out / f"{stage}_eval" for _, stage in STAGES], out / "report", "rlhf quickstart")
    results = summarise(out, files, settings, time.time() - start)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    show(out, results, report)


if __name__ == "__main__":
    main()
