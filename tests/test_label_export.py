"""labelapp.export: the four formats (each read back by the stage that uses it), agreement by hand, and an export
that trains `rlhf reward fit`."""

import json
import sys

import pytest

from datamodules.labelling import read_labels
from datamodules.preference_formats import read_preferences
from labelapp.export import agreement, export_rows, krippendorff_alpha_nominal, pairwise_agreement
from labelapp.store import Store, read_queue
from recipes.cli import main as rlhf
from tests.conftest import ROOT, SYNTHETIC
from tests.test_label_store import write_queue


def pair(chosen, strength="better", unsafe=(False, False)):
    return {"chosen": chosen, "strength": strength, "unsafe": list(unsafe)}


def ranking(ranks, ratings=(4, 4, 4)):
    return {"ranks": list(ranks), "ratings": list(ratings), "flags": [[] for _ in ranks]}


@pytest.fixture
def labelled(tmp_path):
    """P0 (pair): a and b choose 0; P1 (ranking): a [0, 1, 2], b [1, 0, 2]; P2 (pair): a 0, b 1, c 0."""
    db = tmp_path / "l.sqlite"
    store = Store(db)
    rows = write_queue(tmp_path / "q.jsonl", [("P0", ["a0", "a1"]), ("P1", ["b0", "b1", "b2"]), ("P2", ["c0", "c1"])])
    store.import_items(read_queue(tmp_path / "q.jsonl"))
    ids = {name: store.annotator(store.add_annotator(name))["id"] for name in "abc"}
    p0, p1, p2 = (row["id"] for row in rows)
    labels = {"a": {p0: pair(0, "significantly better"), p1: ranking([0, 1, 2], (7, 5, 1)),
                    p2: pair(0, "unsure", (False, True))},
              "b": {p0: pair(0, "slightly better"), p1: ranking([1, 0, 2], (3, 3, 3)), p2: pair(1)},
              "c": {p2: pair(0, "negligibly better")}}
    for name, by_item in labels.items():
        for n, (item, payload) in enumerate(by_item.items()):
            store.add_label(ids[name], item, f"{name}{n}", payload)
    store.add_label(ids["a"], p0, "late", pair(1, "better"))  # a changes their mind: the latest counts ...
    store.add_label(ids["a"], p0, "later", pair(0, "significantly better"))  # ... and changes it back
    return store, db, rows


def test_pairs_rankings_ratings_and_labels_rows(labelled):
    store, _, rows = labelled
    p0, p1, p2 = (row["id"] for row in rows)
    pairs, left_out = export_rows(store, "pairs")
    assert not left_out and pairs == [
        {"prompt": "P0", "chosen": "a0", "rejected": "a1", "strength": "significantly better",
         "unsafe": False, "annotator": "a", "id": p0},
        {"prompt": "P0", "chosen": "a0", "rejected": "a1", "strength": "slightly better",
         "unsafe": False, "annotator": "b", "id": p0},
        {"prompt": "P2", "chosen": "c0", "rejected": "c1", "strength": "unsure", "unsafe": True,
         "annotator": "a", "id": p2},
        {"prompt": "P2", "chosen": "c1", "rejected": "c0", "strength": "better", "unsafe": False,
         "annotator": "b", "id": p2},
        {"prompt": "P2", "chosen": "c0", "rejected": "c1", "strength": "negligibly better",
         "unsafe": False, "annotator": "c", "id": p2}]
    rankings, _ = export_rows(store, "rankings")
    assert [(r["id"], r["annotator"], r["ranks"]) for r in rankings] == [
        (p0, "a", [0, 1]), (p0, "b", [0, 1]), (p1, "a", [0, 1, 2]), (p1, "b", [1, 0, 2]),
        (p2, "a", [0, 1]), (p2, "b", [1, 0]), (p2, "c", [0, 1])]
    ratings, left_out = export_rows(store, "ratings")
    assert ratings == [{"prompt": "P1", "responses": ["b0", "b1", "b2"], "ratings": [7, 5, 1], "annotator": "a",
                        "id": p1}]
    assert left_out == {"all responses tie: no pair": 1}  # b rated 3, 3, 3: the reward stage would refuse it
    labels, _ = export_rows(store, "labels")
    assert labels[3] == {"id": p1, "ranks": [1, 0, 2], "annotator": "b"} and len(labels) == 7


def test_pairs_carry_the_strength_so_the_trainers_strength_map_decides_the_margin(labelled):
    from datamodules.preference_formats import parse_preference

    pairs, _ = export_rows(labelled[0], "pairs")
    assert "margin" not in pairs[0]
    large = {"significantly better": 3.0, "better": 2.0, "slightly better": 1.0, "negligibly better": 0.0,
             "unsure": 0.0}  # Llama 2's larger margins
    assert parse_preference(pairs[0], "t").margin == 1.0  # the default map: Llama 2's 1, 2/3, 1/3, 0
    assert parse_preference(pairs[0], "t", strengths=large).margin == 3.0


def test_a_labels_export_holds_only_the_queue_last_served(labelled, tmp_path):
    """A second round's queue in the same database: the first round's items stay in it (exported in the other
    formats) but the labelling command reads a labels file against the current queue, so they are left out."""
    store, _, rows = labelled
    write_queue(tmp_path / "q2.jsonl", [("P1", ["b0", "b1", "b2"]), ("P3", ["d0", "d1"])])
    store.import_items(read_queue(tmp_path / "q2.jsonl"))
    labels, left_out = export_rows(store, "labels")
    assert {r["id"] for r in labels} == {rows[1]["id"]} and left_out == {"item not in the queue last served": 5}
    assert len(export_rows(store, "rankings")[0]) == 7  # every label is still exported as data


def test_agreement_by_hand(labelled):
    store, _, _ = labelled
    # units (response pairs of items with 2+ annotators) and the annotators' values, "i" = the first is better:
    #   P0 (0,1): a i, b i | P1 (0,1): a i, b j | P1 (0,2): i, i | P1 (1,2): i, i | P2 (0,1): a i, b j, c i
    # annotator pairs agreeing: 1 + 0 + 1 + 1 + 1 (a-c of 3 pairs) = 4 of 1 + 1 + 1 + 1 + 3 = 7
    # coincidences o_ck (ordered value pairs in a unit, weight 1 / (m_u - 1)):
    #   o_ii = 2 (P0) + 2 + 2 (P1 (0,2), (1,2)) + 2 * 1/2 (P2: a-c, c-a) = 7;
    #   o_ij = 1 (P1 (0,1)) + 2 * 1/2 (P2) = 2 = o_ji
    #   n_i = 7 + 2 = 9, n_j = 2, n = 11;  alpha = 1 - (n - 1) * (o_ij + o_ji) / (n_i n_j + n_j n_i)
    #                                             = 1 - 10 * 4 / 36 = -1/9
    assert agreement(store) == {"items": 3, "units": 5, "annotator_pairs": 7, "pairwise_agreement": 4 / 7,
                                "krippendorff_alpha": pytest.approx(-1 / 9)}


def test_alpha_edge_cases():
    assert krippendorff_alpha_nominal([["i", "i"], ["j", "j"]]) == 1.0  # o_ck = 0 off the diagonal
    assert krippendorff_alpha_nominal([["i", "i"], ["i", "i"]]) is None  # one value only: no expected disagreement
    assert krippendorff_alpha_nominal([["i"], ["j", "i"], ["i", "j"]]) == pytest.approx(1 - 3 * 4 / 8)  # n = 4
    assert pairwise_agreement([["i", "j", "j"]]) == (1, 3)


def test_cli_export_files_are_read_by_the_stages(labelled, tmp_path, capsys):
    store, db, rows = labelled
    for fmt in ("pairs", "rankings", "ratings"):
        out = tmp_path / f"{fmt}.jsonl"
        assert rlhf(["label", "export", "--db", str(db), "--format", fmt, "--out", str(out)]) == 0
        records = read_preferences(str(out))
        assert len(records) == {"pairs": 5, "rankings": 7, "ratings": 1}[fmt]
        assert json.loads(out.with_suffix(".agreement.json").read_text())["annotator_pairs"] == 7
        assert json.loads(capsys.readouterr().out)["pairwise_agreement"] == 4 / 7
    assert [r.margin for r in read_preferences(str(tmp_path / "pairs.jsonl"))] == [1.0, 1 / 3, 0.0, 2 / 3, 0.0]
    out = tmp_path / "round1.labels.jsonl"
    assert rlhf(["label", "export", "--db", str(db), "--format", "labels", "--out", str(out)]) == 0
    assert read_labels(out, [item for _, item in read_queue(tmp_path / "q.jsonl")]) == {
        rows[0]["id"]: [0, 1], rows[1]["id"]: [1, 0, 2], rows[2]["id"]: [0, 1]}  # the last row of an id counts


def test_export_without_overlap_writes_no_agreement(tmp_path, capsys):
    store = Store(tmp_path / "l.sqlite")
    write_queue(tmp_path / "q.jsonl", [("P0", ["x", "y"])])
    store.import_items(read_queue(tmp_path / "q.jsonl"))
    a = store.annotator(store.add_annotator("a"))["id"]
    store.add_label(a, store.next_item(a, 1)["id"], "c", pair(1))
    out = tmp_path / "p.jsonl"
    assert rlhf(["label", "export", "--db", str(tmp_path / "l.sqlite"), "--format", "pairs", "--out", str(out)]) == 0
    assert not out.with_suffix(".agreement.json").exists() and "no item is labelled by 2" in capsys.readouterr().err
    assert json.loads(out.read_text())["chosen"] == "y"


def test_exported_pairs_train_a_reward_model(tmp_path, monkeypatch):
    rows = [json.loads(line) for line in (SYNTHETIC / "pairs_train.jsonl").read_text().splitlines()[:24]]
    groups = [(r["prompt"], [r["rejected"], r["chosen"]] if n % 2 else [r["chosen"], r["rejected"]])
              for n, r in enumerate(rows)]
    write_queue(tmp_path / "q.jsonl", groups)
    store = Store(tmp_path / "l.sqlite")
    store.import_items(read_queue(tmp_path / "q.jsonl"))
    ann = store.annotator(store.add_annotator("a"))["id"]
    for n in range(len(rows)):
        store.add_label(ann, store.next_item(ann, 1)["id"], f"c{n}", pair(n % 2, ("better", "unsure")[n % 3 == 0]))
    out = tmp_path / "pairs.jsonl"
    assert rlhf(["label", "export", "--db", str(tmp_path / "l.sqlite"), "--format", "pairs", "--out", str(out)]) == 0
    assert [r["chosen"] for r in map(json.loads, out.read_text().splitlines())] == [r["chosen"] for r in rows]
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["rlhf"])
    assert rlhf(["reward", "fit", "--config", "configs/reward/tiny.yaml", "--data.train_file", str(out),
                 "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
                 f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--trainer.default_root_dir={tmp_path}",
                 f"--model.save_dir={tmp_path / 'hf'}"]) == 0
    assert (tmp_path / "hf").is_dir()


def test_kto_export_judges_single_responses(labelled, tmp_path, capsys):
    from datamodules.unpaired import read_judgements

    store, db, rows = labelled
    p0, p1, p2 = (row["id"] for row in rows)
    kto, left_out = export_rows(store, "kto")
    # pairs: chosen desirable, rejected undesirable; a's P2 choice is "unsure": both left out
    # rankings: ratings 5-7 desirable, 1-3 undesirable (a rated 7, 5, 1; b rated 3, 3, 3)
    assert [(r["id"], r["annotator"], r["completion"], r["label"]) for r in kto] == [
        (p0, "a", "a0", True), (p0, "a", "a1", False), (p0, "b", "a0", True), (p0, "b", "a1", False),
        (p1, "a", "b0", True), (p1, "a", "b1", True), (p1, "a", "b2", False),
        (p1, "b", "b0", False), (p1, "b", "b1", False), (p1, "b", "b2", False),
        (p2, "b", "c0", False), (p2, "b", "c1", True), (p2, "c", "c0", True), (p2, "c", "c1", False)]
    assert left_out == {"unsure pair choice": 2}
    assert kto[0] == {"prompt": "P0", "completion": "a0", "label": True, "annotator": "a", "id": p0, "response": 0}
    out = tmp_path / "kto.jsonl"
    assert rlhf(["label", "export", "--db", str(db), "--format", "kto", "--out", str(out)]) == 0
    assert [j.desirable for j in read_judgements(str(out))] == [r["label"] for r in kto]
    assert "left out: 2 unsure pair choice" in capsys.readouterr().err


def test_kto_rows_flags_and_neutral_ratings():
    from labelapp.export import kto_rows

    item = {"id": "x", "kind": "ranking", "prompt": "P", "responses": ["r0", "r1", "r2", "r3"]}
    label = {"annotator": "a", "payload": {"ranks": [0, 1, 2, 3], "ratings": [7, 4, 4, 2],
                                           "flags": [["made_up_facts"], [], ["harmful"], []]}}
    rows, left_out = kto_rows(item, label)
    # r0: rated 7 but flagged -> undesirable; r1: 4, no flag -> left out; r2: 4 and flagged -> undesirable; r3: 2
    assert [(r["completion"], r["label"]) for r in rows] == [("r0", False), ("r2", False), ("r3", False)]
    assert left_out == {"neutral rating (4) without flags": 1}
    pair = {"id": "y", "kind": "pair", "prompt": "P", "responses": ["a", "b"]}
    unsafe = {"annotator": "a", "payload": {"chosen": 0, "strength": "better", "unsafe": [True, False]}}
    assert [r["label"] for r in kto_rows(pair, unsafe)[0]] == [False, False]  # chosen but unsafe: undesirable
