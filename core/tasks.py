"""The built-in verifiable tasks' oracles: a prompt's task and letters, its correct answer, a response's score.

Pure functions, stdlib only; the tasks' data (prompts, simulated labellers, files) is made in
``datamodules/synthetic.py``. Two tasks, told apart by their prompt's prefix, so one oracle
(``oracle: synthetic``, the reward function ``core.tasks:oracle_reward``) scores both:

- ``reverse``: ``"Reverse: c a f b\\nAnswer:"`` -> ``" b f a c"``; score: share of positions right.
- ``sort``: ``"Sort: d a c b\\nAnswer:"`` -> ``" a b c d"``; score: 1 - Levenshtein distance / length, so a
  dropped or added letter costs one edit instead of shifting every later letter, and a pair left swapped
  costs two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

REVERSE_PREFIX = "Reverse:"
SORT_PREFIX = "Sort:"


def positional_score(target: list[str], items: list[str]) -> float:
    """The reversal oracle: ``#{i: items[i] == target[i]} / max(len(target), len(items))``."""
    return sum(r == t for r, t in zip(items, target, strict=False)) / max(len(target), len(items))


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two item sequences: the fewest single-item insertions, deletions and
    substitutions that turn ``a`` into ``b`` (a swap of two neighbours costs 2)."""
    prev = list(range(len(b) + 1))  # prev[j]: distance between a[:i-1] and b[:j]
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))  # delete, insert, substitute
        prev = cur
    return prev[-1]


def sort_score(target_items: list[str], items: list[str]) -> float:
    """``max(0, 1 - edit_distance(items, target) / max(len(target), len(items)))`` for a non-empty target.

    Perfect scores 1; empty scores 0 (distance = len(target)). The distance never exceeds the longer
    length, so the clamp is only a guard."""
    return max(0.0, 1 - edit_distance(items, target_items) / max(len(target_items), len(items)))


class Task(NamedTuple):
    """One built-in task: prompts ``f"{prefix} c a f b\\nAnswer:"``, completions ``format_answer(letters)``.

    ``score(target letters, response items)`` is the oracle score in [0, 1]."""

    prefix: str  # tells the tasks' prompts apart
    noun: str  # for errors: "not a reversal task prompt"
    target: Callable[[Sequence[str]], list[str]]  # prompt letters -> correct answer letters
    score: Callable[[list[str], list[str]], float]


TASKS = {
    "reverse": Task(REVERSE_PREFIX, "reversal", lambda x: list(x)[::-1], positional_score),
    "sort": Task(SORT_PREFIX, "sort", sorted, sort_score),
}


def get_task(name: str) -> Task:
    """The built-in task called ``name``; else ValueError naming the built-in ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the built-in ones are {', '.join(map(repr, TASKS))}")
    return TASKS[name]


def format_prompt(letters: Sequence[str], task: str = "reverse") -> str:
    """``["c", "a"]`` -> ``"Reverse: c a\\nAnswer:"`` (``task="sort"``: ``"Sort: c a\\nAnswer:"``)."""
    return f"{get_task(task).prefix} {' '.join(letters)}\nAnswer:"


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
    ``functions: ["core.tasks:oracle_reward"]``. Either task, even mixed. ``meta`` is unused."""
    return [oracle_score(p, r) for p, r in zip(prompts, responses, strict=True)]


def mean_oracle_score(prompts: list[str], responses: list[str]) -> float:
    """Mean ``oracle_score`` over aligned prompts and responses."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need equally many (> 0) prompts and responses: {len(prompts)}, {len(responses)}")
    return sum(oracle_score(p, r) for p, r in zip(prompts, responses, strict=True)) / len(prompts)
