"""Label fresh samples of the current policy: K responses per prompt -> K-wise rankings the reward stage reads.

The loop of InstructGPT and Llama 2 collects comparisons of the *current* policy's outputs, so the next reward
model is trained where the policy now samples. This module is the labeller of that loop when the labels come
from a judge: any scoring function (the built-in task's oracle standing in for human labellers, or reward
models / functions through a RewardSpec: AI feedback). A simulated labeller's mistakes are configurable: a share
of groups in which two responses of different rank swap ranks (`flip`), and scores closer than `tie_tolerance`
share a rank. Groups whose responses all tie teach nothing and are left out (counted).

Input: `rlhf generate` rows {prompt, response, sample, index, meta} (K samples per prompt); output rows
{prompt, responses, ranks} (rank 0 = best, ties share a rank), the layout `rankings` of the reward DataModule.

    python -m datamodules.labelling SAMPLES.jsonl OUT.jsonl [--judge '{oracle: synthetic}'] [--flip 0.1] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

ScoreFn = Callable[[list[str], list[str], list[dict]], Sequence[float]]


def group_generations(rows: list[dict]) -> list[dict]:
    """`rlhf generate` rows -> one group per prompt index, in index order: {prompt, responses (in sample order),
    meta}. Rows without an index are grouped by prompt text; then groups keep their first-seen order."""
    groups: dict = {}
    for row in rows:
        key = ("index", row["index"]) if row.get("index") is not None else ("prompt", row["prompt"])
        group = groups.setdefault(key, {"prompt": row["prompt"], "samples": [], "meta": row.get("meta") or {}})
        group["samples"].append((row.get("sample", len(group["samples"])), row["response"]))
    ordered = list(groups.items())
    if all(kind == "index" for kind, _ in groups):
        ordered.sort(key=lambda kv: kv[0][1])
    return [{"prompt": g["prompt"], "responses": [r for _, r in sorted(g["samples"], key=lambda s: s[0])],
             "meta": g["meta"]} for _, g in ordered]


def ranks_from_scores(scores: Sequence[float], tie_tolerance: float = 0.0) -> list[int]:
    """rank_i = number of scores above score_i by more than tie_tolerance: 0 = best, near-equal scores share a
    rank, and a rank never depends on the listing order. A tolerance is not transitive: with 0.45, scores 0.5
    and 0.9 tie and 0.1 ties with 0.5 but not 0.9 (ranks 0, 0, 1)."""
    return [sum(other > s + tie_tolerance for other in scores) for s in scores]


def flip_two(ranks: list[int], rng: random.Random) -> list[int]:
    """A labeller's mistake: two responses of different rank swap ranks (chosen uniformly among such pairs)."""
    pairs = [(i, j) for i in range(len(ranks)) for j in range(i + 1, len(ranks)) if ranks[i] != ranks[j]]
    i, j = rng.choice(pairs)
    out = list(ranks)
    out[i], out[j] = out[j], out[i]
    return out


def label_groups(groups: list[dict], score: ScoreFn, flip: float = 0.0, tie_tolerance: float = 0.0,
                 seed: int = 0) -> tuple[list[dict], dict]:
    """Rank each group's responses by `score` (one call over all groups' responses), flip a share `flip` of the
    groups, drop all-tied groups. -> (rows {prompt, responses, ranks}, stats {groups, kept, all_tied, flipped})."""
    if not 0.0 <= flip <= 1.0:
        raise ValueError(f"flip is a share of groups in [0, 1], got {flip}")
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    prompts = [g["prompt"] for g in groups for _ in g["responses"]]
    responses = [r for g in groups for r in g["responses"]]
    metas = [g.get("meta") or {} for g in groups for _ in g["responses"]]
    scores = [float(s) for s in score(prompts, responses, metas)]
    if len(scores) != len(responses):
        raise ValueError(f"the judge returned {len(scores)} scores for {len(responses)} responses")
    rng = random.Random(f"labelling/{seed}")  # one stream: the same seed flips the same groups
    rows, stats, start = [], {"groups": len(groups), "kept": 0, "all_tied": 0, "flipped": 0}, 0
    for g in groups:
        k = len(g["responses"])
        ranks = ranks_from_scores(scores[start : start + k], tie_tolerance)
        start += k
        if len(set(ranks)) < 2:
            stats["all_tied"] += 1
            continue
        if rng.random() < flip:
            ranks = flip_two(ranks, rng)
            stats["flipped"] += 1
        rows.append({"prompt": g["prompt"], "responses": list(g["responses"]), "ranks": ranks})
        stats["kept"] += 1
    return rows, stats


def main(argv: list[str] | None = None) -> None:
    import yaml

    from modules.outputs import write_jsonl
    from modules.reward_spec import as_reward_spec

    parser = argparse.ArgumentParser(prog="python -m datamodules.labelling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", type=Path, help="`rlhf generate` jsonl, K samples per prompt")
    parser.add_argument("out", type=Path, help="rankings jsonl for `rlhf reward fit --data.layout rankings`")
    parser.add_argument("--judge", default="{oracle: synthetic}", help="a RewardSpec as YAML (models, functions, oracle)")
    parser.add_argument("--flip", type=float, default=0.0, help="share of groups where two ranks swap")
    parser.add_argument("--tie_tolerance", type=float, default=0.0, help="scores closer than this share a rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    with open(args.samples, encoding="utf-8") as f:
        groups = group_generations([json.loads(line) for line in f if line.strip()])
    judge = as_reward_spec(yaml.safe_load(args.judge)).load(args.device)

    def score(prompts, responses, metas):
        return judge.score(prompts, responses, metas, args.device).tolist()

    rows, stats = label_groups(groups, score, args.flip, args.tie_tolerance, args.seed)
    write_jsonl(args.out, rows)
    print(f"labelled {stats['kept']} of {stats['groups']} prompts ({stats['all_tied']} all tied, left out; "
          f"{stats['flipped']} flipped) -> {args.out}")


if __name__ == "__main__":
    main()
