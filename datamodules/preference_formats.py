"""Preference rows -> Ranking records: HH-RLHF pairs, prompt/chosen/rejected, K-wise rankings, ratings.

Pairs may carry a Llama 2 margin (https://arxiv.org/abs/2307.09288, eq. 2); rankings follow InstructGPT
(https://arxiv.org/abs/2203.02155, section 3.5: K = 4..9 responses per prompt, all C(K, 2) pairs scored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

from datamodules.formats import (
    DataError,
    ReadResult,
    Text,
    assistant_reply,
    has,
    messages_field,
    no_shape,
    prompt_field,
    read_records,
    split_hh,
    text_field,
)

# Llama 2's "small" margin per preference-strength label (Table 28); labels match case-insensitively
DEFAULT_STRENGTH_MARGINS = {
    "significantly better": 1.0,
    "better": 2 / 3,
    "slightly better": 1 / 3,
    "negligibly better": 0.0,
    "unsure": 0.0,
}
MAX_RESPONSES = 9  # InstructGPT shows labelers at most 9 responses to rank
SHAPES = "expected fields chosen+rejected, prompt+chosen+rejected, or prompt+responses"
RATING_SCALE = (1.0, 7.0)  # InstructGPT's 1-7 Likert scale of overall quality (arXiv 2203.02155)


@dataclass(frozen=True)
class Ranking:
    """2..9 responses to one prompt; ranks: 0 = best, equal = tie; a pair is (chosen, rejected), ranks (0, 1).

    margin: Llama 2 preference strength, only for pairs; 0.0 when absent.
    """

    prompt: Text
    responses: tuple[str, ...]
    ranks: tuple[float, ...]
    margin: float
    where: str


def as_number(value: Any, finite: bool = True) -> float | None:
    """A (finite) float from a number or a numeric string (csv cells), else None; bools are not numbers."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) or not finite else None


def dense_ranks(values: list[float]) -> tuple[float, ...]:
    """Rank = how many distinct values are lower: [2, 1, 1, 5] -> (1, 0, 0, 2). Lower value = better."""
    distinct = sorted(set(values))
    return tuple(float(distinct.index(v)) for v in values)


def _text_or_list(row: dict, key: str, where: str) -> str | list | tuple:
    """row[key] when it is a list (checked later as messages), else a non-blank string."""
    value = row.get(key)
    return value if isinstance(value, list | tuple) else text_field(row, key, where)


def _pair(row: dict, where: str) -> tuple[Text, tuple[str, str]]:
    chosen, rejected = _text_or_list(row, "chosen", where), _text_or_list(row, "rejected", where)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(where, "chosen and rejected mix a string and a message list")
    if isinstance(chosen, str) and row.get("prompt", "") is None and "\n\nAssistant:" not in chosen:
        raise no_shape(row, where, SHAPES, ("prompt",))
    if isinstance(chosen, str) and not has(row, "prompt"):  # HH-RLHF: two whole conversations
        prompt, chosen = split_hh(chosen, where, allow_empty=True)
        other, rejected = split_hh(rejected, where, allow_empty=True)
    elif isinstance(chosen, str):
        return prompt_field(row, where), (chosen, rejected)
    else:  # chat lists: the last message is the reply, the shared earlier ones the prompt
        prompt, chosen = assistant_reply(messages_field(chosen, "chosen", where), "chosen", where)
        other, rejected = assistant_reply(messages_field(rejected, "rejected", where), "rejected", where)
        if not prompt and not other:  # replies only: the prompt is the `prompt` field
            prompt = other = prompt_field(row, where)
    if prompt != other:
        detail = ""
        texts = (prompt, other) if isinstance(prompt, str) and isinstance(other, str) else None
        if texts and (prompt.startswith(other) or other.startswith(prompt)):
            turns = [text.count("\n\nAssistant:") for text in texts]  # one conversation goes on longer
            detail = (f"they share their first turns, then one goes on: chosen's prompt has {turns[0]} Assistant "
                      f"turn(s), rejected's {turns[1]}; --data.skip_bad_rows true leaves such rows out")
        raise DataError(where, "chosen and rejected do not share the prompt", detail)
    return prompt, (chosen, rejected)


def _responses(row: dict, where: str) -> list[str]:
    responses = row["responses"]
    if not isinstance(responses, list | tuple):
        raise DataError(where, "field 'responses' is not a list", f"got {type(responses).__name__}")
    if len(responses) < 2:
        raise DataError(where, "fewer than 2 responses", f"got {len(responses)}")
    if len(responses) > MAX_RESPONSES:
        raise DataError(where, f"more than {MAX_RESPONSES} responses (InstructGPT's maximum per prompt)",
                        f"got {len(responses)}")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise DataError(where, "response is not a string", f"responses[{i}] is {type(response).__name__}")
        if not response.strip():
            raise DataError(where, "empty response", f"responses[{i}]")
    return list(responses)


def _numbers(row: dict, key: str, count: int, where: str, finite: bool = True) -> list[float]:
    values = row[key]
    if not isinstance(values, list | tuple):
        raise DataError(where, f"field '{key}' is not a list", f"got {type(values).__name__}")
    if len(values) != count:
        detail = f"{len(values)} {key}, {count} responses"
        raise DataError(where, f"{key} and responses differ in length", detail)
    numbers = [as_number(v, finite) for v in values]
    if None in numbers:
        i = numbers.index(None)
        raise DataError(where, f"field '{key}' holds a non-number", f"{key}[{i}] = {values[i]!r}")
    return numbers


def _ratings(row: dict, count: int, where: str, scale: tuple[float, float]) -> list[float]:
    """Ratings within scale (NaN and +-inf are not): a typo such as 1e9 would otherwise dominate the ranks."""
    ratings = _numbers(row, "ratings", count, where, finite=False)
    outside = [i for i, r in enumerate(ratings) if not scale[0] <= r <= scale[1]]
    if outside:
        low, high = scale
        raise DataError(where, f"rating outside rating_scale [{low:g}, {high:g}]",
                        f"ratings[{outside[0]}] = {row['ratings'][outside[0]]!r}")
    return ratings


def _margin(row: dict, where: str, strengths: dict[str, float]) -> float | None:
    """The row's margin, from `margin` or a `strength` label; None when it has neither."""
    if row.get("margin") not in (None, ""):  # an empty csv cell means no margin
        margin = as_number(row["margin"])
        if margin is None:
            raise DataError(where, "field 'margin' is not a number", f"got {row['margin']!r}")
        return margin
    if row.get("strength") not in (None, ""):
        label = row["strength"]
        key = label.strip().lower() if isinstance(label, str) else label
        if key not in strengths:
            known = ", ".join(map(repr, strengths))
            raise DataError(where, "unknown strength label", f"{label!r}; known: {known}")
        return float(strengths[key])
    return None


def parse_preference(row: dict, where: str, strengths: dict = DEFAULT_STRENGTH_MARGINS,
                     rating_scale: tuple[float, float] = RATING_SCALE) -> Ranking:
    """One row -> Ranking; see read_preferences for the accepted shapes."""
    if has(row, "responses"):
        prompt, responses = prompt_field(row, where), _responses(row, where)
        if has(row, "ranks") and has(row, "ratings"):
            raise DataError(where, "both ranks and ratings given")
        if has(row, "ratings"):  # higher = better: rank = number of distinct higher ratings
            ranks = dense_ranks([-r for r in _ratings(row, len(responses), where, rating_scale)])
        elif has(row, "ranks"):  # lower = better, any scale: normalised to 0, 1, ... keeping ties
            ranks = dense_ranks(_numbers(row, "ranks", len(responses), where))
        else:  # listed best first
            ranks = tuple(float(i) for i in range(len(responses)))
        if len(set(ranks)) == 1:
            raise DataError(where, "all responses tie: no pair")
        if len(set(responses)) < len(responses):
            raise DataError(where, "identical responses")
    elif has(row, "chosen") or has(row, "rejected"):
        prompt, responses = _pair(row, where)
        ranks = (0.0, 1.0)
        if responses[0] == responses[1]:
            raise DataError(where, "chosen and rejected are identical")
    else:
        raise no_shape(row, where, SHAPES, ("prompt", "chosen", "rejected", "responses"))
    margin = _margin(row, where, strengths)
    if margin is not None and len(responses) > 2:
        raise DataError(where, "a margin is only defined for pairs", f"got {len(responses)} responses")
    return Ranking(prompt, tuple(responses), ranks, margin or 0.0, where)


def read_preferences(source: str, split: str = "train", skip_bad_rows: bool = False,
                     strength_map: dict[str, float] | None = None,
                     rating_scale: tuple[float, float] = RATING_SCALE) -> ReadResult:
    """Read preference rows into Ranking records (ReadResult: a list, plus skip counts).

    Row shapes, detected per row by their keys:
        chosen + rejected: HH-RLHF conversations; the shared prompt ends with the last "\\n\\nAssistant:".
        prompt + chosen + rejected: strings, or chat lists whose last message is the assistant reply (then the
            shared earlier messages are the prompt, and `prompt` is used only when there are none).
        prompt + responses [+ ranks | ratings]: 2..9 responses; ranks lower = better (ties allowed), ratings
            higher = better; with neither, responses are listed best first.
        Optional `margin` (number) or `strength` (label looked up in strength_map) on pairs.

    Args:
        source: a .jsonl/.json/.csv/.parquet file, a save_to_disk folder, or a hub dataset id.
        split: the split to read from a DatasetDict folder or a hub dataset.
        skip_bad_rows: skip and count bad rows instead of raising on the first one.
        strength_map: strength label -> margin; None uses DEFAULT_STRENGTH_MARGINS (Llama 2).
        rating_scale: (lowest, highest) valid rating; a rating outside it (or NaN, inf) is a bad row.
    """
    strengths = DEFAULT_STRENGTH_MARGINS if strength_map is None else strength_map
    strengths = {label.strip().lower(): float(margin) for label, margin in strengths.items()}
    if not rating_scale[0] < rating_scale[1]:
        raise ValueError(f"rating_scale must be (lowest, highest), got {rating_scale}")
    parse = partial(parse_preference, strengths=strengths, rating_scale=tuple(rating_scale))
    return read_records(source, parse, split, skip_bad_rows)
