"""Labelling fresh samples: generations grouped per prompt, ranks from scores by hand, a labeller's flips and
ties, and the command that writes rankings the reward stage reads."""

from __future__ import annotations

import json
import random

import pytest

from datamodules.labelling import flip_two, group_generations, label_groups, main, ranks_from_scores
from datamodules.synthetic import format_prompt, oracle_reward


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
    main([str(samples), str(out), "--judge", "{oracle: synthetic}"])
    assert "labelled 1 of 1 prompts" in capsys.readouterr().out
    assert json.loads(out.read_text())["ranks"] == [0, 2, 1]
    records = read_preferences(str(out))
    assert len(records) == 1
