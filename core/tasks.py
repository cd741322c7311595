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

from collections import Counter
from collections.abc import Callable, Sequence
from typing import NamedTuple

REVERSE_PREFIX = "Reverse:"
SORT_PREFIX = "Sort:"
LETTERS = "abcdefgh"  # the letters both tasks' prompts are drawn from (datamodules/synthetic.py)
MIN_LEN, MAX_LEN = 3, 6  # letters per prompt


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


def _locate(prompt: str) -> tuple[Task, int, int]:
    # the task whose prefix occurs last (prompts may be wrapped in chat text) and where its letters are:
    # prompt[start:end] is the prefix and the letters, up to the next newline (or the end)
    task = max(TASKS.values(), key=lambda t: prompt.rfind(t.prefix))
    start = prompt.rfind(task.prefix)
    if start < 0:
        kinds = " nor ".join(f"a {t.noun} task prompt" for t in TASKS.values())
        prefixes = ", ".join(repr(t.prefix) for t in TASKS.values())
        raise ValueError(f"not {kinds} (known prefixes: {prefixes}): {prompt[:80]!r}")
    end = prompt.find("\n", start)
    return task, start, len(prompt) if end < 0 else end


def _parse(prompt: str) -> tuple[Task, list[str]]:
    task, start, end = _locate(prompt)
    letters = prompt[start + len(task.prefix) : end].split()
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


def _answer_items(response: str) -> list[str] | None:
    """The response's letters when it is an answer exactly as ``format_answer`` writes it (a leading space,
    letters joined by single spaces, nothing after them: no newline, no trailing space) of MIN_LEN..MAX_LEN
    letters of LETTERS; else None."""
    items = response.split()
    if response != format_answer(items) or not MIN_LEN <= len(items) <= MAX_LEN:
        return None
    return items if all(len(x) == 1 and x in LETTERS for x in items) else None


def _nearest_order(items: list[str], letters: list[str]) -> list[str]:
    """`items` in the order nearest the prompt's `letters`: each prompt letter that `items` still holds stays in
    its place (matched left to right); every other prompt letter is replaced, left to right, by the next of the
    items left over (in their order in `items`), or deleted when none is left; items still left are appended.
    ``items`` a b c e, ``letters`` d a c b -> e a c b; the same multiset in any order -> ``letters`` itself."""
    need = Counter(items)
    slots = []  # per prompt letter: itself when matched, else None (a slot for a left-over item)
    for x in letters:
        slots.append(x if need[x] else None)
        need[x] -= bool(need[x])
    extra = iter([x for x in dict.fromkeys(items) for _ in range(need[x])])  # what the prompt lacks, in order
    placed = [x if x is not None else next(extra, None) for x in slots]
    return [x for x in placed if x is not None] + list(extra)


def hindsight_prompt(prompt: str, response: str, score: float | None = None) -> str | None:
    """The task prompt ``response`` is a correct answer to (Hindsight Instruction Relabelling, Zhang et al. 2023,
    arXiv 2302.05206), as ``rlhf relabel --relabel core.tasks:hindsight_prompt`` calls it; None drops the sample.

    The response must be a well-formed answer: exactly ``format_answer(items)`` (a leading space, single spaces,
    nothing after the letters), MIN_LEN..MAX_LEN items, each one letter of LETTERS; else None. Then:

    - ``score`` (a judge's score of the sample, when --judge is given) is not needed: the task itself says which
      prompt an answer fulfils, and a judge's score (a reward model's is unbounded) never overrides that;
    - reverse: a response is the correct reversal of its own reverse, so the prompt's letters become the
      response's reversed: ``"Reverse: c a f b\\nAnswer:"``, ``" c a f b"`` -> ``"Reverse: b f a c\\nAnswer:"``;
    - sort: a sorted response (non-decreasing) answers a prompt of its letters in any order; the order taken is
      the one nearest the original prompt (``_nearest_order``: the prompt's letters the response holds stay in
      place, the rest are replaced by the response's left-over letters, then deleted or appended), so a response
      with the prompt's letters keeps the prompt; ``"Sort: d a c b\\nAnswer:"``, ``" a b c e"`` ->
      ``"Sort: e a c b\\nAnswer:"``. A response that is not sorted: None.

    Only the letters between the prefix and the next newline change: chat text around them (as ``_parse`` finds
    the prompt in it) is kept. A response that answers the prompt as it stands returns ``prompt`` unchanged.
    Raises ValueError if ``prompt`` is not a task prompt.
    """
    task, start, end = _locate(prompt)
    letters = prompt[start + len(task.prefix) : end].split()
    if not letters:
        raise ValueError(f"not a {task.noun} task prompt: {prompt[:80]!r}")
    items = _answer_items(response)
    if items is None:
        return None
    if task.prefix == REVERSE_PREFIX:
        fulfilled = items[::-1]
    elif items == sorted(items):
        fulfilled = _nearest_order(items, letters)
    else:
        return None
    if fulfilled == letters:
        return prompt
    return f"{prompt[:start]}{task.prefix} {' '.join(fulfilled)}{prompt[end:]}"
