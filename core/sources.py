"""Files, saved datasets and hub ids -> (where, row) pairs; what cannot be read -> DataError naming file and line."""

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
_UNDECODED = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as errors="surrogateescape" reads it


class DataError(ValueError):
    """str(): "{where}: {reason} ({detail})"; reason has no row-specific values (skip mode counts by it)."""
    def __init__(self, where: str, reason: str = "", detail: str = ""):  # cls(message) works too (pickle)
        self.where, self.reason, self.detail = where, reason, detail
        super().__init__((f"{where}: {reason}" + (f" ({detail})" if detail else "")) if reason else where)


def looks_local(path: str) -> bool:
    """./x, /x, ~/x, a/b/c, or a/b where folder a exists here: a path, never a hub id (name or org/name)."""
    head = path.split("/")[0]
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or ("/" in path and Path(head).is_dir())


def source_rows(source: str, split: str) -> Iterator[tuple[str, Any]]:
    """(where, item): a row dict, or what stands in a row's place (a DataError when it cannot be read)."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        if not any((path / name).is_file() for name in ("dataset_dict.json", "state.json")):
            raise DataError(source, "a folder, not a data file or a dataset saved with save_to_disk",
                            f"name one {', '.join(FILE_TYPES)} file in it")
        yield from _saved_rows(source, path, split)
    elif path.is_file() and suffix == ".parquet":
        yield from _parquet_rows(source, path)
    elif path.is_file() and suffix in FILE_TYPES:
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            yield from (_csv_rows if suffix == ".csv" else _json_rows)(source, f)
    elif path.exists():
        raise DataError(source, "unsupported file type", f"use {', '.join(FILE_TYPES)} or a saved dataset")
    elif suffix in FILE_TYPES or looks_local(source):
        raise DataError(source, "no such file or folder")
    else:
        import datasets
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:  # offline, unknown id, unknown split: all end here
            raise DataError(source, "no such local file or folder, and the Hugging Face hub can't load it",
                            f"{type(e).__name__}: {str(e)[:300]}") from e
        yield from ((f"{source}[{split}] row {i}", row) for i, row in enumerate(ds, 1))


def _saved_rows(source: str, path: Path, split: str) -> Iterator[tuple[str, Any]]:
    import datasets
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(source, f"no split '{split}'", f"splits: {', '.join(ds)}")
        ds, source = ds[split], f"{source}[{split}]"
    yield from ((f"{source} row {i}", row) for i, row in enumerate(ds, 1))


def _parquet_rows(source: str, path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                n += 1
                yield f"{source} row {n}", row
    except (pa.ArrowException, OSError) as e:  # text named .parquet, an empty or cut-off file
        raise DataError(source, "not a readable Parquet file", str(e).split(". ")[0]) from e


def _not_utf8(source: str, line: int, text: str) -> DataError | None:
    """The first byte of text (which starts at `line` of source) that is not UTF-8, named by line and column."""
    if (bad := _UNDECODED.search(text)) is None:
        return None
    i, newline = bad.start(), "\n"
    return DataError(f"{source}:{line + text.count(newline, 0, i)}", "not UTF-8 text",
                     f"byte 0x{ord(bad.group()) - 0xDC00:02x} at column {i - text.rfind(newline, 0, i)}; "
                     "save the file as UTF-8")


def _json_rows(source: str, f) -> Iterator[tuple[str, Any]]:
    if source.lower().endswith(".json") and f.read(4096).lstrip().startswith("["):  # a top-level list
        f.seek(0)
        text = f.read()
        if err := _not_utf8(source, 1, text):
            raise err
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}:{e.lineno}", "invalid JSON", f"{e.msg} at column {e.colno}") from e
        yield from ((f"{source}[{i}]", item) for i, item in enumerate(items))
        return
    f.seek(0)
    for n, line in enumerate(f, 1):  # JSON lines; blank lines are skipped but still counted
        line = line.rstrip("\r\n").removeprefix("\ufeff")  # a BOM on a later line: files joined with cat
        if line.strip():
            yield f"{source}:{n}", _not_utf8(source, n, line) or _json_value(f"{source}:{n}", line)


def _json_value(where: str, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:  # e.colno would count a cut-off line's end as column 1 of a next line
        at = f"at column {e.pos + 1}" if e.pos < len(line) else "at the end of the line"
        return DataError(where, "invalid JSON", f"{e.msg} {at}")


def _csv_rows(source: str, f) -> Iterator[tuple[str, Any]]:
    undecodable = []  # DataErrors of the lines read for the current row

    def lines() -> Iterator[str]:
        for n, line in enumerate(f, 1):
            if err := _not_utf8(source, n, line):
                undecodable.append(err)
            yield line

    reader = csv.reader(lines())
    header, start = next(reader, None), reader.line_num + 1
    if undecodable:
        raise undecodable[0]
    repeated = sorted({name for name in header or [] if header.count(name) > 1})
    if repeated:  # dict(zip(...)) would keep the last such column and drop the others unseen
        raise DataError(f"{source}:1", "repeated column name in the header", ", ".join(map(repr, repeated)))
    for row in reader:  # a quoted field may span lines: `where` is the line the row starts on
        where, start = f"{source}:{start}", reader.line_num + 1
        if undecodable:
            yield where, undecodable[0]
            undecodable.clear()
        elif row and len(row) != len(header):
            yield where, DataError(where, "wrong number of columns", f"{len(row)}, header has {len(header)}")
        elif row:  # blank lines are skipped
            yield where, dict(zip(header, row))
