"""The built-in verifiable tasks: reverse or sort a sequence of letters, scored by a programmatic oracle.

Two tasks, told apart by their prompt's prefix, so one oracle (``oracle: synthetic``) and the same configs
serve both with only the data paths changed (completions carry no EOS: tokenization adds it):

- ``reverse``: ``"Reverse: c a f b\\nAnswer:"`` -> ``" b f a c"``; oracle: share of positions right.
- ``sort`` (pieces in ``datamodules/synthetic_sort.py``): ``"Sort: d a c b\\nAnswer:"`` -> ``" a b c d"``;
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
from typing import NamedTuple

from datamodules import synthetic_sort
from modules.outputs import write_jsonl

LETTERS = "abcdefgh"
PROMPT_PREFIX = "Reverse:"
P_CORRECT = 0.3  # share of pairs/rankings that include the exact answer: "perfect beats near-perfect"
VAL_SEED_OFFSET = 1_000_000  # write_task: val seed = seed + this (prompts are also made disjoint)
_MAX_TRIES = 10_000


def _positional_score(target: list[str], items: list[str]) -> float:
    # the reversal oracle: #{i: items[i] == target[i]} / max(len(target), len(items))
    return sum(r == t for r, t in zip(items, target, strict=False)) / max(len(target), len(items))


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


class Task(NamedTuple):
    """One built-in task: prompts ``f"{prefix} c a f b\\nAnswer:"``, completions ``format_answer(letters)``.

    ``score(target letters, response items)`` is the oracle score in [0, 1]; ``noisy_response(letters, rng,
    copy_prob, error_rate, alphabet)`` is the simulated labeller (see ``noisy_response``)."""

    prefix: str  # tells the tasks' prompts apart
    noun: str  # for errors: "not a reversal task prompt"
    target: Callable[[Sequence[str]], list[str]]  # prompt letters -> correct answer letters
    score: Callable[[list[str], list[str]], float]
    noisy_response: Callable[[Sequence[str], random.Random, float, float, str], str]


TASKS = {
    "reverse": Task(PROMPT_PREFIX, "reversal", lambda x: list(x)[::-1], _positional_score, noisy_response),
    "sort": Task(synthetic_sort.PREFIX, "sort", sorted, synthetic_sort.score, synthetic_sort.noisy_response),
}


def _task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the built-in ones are {', '.join(map(repr, TASKS))}")
    return TASKS[name]


def format_prompt(letters: Sequence[str], task: str = "reverse") -> str:
    """``["c", "a"]`` -> ``"Reverse: c a\\nAnswer:"`` (``task="sort"``: ``"Sort: c a\\nAnswer:"``)."""
    return f"{_task(task).prefix} {' '.join(letters)}\nAnswer:"


def format_answer(letters: Sequence[str]) -> str:
    """Completion text for letters in the given order: ``["a", "c"]`` -> ``" a c"`` (leading space)."""
    return " " + " ".join(letters)


def _parse(prompt: str) -> tuple[Task, list[str]]:
    # the task whose prefix occurs last (prompts may be wrapped in chat text) and the letters after it
    task = max(TASKS.values(), key=lambda t: prompt.rfind(t.prefix))
    start = prompt.rfind(task.prefix)
    if start < 0:
        kinds = " nor ".join(f"a {t.noun} task prompt" for t in TASKS.values())
        prefixes = ", ".join(repr(t.prefix) for t in TASKS.values())
        raise ValueError(f"not {kinds} (known prefixes: {prefixes}): {prompt[:80]!r}")
    letters = prompt[start + len(task.prefix) :].split("\n", 1)[0].split()
    if not letters:
        raise ValueError(f"not a {task.noun} task prompt: {prompt[:80]!r}")
    return task, letters


def parse_prompt(prompt: str) -> list[str]:
    """Letters of a task prompt (after the last ``"Reverse:"`` or ``"Sort:"`` up to the next newline);
    else ValueError naming the known prefixes."""
    return _parse(prompt)[1]


def target_response(prompt: str) -> str:
    """The correct completion of a task prompt (of either task)."""
    task, letters = _parse(prompt)
    return format_answer(task.target(letters))


def oracle_score(prompt: str, response: str) -> float:
    """The prompt's task's oracle score in [0, 1] for ``response``; the task is told by the prompt's prefix.

    Only the response's first line counts and its items are whitespace-separated, so a perfect answer
    scores 1, and each extra, missing or wrong letter costs. Empty or junk responses score 0.

    - reverse: fraction of positions right, ``#{i: resp[i] == target[i]} / max(len(target), len(resp))``
      (a missing or extra letter also shifts all later ones).
    - sort: ``max(0, 1 - levenshtein(resp, target) / max(len(target), len(resp)))``.

    Raises ValueError if ``prompt`` is not a task prompt.
    """
    task, letters = _parse(prompt)
    return task.score(task.target(letters), response.split("\n", 1)[0].split())


def oracle_reward(prompts: list[str], responses: list[str], meta: list[dict] | None = None) -> list[float]:
    """``oracle_score`` per pair, as a RewardSpec reward function (``oracle: synthetic`` is its short name):
    ``functions: ["datamodules.synthetic:oracle_reward"]``. Either task, even mixed. ``meta`` is unused."""
    return [oracle_score(p, r) for p, r in zip(prompts, responses, strict=True)]


def mean_oracle_score(prompts: list[str], responses: list[str]) -> float:
    """Mean ``oracle_score`` over aligned prompts and responses."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need equally many (> 0) prompts and responses: {len(prompts)}, {len(responses)}")
    return sum(oracle_score(p, r) for p, r in zip(prompts, responses, strict=True)) / len(prompts)


def _stream(task: str, name: str, seed: int) -> random.Random:
    # reverse keeps the stream names it had before the sort task existed: its files stay byte-identical
    label = f"synthetic/{name}/{seed}" if task == "reverse" else f"synthetic/{task}/{name}/{seed}"
    return random.Random(label)


def _candidate(task: str, letters: list[str], rng: random.Random) -> str:
    # a labeller of random skill: copy_prob in {0, 0.5}, error_rate uniform in [0, 0.5]
    return _task(task).noisy_response(letters, rng, rng.choice((0.0, 0.5)), rng.uniform(0.0, 0.5), LETTERS)


def _candidates(task: str, letters: list[str], rng: random.Random, k: int) -> tuple[list[str], list[float]]:
    # k distinct responses whose oracle scores are not all equal (an all-tie ranking teaches nothing)
    if k < 2:
        raise ValueError(f"need k >= 2 candidates per prompt, got {k}")
    prompt = format_prompt(letters, task)
    for _ in range(_MAX_TRIES):
        responses = [format_answer(_task(task).target(letters))] if rng.random() < P_CORRECT else []
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
    *, task: str = "reverse", min_len: int = 3, max_len: int = 6, exclude: Collection[str] = (),
) -> list[dict]:
    """``n`` rows ``{"prompt", "target"}`` (target: the correct completion, for reference only)."""
    draws = _draw(task, "prompts", n, seed, min_len, max_len, exclude)
    target = _task(task).target
    return [{"prompt": format_prompt(x, task), "target": format_answer(target(x))} for x, _ in draws]


def make_demonstrations(
    n: int, seed: int, copy_prob: float = 0.25, error_rate: float = 0.1,
    *, task: str = "reverse", min_len: int = 3, max_len: int = 6, exclude: Collection[str] = (),
) -> list[dict]:
    """``n`` imperfect demonstrations ``{"prompt", "completion"}`` from the task's noisy labeller."""
    noisy = _task(task).noisy_response
    return [
        {"prompt": format_prompt(x, task), "completion": noisy(x, rng, copy_prob, error_rate, LETTERS)}
        for x, rng in _draw(task, "sft", n, seed, min_len, max_len, exclude)
    ]


def make_pairs(
    n: int, seed: int, label_noise: float = 0.1,
    *, task: str = "reverse", min_len: int = 3, max_len: int = 6, exclude: Collection[str] = (),
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
            a = format_answer(_task(task).target(letters)) if correct else _candidate(task, letters, rng)
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
    *, task: str = "reverse", min_len: int = 3, max_len: int = 6, exclude: Collection[str] = (),
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
    *, task: str = "reverse", min_len: int = 3, max_len: int = 6, exclude: Collection[str] = (),
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
    _task(task)
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
