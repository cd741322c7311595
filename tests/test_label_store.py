"""labelapp.store: the SQLite settings, tokens, queue import, assignment, append-only labels, validation;
`rlhf label add-annotator` and `serve` errors through the `rlhf` command's exit codes."""

import hashlib
import json
import sqlite3

import pytest

from core.sources import DataError
from datamodules.labelling import item_id
from labelapp.store import ClientIdReused, InvalidLabel, Store, read_queue, validate_label
from recipes.cli import main as rlhf


def write_queue(path, groups):
    """groups: [(prompt, [responses])] -> queue rows as datamodules.labelling writes them."""
    rows = [{"id": item_id(p, r), "prompt": p, "responses": r, "kind": "pair" if len(r) == 2 else "ranking",
             "meta": {}} for p, r in groups]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return rows


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "l.sqlite")
    write_queue(tmp_path / "q.jsonl", [("P0", ["a", "b"]), ("P1", ["c", "d", "e"]), ("P2", ["f", "g"])])
    store.import_items(read_queue(tmp_path / "q.jsonl"))
    return store


PAIR = {"chosen": 1, "strength": "better", "unsafe": [False, True]}


def test_wal_full_sync_and_hashed_tokens(tmp_path, store):
    token = store.add_annotator("ana")
    db = sqlite3.connect(tmp_path / "l.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    stored = db.execute("SELECT token_sha256 FROM annotators").fetchone()[0]
    assert stored == hashlib.sha256(token.encode()).hexdigest() and token not in stored
    assert store.annotator(token) == {"id": 1, "name": "ana", "admin": False}
    assert store.annotator(token + "x") is None
    with store._connect() as conn:
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with pytest.raises(ValueError, match="exists"):
        store.add_annotator("ana")


def test_next_item_respects_overlap_and_queue_order(store):
    a, b, c = (store.annotator(store.add_annotator(n))["id"] for n in "abc")
    first = store.next_item(a, overlap=2)
    assert first["prompt"] == "P0" and store.next_item(a, overlap=2) == first  # assigned, not labelled: again
    assert store.next_item(b, overlap=2)["prompt"] == "P0"  # overlap 2: the same item to a second annotator
    assert store.next_item(c, overlap=2)["prompt"] == "P1"  # P0 has its 2 annotators
    store.add_label(a, first["id"], "c1", PAIR)
    assert store.next_item(a, overlap=2)["prompt"] == "P1"
    assert store.progress(a) == {"labelled": 1, "total": 3}


def test_labels_are_appended_latest_counts_and_a_retry_stores_nothing(store):
    a = store.annotator(store.add_annotator("a"))["id"]
    pair = store.next_item(a, 1)["id"]
    assert store.add_label(a, pair, "c1", PAIR) == (1, False)
    assert store.add_label(a, pair, "c1", PAIR) == (1, True)  # a double click: the first label_id
    assert store.count_labels() == 1
    with pytest.raises(ClientIdReused):  # the same client_id for another label: never silently dropped
        store.add_label(a, pair, "c1", {**PAIR, "chosen": 0})
    assert store.add_label(a, pair, "c2", {**PAIR, "chosen": 0}) == (2, False)
    [latest] = store.latest_labels(a)
    assert latest["label_id"] == 2 and latest["payload"]["chosen"] == 0 and store.count_labels() == 2


def test_reimporting_a_rewritten_queue_keeps_labels(tmp_path, store):
    a = store.annotator(store.add_annotator("a"))["id"]
    old = store.next_item(a, 1)["id"]
    store.add_label(a, old, "c1", PAIR)
    write_queue(tmp_path / "q2.jsonl", [("P9", ["x", "y"]), ("P2", ["f", "g"])])
    assert store.import_items(read_queue(tmp_path / "q2.jsonl")) == {"items": 2, "new": 1}
    assert store.progress(a) == {"labelled": 0, "total": 2}  # P0 left the queue ...
    assert [label["item_id"] for label in store.latest_labels(a)] == [old]  # ... its label did not
    assert store.next_item(a, 1)["prompt"] == "P9"


@pytest.mark.parametrize("line, reason", [
    ('{"id": "x", "prompt": "p", "responses": ["a"]}', "responses is not a list of 2 or more strings"),
    ('{"id": "x", "prompt": "p", "responses": ["a", "b"], "kind": "ranking"}', "kind does not match"),
    ('{"prompt": "p", "responses": ["a", "b"]}', "queue row without a field"),
    ('{"id": "x", "prompt": "p"', "invalid JSON"),
    ('["x"]', "row is not a JSON object"),
])
def test_bad_queue_rows_name_file_and_line(tmp_path, line, reason):
    queue = tmp_path / "q.jsonl"
    queue.write_text('{"id": "ok", "prompt": "p", "responses": ["a", "b"]}\n' + line + "\n")
    with pytest.raises(DataError, match=f"{queue}:2: {reason}"):
        read_queue(queue)


def test_a_known_id_with_other_content_is_refused(tmp_path, store):
    rows = read_queue(tmp_path / "q.jsonl")
    where, item = rows[0]
    with pytest.raises(DataError, match=f"{where}: id already in the database"):
        store.import_items([(where, {**item, "responses": ["a", "changed"]})])
    assert store.progress(0)["total"] == 3  # rolled back: the old queue is still served


@pytest.mark.parametrize("kind, body, reason", [
    ("pair", {**PAIR}, "missing client_id"),
    ("pair", {**PAIR, "client_id": ""}, "missing client_id"),
    ("pair", {**PAIR, "client_id": "c", "chosen": 2}, "chosen must be 0 or 1"),
    ("pair", {**PAIR, "client_id": "c", "chosen": True}, "chosen must be 0 or 1"),
    ("pair", {**PAIR, "client_id": "c", "strength": "much better"}, "unknown strength"),
    ("pair", {**PAIR, "client_id": "c", "unsafe": [False]}, "unsafe must be a list of 2 booleans"),
    ("pair", {"client_id": "c", "chosen": 0, "strength": "better"}, "missing field 'unsafe'"),
    ("pair", {**PAIR, "client_id": "c", "ranks": [0, 1]}, "ranks: not a field of a pair label"),
    ("pair", {**PAIR, "client_id": "c", "note": "x"}, "unknown field 'note'"),
    ("ranking", {**PAIR, "client_id": "c"}, "not a field of a ranking label"),
    ("ranking", {"client_id": "c", "ranks": [0, 0, 1], "ratings": [1, 2, 3], "flags": [[], [], []]}, "permutation"),
    ("ranking", {"client_id": "c", "ranks": [0, 1], "ratings": [1, 2, 3], "flags": [[], [], []]}, "list of 3"),
    ("ranking", {"client_id": "c", "ranks": [0, 1, 2], "ratings": [1, 8, 3], "flags": [[], [], []]}, "1..7"),
    ("ranking", {"client_id": "c", "ranks": [0, 1, 2], "ratings": [1, 2.5, 3], "flags": [[], [], []]}, "1..7"),
    ("ranking", {"client_id": "c", "ranks": [0, 1, 2], "ratings": [1, 2, 3], "flags": [[], ["rude"], []]},
     "unknown flag 'rude'"),
    ("ranking", {"client_id": "c", "ranks": [0, 1, 2], "ratings": [1, 2, 3], "flags": [[], [], "harmful"]},
     "flags\\[2\\] must be a list"),
])
def test_invalid_labels_say_why(kind, body, reason):
    with pytest.raises(InvalidLabel, match=reason):
        validate_label(kind, 2 if kind == "pair" else 3, body)


def test_valid_labels_keep_only_their_fields():
    body = {"item_id": "i", "client_id": "c", "ranks": [2, 0, 1], "ratings": [1, 7, 4], "flags": [["harmful"], [], []]}
    assert validate_label("ranking", 3, body) == ("c", {"ranks": [2, 0, 1], "ratings": [1, 7, 4],
                                                        "flags": [["harmful"], [], []]})


def test_cli_add_annotator_prints_only_the_token_and_refuses_a_taken_name(tmp_path, capsys):
    db = tmp_path / "l.sqlite"
    assert rlhf(["label", "add-annotator", "ana", "--db", str(db), "--admin"]) == 0
    token = capsys.readouterr().out
    assert token.endswith("\n") and len(token.strip().splitlines()) == 1
    assert Store(db).annotator(token.strip())["admin"] is True
    with pytest.raises(SystemExit) as exit_:
        rlhf(["label", "add-annotator", "ana", "--db", str(db)])
    assert exit_.value.code == 2 and "'ana' exists" in capsys.readouterr().err


def test_cli_serve_with_a_bad_queue_row_exits_3_naming_the_line(tmp_path, capsys):
    queue = tmp_path / "q.jsonl"
    queue.write_text('{"id": "ok", "prompt": "p", "responses": ["a", "b"]}\n{"id": "x", "prompt": "p", '
                     '"responses": "ab"}\n')
    assert rlhf(["label", "serve", "--queue", str(queue), "--db", str(tmp_path / "l.sqlite")]) == 3
    assert f"{queue}:2: responses is not a list of 2 or more strings" in capsys.readouterr().err
