"""The built-in sort task's own pieces (prefix, oracle, labeller); its target is ``sorted(letters)``.

Prompt ``"Sort: d a c b\\nAnswer:"``, correct completion ``" a b c d"``. Its oracle differs in kind from
the reversal task's positional one: a dropped or added letter costs one edit instead of shifting every later
letter, and a pair left swapped costs two. ``datamodules/synthetic.py`` lists these in its task table and
makes the prompts, labels and files of both tasks; stdlib only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

PREFIX = "Sort:"


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


def score(target_items: list[str], items: list[str]) -> float:
    """``max(0, 1 - edit_distance(items, target) / max(len(target), len(items)))`` for a non-empty target.

    Perfect scores 1; empty scores 0 (distance = len(target)). The distance never exceeds the longer
    length, so the clamp is only a guard."""
    return max(0.0, 1 - edit_distance(items, target_items) / max(len(target_items), len(items)))


def noisy_response(
    letters: Sequence[str], rng: random.Random, copy_prob: float, error_rate: float, alphabet: str
) -> str:
    """A simulated imperfect human answer to the sort prompt made of ``letters``, deterministic given ``rng``.

    With prob. ``copy_prob`` the letters keep the prompt's order (forgot to sort), else they are sorted and,
    with prob. ``error_rate``, one random adjacent pair of different letters is left swapped (sorted only
    partly). Then, as in the reversal task: each position is replaced by a random letter (maybe the same one)
    with prob. ``error_rate``; with prob. ``error_rate / 2`` one letter is dropped (never the last one), with
    prob. ``error_rate / 2`` a random letter is appended. Completion format as ``synthetic.format_answer``."""
    if rng.random() < copy_prob:
        seq = list(letters)
    else:
        seq = sorted(letters)
        unequal = [i for i in range(len(seq) - 1) if seq[i] != seq[i + 1]]  # a swap of equal ones is no error
        if rng.random() < error_rate and unequal:
            i = rng.choice(unequal)
            seq[i], seq[i + 1] = seq[i + 1], seq[i]
    seq = [rng.choice(alphabet) if rng.random() < error_rate else x for x in seq]
    if rng.random() < error_rate / 2 and len(seq) > 1:
        del seq[rng.randrange(len(seq))]
    if rng.random() < error_rate / 2:
        seq.append(rng.choice(alphabet))
    return " " + " ".join(seq)
