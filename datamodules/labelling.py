"""Label fresh samples of the current policy: K responses per prompt -> K-wise rankings the reward stage reads.

The loop of InstructGPT and Llama 2 collects comparisons of the *current* policy's outputs, so the next reward
model is trained where the policy now samples. This module is the labeller of that loop, with two labellers:

- `--labeller judge` (default): any scoring function (the built-in task's oracle standing in for human labellers,
  or reward models / functions through a RewardSpec: AI feedback). A simulated labeller's mistakes are
  configurable: a share of groups in which two responses of different rank swap ranks (`--flip`), and scores
  closer than `--tie_tolerance` share a rank. Empty responses are left out; groups whose responses all tie (or
  are all the same text) teach nothing and are left out too.
- `--labeller ai`: an AI judge (core/judge.py's JudgeSpec, `--ai_judge`: a causal LM asked which of two responses
  is better, optionally by the principles of a constitution: RLAIF, arXiv 2309.00267; Constitutional AI, arXiv
  2212.08073) compares all C(K, 2) pairs of a group, each in both orders; response i scores the mean over j != i
  of P(i beats j) and the ranks follow from the scores as for the judge (`--tie_tolerance`, `--flip` apply).
- `--labeller human`: the groups go to a queue file that people label (docs/labelling-queue.md: the queue and
  labels formats); the labels file is read back. Short of `--min_labelled` items labelled, it prints one
  `waiting for labels: ...` line to stderr and exits with code 7, writing no --out; rerun once labels are in.

Input: `rlhf generate` rows {prompt, response, sample, index, meta} (K samples per prompt); output rows
{prompt, responses, ranks} (rank 0 = best, ties share a rank), the layout `rankings` of the reward DataModule.
With `--add_to`, the rows of an existing preference .jsonl come first, so each round's --out holds all data so far.

    python -m datamodules.labelling --samples=SAMPLES.jsonl --out=OUT.jsonl [--add_to=PREVIOUS.jsonl] \\
        [--judge='{oracle: synthetic}'] [--flip=0.1] [--seed=0]
    python -m datamodules.labelling --samples=SAMPLES.jsonl --out=OUT.jsonl --labeller=ai \\
        --ai_judge='{model: runs/sft, constitution: configs/constitution/harmless.yaml}' [--tie_tolerance=0.05]
    python -m datamodules.labelling --samples=SAMPLES.jsonl --out=OUT.jsonl --labeller=human [--min_labelled=0.8]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from core.sources import DataError

ScoreFn = Callable[[list[str], list[str], list[dict]], Sequence[float]]
LABELS_PENDING_EXIT = 7  # = recipes/cli.py EXIT_CODES["LabelsPendingError"]; the pipeline waits on it


class LabelsPendingError(Exception):
    """Human labelling: fewer queue items are labelled than --min_labelled asks; str() is the `waiting for
    labels: ...` line. main() prints it and exits with LABELS_PENDING_EXIT."""


def group_generations(rows: list[dict]) -> list[dict]:
    """`rlhf generate` rows -> one group per prompt index, in index order: {prompt, responses (the distinct
    non-blank texts, in sample order: a labeller is never shown one text twice or an empty one, and the reward data
    refuses both), samples (how many were drawn), meta}. Rows without an index are grouped by prompt text; then
    groups keep their first-seen order."""
    groups: dict = {}
    for row in rows:
        key = ("index", row["index"]) if row.get("index") is not None else ("prompt", row["prompt"])
        group = groups.setdefault(key, {"prompt": row["prompt"], "samples": [], "meta": row.get("meta") or {}})
        group["samples"].append((row.get("sample", len(group["samples"])), row["response"]))
    ordered = list(groups.items())
    if all(kind == "index" for kind, _ in groups):
        ordered.sort(key=lambda kv: kv[0][1])
    return [{"prompt": g["prompt"], "samples": len(g["samples"]),
             "responses": list(dict.fromkeys(r for _, r in sorted(g["samples"], key=lambda s: s[0]) if r.strip())),
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


def pairwise_scores(groups: list[dict], prefer: Callable[[list[str], list[str], list[str]], Sequence[float]]
                    ) -> list[float]:
    """Each group's responses scored by pairwise comparisons: score_i = mean over j != i of P(i beats j), with
    P(j beats i) = 1 - P(i beats j); one `prefer(prompts, a, b)` call asks every pair (i < j) of every group.
    -> the scores flattened in group and response order (a group of one response scores 0.5)."""
    pairs = [(g, i, j) for g, group in enumerate(groups) for i in range(len(group["responses"]))
             for j in range(i + 1, len(group["responses"]))]
    probs = [float(p) for p in prefer([groups[g]["prompt"] for g, _, _ in pairs],
                                      [groups[g]["responses"][i] for g, i, _ in pairs],
                                      [groups[g]["responses"][j] for g, _, j in pairs])]
    if len(probs) != len(pairs):
        raise ValueError(f"the AI judge returned {len(probs)} probabilities for {len(pairs)} pairs")
    wins = [[0.0] * len(group["responses"]) for group in groups]  # sum over j of P(i beats j)
    for (g, i, j), p in zip(pairs, probs):
        wins[g][i] += p
        wins[g][j] += 1.0 - p
    return [w / (len(row) - 1) if len(row) > 1 else 0.5 for row in wins for w in row]


def item_id(prompt: str, responses: list[str]) -> str:
    """A queue item's id: the first 16 hex digits of sha256(json.dumps([prompt, responses])), so the same group
    gets the same id every time the queue is written."""
    return hashlib.sha256(json.dumps([prompt, responses]).encode("utf-8")).hexdigest()[:16]


def queue_items(groups: list[dict], where: str) -> list[dict]:
    """Groups -> queue rows {id, prompt, responses, kind ("pair" | "ranking"), meta}; identical groups (same
    prompt and responses) are one item, and a prompt whose samples are all the same text is left out. Fewer than 2
    samples of a prompt is a sampling mistake: DataError."""
    items: dict[str, dict] = {}
    for g in groups:
        if g.get("samples", len(g["responses"])) < 2:
            raise DataError(where, "fewer than 2 responses to a prompt, nothing to compare",
                            f"{len(g['responses'])}; sample with rlhf generate --num_samples 2 or more")
        if len(g["responses"]) < 2:  # every sample the same text
            continue
        key = item_id(g["prompt"], g["responses"])
        items.setdefault(key, {"id": key, "prompt": g["prompt"], "responses": list(g["responses"]),
                               "kind": "ranking" if len(g["responses"]) > 2 else "pair", "meta": g["meta"]})
    return list(items.values())


def label_ranks(row: dict, item: dict | None, where: str) -> list[int]:
    """One labels row -> the ranks of its item's responses: {"ranks": [...]} (integers 0..K-1, 0 = best, ties
    share a rank, one per response) or, for a pair, {"chosen": i} (the better response: ranks 0 for it, 1 for the
    other). Anything else: DataError at `where`."""
    if item is None:
        raise DataError(where, "unknown id", f"{row.get('id')!r} is not an item of the queue")
    k = len(item["responses"])
    if ("ranks" in row) == ("chosen" in row):
        raise DataError(where, "a label needs exactly one of 'ranks' and 'chosen'", f"keys: {', '.join(row)}")
    if "chosen" in row:
        chosen = row["chosen"]
        if item["kind"] != "pair":
            raise DataError(where, "'chosen' labels a pair", f"item {item['id']} has {k} responses: give 'ranks'")
        if isinstance(chosen, bool) or chosen not in (0, 1):
            raise DataError(where, "'chosen' is not 0 or 1", f"got {chosen!r}")
        return [0, 1] if chosen == 0 else [1, 0]
    ranks = row["ranks"]
    if not isinstance(ranks, list) or len(ranks) != k:
        got = f"{len(ranks)} ranks" if isinstance(ranks, list) else type(ranks).__name__
        raise DataError(where, "ranks is not a list of one rank per response",
                        f"got {got}, item {item['id']} has {k} responses")
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < k]
    if bad or 0 not in ranks:
        detail = f"{bad[0]!r} is not an integer in 0..{k - 1}" if bad else "no response has rank 0 (the best)"
        raise DataError(where, "invalid ranks", f"{ranks}: {detail}")
    return ranks


def read_labels(path: Path, items: list[dict]) -> dict[str, list[int]]:
    """The labels file -> {item id: ranks}; several labels of one id: the last counts. No file: no labels. A last
    line without its newline that is not JSON yet is being appended: it is read next time."""
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    by_id, labels = {item["id"]: item for item in items}, {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise DataError(where, "invalid JSON", err.msg) from None
        if not isinstance(row, dict):
            raise DataError(where, "row is not a JSON object", f"got {type(row).__name__}")
        labels[row.get("id")] = label_ranks(row, by_id.get(row.get("id")), where)
    return labels


def labels_needed(min_labelled: float, total: int) -> int:
    """--min_labelled as a count of items: a share of `total` (<= 1.0, rounded up) or a count (> 1)."""
    if min_labelled <= 1.0:
        return math.ceil(round(min_labelled * total, 9))  # 0.3 * 10 is 3.0000000000000004: still 3
    return int(min_labelled)


def human_rows(items: list[dict], queue: Path, labels_path: Path, need: int) -> tuple[list[dict], dict]:
    """The queue's labels -> (rows {prompt, responses, ranks} of the labelled items, all-tied ones left out;
    stats {items, labelled, all_tied}). Fewer than `need` items labelled: LabelsPendingError."""
    labels = read_labels(labels_path, items)
    if len(labels) < need:
        raise LabelsPendingError(f"waiting for labels: {len(labels)} of {len(items)} items labelled (need {need}); "
                                 f"queue: {queue}; labels: {labels_path}")
    rows, stats = [], {"items": len(items), "labelled": len(labels), "all_tied": 0}
    for item in items:
        ranks = labels.get(item["id"])
        if ranks is None:
            continue
        if len(set(ranks)) < 2:  # "all equally good": no pair to learn from
            stats["all_tied"] += 1
            continue
        rows.append({"prompt": item["prompt"], "responses": item["responses"], "ranks": ranks})
    return rows, stats


def read_add_to(path: str) -> list[dict]:
    """The rows of an existing preference .jsonl, parsed (a bad line: DataError naming it) to be written again."""
    from datamodules.formats import iter_rows

    return [row for _, row in iter_rows(path)]


def build_parser() -> argparse.ArgumentParser:
    """The flags alone (rlhf pipeline checks a label stage's args with it before anything runs)."""
    parser = argparse.ArgumentParser(prog="python -m datamodules.labelling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=Path, required=True, help="`rlhf generate` jsonl, K samples per prompt")
    parser.add_argument("--out", type=Path, required=True,
                        help="rankings .jsonl for `rlhf reward fit --data.layout rankings` (written whole, atomically)")
    parser.add_argument("--add_to", type=Path, default=None,
                        help="an existing preference .jsonl whose rows --out starts with (the data so far)")
    parser.add_argument("--labeller", choices=["judge", "ai", "human"], default="judge")
    parser.add_argument("--judge", default="{oracle: synthetic}",
                        help="judge: a RewardSpec as YAML (models, functions, oracle)")
    parser.add_argument("--ai_judge", default=None,
                        help="ai: a JudgeSpec (core/judge.py) as YAML text or a file, e.g. '{model: runs/sft, "
                             "constitution: configs/constitution/harmless.yaml}', or a causal LM's folder")
    parser.add_argument("--flip", type=float, default=None,
                        help="judge, ai: share of groups where two ranks swap (default 0)")
    parser.add_argument("--tie_tolerance", type=float, default=None,
                        help="judge, ai: scores closer than this share a rank (default 0)")
    parser.add_argument("--queue", type=Path, default=None,
                        help="human: the queue to write (default: the --out path with suffix .queue.jsonl)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="human: the labels to read (default: the --out path with suffix .labels.jsonl)")
    parser.add_argument("--min_labelled", type=float, default=None,
                        help="human: labelled items needed, a share of the queue (<= 1) or a count (> 1); default 1.0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--restart", action="store_true",
                        help="ai: discard the pairs an interrupted run saved (OUT.progress) and start afresh")
    return parser


def main(argv: list[str] | None = None) -> None:
    from core.outputs import Journal, progress_path, write_jsonl
    from datamodules.formats import iter_rows

    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("out", "add_to"):
        path = getattr(args, name)
        if path is not None and path.suffix.lower() != ".jsonl":
            parser.error(f"--{name} {path}: a .jsonl file is needed (JSON lines of preference rows)")
    human_only = [f"--{n}" for n in ("queue", "labels", "min_labelled") if getattr(args, n) is not None]
    judge_only = [f"--{n}" for n in ("flip", "tie_tolerance") if getattr(args, n) is not None]
    if args.labeller == "human" and judge_only:
        parser.error(f"{' and '.join(judge_only)}: for --labeller judge or ai only (a simulated labeller's mistakes)")
    if args.labeller != "human" and human_only:
        parser.error(f"{' and '.join(human_only)}: for --labeller human only")
    if args.restart and args.labeller != "ai":
        parser.error("--restart: for --labeller ai only (the judge and human labellers save no progress)")
    if (args.labeller == "ai") != (args.ai_judge is not None):
        parser.error("--labeller ai needs --ai_judge (a JudgeSpec), and --ai_judge needs --labeller ai")
    ai_judge = None
    if args.ai_judge is not None:
        from core.judge import as_judge_spec

        try:
            ai_judge = as_judge_spec(args.ai_judge)  # a bad spec fails before any model loads
        except ValueError as err:
            parser.error(f"--ai_judge: {err}")
    share_or_count = args.min_labelled is None or 0 <= args.min_labelled <= 1 or args.min_labelled.is_integer()
    if not share_or_count:
        parser.error(f"--min_labelled is a share in [0, 1] or a whole count above 1, got {args.min_labelled:g}")

    kept = read_add_to(str(args.add_to)) if args.add_to is not None else []
    groups = group_generations([row for _, row in iter_rows(str(args.samples))])
    if args.labeller == "human":
        queue = args.queue or args.out.with_suffix(".queue.jsonl")
        labels = args.labels or args.out.with_suffix(".labels.jsonl")
        items = queue_items(groups, str(args.samples))
        write_jsonl(queue, items)  # every run: the labelling app serves it (same groups, same ids)
        min_labelled = 1.0 if args.min_labelled is None else args.min_labelled
        need = labels_needed(min_labelled, len(items))
        if need > len(items):
            parser.error(f"--min_labelled {min_labelled:g} asks for more items than the queue's {len(items)} "
                         f"({queue})")
        try:
            rows, stats = human_rows(items, queue, labels, need)
        except LabelsPendingError as err:
            print(err, file=sys.stderr)
            raise SystemExit(LABELS_PENDING_EXIT) from None
        said = (f"{stats['labelled']} of {stats['items']} items labelled by hand ({stats['all_tied']} all tied, "
                f"{stats['items'] - stats['labelled']} unlabelled: left out)")
    else:
        journal = None
        if ai_judge is not None:  # progress of other settings stops here, before the judge loads
            journal = Journal(progress_path(args.out), "labelling --labeller ai", ai_settings(groups, ai_judge, args))
            if saved := journal.open(restart=args.restart):
                print(f"continuing: {saved} chunk(s) of pairs saved in {journal.path}", file=sys.stderr)
        rows, stats = judge_rows(groups, args) if ai_judge is None else ai_rows(groups, ai_judge, args, journal)
        said = (f"labelled {stats['kept']} of {stats['groups']} prompts ({stats['all_tied']} all tied, left out; "
                f"{stats['flipped']} flipped)")
        if "position_bias" in stats:
            said += f"; AI judge: {stats['pairs']} pairs, position bias {stats['position_bias']:.3f}"
    write_jsonl(args.out, kept + rows)
    if args.labeller == "ai":
        journal.remove()  # every pair it saved is in --out now
    added = f"{len(kept)} rows of {args.add_to} + " if args.add_to is not None else ""
    print(f"{said} -> {args.out}: {added}{len(rows)} new rows")


def judge_rows(groups: list[dict], args) -> tuple[list[dict], dict]:
    """label_groups with the --judge RewardSpec loaded on --device."""
    import yaml

    from core.reward_spec import as_reward_spec

    judge = as_reward_spec(yaml.safe_load(args.judge)).load(args.device)

    def score(prompts, responses, metas):
        return judge.score(prompts, responses, metas, args.device).tolist()

    return label_groups(groups, score, args.flip or 0.0, args.tie_tolerance or 0.0, args.seed)


AI_CHUNK = 16  # pairs the AI labeller judges (in both orders) between saves of its progress


def ai_settings(groups: list[dict], judge, args) -> dict:
    """What an AI labeller's saved pairs depend on: the judge (its spec, its model's files, its constitution's
    text) and the groups' prompts and responses. --flip, --tie_tolerance and --seed act after the judge (left out),
    and so does --device (a run may move to a GPU)."""
    import dataclasses

    from core.outputs import config_hash, files_stamp

    spec = dataclasses.asdict(judge)
    constitution = Path(judge.constitution).read_text() if judge.constitution else None
    return {"judge": config_hash(spec), "judge_model": [judge.model.path, files_stamp(judge.model.path)],
            "constitution": config_hash(constitution),
            "groups": config_hash([(g["prompt"], g["responses"]) for g in groups])}


def ai_rows(groups: list[dict], judge, args, journal=None) -> tuple[list[dict], dict]:
    """label_groups with the AI judge's pairwise scores (pairwise_scores); stats add the pairs asked and the
    judge's position bias (mean P(first option), 0.5 = none). The pairs are judged AI_CHUNK at a time, each chunk's
    probabilities (both orders) saved to the journal as it ends and read from it when an earlier run saved it."""
    import torch

    from core.judge import Preference, position_bias

    asked = []

    def prefer(prompts, a, b):
        p1, p2 = [], []
        for chunk, start in enumerate(range(0, len(prompts), AI_CHUNK)):
            end = start + AI_CHUNK
            saved = journal.get("pairs", chunk) if journal is not None else None
            if saved is None:
                judge.load(args.device)  # once: a second call does nothing; not at all when every chunk is saved
                pref = judge.compare(prompts[start:end], a[start:end], b[start:end])
                saved = [pref.p1.tolist(), pref.p2.tolist()]
                if journal is not None:
                    journal.put(("pairs", chunk), saved)
            p1 += saved[0]
            p2 += saved[1]
        first, second = torch.tensor(p1, dtype=torch.float64), torch.tensor(p2, dtype=torch.float64)
        asked.append(Preference((first + second) / 2, first, second))  # as judge.compare computes prob
        return asked[-1].prob.tolist()

    scores = pairwise_scores(groups, prefer)
    rows, stats = label_groups(groups, lambda p, r, m: scores, args.flip or 0.0, args.tie_tolerance or 0.0,
                               args.seed)
    stats["pairs"] = asked[-1].prob.numel()
    stats["position_bias"] = position_bias(asked[-1])
    return rows, stats


if __name__ == "__main__":
    from core.outputs import OutputExistsError

    try:
        main()
    except (DataError, OutputExistsError) as err:  # one line, with `rlhf`'s exit codes (recipes/cli.py EXIT_CODES)
        print(" ".join(str(err).splitlines()), file=sys.stderr)
        sys.exit(3 if isinstance(err, DataError) else 5)
