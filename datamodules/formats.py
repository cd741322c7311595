"""Rows -> canonical records; a bad row -> DataError naming file and line. Files: sources; pairs: preference_formats."""

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from core.sources import DataError, source_rows

Messages = list[dict]  # [{"role": "system" | "user" | "assistant", "content": str}, ...]
Text = str | Messages
_TURN = re.compile(r"\n\n(Human|Assistant):")  # an HH-RLHF turn marker; "Assistant:" mid-line is text
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Demonstration:
    prompt: Text
    completion: str
    where: str


@dataclass(frozen=True)
class PromptRecord:
    prompt: Text
    where: str
    meta: dict = field(default_factory=dict)  # the row's other columns, e.g. {"target": "42"}


class ReadResult(list):
    """The records (this list), `skipped`: skip mode's count of bad rows per reason, `total`: rows seen."""
    def __init__(self, records: list, skipped: Counter, total: int):
        super().__init__(records)
        self.skipped, self.total = skipped, total


def _as_row(where: str, item: Any) -> dict:
    if isinstance(item, DataError):
        raise item
    if not isinstance(item, dict):
        raise DataError(where, "row is not a JSON object", f"got {type(item).__name__}")
    return item


def iter_rows(source: str, split: str = "train") -> Iterator[tuple[str, dict]]:
    """(where, row) from a .jsonl/.json/.csv/.parquet file, saved dataset or hub id; bad row: DataError."""
    yield from ((where, _as_row(where, item)) for where, item in source_rows(source, split))


def read_records(source: str, parse: Callable[[dict, str], Any], split: str = "train",
                 skip_bad_rows: bool = False) -> ReadResult:
    """parse(row, where) for every row. Strict: the first bad row raises. Skip: count, log a summary."""
    records, skipped, total = [], Counter(), 0
    for where, item in source_rows(source, split):
        total += 1
        try:
            records.append(parse(_as_row(where, item), where))
        except DataError as err:
            if not skip_bad_rows:
                raise
            skipped[err.reason] += 1
    why = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
    if not records:
        raise DataError(source, "no usable rows", f"{total} rows" + (f": {why}" if why else ""))
    if skipped:
        log.warning(f"skipped {total - len(records)} of {total} rows in {source}: {why}")
    return ReadResult(records, skipped, total)


def has(row: dict, key: str) -> bool:
    return row.get(key) is not None  # datasets/parquet fill a row's absent columns with None


def no_shape(row: dict, where: str, expected: str, keys: tuple[str, ...]) -> DataError:
    """The error for a row that matches no shape: name a null expected field before listing the keys."""
    null = [k for k in keys if k in row and row[k] is None]
    if null:
        return DataError(where, f"field '{null[0]}' is null", expected)
    return DataError(where, expected, f"got {', '.join(row)}")


def text_field(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        raise DataError(where, f"field '{key}' is null" if key in row else f"missing field '{key}'")
    if not isinstance(value, str):
        raise DataError(where, f"field '{key}' is not a string", f"got {type(value).__name__}")
    if not value.strip():
        raise DataError(where, f"empty field '{key}'")
    return value


def messages_field(value: Any, key: str, where: str) -> Messages:
    """A non-empty list of {role, content} dicts, copied with only those two keys."""
    if not isinstance(value, list | tuple):
        raise DataError(where, f"field '{key}' is not a list of messages", f"got {type(value).__name__}")
    if not value:
        raise DataError(where, f"empty field '{key}'")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise DataError(where, f"bad message in field '{key}'",
                            f"item {i} is not {{'role': system|user|assistant, 'content': str}}: {m!s:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def prompt_field(row: dict, where: str, key: str = "prompt") -> Text:
    value = row.get(key)
    is_list = isinstance(value, list | tuple)
    return messages_field(value, key, where) if is_list else text_field(row, key, where)


def assistant_reply(messages: Messages, key: str, where: str) -> tuple[Messages, str]:
    if messages[-1]["role"] != "assistant":
        raise DataError(where, f"last message in '{key}' is not from the assistant", messages[-1]["role"])
    if not messages[-1]["content"].strip():
        raise DataError(where, f"empty assistant reply in '{key}'")
    return messages[:-1], messages[-1]["content"]


def split_hh(text: str, where: str, allow_empty: bool = False) -> tuple[str, str]:
    """"\\n\\nHuman: Hi\\n\\nAssistant: Sure." -> ("\\n\\nHuman: Hi\\n\\nAssistant:", " Sure."), by turns.

    allow_empty keeps a blank last reply (a few HH-RLHF pairs prefer the assistant saying nothing).
    """
    turns = list(_TURN.finditer(text))
    if not turns or turns[-1].group(1) != "Assistant":  # the last turn must be the Assistant's
        reason = "conversation ends with a Human turn" if "\n\nAssistant:" in text else "no Assistant turn"
        raise DataError(where, reason)
    prompt, completion = text[: turns[-1].end()], text[turns[-1].end() :]
    if not completion.strip() and not allow_empty:
        raise DataError(where, "empty completion after the last Assistant turn")
    return prompt, completion


def _demonstration(row: dict, where: str) -> Demonstration:
    if has(row, "messages"):
        messages = messages_field(row["messages"], "messages", where)
        earlier, reply = assistant_reply(messages, "messages", where)
        if not earlier:
            raise DataError(where, "no prompt before the assistant reply in 'messages'")
        return Demonstration(earlier, reply, where)
    if has(row, "prompt"):
        key = "response" if has(row, "response") and not has(row, "completion") else "completion"
        return Demonstration(prompt_field(row, where), text_field(row, key, where), where)
    if has(row, "chosen"):
        return Demonstration(*split_hh(text_field(row, "chosen", where), where), where)
    raise no_shape(row, where, "expected fields prompt+completion, messages, or chosen",
                   ("prompt", "messages", "chosen"))


def read_demonstrations(source: str, split: str = "train", skip_bad_rows: bool = False) -> ReadResult:
    """SFT rows: prompt+completion (or response), chat messages ending in an assistant reply, or HH chosen."""
    return read_records(source, _demonstration, split, skip_bad_rows)


def _prompt_record(row: dict, where: str) -> PromptRecord:
    if has(row, "prompt"):
        key, prompt = "prompt", prompt_field(row, where)
    elif has(row, "chosen"):
        key, prompt = "chosen", split_hh(text_field(row, "chosen", where), where, allow_empty=True)[0]
    else:
        raise no_shape(row, where, "expected field prompt or chosen", ("prompt", "chosen"))
    return PromptRecord(prompt, where, {k: v for k, v in row.items() if k != key})


def read_prompts(source: str, split: str = "train", skip_bad_rows: bool = False) -> ReadResult:
    """Generation prompts: prompt (string or messages) or an HH chosen's prompt; meta = the other columns."""
    return read_records(source, _prompt_record, split, skip_bad_rows)
