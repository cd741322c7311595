"""Output folders we write (Hugging Face exports): a marker says they are ours, and only ours are replaced.

A folder is written whole to a sibling `<name>.tmp-<pid>`, the marker last, then swapped in with two renames
(`<name>` -> `<name>.old-<pid>`, tmp -> `<name>`). A kill between the renames leaves no `<name>`, a complete
tmp and an old: `recover` (run before every check and save) puts the newest complete one back and removes
the leftovers of dead processes. A folder without the marker is never replaced unless asked (overwrite).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MARKER = "lightning_rlhf.json"


class OutputExistsError(FileExistsError):
    """The output path holds something we did not write; str() is one line saying what to do."""


def is_ours(path: Path) -> bool:
    return (path / MARKER).is_file()


def config_hash(config: dict | None) -> str | None:
    if config is None:
        return None
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _leftovers(out: Path) -> list[tuple[str, int, Path]]:
    """(kind "tmp" | "old", pid, path) of swap leftovers next to `out` whose process is gone."""
    pattern = re.compile(re.escape(out.name) + r"\.(tmp|old)-(\d+)$")
    found = []
    if out.parent.is_dir():
        for p in out.parent.iterdir():
            m = pattern.match(p.name)
            if m and not _alive(int(m.group(2))):
                found.append((m.group(1), int(m.group(2)), p))
    return found


def recover(out: str | os.PathLike) -> list[str]:
    """Finish or undo a swap a killed process left half done; returns what was done, one line each.

    With `out` missing, a complete tmp (marker written, so every file before it was) is the newer model and
    goes in place; else an old one goes back. Leftovers no longer needed are deleted: they are ours by name.
    """
    out, done = Path(out), []
    left = _leftovers(out)
    if not out.exists():
        newest = [p for kind, _, p in sorted(left, key=lambda x: -x[1]) if kind == "tmp" and is_ours(p)]
        newest += [p for kind, _, p in sorted(left, key=lambda x: -x[1]) if kind == "old"]
        if newest:
            newest[0].rename(out)
            done.append(f"recovered {out} from {newest[0].name} (an earlier save was interrupted)")
    for _, _, p in left:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p} (left by an interrupted save)")
    return done


def check_writable(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise OutputExistsError unless `out` is free, an empty folder, or a folder we wrote (or overwrite)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is a file, not a model folder: choose another --model.save_dir")
    if out.is_dir() and not overwrite and not is_ours(out) and any(out.iterdir()):
        raise OutputExistsError(
            f"{out} exists and was not written by lightning-rlhf (no {MARKER}); nothing was changed: "
            "choose a new --model.save_dir, or pass --model.overwrite true to replace it"
        )
    return out


def write_dir(out: str | os.PathLike, write: Callable[[Path], None], info: dict, overwrite: bool = False) -> Path:
    """write(tmp) fills a fresh folder, then it replaces `out` (checked by check_writable) in one swap."""
    out = Path(out)
    for line in recover(out):
        print(line)
    check_writable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    marker = {"written_by": "lightning-rlhf", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
    (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")  # last: a tmp with it is complete
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    """One JSON line per row, written to a temp file and renamed over `path`: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, default=str) + "\n" for row in rows)  # e.g. a parquet timestamp in meta
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def settings_differ(saved: dict, now: dict) -> list[str]:
    """The keys whose values differ between the settings a file was written with and a run's (sorted)."""
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


def progress_path(out: str | os.PathLike) -> Path:
    """Where a tool writing `out` saves its finished units (a Journal): OUT.progress next to it."""
    out = Path(out)
    return out.with_name(out.name + ".progress")


class Journal:
    """A run's finished units of work, one JSON line each, next to its output, so a killed run continues.

    Line 1 is {"journal": kind, "settings": {...}}: what the saved work depends on. Then one
    {"key": [...], "value": ...} line per unit, flushed and fsynced as it finishes. `open()` reads what an
    earlier run left: with other settings it raises OutputExistsError naming them (the saved work is not this
    run's; nothing is changed), a line cut by a kill at the end is dropped, a bad line elsewhere is a DataError.
    The file is written with the first unit (a journal of other settings that saved no unit is replaced then);
    `remove()` deletes it once the output is written whole; a file whose first line is not a journal of this kind
    is never read past nor deleted.
    """

    def __init__(self, path: str | os.PathLike, kind: str, settings: dict):
        self.path, self.kind = Path(path), kind
        self.settings = json.loads(json.dumps(settings, default=str))  # as it reads back from the file
        self.units: dict[tuple, object] = {}
        self._file = None

    def open(self, restart: bool = False) -> int:
        """Load the units an earlier run saved (none when `restart` or none saved); returns how many."""
        from core.sources import DataError

        if not self.path.exists():
            return 0
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        header = _json_or_none(lines[0]) if lines else None
        if not (isinstance(header, dict) and header.get("journal") == self.kind):
            raise OutputExistsError(f"{self.path} exists and is not a {self.kind} progress file; nothing was "
                                    "changed: move it, or choose another --out")
        saved = header.get("settings") or {}
        differ = settings_differ(saved, self.settings)
        if restart or (differ and not any(map(_is_unit, lines[1:]))):  # discarded, or no finished unit to lose
            self.path.unlink()
            return 0
        if differ:
            raise OutputExistsError(
                f"{self.path} holds the progress of a run with other {', '.join(differ)}; nothing was "
                "changed: run again with those settings to continue it, or pass --restart to discard it")
        keep = lines[:1]
        for number, line in enumerate(lines[1:], 2):
            if not _is_unit(line):
                if number == len(lines):  # the last line, cut by a kill mid-write
                    break
                raise DataError(f"{self.path}:{number}", "not a progress line",
                                "the file is damaged: pass --restart to discard it")
            unit = json.loads(line)
            self.units[tuple(unit["key"])] = unit["value"]
            keep.append(line)
        if len(keep) < len(lines):
            self._replace("".join(keep))
        return len(self.units)

    def _replace(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path)

    def get(self, *key):
        """The saved value of unit `key`, or None."""
        return self.units.get(tuple(key))

    def put(self, key: tuple, value) -> None:
        """Save a finished unit (appended, flushed and fsynced before this returns)."""
        if self._file is None:
            if not self.path.exists():  # written with the first unit: a run that saved nothing leaves no file
                self._replace(json.dumps({"journal": self.kind, "settings": self.settings}) + "\n")
            self._file = self.path.open("a", encoding="utf-8")
        key = list(key)
        self._file.write(json.dumps({"key": key, "value": value}, default=str) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.units[tuple(key)] = json.loads(json.dumps(value, default=str))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        """Delete the journal (the output it was for is written whole)."""
        self.close()
        self.path.unlink(missing_ok=True)


def _is_unit(line: str) -> bool:
    """A whole journal line of one finished unit ({"key": [...], "value": ...}, newline-terminated)."""
    unit = _json_or_none(line) if line.endswith("\n") else None
    return isinstance(unit, dict) and isinstance(unit.get("key"), list) and "value" in unit


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def files_stamp(path: str | os.PathLike) -> list | str:
    """What a model path's files are now: [name, size, mtime_ns] of a file, or of each file in a folder (sorted, not
    recursing), so a journal notices a model retrained in place; the path itself when it is not local."""
    p = Path(path).expanduser()
    if p.is_file():
        st = p.stat()
        return [[p.name, st.st_size, st.st_mtime_ns]]
    if p.is_dir():
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(p.iterdir()) if f.is_file()]
    return str(path)
