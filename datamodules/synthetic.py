"""The built-in verifiable task: reverse a sequence of letters, scored by a programmatic oracle.

Prompt ``"Reverse: c a f b\\nAnswer:"``, correct completion ``" b f a c"`` (no EOS: tokenization adds it).
Tiny models learn it in a minute on CPU. Demonstrations and preference labels come from a simulated
noisy labeller (forgets to reverse, typos, drops/adds letters, flips comparisons), so SFT alone is not
perfect and the reward model / DPO / rejection sampling / PPO stages can show the oracle score rising.
Stdlib only. Every ``make_*`` generator is deterministic in its ``seed`` and takes keyword-only
``min_len``/``max_len`` (letters per prompt) and ``exclude`` (prompts never to produce, e.g. train ones).

    python -m datamodules.synthetic OUT_DIR [--n-train 2000] [--n-val 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

from modules.outputs import write_jsonl

LETTERS = "abcdefgh"
PROMPT_PREFIX = "Reverse:"
P_CORRECT = 0.3  # share of pairs/rankings that include the exact answer: "perfect beats near-perfect"
VAL_SEED_OFFSET = 1_000_000  # write_task: val seed = seed + this (prompts are also made disjoint)
_MAX_TRIES = 10_000


def format_prompt(letters: Sequence[str]) -> str:
    """``["c", "a"]`` -> ``"Reverse: c a\\nAnswer:"``."""
    return f"{PROMPT_PREFIX} {' '.join(letters)}\nAnswer:"


def format_answer(letters: Sequence[str]) -> str:
    """Completion text for letters in the given order: ``["a", "c"]`` -> ``" a c"`` (leading space)."""
    return " " + " ".join(letters)


def parse_prompt(prompt: str) -> list[str]:
    """Letters of a task prompt (after the last ``"Reverse:"`` up to the next newline); else ValueError."""
    start = prompt.rfind(PROMPT_PREFIX)
    letters = prompt[start + len(PROMPT_PREFIX) :].split("\n", 1)[0].split() if start >= 0 else []
    if not letters:
        raise ValueError(f"not a reversal task prompt: {prompt[:80]!r}")
    return letters


def target_response(prompt: str) -> str:
    """The correct completion of a task prompt."""
    return format_answer(parse_prompt(prompt)[::-1])


def oracle_score(prompt: str, response: str) -> float:
    """Fraction of positions right: ``#{i: resp[i] == target[i]} / max(len(target), len(resp))``.

    Only the response's first line counts and its items are whitespace-separated, so a perfect answer
    scores 1, and each extra, missing, wrong or shifted letter costs. Empty or junk responses score 0.
    Raises ValueError if ``prompt`` is not a task prompt.
    """
    target = parse_prompt(prompt)[::-1]
    items = response.split("\n", 1)[0].split()
    return sum(r == t for r, t in zip(items, target, strict=False)) / max(len(target), len(items))


def oracle_reward(prompts: list[str], responses: list[str], meta: list[dict] | None = None) -> list[float]:
    """``oracle_score`` per pair, as a RewardSpec reward function (``oracle: synthetic`` is its short name):
    ``functions: ["datamodules.synthetic:oracle_reward"]``. ``meta`` is unused."""
    return [oracle_score(p, r) for p, r in zip(prompts, responses, strict=True)]


def mean_oracle_score(prompts: list[str], responses: list[str]) -> float:
    """Mean ``oracle_score`` over aligned prompts and responses."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need equally many (> 0) prompts and responses: {len(prompts)}, {len(responses)}")
    return sum(oracle_score(p, r) for p, r in zip(prompts, responses, strict=True)) / len(prompts)


def noisy_response(
    letters: Sequence[str], rng: random.Random, copy_prob: float, error_rate: float, alphabet: str = LETTERS
) -> str:
    """A simulated imperfect human answer to the prompt made of ``letters``, deterministic given ``rng``.

    With prob. ``copy_prob`` the letters keep their original order (forgot to reverse), else reversed;
    each position is then replaced by a random letter (maybe the same one) with prob. ``error_rate``;
    with prob. ``error_rate / 2`` one letter is dropped (never the last one), with prob. ``error_rate / 2``
    a random letter is appended."""
    seq = list(letters) if rng.random() < copy_prob else list(letters)[::-1]
    seq = [rng.choice(alphabet) if rng.random() < error_rate else x for x in seq]
    if rng.random() < error_rate / 2 and len(seq) > 1:
        del seq[rng.randrange(len(seq))]
    if rng.random() < error_rate / 2:
        seq.append(rng.choice(alphabet))
    return format_answer(seq)


def _candidate(letters: list[str], rng: random.Random) -> str:
    # a labeller of random skill: copy_prob in {0, 0.5}, error_rate uniform in [0, 0.5]
    return noisy_response(letters, rng, rng.choice((0.0, 0.5)), rng.uniform(0.0, 0.5))


def _candidates(letters: list[str], rng: random.Random, k: int) -> tuple[list[str], list[float]]:
    # k distinct responses whose oracle scores are not all equal (an all-tie ranking teaches nothing)
    if k < 2:
        raise ValueError(f"need k >= 2 candidates per prompt, got {k}")
    prompt = format_prompt(letters)
    for _ in range(_MAX_TRIES):
        responses = [format_answer(letters[::-1])] if rng.random() < P_CORRECT else []
        while len(responses) < k:
            cand = _candidate(letters, rng)
            if cand not in responses:
                responses.append(cand)
        rng.shuffle(responses)  # random listing order: ranks/ratings say which is best
        scores = [oracle_score(prompt, r) for r in responses]
        if len(set(scores)) > 1:
            return responses, scores
    raise ValueError(f"could not draw {k} distinct candidates with differing scores for {prompt!r}")


def _draw(
    kind: str, n: int, seed: int, min_len: int, max_len: int, exclude: Collection[str]
) -> Iterator[tuple[list[str], random.Random]]:
    # n prompts' letters and the stream that drew them; a stream per kind: SFT/pair prompts differ
    rng = random.Random(f"synthetic/{kind}/{seed}")
    for _ in range(n):
        for _ in range(_MAX_TRIES):
            letters = [rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len))]
            if format_prompt(letters) not in exclude:
                break
        else:
            raise ValueError(f"could not draw a prompt outside `exclude` in {_MAX_TRIES} tries")
        yield letters, rng


def make_prompts(
    n: int, seed: int, *, min_len: int = 3, max_len: int = 6, exclude: Collection[str] = ()
) -> list[dict]:
    """``n`` rows ``{"prompt", "target"}`` (target: the correct completion, for reference only)."""
    draws = _draw("prompts", n, seed, min_len, max_len, exclude)
    return [{"prompt": format_prompt(x), "target": format_answer(x[::-1])} for x, _ in draws]


def make_demonstrations(
    n: int, seed: int, copy_prob: float = 0.25, error_rate: float = 0.1,
    *, min_len: int = 3, max_len: int = 6, exclude: Collection[str] = (),
) -> list[dict]:
    """``n`` imperfect demonstrations ``{"prompt", "completion"}`` from ``noisy_response``."""
    return [
        {"prompt": format_prompt(x), "completion": noisy_response(x, rng, copy_prob, error_rate)}
        for x, rng in _draw("sft", n, seed, min_len, max_len, exclude)
    ]


def make_pairs(
    n: int, seed: int, label_noise: float = 0.1,
    *, min_len: int = 3, max_len: int = 6, exclude: Collection[str] = (),
) -> list[dict]:
    """``n`` comparisons ``{"prompt", "chosen", "rejected"}`` whose oracle scores always differ.

    One candidate is the exact answer with prob. ``P_CORRECT``, else a random-skill noisy answer; the
    other is always noisy. Chosen = higher oracle score, then swapped with prob. ``label_noise`` (drawn
    from a separate stream, so changing ``label_noise`` flips rows and changes nothing else).
    """
    noise_rng = random.Random(f"synthetic/pairs-noise/{seed}")
    rows = []
    for letters, rng in _draw("pairs", n, seed, min_len, max_len, exclude):
        prompt = format_prompt(letters)
        for _ in range(_MAX_TRIES):
            a = format_answer(letters[::-1]) if rng.random() < P_CORRECT else _candidate(letters, rng)
            b = _candidate(letters, rng)
            if oracle_score(prompt, a) != oracle_score(prompt, b):
                break
        chosen, rejected = (a, b) if oracle_score(prompt, a) > oracle_score(prompt, b) else (b, a)
        if noise_rng.random() < label_noise:
            chosen, rejected = rejected, chosen
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def make_rankings(
    n: int, seed: int, k: int = 4, label_noise: float = 0.0,
    *, min_len: int = 3, max_len: int = 6, exclude: Collection[str] = (),
) -> list[dict]:
    """``n`` K-wise rankings ``{"prompt", "responses": [k str], "ranks": [k int]}``; rank 0 = best.

    rank = number of candidates with a strictly higher oracle score (ties share a rank; never all tie).
    With prob. ``label_noise`` two random responses swap ranks (separate stream, as in ``make_pairs``).
    """
    noise_rng = random.Random(f"synthetic/rankings-noise/{seed}")
    rows = []
    for letters, rng in _draw("rankings", n, seed, min_len, max_len, exclude):
        responses, scores = _candidates(letters, rng, k)
        ranks = [sum(other > s for other in scores) for s in scores]
        i, j = noise_rng.sample(range(k), 2)
        if noise_rng.random() < label_noise:
            ranks[i], ranks[j] = ranks[j], ranks[i]
        rows.append({"prompt": format_prompt(letters), "responses": responses, "ranks": ranks})
    return rows


def make_ratings(
    n: int, seed: int, k: int = 4, *, min_len: int = 3, max_len: int = 6, exclude: Collection[str] = ()
) -> list[dict]:
    """``n`` rows ``{"prompt", "responses": [k str], "ratings": [k int]}``, rating = round(1 + 6 * score)
    on a 1-7 Likert scale (Python's round: halves go to the even integer; ties happen)."""
    rows = []
    for letters, rng in _draw("ratings", n, seed, min_len, max_len, exclude):
        responses, scores = _candidates(letters, rng, k)
        ratings = [round(1 + 6 * s) for s in scores]
        rows.append({"prompt": format_prompt(letters), "responses": responses, "ratings": ratings})
    return rows


def write_task(
    out_dir: str | os.PathLike, n_train: int = 2000, n_val: int = 200, seed: int = 0
) -> dict[str, Path]:
    """Write ``{sft,pairs,rankings,prompts}_{train,val}.jsonl`` to ``out_dir``; return paths by stem.
    Val uses seed ``seed + VAL_SEED_OFFSET`` and no val prompt appears in any train file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    makers = dict(sft=make_demonstrations, pairs=make_pairs, rankings=make_rankings, prompts=make_prompts)
    data = {f"{name}_train": make(n_train, seed) for name, make in makers.items()}
    seen = frozenset(row["prompt"] for rows in data.values() for row in rows)
    for name, make in makers.items():
        data[f"{name}_val"] = make(n_val, seed + VAL_SEED_OFFSET, exclude=seen)
    paths = {name: out / f"{name}.jsonl" for name in sorted(data)}
    for name, path in paths.items():
        write_jsonl(path, data[name])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic letter-reversal task as jsonl files.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_task(args.out_dir, args.n_train, args.n_val, args.seed).items():
        print(f"{name}\t{path}")


if __name__ == "__main__":
    main()
