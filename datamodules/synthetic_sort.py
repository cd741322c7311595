"""The built-in sort task's simulated labeller; its prefix, target (``sorted(letters)``) and oracle (edit
distance) are in ``core/tasks.py``.

Prompt ``"Sort: d a c b\\nAnswer:"``, correct completion ``" a b c d"``. ``datamodules/synthetic.py`` lists this
labeller next to the reversal task's and makes the prompts, labels and files of both tasks; stdlib only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


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
