"""The built-in verifiable tasks' data: reverse or sort a sequence of letters, scored by a programmatic oracle.

Two tasks, told apart by their prompt's prefix, so one oracle (``oracle: synthetic``) and the same configs
serve both with only the data paths changed (completions carry no EOS: tokenization adds it). The prompt
format and the oracles are in ``core/tasks.py`` (pure scoring, which RewardSpec imports too):

- ``reverse``: ``"Reverse: c a f b\\nAnswer:"`` -> ``" b f a c"``; oracle: share of positions right.
- ``sort`` (its labeller in ``datamodules/synthetic_sort.py``): ``"Sort: d a c b\\nAnswer:"`` -> ``" a b c d"``;
  oracle: 1 - Levenshtein distance / length, so a dropped letter costs one edit, not a shift.

Tiny models learn them in a minute on CPU. Demonstrations and preference labels come from a simulated noisy
labeller (forgets to reverse/sort, typos, drops/adds letters, flips comparisons), so SFT alone is not
perfect and the reward model / DPO / rejection sampling / PPO stages can show the oracle score rising.
Stdlib only. Every ``make_*`` generator is deterministic in its ``seed`` and takes keyword-only ``task``
(``"reverse"`` unless given), ``min_len``/``max_len`` (letters per prompt) and ``exclude`` (prompts never to
produce, e.g. train ones).

    python -m datamodules.synthetic OUT_DIR [--task reverse|sort] [--n-train 2000] [--n-val 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

from core.outputs import write_jsonl
from core.tasks import (
    LETTERS,
    MAX_LEN,
    MIN_LEN,
    TASKS,
    format_answer,
    format_prompt,
    get_task,
    oracle_reward,  # noqa: F401  (the old path "datamodules.synthetic:oracle_reward" still works)
    oracle_score,
)
from datamodules import synthetic_sort

P_CORRECT = 0.3  # share of pairs/rankings that include the exact answer: "perfect beats near-perfect"
VAL_SEED_OFFSET = 1_000_000  # write_task: val seed = seed + this (prompts are also made disjoint)
_MAX_TRIES = 10_000


def noisy_response(
    letters: Sequence[str], rng: random.Random, copy_prob: float, error_rate: float, alphabet: str = LETTERS
) -> str:
    """A simulated imperfect human answer to the reversal prompt of ``letters``, deterministic given ``rng``.

    With prob. ``copy_prob`` the letters keep their original order (forgot to reverse), else reversed;
    each position is then replaced by a random letter (maybe the same one) with prob. ``error_rate``;
    with prob. ``error_rate / 2`` one letter is dropped (never the last one), with prob. ``error_rate / 2``
    a random letter is appended. The sort task's labeller is ``synthetic_sort.noisy_response``."""
    seq = list(letters) if rng.random() < copy_prob else list(letters)[::-1]
    seq = [rng.choice(alphabet) if rng.random() < error_rate else x for x in seq]
    if rng.random() < error_rate / 2 and len(seq) > 1:
        del seq[rng.randrange(len(seq))]
    if rng.random() < error_rate / 2:
        seq.append(rng.choice(alphabet))
    return format_answer(seq)


def _stream(task: str, name: str, seed: int) -> random.Random:
    # reverse keeps the stream names it had before the sort task existed: its files stay byte-identical
    label = f"synthetic/{name}/{seed}" if task == "reverse" else f"synthetic/{task}/{name}/{seed}"
    return random.Random(label)


LABELLERS: dict[str, Callable[[Sequence[str], random.Random, float, float, str], str]] = {
    "reverse": noisy_response,
    "sort": synthetic_sort.noisy_response,
}  # per task: the simulated labeller (see ``noisy_response``)


def _labeller(task: str) -> Callable[[Sequence[str], random.Random, float, float, str], str]:
    get_task(task)  # an unknown task: ValueError naming the built-in ones
    return LABELLERS[task]


def _candidate(task: str, letters: list[str], rng: random.Random) -> str:
    # a labeller of random skill: copy_prob in {0, 0.5}, error_rate uniform in [0, 0.5]
    return _labeller(task)(letters, rng, rng.choice((0.0, 0.5)), rng.uniform(0.0, 0.5), LETTERS)


def _candidates(task: str, letters: list[str], rng: random.Random, k: int) -> tuple[list[str], list[float]]:
    # k distinct responses whose oracle scores are not all equal (an all-tie ranking teaches nothing)
    if k < 2:
        raise ValueError(f"need k >= 2 candidates per prompt, got {k}")
    prompt = format_prompt(letters, task)
    for _ in range(_MAX_TRIES):
        responses = [format_answer(get_task(task).target(letters))] if rng.random() < P_CORRECT else []
        while len(responses) < k:
            cand = _candidate(task, letters, rng)
            if cand not in responses:
                responses.append(cand)
        rng.shuffle(responses)  # random listing order: ranks/ratings say which is best
        scores = [oracle_score(prompt, r) for r in responses]
        if len(set(scores)) > 1:
            return responses, scores
    raise ValueError(f"could not draw {k} distinct candidates with differing scores for {prompt!r}")


def _draw(
    task: str, kind: str, n: int, seed: int, min_len: int, max_len: int, exclude: Collection[str]
) -> Iterator[tuple[list[str], random.Random]]:
    # n prompts' letters and the stream that drew them; a stream per task and kind: SFT/pair prompts differ
    rng = _stream(task, kind, seed)
    for _ in range(n):
        for _ in range(_MAX_TRIES):
            letters = [rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len))]
            if format_prompt(letters, task) not in exclude:
                break
        else:
            raise ValueError(f"could not draw a prompt outside `exclude` in {_MAX_TRIES} tries")
        yield letters, rng


def make_prompts(
    n: int, seed: int,
    *, task: str = "reverse", min_len: int = MIN_LEN, max_len: int = MAX_LEN, exclude: Collection[str] = (),
) -> list[dict]:
    """``n`` rows ``{"prompt", "target"}`` (target: the correct completion, for reference only)."""
    draws = _draw(task, "prompts", n, seed, min_len, max_len, exclude)
    target = get_task(task).target
    return [{"prompt": format_prompt(x, task), "target": format_answer(target(x))} for x, _ in draws]


def make_demonstrations(
    n: int, seed: int, copy_prob: float = 0.25, error_rate: float = 0.1,
    *, task: str = "reverse", min_len: int = MIN_LEN, max_len: int = MAX_LEN, exclude: Collection[str] = (),
) -> list[dict]:
    """``n`` imperfect demonstrations ``{"prompt", "completion"}`` from the task's noisy labeller."""
    noisy = _labeller(task)
    return [
        {"prompt": format_prompt(x, task), "completion": noisy(x, rng, copy_prob, error_rate, LETTERS)}
        for x, rng in _draw(task, "sft", n, seed, min_len, max_len, exclude)
    ]


def make_pairs(
    n: int, seed: int, label_noise: float = 0.1,
    *, task: str = "reverse", min_len: int = MIN_LEN, max_len: int = MAX_LEN, exclude: Collection[str] = (),
) -> list[dict]:
    """``n`` comparisons ``{"prompt", "chosen", "rejected"}`` whose oracle scores always differ.

    One candidate is the exact answer with prob. ``P_CORRECT``, else a random-skill noisy answer; the
    other is always noisy. Chosen = higher oracle score, then swapped with prob. ``label_noise`` (drawn
    from a separate stream, so changing ``label_noise`` flips rows and changes nothing else).
    """
    noise_rng = _stream(task, "pairs-noise", seed)
    rows = []
    for letters, rng in _draw(task, "pairs", n, seed, min_len, max_len, exclude):
        prompt = format_prompt(letters, task)
        for _ in range(_MAX_TRIES):
            correct = rng.random() < P_CORRECT
            a = format_answer(get_task(task).target(letters)) if correct else _candidate(task, letters, rng)
            b = _candidate(task, letters, rng)
            if oracle_score(prompt, a) != oracle_score(prompt, b):
                break
        chosen, rejected = (a, b) if oracle_score(prompt, a) > oracle_score(prompt, b) else (b, a)
        if noise_rng.random() < label_noise:
            chosen, rejected = rejected, chosen
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def make_rankings(
    n: int, seed: int, k: int = 4, label_noise: float = 0.0,
    *, task: str = "reverse", min_len: int = MIN_LEN, max_len: int = MAX_LEN, exclude: Collection[str] = (),
) -> list[dict]:
    """``n`` K-wise rankings ``{"prompt", "responses": [k str], "ranks": [k int]}``; rank 0 = best.

    rank = number of candidates with a strictly higher oracle score (ties share a rank; never all tie).
    With prob. ``label_noise`` two random responses swap ranks (separate stream, as in ``make_pairs``).
    """
    noise_rng = _stream(task, "rankings-noise", seed)
    rows = []
    for letters, rng in _draw(task, "rankings", n, seed, min_len, max_len, exclude):
        responses, scores = _candidates(task, letters, rng, k)
        ranks = [sum(other > s for other in scores) for s in scores]
        i, j = noise_rng.sample(range(k), 2)
        if noise_rng.random() < label_noise:
            ranks[i], ranks[j] = ranks[j], ranks[i]
        rows.append({"prompt": format_prompt(letters, task), "responses": responses, "ranks": ranks})
    return rows


def make_ratings(
    n: int, seed: int, k: int = 4,
    *, task: str = "reverse", min_len: int = MIN_LEN, max_len: int = MAX_LEN, exclude: Collection[str] = (),
) -> list[dict]:
    """``n`` rows ``{"prompt", "responses": [k str], "ratings": [k int]}``, rating = round(1 + 6 * score)
    on a 1-7 Likert scale (Python's round: halves go to the even integer; ties happen)."""
    rows = []
    for letters, rng in _draw(task, "ratings", n, seed, min_len, max_len, exclude):
        responses, scores = _candidates(task, letters, rng, k)
        ratings = [round(1 + 6 * s) for s in scores]
        rows.append({"prompt": format_prompt(letters, task), "responses": responses, "ratings": ratings})
    return rows


def write_task(
    out_dir: str | os.PathLike, n_train: int = 2000, n_val: int = 200, seed: int = 0, *, task: str = "reverse"
) -> dict[str, Path]:
    """Write ``task``'s ``{sft,pairs,rankings,prompts}_{train,val}.jsonl`` to ``out_dir``; return paths by
    stem. Val uses seed ``seed + VAL_SEED_OFFSET`` and no val prompt appears in any train file."""
    get_task(task)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    makers = dict(sft=make_demonstrations, pairs=make_pairs, rankings=make_rankings, prompts=make_prompts)
    data = {f"{name}_train": make(n_train, seed, task=task) for name, make in makers.items()}
    seen = frozenset(row["prompt"] for rows in data.values() for row in rows)
    for name, make in makers.items():
        data[f"{name}_val"] = make(n_val, seed + VAL_SEED_OFFSET, task=task, exclude=seen)
    paths = {name: out / f"{name}.jsonl" for name in sorted(data)}
    for name, path in paths.items():
        write_jsonl(path, data[name])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic task (reverse or sort) as jsonl files.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--task", choices=sorted(TASKS), default="reverse")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_task(args.out_dir, args.n_train, args.n_val, args.seed, task=args.task).items():
        print(f"{name}\t{path}")


if __name__ == "__main__":
    main()
