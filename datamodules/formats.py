"""User data -> canonical records; a bad row -> DataError naming file and line. Pairs: preference_formats."""

import csv
import errno
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Messages = list[dict]  # [{"role": "system" | "user" | "assistant", "content": str}, ...]
Text = str | Messages
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
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


class DataError(ValueError):
    """str(): "{where}: {reason} ({detail})"; reason has no row-specific values (skip mode counts by it)."""
    def __init__(self, where: str, reason: str = "", detail: str = ""):  # cls(message) works too (pickle)
        self.where, self.reason, self.detail = where, reason, detail
        super().__init__((f"{where}: {reason}" + (f" ({detail})" if detail else "")) if reason else where)


class ReadResult(list):
    """The records (this list), `skipped`: skip mode's count of bad rows per reason, `total`: rows seen."""
    def __init__(self, records: list, skipped: Counter, total: int):
        super().__init__(records)
        self.skipped, self.total = skipped, total


def _rows(source: str, split: str) -> Iterator[tuple[str, Any]]:
    """(where, item): a row dict, or what stands in a row's place (a DataError when it cannot be read)."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        import datasets
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(source, f"no split '{split}'", f"splits: {', '.join(ds)}")
            ds, source = ds[split], f"{source}[{split}]"
        yield from ((f"{source} row {i}", row) for i, row in enumerate(ds, 1))
    elif path.is_file() and suffix == ".parquet":
        import pyarrow.parquet as pq
        rows = (row for batch in pq.ParquetFile(path).iter_batches() for row in batch.to_pylist())
        yield from ((f"{source} row {i}", row) for i, row in enumerate(rows, 1))
    elif path.is_file() and suffix in FILE_TYPES:
        with open(path, encoding="utf-8-sig", newline="") as f:
            yield from (_csv_rows if suffix == ".csv" else _json_rows)(source, f)
    elif path.exists():
        raise DataError(source, "unsupported file type", f"use {', '.join(FILE_TYPES)} or a saved dataset")
    elif suffix in FILE_TYPES or source.startswith((".", "/", "~")):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), source)
    else:
        import datasets
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:  # offline, unknown id, unknown split: all end here
            raise DataError(source, "no such local file or folder, and the Hugging Face hub can't load it",
                            f"{type(e).__name__}: {str(e)[:300]}") from e
        yield from ((f"{source}[{split}] row {i}", row) for i, row in enumerate(ds, 1))


def _json_rows(source: str, f) -> Iterator[tuple[str, Any]]:
    if source.lower().endswith(".json") and f.read(4096).lstrip().startswith("["):  # a top-level list
        f.seek(0)
        try:
            yield from ((f"{source}[{i}]", item) for i, item in enumerate(json.load(f)))
        except json.JSONDecodeError as e:
            raise DataError(f"{source}:{e.lineno}", "invalid JSON", f"{e.msg} at column {e.colno}") from e
        return
    f.seek(0)
    for n, line in enumerate(f, 1):  # JSON lines; blank lines are skipped but still counted
        if line.strip():
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                item = DataError(f"{source}:{n}", "invalid JSON", f"{e.msg} at column {e.colno}")
            yield f"{source}:{n}", item


def _csv_rows(source: str, f) -> Iterator[tuple[str, Any]]:
    reader = csv.reader(f)
    header, start = next(reader, None), reader.line_num + 1
    for row in reader:  # a quoted field may span lines: `where` is the line the row starts on
        where, start = f"{source}:{start}", reader.line_num + 1
        if row and len(row) != len(header):
            yield where, DataError(where, "wrong number of columns", f"{len(row)}, header has {len(header)}")
        elif row:  # blank lines are skipped
            yield where, dict(zip(header, row))


def _as_row(where: str, item: Any) -> dict:
    if isinstance(item, DataError):
        raise item
    if not isinstance(item, dict):
        raise DataError(where, "row is not a JSON object", f"got {type(item).__name__}")
    return item


def iter_rows(source: str, split: str = "train") -> Iterator[tuple[str, dict]]:
    """(where, row) from a .jsonl/.json/.csv/.parquet file, saved dataset or hub id; bad row: DataError."""
    yield from ((where, _as_row(where, item)) for where, item in _rows(source, split))


def read_records(source: str, parse: Callable[[dict, str], Any], split: str = "train",
                 skip_bad_rows: bool = False) -> ReadResult:
    """parse(row, where) for every row. Strict: the first bad row raises. Skip: count, log a summary."""
    records, skipped, total = [], Counter(), 0
    for where, item in _rows(source, split):
        total += 1
        try:
            records.append(parse(_as_row(where, item), where))
        except DataError as err:
            if not skip_bad_rows:
                raise
            skipped[err.reason] += 1
    why = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
    if not records:
        raise DataError(source, f"no usable rows in {source}", f"{total} rows" + (f": {why}" if why else ""))
    if skipped:
        log.warning(f"skipped {total - len(records)} of {total} rows in {source}: {why}")
    return ReadResult(records, skipped, total)


def has(row: dict, key: str) -> bool:
    return row.get(key) is not None  # datasets/parquet fill a row's absent columns with None


def text_field(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        raise DataError(where, f"missing field '{key}'")
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
    raise DataError(where, "expected fields prompt+completion, messages, or chosen", f"got {', '.join(row)}")


def read_demonstrations(source: str, split: str = "train", skip_bad_rows: bool = False) -> ReadResult:
    """SFT rows: prompt+completion (or response), chat messages ending in an assistant reply, or HH chosen."""
    return read_records(source, _demonstration, split, skip_bad_rows)


def _prompt_record(row: dict, where: str) -> PromptRecord:
    if has(row, "prompt"):
        key, prompt = "prompt", prompt_field(row, where)
    elif has(row, "chosen"):
        key, prompt = "chosen", split_hh(text_field(row, "chosen", where), where, allow_empty=True)[0]
    else:
        raise DataError(where, "expected field prompt or chosen", f"got {', '.join(row)}")
    return PromptRecord(prompt, where, {k: v for k, v in row.items() if k != key})


def read_prompts(source: str, split: str = "train", skip_bad_rows: bool = False) -> ReadResult:
    """Generation prompts: prompt (string or messages) or an HH chosen's prompt; meta = the other columns."""
    return read_records(source, _prompt_record, split, skip_bad_rows)


def render_prompt(prompt: Text, tokenizer) -> str:
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
