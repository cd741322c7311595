"""Iterated RLHF rounds against one round, on the gold (oracle) score of the built-in task.

Runs `rlhf quickstart --rounds N` (configs/pipeline/quickstart.yaml: SFT, a reward-model ensemble, rejection
sampling against it, then N rounds of fresh samples of the current policy labelled by the oracle with 10% of the
labels flipped, the previous ensemble fine-tuned on all labels so far and rejection sampling again) per task and
seed, each in its own process and folder (OUT/<task>-<seed>/; a finished run is read, not re-run; an interrupted
one resumes), then prints markdown tables from each run's manifest.json: per seed and the median of the seeds,
the oracle score of one sample per held-out prompt after SFT, after one round (round 0: rejection sampling
against the ensemble trained on the task's data) and after each further round, the KL to SFT, the reward
ensemble's held-out ranking accuracy (its members' mean on the task's validation rankings), the preference rows
the reward model trained on and the wall time of each round.

    python -m benchmarks.rounds --out runs/rounds [--tasks reverse] [--seeds 0,1,2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def run(folder: Path, task: str, seed: int, rounds: int) -> dict[str, dict]:
    """The run's manifest stages by name (runs it first unless every stage is done)."""
    stages = _stages(folder)
    if not stages or any(e["status"] != "done" for e in stages.values()) or f"r{rounds}.eval" not in stages:
        cmd = [sys.executable, "-m", "recipes.cli", "quickstart", "--rounds", str(rounds), "--task", task,
               "--seed", str(seed), "--out", str(folder)]
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.with_name(folder.name + ".log"), "a") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        stages = _stages(folder)
    return stages


def _stages(folder: Path) -> dict[str, dict]:
    try:
        return {e["name"]: e for e in json.loads((folder / "manifest.json").read_text())["stages"]}
    except (OSError, ValueError, KeyError):
        return {}


def _score(eval_json: Path, side: str) -> float:
    return json.loads(eval_json.read_text())[side]["score"]["mean"]


def _accuracy(entry: dict) -> float:
    """A reward ensemble stage's held-out ranking accuracy: its members' mean."""
    members = [m for m in entry["metrics"].values() if isinstance(m, dict)]
    return statistics.mean(m["val/ranking_accuracy"] for m in members)


def cells(folder: Path, stages: dict[str, dict], rounds: int) -> list[float]:
    """SFT score, then per round 0..N: oracle score, KL to SFT; then the reward ensemble's held-out ranking
    accuracy per round 0..N, the reward data rows per round 1..N, the wall time of round 0 (sft + reward + rs)
    and of each round."""
    row = [_score(folder / "rs_eval" / "eval.json", "baseline")]
    evals = [stages["rs_eval"]] + [stages[f"r{k}.eval"] for k in range(1, rounds + 1)]
    for e in evals:
        row += [e["metrics"]["score"], e["metrics"]["kl"]]
    row += [_accuracy(stages[n]) for n in ["reward"] + [f"r{k}.rm" for k in range(1, rounds + 1)]]
    row += [stages[f"r{k}.labels"]["metrics"]["rows"] for k in range(1, rounds + 1)]
    row.append(sum(stages[n]["wall_s"] for n in ("sft", "reward", "rs")))
    row += [sum(e["wall_s"] for n, e in stages.items() if n.startswith(f"r{k}.")) for k in range(1, rounds + 1)]
    return row


def table(task: str, seeds: list[int], values: list[list[float]], rounds: int) -> str:
    head = ["seed", "SFT"]
    for k in range(rounds + 1):
        head += [f"round {k}" + (" (one round)" if k == 0 else ""), f"KL r{k}"]
    head += [f"RM acc r{k}" for k in range(rounds + 1)]
    head += [f"RM rows r{k}" for k in range(1, rounds + 1)] + ["wall r0"] + [f"wall r{k}" for k in range(1, rounds + 1)]
    kinds = (["score"] + ["score", "kl"] * (rounds + 1) + ["score"] * (rounds + 1) + ["rows"] * rounds
             + ["wall"] * (rounds + 1))
    lines = [f"**{task}** (oracle score of one sample per held-out prompt, 200 prompts; KL to SFT in nats; rows: "
             "preference rows the round's reward model trained on; RM acc: the reward ensemble's held-out ranking "
             "accuracy; wall in s)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for seed, v in zip(seeds, values, strict=True):
        lines.append(f"| {seed} | " + " | ".join(_fmt(x, k) for x, k in zip(v, kinds, strict=True)) + " |")
    median = [statistics.median(col) for col in zip(*values, strict=True)]
    lines.append("| **median** | " + " | ".join(f"**{_fmt(x, k)}**" for x, k in zip(median, kinds, strict=True)) + " |")
    return "\n".join(lines)


def _fmt(x: float, kind: str) -> str:
    return {"score": f"{x:.3f}", "kl": f"{x:.2f}"}.get(kind, f"{x:.0f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rounds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/rounds"))
    parser.add_argument("--tasks", default="reverse")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default="{task}-{seed}", help="each run's folder under --out")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    for task in args.tasks.split(","):
        values = []
        for seed in seeds:
            folder = args.out / args.name.format(task=task, seed=seed)
            values.append(cells(folder, run(folder, task, seed, args.rounds), args.rounds))
        print(table(task, seeds, values, args.rounds) + "\n")


if __name__ == "__main__":
    main()
