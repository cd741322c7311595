"""Alignment with a learned reward model in the loop, measured on the gold (oracle) score.

Runs `rlhf quickstart` (SFT, reward model, DPO, rejection sampling and PPO through the shipped
configs; the oracle only labels the data and scores the held-out samples) for each task and seed, each in its
own process, and prints markdown tables: per seed and the median of the seeds, the oracle score of every policy,
its KL to SFT (nats per response) and each stage's wall time. Every run keeps its folder (OUT/<task>-<seed>/:
results.json, samples, evals, report); a finished run is read, not re-run.

    python -m benchmarks.alignment --out runs/alignment [--tasks reverse,sort] [--seeds 0,1,2] [-- QUICKSTART ARGS]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

POLICIES = ("sft", "dpo", "rejection sampling", "ppo")
SHORT = {"rejection sampling": "rs"}


def run(out: Path, task: str, seed: int, extra: list[str]) -> dict:
    folder = out / f"{task}-{seed}"
    done = folder / "results.json"
    if not done.exists():
        cmd = [sys.executable, "-m", "recipes.cli", "quickstart", "--task", task,
               "--seed", str(seed), "--out", str(folder), *extra]
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / f"{task}-{seed}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(done.read_text())


def table(task: str, rows: list[dict]) -> str:
    head = ["seed", *POLICIES, "RM acc", *(f"KL {SHORT.get(p, p)}" for p in POLICIES[1:]),
            *(f"wall {s}" for s in ("reward", "dpo", "rs", "ppo")), "wall total"]
    lines = [f"**{task}** (oracle score of one sample per held-out prompt; KL to SFT in nats; wall in s)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(r: dict) -> list[float]:
        vs = r["versus_sft"]
        return (
            [r["scores"][p] for p in POLICIES]
            + [r["scores"]["reward model"]]
            + [vs[SHORT.get(p, p)]["kl"] for p in POLICIES[1:]]
            + [r["stage_wall_s"][s] for s in ("reward", "dpo", "rs", "ppo")]
            + [r["wall_s"]]
        )

    values = [cells(r) for r in rows]
    for r, v in zip(rows, values, strict=True):
        lines.append(f"| {r['seed']} | " + " | ".join(_fmt(x, i) for i, x in enumerate(v)) + " |")
    median = [statistics.median(col) for col in zip(*values, strict=True)]
    lines.append("| **median** | " + " | ".join(f"**{_fmt(x, i)}**" for i, x in enumerate(median)) + " |")
    return "\n".join(lines)


def _fmt(x: float, column: int) -> str:
    return f"{x:.0f}" if column >= 8 else f"{x:.3f}" if column < 5 else f"{x:.2f}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/alignment")
    parser.add_argument("--tasks", default="reverse,sort")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    from benchmarks.common import machine

    out = Path(args.out)
    for task in args.tasks.split(","):
        rows = [run(out, task, int(seed), extra) for seed in args.seeds.split(",")]
        print(table(task, rows) + "\n")
    print(json.dumps(machine()))


if __name__ == "__main__":
    main()
