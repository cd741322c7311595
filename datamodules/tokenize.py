"""Prompt + completion -> token ids from one tokenization, shared by the SFT and preference DataModules."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence

from datamodules.formats import DataError

IGNORE_INDEX = -100


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")


def completion_text(prompt, completion: str, tokenizer) -> str:
    """Chat messages rendered HH style (no chat template) end with "Assistant:"; the reply follows after a
    space, as in HH-RLHF, so it is not glued to the colon."""
    hh_rendered = not isinstance(prompt, str) and not getattr(tokenizer, "chat_template", None)
    return " " + completion if hh_rendered and not completion[:1].isspace() else completion


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # text from a chat template that writes BOS itself must not get a second one from the tokenizer
    bos = tokenizer.bos_token
    add = not (bos and texts and all(t.startswith(bos) for t in texts))
    return tokenizer(texts, add_special_tokens=add)["input_ids"]


def encode_completions(
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    wheres: Sequence[str],
    max_length: int,
    max_prompt_length: int,
    skip_bad_rows: bool = False,
) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, completion_ids) per row, completion ending with EOS.

    Prompt and prompt+completion are tokenized and the first must be a prefix of the second, so the
    completion tokens are exactly what the model sees after that prompt. Over max_length, the prompt is cut
    from the left, never below its last max_prompt_length tokens; then the completion is cut from the
    right (losing its EOS). A row that breaks raises DataError naming it, or is skipped and counted.
    """
    skipped: Counter = Counter()

    def bad(where: str, reason: str, detail: str = "") -> None:
        if not skip_bad_rows:
            raise DataError(where, reason, detail)
        skipped[reason] += 1

    eos = tokenizer.eos_token_id
    prompt_ids = _encode(tokenizer, list(prompts))
    full_ids = _encode(tokenizer, [p + c for p, c in zip(prompts, completions)])
    out = []
    for p, f, where in zip(prompt_ids, full_ids, wheres):
        if f[: len(p)] != p:
            bad(where, "the prompt's tokens are not a prefix of prompt+completion's tokens", "a token merges "
                "across the boundary: end the prompt before whitespace or start the completion with a space")
            continue
        c = f[len(p) :] + [eos]
        if len(c) == 1:
            bad(where, "empty completion after tokenization")
            continue
        if len(p) + len(c) > max_length:
            keep = max(max_length - len(c), min(len(p), max_prompt_length))
            p = p[len(p) - keep :]
            c = c[: max_length - len(p)]
        if not c:
            bad(where, "row too long to keep any completion token", f"max_length {max_length}")
            continue
        out.append((p, c))
    if skipped:
        counts = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
        print(f"skipped {sum(skipped.values())} of {len(wheres)} rows at tokenization: {counts}", file=sys.stderr)
    if not out:
        raise DataError(wheres[0].rsplit(":", 1)[0] if wheres else "data", "no usable rows after tokenization")
    return out


def pad_right(rows: list[list[int]], value: int, length: int | None = None) -> list[list[int]]:
    length = length or max(len(r) for r in rows)
    return [r + [value] * (length - len(r)) for r in rows]
