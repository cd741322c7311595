"""Labelling fresh samples: generations grouped per prompt, ranks from scores by hand, a labeller's flips and
ties, the command that writes rankings the reward stage reads (added to the data so far), and human labelling
through a queue and a labels file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from core.tasks import format_prompt, oracle_reward
from datamodules.labelling import flip_two, group_generations, label_groups, main, ranks_from_scores


def _rows(prompt, index, responses):
    return [{"prompt": prompt, "response": r, "sample": s, "index": index, "meta": {}} for s, r in enumerate(responses)]


def test_generations_group_by_index_in_sample_order():
    rows = _rows("p1", 1, ["x", "y"]) + _rows("p0", 0, ["a", "b", "c"])
    rows[0], rows[1] = rows[1], rows[0]  # samples out of order within a prompt
    groups = group_generations(rows)
    assert [g["prompt"] for g in groups] == ["p0", "p1"]
    assert groups[0]["responses"] == ["a", "b", "c"] and groups[1]["responses"] == ["x", "y"]


def test_ranks_count_the_strictly_better_scores_and_share_ties():
    # scores 0.5, 0.9, 0.5, 0.1: 0.9 beats all (rank 0); each 0.5 is beaten by 0.9 only (rank 1); 0.1 by 3
    assert ranks_from_scores([0.5, 0.9, 0.5, 0.1]) == [1, 0, 1, 3]
    # tolerance 0.45: 0.9 is not above 0.5 + 0.45 = 0.95, so 0.5, 0.9 and 0.5 all rank 0; for 0.1 only 0.9 is
    # above 0.1 + 0.45 = 0.55 (the 0.5s are within the tolerance of it), so rank 1
    assert ranks_from_scores([0.5, 0.9, 0.5, 0.1], tie_tolerance=0.45) == [0, 0, 0, 1]


def test_flip_swaps_two_responses_of_different_rank():
    rng = random.Random(0)
    for _ in range(20):
        out = flip_two([0, 1, 1, 3], rng)
        assert sorted(out) == [0, 1, 1, 3] and out != [0, 1, 1, 3]
        changed = [i for i in range(4) if out[i] != [0, 1, 1, 3][i]]
        assert len(changed) == 2


def test_label_groups_with_the_oracle_drops_ties_and_counts_flips():
    letters = ["c", "a", "b"]
    prompt = format_prompt(letters)  # target " b a c"
    groups = [
        {"prompt": prompt, "responses": [" b a c", " c a b", " b a"], "meta": {}},  # oracle 1, 1/3, 2/3
        {"prompt": prompt, "responses": [" x", " y"], "meta": {}},  # both 0: all tied, left out
    ]
    rows, stats = label_groups(groups, oracle_reward)
    assert rows == [{"prompt": prompt, "responses": [" b a c", " c a b", " b a"], "ranks": [0, 2, 1]}]
    assert stats == {"groups": 2, "kept": 1, "all_tied": 1, "flipped": 0}
    flipped, stats = label_groups(groups, oracle_reward, flip=1.0, seed=3)
    assert stats["flipped"] == 1 and sorted(flipped[0]["ranks"]) == [0, 1, 2] and flipped[0]["ranks"] != [0, 2, 1]
    again, _ = label_groups(groups, oracle_reward, flip=1.0, seed=3)
    assert again == flipped  # the seed fixes the labeller's mistakes


def test_flip_share_is_about_the_asked_share():
    prompt = format_prompt(["a", "b"])
    groups = [{"prompt": prompt, "responses": [" b a", " a b"], "meta": {}}] * 1000
    _, stats = label_groups(groups, oracle_reward, flip=0.2, seed=1)
    assert 150 < stats["flipped"] < 250  # binomial(1000, 0.2): mean 200, sd 12.6


def test_bad_settings_and_a_short_judge_are_refused():
    groups = [{"prompt": "p", "responses": ["a", "b"], "meta": {}}]
    with pytest.raises(ValueError, match="flip"):
        label_groups(groups, oracle_reward, flip=1.5)
    with pytest.raises(ValueError, match="2 responses"):
        label_groups(groups, lambda p, r, m: [1.0])


def test_command_writes_rankings_the_reward_datamodule_reads(tmp_path, capsys):
    from datamodules.preference_formats import read_preferences

    prompt = format_prompt(["c", "a", "b"])
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in _rows(prompt, 0, [" b a c", " c a b", " b a"])))
    out = tmp_path / "rankings.jsonl"
    main([f"--samples={samples}", f"--out={out}", "--judge={oracle: synthetic}"])
    assert "labelled 1 of 1 prompts" in capsys.readouterr().out
    assert json.loads(out.read_text())["ranks"] == [0, 2, 1]
    records = read_preferences(str(out))
    assert len(records) == 1


def _samples(tmp_path, groups) -> Path:
    """groups: [(prompt, responses)] -> an `rlhf generate` file, prompt i at index i."""
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for i, (p, rs) in enumerate(groups) for r in _rows(p, i, rs)))
    return path


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_add_to_copies_the_rows_so_far_then_appends_the_new(tmp_path, capsys):
    prompt = format_prompt(["c", "a", "b"])
    samples = _samples(tmp_path, [(prompt, [" b a c", " c a b", " b a"])])
    old = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "responses": ["x", "y"], "ranks": [1, 0]}]
    previous = tmp_path / "round1.jsonl"
    previous.write_text(json.dumps(old[0]) + "\n\n" + json.dumps(old[1]) + "\n")  # a blank line is no row
    out = tmp_path / "round2.jsonl"
    main([f"--samples={samples}", f"--out={out}", f"--add_to={previous}"])
    assert [json.loads(line) for line in out.read_text().splitlines()] == old + [
        {"prompt": prompt, "responses": [" b a c", " c a b", " b a"], "ranks": [0, 2, 1]}]
    assert f"-> {out}: 2 rows of {previous} + 1 new rows" in capsys.readouterr().out


def test_a_bad_add_to_line_or_file_is_named(tmp_path):
    from datamodules.formats import DataError

    samples = _samples(tmp_path, [(format_prompt(["a", "b"]), [" b a", " a b"])])
    previous = tmp_path / "round1.jsonl"
    previous.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "q", \n')
    out = tmp_path / "round2.jsonl"
    with pytest.raises(DataError, match=f"{previous}:2: invalid JSON"):
        main([f"--samples={samples}", f"--out={out}", f"--add_to={previous}"])
    with pytest.raises(DataError, match="no such file"):
        main([f"--samples={samples}", f"--out={out}", f"--add_to={tmp_path / 'nope.jsonl'}"])
    assert not out.exists()
    with pytest.raises(SystemExit):  # argparse: a preference file to copy line for line is JSON lines
        main([f"--samples={samples}", f"--out={out}", f"--add_to={tmp_path / 'round1.csv'}"])


PAIR, TRIPLE = ("P0", ["a", "b"]), ("P1", ["x", "y", "z"])


def _id(prompt, responses):
    import hashlib

    return hashlib.sha256(json.dumps([prompt, responses]).encode()).hexdigest()[:16]


def test_human_mode_writes_the_queue_and_waits_for_labels(tmp_path, capsys):
    from recipes.cli import EXIT_CODES

    samples, out = _samples(tmp_path, [PAIR, TRIPLE]), tmp_path / "round1.jsonl"
    with pytest.raises(SystemExit) as exc:
        main([f"--samples={samples}", f"--out={out}", "--labeller=human"])
    assert exc.value.code == 7 == EXIT_CODES["LabelsPendingError"]
    queue, labels = tmp_path / "round1.queue.jsonl", tmp_path / "round1.labels.jsonl"
    assert capsys.readouterr().err == (f"waiting for labels: 0 of 2 items labelled (need 2); queue: {queue}; "
                                       f"labels: {labels}\n")
    assert not out.exists()
    items = [json.loads(line) for line in queue.read_text().splitlines()]
    assert items == [
        {"id": _id("P0", ["a", "b"]), "prompt": "P0", "responses": ["a", "b"], "kind": "pair", "meta": {}},
        {"id": _id("P1", ["x", "y", "z"]), "prompt": "P1", "responses": ["x", "y", "z"], "kind": "ranking", "meta": {}},
    ]
    # one of two labelled (the app is midway through writing a 2nd label: not read yet): --min_labelled 0.5 of 2
    # items = 1 is enough; the default (all) is not
    _write(labels, [{"id": items[1]["id"], "ranks": [2, 0, 1], "annotator": "ann"}])
    with labels.open("a") as f:
        f.write(json.dumps({"id": items[0]["id"], "chosen": 0})[:20])
    with pytest.raises(SystemExit) as exc:
        main([f"--samples={samples}", f"--out={out}", "--labeller=human"])
    assert exc.value.code == 7 and "waiting for labels: 1 of 2 items labelled (need 2)" in capsys.readouterr().err
    assert [json.loads(line) for line in queue.read_text().splitlines()] == items  # rewritten: the same ids
    main([f"--samples={samples}", f"--out={out}", "--labeller=human", "--min_labelled=0.5"])
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"prompt": "P1", "responses": ["x", "y", "z"], "ranks": [2, 0, 1]}]
    assert "1 of 2 items labelled by hand" in capsys.readouterr().out


def test_human_labels_become_rankings_pairs_by_chosen_and_the_last_label_counts(tmp_path, capsys):
    samples, out = _samples(tmp_path, [PAIR, TRIPLE]), tmp_path / "r.jsonl"
    queue, labels = tmp_path / "q.jsonl", tmp_path / "l.jsonl"
    previous = _write(tmp_path / "r0.jsonl", [{"prompt": "old", "chosen": "c", "rejected": "d"}])
    _write(labels, [{"id": _id(*TRIPLE), "ranks": [0, 0, 2]},
                    {"id": _id(*PAIR), "chosen": 0},
                    {"id": _id(*PAIR), "chosen": 1, "annotator": "second"}])  # the last label of P0 counts
    main([f"--samples={samples}", f"--out={out}", "--labeller=human", f"--queue={queue}", f"--labels={labels}",
          f"--add_to={previous}"])
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"prompt": "old", "chosen": "c", "rejected": "d"},
        {"prompt": "P0", "responses": ["a", "b"], "ranks": [1, 0]},  # chosen 1: b is better
        {"prompt": "P1", "responses": ["x", "y", "z"], "ranks": [0, 0, 2]},  # x and y tie for best
    ]
    assert queue.is_file() and "2 of 2 items labelled by hand" in capsys.readouterr().out
    # a label that ties all responses is labelled (nothing to wait for) but gives no pair: left out
    _write(labels, [{"id": _id(*TRIPLE), "ranks": [0, 0, 0]}, {"id": _id(*PAIR), "chosen": 0}])
    main([f"--samples={samples}", f"--out={out}", "--labeller=human", f"--queue={queue}", f"--labels={labels}"])
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"prompt": "P0", "responses": ["a", "b"], "ranks": [0, 1]}]
    assert "2 of 2 items labelled by hand (1 all tied" in capsys.readouterr().out


@pytest.mark.parametrize("label, says", [
    ({"id": "0123456789abcdef", "ranks": [0, 1]}, "unknown id"),
    ({"id": _id(*TRIPLE), "ranks": [0, 1]}, "ranks is not a list of one rank per response (got 2 ranks"),
    ({"id": _id(*TRIPLE), "ranks": [1, 2, 1]}, "invalid ranks ([1, 2, 1]: no response has rank 0"),
    ({"id": _id(*TRIPLE), "ranks": [0, 3, 1]}, "invalid ranks ([0, 3, 1]: 3 is not an integer in 0..2"),
    ({"id": _id(*TRIPLE), "chosen": 1}, "'chosen' labels a pair"),
    ({"id": _id(*PAIR), "chosen": 2}, "'chosen' is not 0 or 1"),
    ({"id": _id(*PAIR)}, "exactly one of 'ranks' and 'chosen'"),
    ('{"id": "x", ', "invalid JSON"),  # not the last line: a broken line, not one being written
])
def test_a_bad_label_is_named_by_file_and_line(tmp_path, label, says):
    from datamodules.formats import DataError

    samples, out, labels = _samples(tmp_path, [PAIR, TRIPLE]), tmp_path / "r.jsonl", tmp_path / "r.labels.jsonl"
    labels.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                              for r in [{"id": _id(*PAIR), "chosen": 0}, label, {"id": _id(*PAIR), "chosen": 1}]))
    with pytest.raises(DataError) as exc:
        main([f"--samples={samples}", f"--out={out}", "--labeller=human"])
    assert str(exc.value).startswith(f"{labels}:2: ") and says in str(exc.value)
    assert not out.exists() and (tmp_path / "r.queue.jsonl").is_file()


def test_min_labelled_is_a_share_or_a_count():
    from datamodules.labelling import labels_needed

    assert labels_needed(1.0, 7) == 7
    assert labels_needed(0.3, 10) == 3  # 0.3 * 10 = 3 (3.0000000000000004 in floats)
    assert labels_needed(0.5, 3) == 2  # 1.5 rounded up
    assert labels_needed(0.0, 3) == 0
    assert labels_needed(4, 10) == 4  # above 1: a count


@pytest.mark.parametrize("extra, says", [
    (["--labeller=human", "--flip=0.1"], "--flip: for --labeller judge or ai only"),
    (["--labeller=human", "--tie_tolerance=0.1"], "--tie_tolerance: for --labeller judge or ai only"),
    (["--queue=q.jsonl"], "--queue: for --labeller human only"),
    (["--labeller=human", "--min_labelled=2.5"], "a whole count above 1, got 2.5"),
    (["--labeller=human", "--min_labelled=3"], "asks for more items than the queue's 2"),
])
def test_options_of_the_other_labeller_are_refused(tmp_path, capsys, extra, says):
    samples, out = _samples(tmp_path, [PAIR, TRIPLE]), tmp_path / "r.jsonl"
    with pytest.raises(SystemExit) as exc:
        main([f"--samples={samples}", f"--out={out}", *extra])
    assert exc.value.code == 2 and says in capsys.readouterr().err and not out.exists()


def test_a_response_sampled_twice_is_ranked_once_blanks_and_a_prompt_of_one_text_are_left_out():
    """The reward data refuses identical responses in a group (datamodules/preference_formats.py): samples of a
    peaked policy repeat, so the labeller keeps the distinct texts, in sample order."""
    rows = _rows("p0", 0, ["a", "b", "a", " ", "c"]) + _rows("p1", 1, ["x", "x", ""])  # blank: refused as well
    groups = group_generations(rows)
    assert [g["responses"] for g in groups] == [["a", "b", "c"], ["x"]] and [g["samples"] for g in groups] == [5, 3]
    scores = {"a": 0.2, "b": 0.9, "c": 0.5, "x": 0.3}
    out, stats = label_groups(groups, lambda prompts, responses, metas: [scores[r] for r in responses])
    # p0: b (0.9) beats a and c -> 0; c (0.5) beaten by b -> 1; a (0.2) beaten by both -> 2. p1: one text, no pair
    assert out == [{"prompt": "p0", "responses": ["a", "b", "c"], "ranks": [2, 0, 1]}]
    assert stats == {"groups": 2, "kept": 1, "all_tied": 1, "flipped": 0}
    from datamodules.labelling import queue_items

    assert [item["responses"] for item in queue_items(groups, "s.jsonl")] == [["a", "b", "c"]]
