"""Prompt + completion -> token ids from one tokenization, shared by the SFT and preference DataModules; prompts alone
for generation (`predict`, `rlhf generate`)."""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Sequence

from core.sources import DataError

TRUNCATION = ("error", "left", "skip")
log = logging.getLogger(__name__)


class Cuts:
    """Rows over a length limit under `truncation`: "left" cuts them, "skip" drops them, "error" raises
    DataError naming the first. Counts per reason, with the first row's where, for one report per file."""

    def __init__(self, truncation: str = "left"):
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation must be one of {', '.join(TRUNCATION)}, got {truncation!r}")
        self.truncation, self.counts, self.first = truncation, Counter(), {}

    def keep(self, where: str, reason: str, side: str, before: int, after: int) -> bool:
        """A row whose `before` tokens would be cut to `after` (from `side`): keep it cut (True) or drop it."""
        if self.truncation == "error":
            raise DataError(where, reason, f"{before - after} of {before} tokens would be cut {side}; "
                                           "truncation='error'")
        self.counts[reason] += 1
        self.first.setdefault(reason, f"{where}, {before} -> {after} tokens, cut {side}")
        return self.truncation == "left"

    def report(self, total: int, noun: str) -> None:
        verb = "truncated" if self.truncation == "left" else "skipped (truncation='skip')"
        for reason, n in self.counts.items():
            log.warning(f"{verb} {n} of {total} {noun}: {reason} (first: {self.first[reason]})")


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
    truncation: str = "left",
    aligned: bool = False,
    eos: bool = True,
    groups: Sequence[int] | None = None,
) -> list[tuple[list[int], list[int]] | None]:
    """(prompt_ids, completion_ids) per row, completion ending with EOS (eos=False: the text's tokens only, as a
    reward model is trained and scored); aligned: None for a dropped row.

    Prompt and prompt+completion are tokenized and the first must be a prefix of the second, so the
    completion tokens are exactly what the model sees after that prompt. Over max_length, the prompt is cut
    from the left, never below its last max_prompt_length tokens; then the completion is cut from the
    right (losing its EOS, if any); `truncation` (Cuts) decides whether such rows are cut, dropped or an error, and
    cuts are reported once per call. A row that breaks raises DataError naming it, or is skipped and counted.
    groups: sizes of runs of consecutive rows that share one prompt (a preference record's responses): their
    prompt is cut to one length, the one its longest completion leaves, so every response of a comparison answers
    the same context. A prompt that starts with BOS keeps it when cut (the cut is after it).
    """
    skipped: Counter = Counter()

    def bad(where: str, reason: str, detail: str = "") -> None:
        if not skip_bad_rows:
            raise DataError(where, reason, detail)
        skipped[reason] += 1

    end, cuts = [tokenizer.eos_token_id] if eos else [], Cuts(truncation)
    prompt_ids = _encode(tokenizer, list(prompts))
    full_ids = _encode(tokenizer, [p + c for p, c in zip(prompts, completions)])
    rows: list[tuple[list[int], list[int]] | None] = []
    for p, f, where in zip(prompt_ids, full_ids, wheres):
        rows.append(None)
        if f[: len(p)] != p:
            bad(where, "the prompt's tokens are not a prefix of prompt+completion's tokens", "a token merges "
                "across the boundary: end the prompt before whitespace or start the completion with a space")
            continue
        c = f[len(p) :] + end
        if not c:  # with eos an empty reply is EOS alone (an HH assistant that said nothing): kept
            bad(where, "empty completion after tokenization")
            continue
        rows[-1] = (p, c)
    # the prompt tokens each row keeps: never below max_prompt_length, more where the completion leaves room
    budgets = [None if r is None else max(max_length - len(r[1]), min(len(r[0]), max_prompt_length)) for r in rows]
    start = 0
    for size in groups or []:
        shared = [b for b in budgets[start : start + size] if b is not None]
        budgets[start : start + size] = [None if b is None else min(shared) for b in budgets[start : start + size]]
        start += size
    out = []
    for row, keep, where in zip(rows, budgets, wheres):
        out.append(None)
        if row is None:
            continue
        p, c = row
        if len(p) > keep and not cuts.keep(where, f"prompt longer than max_length {max_length} allows",
                                           "from the left", len(p), keep):
            continue
        p = cut_left(p, keep, tokenizer.bos_token_id)
        if len(p) >= max_length:  # only when max_prompt_length >= max_length (check_lengths forbids it)
            bad(where, "row too long to keep any completion token", f"max_length {max_length}")
            continue
        side = "from the right, with its EOS" if eos else "from the right"
        if len(p) + len(c) > max_length and not cuts.keep(
                where, f"completion longer than max_length {max_length} allows", side, len(c), max_length - len(p)):
            continue
        out[-1] = (p, c[: max_length - len(p)])
    if skipped:
        counts = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
        print(f"skipped {sum(skipped.values())} of {len(wheres)} rows at tokenization: {counts}", file=sys.stderr)
    cuts.report(len(wheres), "sequences")
    if not any(out):
        raise DataError(wheres[0].rsplit(":", 1)[0] if wheres else "data", "no usable rows after tokenization")
    return out if aligned else [x for x in out if x is not None]


def cut_left(ids: list[int], keep: int, bos_id: int | None) -> list[int]:
    """The last `keep` tokens of ids; a leading BOS stays in front (counted in `keep`): the model never saw a
    prompt without it."""
    if len(ids) <= keep:
        return ids
    if bos_id is not None and ids[0] == bos_id and keep > 1:
        return ids[:1] + ids[len(ids) - (keep - 1) :]
    return ids[len(ids) - keep :]


def pad_right(rows: list[list[int]], value: int, length: int | None = None) -> list[list[int]]:
    length = length or max(len(r) for r in rows)
    return [r + [value] * (length - len(r)) for r in rows]


def encode_prompts(records, tokenizer, max_prompt_length: int | None, truncation: str = "left",
                   limit_name: str = "max_prompt_length") -> list[dict]:
    """Records with .prompt and .where (and .meta, if they have one) -> {"input_ids", "prompt" (rendered text),
    "meta", "index" (the record's position)} as PromptDataModule encodes them: the chat template for messages, the
    tokenizer's special tokens (no BOS added to texts that start with it, as encode_completions); prompts over
    max_prompt_length are cut from the left, dropped or an error
    (`truncation`, Cuts), reported once."""
    texts = [render_prompt(r.prompt, tokenizer) for r in records]
    ids = _encode(tokenizer, texts)  # as training encodes them: no second BOS after a chat template's own
    cuts, n, rows = Cuts(truncation), max_prompt_length, []
    for index, (i, text, record) in enumerate(zip(ids, texts, records)):
        # cut from the left: the end of a conversation is what the response answers
        if n is not None and len(i) > n:
            if not cuts.keep(record.where, f"prompt longer than {limit_name} {n}", "from the left", len(i), n):
                continue
            i = cut_left(i, n, tokenizer.bos_token_id)
        rows.append({"input_ids": i, "prompt": text, "meta": dict(getattr(record, "meta", {})), "index": index})
    cuts.report(len(records), "prompts")
    return rows


def render_prompt(prompt: str | Sequence[dict[str, str]], tokenizer) -> str:
    """A string as is; messages via the tokenizer's chat template, else HH style ending "\\n\\nAssistant:"."""
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    system, text = "\n\n".join(m["content"] for m in prompt if m["role"] == "system"), ""
    for m in prompt:
        if m["role"] == "user":  # HH has no system turn: the system text opens the first human turn
            text, system = text + "\n\nHuman: " + (f"{system}\n\n" if system else "") + m["content"], ""
        elif m["role"] == "assistant":
            text += f"\n\nAssistant: {m['content']}"
    return (f"\n\nHuman: {system}" if system else "") + text + "\n\nAssistant:"
