"""SQLite storage of the labelling app: annotators, queue items, assignments, labels; queue and label validation.

Durability: WAL journal with synchronous=FULL, so a commit is on disk (the WAL fsynced) before it returns, and a
killed server loses no acknowledged label. Every call opens its own connection; writes take a process lock and
`BEGIN IMMEDIATE` (the database's write lock), so two annotators never both take an item's last free slot.
Labels are only ever appended: a new label for an item supersedes the annotator's earlier one (the latest counts).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from core.sources import DataError

SCHEMA = """
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_sha256 TEXT NOT NULL UNIQUE,
    admin INTEGER NOT NULL DEFAULT 0, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (  -- position: order in the queue last served; NULL: no longer in it
    id TEXT PRIMARY KEY, position INTEGER UNIQUE, prompt TEXT NOT NULL, responses TEXT NOT NULL,
    kind TEXT NOT NULL, meta TEXT NOT NULL, added TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    item_id TEXT NOT NULL REFERENCES items(id), annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    assigned TEXT NOT NULL, PRIMARY KEY (item_id, annotator_id));
CREATE TABLE IF NOT EXISTS labels (  -- append-only
    id INTEGER PRIMARY KEY AUTOINCREMENT, annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    item_id TEXT NOT NULL REFERENCES items(id), client_id TEXT NOT NULL, payload TEXT NOT NULL,
    created TEXT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS labels_client ON labels (annotator_id, client_id);
CREATE INDEX IF NOT EXISTS labels_item ON labels (annotator_id, item_id);
"""
STRENGTHS = ("significantly better", "better", "slightly better", "negligibly better", "unsure")
FLAGS = ("fails_instruction", "harmful", "made_up_facts", "inappropriate")
RATINGS = (1, 7)  # InstructGPT's Likert scale
FIELDS = {"pair": ("chosen", "strength", "unsafe"), "ranking": ("ranks", "ratings", "flags")}
NAME = re.compile(r"[\w.@-]{1,64}")
MAX_CLIENT_ID = 200


class InvalidLabel(ValueError):
    """A label body that cannot be stored; str() is the reason the API returns with 422."""


class ClientIdReused(ValueError):
    """A client_id this annotator already used for a different label (not a retry of the same one)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def canonical(payload: dict) -> str:
    return json.dumps(payload, sort_keys=True, ensure_ascii=False)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_label(kind: str, k: int, body: dict) -> tuple[str, dict]:
    """A POST /api/labels body for an item of `kind` with k responses -> (client_id, payload); else InvalidLabel."""
    client_id = body.get("client_id")
    if not isinstance(client_id, str) or not client_id.strip():
        raise InvalidLabel("missing client_id: a non-empty string per submission (a retry sends the same one)")
    if len(client_id) > MAX_CLIENT_ID:
        raise InvalidLabel(f"client_id longer than {MAX_CLIENT_ID} characters")
    other = FIELDS["ranking" if kind == "pair" else "pair"]
    wrong = [key for key in body if key in other]
    if wrong:
        raise InvalidLabel(f"{', '.join(wrong)}: not a field of a {kind} label (fields: {', '.join(FIELDS[kind])})")
    unknown = [key for key in body if key not in ("item_id", "client_id", *FIELDS[kind])]
    if unknown:
        raise InvalidLabel(f"unknown field {unknown[0]!r} (fields of a {kind} label: {', '.join(FIELDS[kind])})")
    missing = [key for key in FIELDS[kind] if key not in body]
    if missing:
        raise InvalidLabel(f"missing field {missing[0]!r}")
    payload = {key: body[key] for key in FIELDS[kind]}
    if kind == "pair":
        if not _is_int(payload["chosen"]) or payload["chosen"] not in (0, 1):
            raise InvalidLabel(f"chosen must be 0 or 1, got {payload['chosen']!r}")
        if payload["strength"] not in STRENGTHS:
            raise InvalidLabel(f"unknown strength {payload['strength']!r}; known: {', '.join(STRENGTHS)}")
        unsafe = payload["unsafe"]
        if not isinstance(unsafe, list) or len(unsafe) != 2 or not all(isinstance(u, bool) for u in unsafe):
            raise InvalidLabel(f"unsafe must be a list of 2 booleans, got {unsafe!r}")
        return client_id, payload
    ranks, ratings, flags = payload["ranks"], payload["ratings"], payload["flags"]
    for key, value in payload.items():
        if not isinstance(value, list) or len(value) != k:
            raise InvalidLabel(f"{key} must be a list of {k} entries, one per response, got {value!r}")
    if not all(_is_int(r) for r in ranks) or sorted(ranks) != list(range(k)):
        raise InvalidLabel(f"ranks must be a permutation of 0..{k - 1} (0 = best), got {ranks!r}")
    low, high = RATINGS
    if not all(_is_int(r) and low <= r <= high for r in ratings):
        raise InvalidLabel(f"ratings must be integers {low}..{high}, got {ratings!r}")
    for i, item_flags in enumerate(flags):
        if not isinstance(item_flags, list) or len(set(map(str, item_flags))) != len(item_flags):
            raise InvalidLabel(f"flags[{i}] must be a list of distinct flags, got {item_flags!r}")
        bad = [f for f in item_flags if f not in FLAGS]
        if bad:
            raise InvalidLabel(f"unknown flag {bad[0]!r} in flags[{i}]; known: {', '.join(FLAGS)}")
    return client_id, payload


def label_ranks(kind: str, payload: dict) -> list[int]:
    """A stored payload -> ranks of the item's responses (0 = best); a pair's from `chosen`."""
    if kind == "pair":
        return [0, 1] if payload["chosen"] == 0 else [1, 0]
    return list(payload["ranks"])


def read_queue(path: str | Path) -> list[tuple[str, dict]]:
    """The queue file (docs/labelling-queue.md) -> [(file:line, item)]; a bad row: DataError naming its line."""
    from datamodules.formats import iter_rows

    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "no such queue file",
                        "write one with python -m datamodules.labelling --labeller human")
    rows, seen = [], {}
    for where, row in iter_rows(str(path)):
        item = queue_item(row, where)
        if item["id"] in seen:
            if seen[item["id"]] != item:
                raise DataError(where, "duplicate id with different content", f"{item['id']!r}")
            continue
        seen[item["id"]] = item
        rows.append((where, item))
    if not rows:
        raise DataError(str(path), "empty queue", "no items to label")
    return rows


def queue_item(row: dict, where: str) -> dict:
    """One queue row -> {id, prompt, responses, kind, meta}, checked."""
    missing = [key for key in ("id", "prompt", "responses") if key not in row]
    if missing:
        raise DataError(where, "queue row without a field", f"missing {missing[0]!r}; keys: {', '.join(row)}")
    if not isinstance(row["id"], str) or not row["id"].strip():
        raise DataError(where, "id is not a non-empty string", f"got {row['id']!r}")
    if not isinstance(row["prompt"], str):
        raise DataError(where, "prompt is not a string", f"got {type(row['prompt']).__name__}")
    responses = row["responses"]
    if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
        raise DataError(where, "responses is not a list of 2 or more strings", f"got {responses!r:.80}")
    kind = "pair" if len(responses) == 2 else "ranking"
    if row.get("kind", kind) != kind:
        raise DataError(where, "kind does not match the number of responses",
                        f"kind {row.get('kind')!r} with {len(responses)} responses (pair: 2, ranking: 3 or more)")
    meta = row.get("meta") or {}
    if not isinstance(meta, dict):
        raise DataError(where, "meta is not a JSON object", f"got {type(meta).__name__}")
    return {"id": row["id"], "prompt": row["prompt"], "responses": responses, "kind": kind, "meta": meta}


def _item(row: sqlite3.Row) -> dict:
    return {"id": row["id"], "kind": row["kind"], "prompt": row["prompt"], "responses": json.loads(row["responses"]),
            "meta": json.loads(row["meta"]), "queued": row["position"] is not None}  # in the queue last served


class Store:
    """The labelling database at `path` (created with its schema when missing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]  # persistent: stays set in the file
            if mode != "wal":
                raise RuntimeError(f"{self.path}: SQLite could not switch to WAL mode (got {mode})")
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=FULL")  # per connection: the WAL is fsynced at every commit
            db.execute("PRAGMA foreign_keys=ON")
            yield db
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed (on disk) when the block ends, rolled back if it raises."""
        with self._lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # annotators
    def add_annotator(self, name: str, admin: bool = False) -> str:
        """A new annotator -> their token (shown once; only its sha256 is stored). ValueError: bad or taken name."""
        if not NAME.fullmatch(name):
            raise ValueError(f"annotator name {name!r}: 1-64 letters, digits, '.', '_', '-' or '@'")
        token = secrets.token_urlsafe(24)
        try:
            with self._write() as db:
                db.execute("INSERT INTO annotators (name, token_sha256, admin, created) VALUES (?, ?, ?, ?)",
                           (name, hash_token(token), int(admin), now()))
        except sqlite3.IntegrityError:
            raise ValueError(f"annotator {name!r} exists in {self.path}") from None
        return token

    def annotator(self, token: str) -> dict | None:
        """The annotator holding `token`: {id, name, admin}, or None."""
        with self._connect() as db:
            row = db.execute("SELECT id, name, admin FROM annotators WHERE token_sha256 = ?",
                             (hash_token(token),)).fetchone()
        return None if row is None else {"id": row["id"], "name": row["name"], "admin": bool(row["admin"])}

    def annotator_names(self) -> list[str]:
        with self._connect() as db:
            return [r[0] for r in db.execute("SELECT name FROM annotators ORDER BY id")]

    # items
    def import_items(self, rows: list[tuple[str, dict]]) -> dict:
        """Queue rows (read_queue) become the served items, in this order; items of an earlier queue and their
        labels stay (out of the queue). An id known with other content: DataError at its line, nothing changed."""
        with self._write() as db:
            db.execute("UPDATE items SET position = NULL")
            new = 0
            for position, (where, item) in enumerate(rows):
                old = db.execute("SELECT * FROM items WHERE id = ?", (item["id"],)).fetchone()
                if old is None:
                    db.execute("INSERT INTO items (id, position, prompt, responses, kind, meta, added) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (item["id"], position, item["prompt"], json.dumps(item["responses"]), item["kind"],
                                json.dumps(item["meta"], default=str), now()))
                    new += 1
                elif (old["prompt"], json.loads(old["responses"])) != (item["prompt"], item["responses"]):
                    raise DataError(where, "id already in the database with another prompt or responses",
                                    f"{item['id']!r} in {self.path}: labels given to it would change meaning")
                else:
                    db.execute("UPDATE items SET position = ? WHERE id = ?", (position, item["id"]))
        return {"items": len(rows), "new": new}

    def item(self, item_id: str) -> dict | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        return None if row is None else _item(row)

    def items(self) -> dict[str, dict]:
        """Every item ever served, by id, queue order first."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM items ORDER BY position IS NULL, position, rowid").fetchall()
        return {row["id"]: _item(row) for row in rows}

    def is_assigned(self, item_id: str, annotator_id: int) -> bool:
        with self._connect() as db:
            return db.execute("SELECT 1 FROM assignments WHERE item_id = ? AND annotator_id = ?",
                              (item_id, annotator_id)).fetchone() is not None

    def progress(self, annotator_id: int) -> dict:
        """{labelled: items of the queue this annotator labelled, total: items in the queue}."""
        with self._connect() as db:
            labelled = db.execute("SELECT COUNT(DISTINCT l.item_id) FROM labels l JOIN items i ON i.id = l.item_id "
                                  "WHERE l.annotator_id = ? AND i.position IS NOT NULL", (annotator_id,)).fetchone()[0]
            total = db.execute("SELECT COUNT(*) FROM items WHERE position IS NOT NULL").fetchone()[0]
        return {"labelled": labelled, "total": total}

    def next_item(self, annotator_id: int, overlap: int) -> dict | None:
        """The first queue item assigned to this annotator and not labelled by them, else the first with fewer than
        `overlap` assignees (assigned to them in the same transaction), else None."""
        with self._write() as db:
            row = db.execute(
                "SELECT i.* FROM items i JOIN assignments s ON s.item_id = i.id AND s.annotator_id = :a "
                "WHERE i.position IS NOT NULL AND NOT EXISTS "
                "(SELECT 1 FROM labels l WHERE l.annotator_id = :a AND l.item_id = i.id) ORDER BY i.position LIMIT 1",
                {"a": annotator_id}).fetchone()
            if row is None:
                row = db.execute(
                    "SELECT i.* FROM items i WHERE i.position IS NOT NULL AND NOT EXISTS "
                    "(SELECT 1 FROM assignments s WHERE s.item_id = i.id AND s.annotator_id = :a) AND "
                    "(SELECT COUNT(*) FROM assignments s WHERE s.item_id = i.id) < :overlap "
                    "ORDER BY i.position LIMIT 1", {"a": annotator_id, "overlap": overlap}).fetchone()
                if row is not None:
                    db.execute("INSERT INTO assignments (item_id, annotator_id, assigned) VALUES (?, ?, ?)",
                               (row["id"], annotator_id, now()))
        return None if row is None else _item(row)

    # labels
    def add_label(self, annotator_id: int, item_id: str, client_id: str, payload: dict) -> tuple[int, bool]:
        """Append a label, committed on return -> (label_id, duplicate). The same client_id again with the same
        item and payload (a retry) stores nothing and gives the first label_id, duplicate True; with another item
        or payload: ClientIdReused (a page bug that would otherwise drop a label silently)."""
        text = canonical(payload)
        with self._write() as db:
            try:
                cursor = db.execute("INSERT INTO labels (annotator_id, item_id, client_id, payload, created) "
                                    "VALUES (?, ?, ?, ?, ?)", (annotator_id, item_id, client_id, text, now()))
                return cursor.lastrowid, False
            except sqlite3.IntegrityError:  # UNIQUE (annotator_id, client_id): a retry
                first = db.execute("SELECT id, item_id, payload FROM labels WHERE annotator_id = ? AND client_id = ?",
                                   (annotator_id, client_id)).fetchone()
                if first is None:
                    raise
        if (first["item_id"], first["payload"]) != (item_id, text):
            raise ClientIdReused(f"client_id {client_id!r} was used for another label ({first['id']}, item "
                                 f"{first['item_id']}): send a new client_id per submission")
        return first["id"], True

    def latest_labels(self, annotator_id: int | None = None, item_id: str | None = None) -> list[dict]:
        """The latest label per (item, annotator), queue order then annotator name:
        {label_id, item_id, annotator, client_id, created, payload}."""
        where, args = [], []
        if annotator_id is not None:
            where.append("l.annotator_id = ?")
            args.append(annotator_id)
        if item_id is not None:
            where.append("l.item_id = ?")
            args.append(item_id)
        sql = ("SELECT l.id, l.item_id, l.client_id, l.payload, l.created, a.name FROM labels l "
               "JOIN annotators a ON a.id = l.annotator_id JOIN items i ON i.id = l.item_id "
               "WHERE l.id IN (SELECT MAX(id) FROM labels GROUP BY annotator_id, item_id)"
               + "".join(f" AND {w}" for w in where) + " ORDER BY i.position IS NULL, i.position, i.rowid, a.name")
        with self._connect() as db:
            rows = db.execute(sql, args).fetchall()
        return [{"label_id": r["id"], "item_id": r["item_id"], "annotator": r["name"], "client_id": r["client_id"],
                 "created": r["created"], "payload": json.loads(r["payload"])} for r in rows]

    def count_labels(self) -> int:
        """Every stored label row (superseded ones included)."""
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
