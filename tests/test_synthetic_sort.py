"""The synthetic sort task: Levenshtein oracle by hand, dispatch by prefix, labeller, generators, files,
CLI; and the reversal task's outputs unchanged by the task table."""

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from core.tasks import (
    edit_distance,
    format_prompt,
    mean_oracle_score,
    oracle_reward,
    oracle_score,
    parse_prompt,
    target_response,
)
from datamodules import synthetic as syn
from datamodules.synthetic import (
    make_demonstrations,
    make_pairs,
    make_prompts,
    make_rankings,
    make_ratings,
    write_task,
)
from datamodules.synthetic_sort import noisy_response

ROOT = Path(__file__).resolve().parents[1]
S = "Sort: d a c b\nAnswer:"  # target " a b c d"
R = "Reverse: c a f b\nAnswer:"  # target " b f a c"


def test_prompt_and_target():
    assert format_prompt(["d", "a", "c", "b"], "sort") == S
    assert format_prompt(["d", "a", "c", "b"], task="sort") == S
    assert parse_prompt(S) == ["d", "a", "c", "b"]
    assert target_response(S) == " a b c d"
    assert target_response("Sort: b a b a\nAnswer:") == " a a b b"  # repeats stay
    assert target_response("System: be nice\nUser: " + S) == " a b c d"  # wrapped prompts work
    with pytest.raises(ValueError, match="unknown task 'shuffle'.*'reverse', 'sort'"):
        format_prompt(["a"], "shuffle")


@pytest.mark.parametrize(
    "a, b, distance",
    [
        ("", "", 0),
        ("", "abc", 3),  # 3 insertions
        ("abc", "", 3),  # 3 deletions
        ("abcd", "abcd", 0),
        ("acb", "abc", 2),  # a swapped neighbour pair is 2 substitutions (no transpositions)
        ("kitten", "sitting", 3),  # k->s, e->i, insert g
        ("bcd", "abcd", 1),  # insert a
        ("dacb", "abcd", 3),  # delete d, insert b after a, b->d; not 2 (Hamming 3, common subsequence 2)
        ("aaaaaaaa", "abcd", 7),  # 4 deletions + 3 substitutions
    ],
)
def test_edit_distance_by_hand(a, b, distance):
    assert edit_distance(list(a), list(b)) == distance
    assert edit_distance(list(b), list(a)) == distance  # symmetric


@pytest.mark.parametrize(
    "prompt, response, expected",
    [
        (S, " a b c d", 1 - 0 / 4),  # perfect
        (S, " a c b d", 1 - 2 / 4),  # b, c swapped: 2 substitutions
        (S, " a b c", 1 - 1 / 4),  # d missing: 1 insertion / max(4, 3)
        (S, " b c d", 1 - 1 / 4),  # a missing: still 1 edit (the positional oracle would give 0)
        (S, " a b c d e", 1 - 1 / 5),  # 1 extra: 1 deletion / max(4, 5)
        (S, " a b x d", 1 - 1 / 4),  # one typo
        (S, " d a c b", 1 - 3 / 4),  # forgot to sort: distance 3 (see test_edit_distance_by_hand)
        (S, "   a  b\tc d  ", 1.0),  # extra whitespace is fine
        (S, "", 0.0),  # distance 4 / max(4, 0)
        (S, "   ", 0.0),
        (S, "hello world!", 1 - 4 / 4),  # junk: 2 substitutions + 2 insertions / max(4, 2)
        (S, " x y z w v u t s r q", 1 - 10 / 10),  # long junk: 4 substitutions + 6 deletions / 10
        (S, " a a a a a a a a", 1 - 7 / 8),  # 4 deletions + 3 substitutions / max(4, 8)
        (S, " a b c d\nSort: x y", 1.0),  # only the first line counts
        (S, " a b\n c d", 1 - 2 / 4),  # first line " a b": 2 insertions
        (S, "\n a b c d", 0.0),  # first line empty
        ("Sort: c a b\nAnswer:", " a c b", 1 - 2 / 3),  # target a b c: distance 2
        ("Sort: b a b\nAnswer:", " a b", 1 - 1 / 3),  # target a b b: 1 insertion
        ("Sort: a b c\nAnswer:", " a b c", 1.0),  # already sorted: the copy is right
    ],
)
def test_oracle_score_by_hand(prompt, response, expected):
    assert oracle_score(prompt, response) == pytest.approx(expected)


def test_oracle_dispatches_by_prefix():
    # the same response, scored by each task's own target and formula
    # both prompts have the target " a b c d"; the response drops its first letter
    assert oracle_score(S, " b c d") == pytest.approx(1 - 1 / 4)  # sort: 1 insertion / 4
    assert oracle_score("Reverse: d c b a\nAnswer:", " b c d") == 0.0  # reverse: b!=a, c!=b, d!=c: 0 / 4
    assert oracle_score(R, " b f a c") == oracle_score(S, " a b c d") == 1.0
    # one reward function for both tasks, even mixed in a batch
    assert oracle_reward([S, R, S], [" a b c d", " b f a c", ""]) == [1.0, 1.0, 0.0]
    assert mean_oracle_score([S, R], [" a c b d", " b f a"]) == pytest.approx((2 / 4 + 3 / 4) / 2)
    # the prefix that comes last decides (the other may appear in a system text before it)
    assert target_response("Reverse: a b\nUser: Sort: c b a\nAnswer:") == " a b c"
    assert target_response("Sort: c b a\nUser: Reverse: a b\nAnswer:") == " b a"


def test_oracle_reward_through_reward_spec():
    from core.reward_spec import RewardSpec

    assert RewardSpec(oracle="synthetic").score([S, R], [" a c b d", " b f a c"]).tolist() == [0.5, 1.0]
    # the oracle's old path (before it moved to core/tasks.py) names the same function
    assert RewardSpec(functions=["datamodules.synthetic:oracle_reward"]).score([S], [" a c b d"]).tolist() == [0.5]


@pytest.mark.parametrize("bad", ["Hello\nAnswer:", "", "sort: a b\nAnswer:", "Sorted a b"])
def test_unknown_prompt_raises_naming_prefixes(bad):
    with pytest.raises(ValueError, match="known prefixes: 'Reverse:', 'Sort:'"):
        oracle_score(bad, " a")


@pytest.mark.parametrize("bad", ["Sort:\nAnswer:", "Sort:   \n a b"])
def test_sort_prompt_without_letters_raises(bad):
    with pytest.raises(ValueError, match="not a sort task prompt"):
        target_response(bad)


def test_noisy_response_extremes_and_determinism():
    letters = list("dacb")
    assert noisy_response(letters, random.Random(0), 0.0, 0.0, syn.LETTERS) == " a b c d"
    assert noisy_response(letters, random.Random(0), 1.0, 0.0, syn.LETTERS) == " d a c b"
    outs = [noisy_response(letters, random.Random(s), 0.5, 0.5, syn.LETTERS) for s in range(50)]
    assert outs == [noisy_response(letters, random.Random(s), 0.5, 0.5, syn.LETTERS) for s in range(50)]
    assert len(set(outs)) > 10
    for out in outs:  # one drop and one append at most, letters from the alphabet
        assert 3 <= len(out.split()) <= 5 and set("".join(out.split())) <= set(syn.LETTERS)


def test_noisy_response_copies_and_partial_sorts():
    rng = random.Random(0)
    outs = [noisy_response(list("dacb"), rng, 0.25, 0.0, syn.LETTERS) for _ in range(2000)]
    assert 0.20 < outs.count(" d a c b") / 2000 < 0.30
    assert outs.count(" d a c b") + outs.count(" a b c d") == 2000
    # only partly sorted: a b c d with one neighbour pair swapped; letters kept
    partial = {" b a c d", " a c b d", " a b d c"}
    outs = [noisy_response(list("dacb"), random.Random(s), 0.0, 0.3, syn.LETTERS) for s in range(2000)]
    # ~0.3 swapped x ~0.74^4 typo-free (a typo may redraw the same letter) x ~0.72 no drop/add ~ 0.065
    assert 0.03 < sum(o in partial for o in outs) / 2000 < 0.15
    # repeats: a swap of two equal letters would be no error, so the swap picks unequal neighbours
    outs = [noisy_response(list("bab"), random.Random(s), 0.0, 0.3, syn.LETTERS) for s in range(500)]
    assert " a b b" in outs and " b a b" in outs


@pytest.mark.parametrize("make", [make_prompts, make_demonstrations, make_pairs, make_rankings, make_ratings])
def test_generators_deterministic_in_seed(make):
    assert make(30, 0, task="sort") == make(30, 0, task="sort")
    assert make(30, 0, task="sort") != make(30, 1, task="sort")
    rows = make(30, 0, task="sort")
    assert all(r["prompt"].startswith("Sort: ") for r in rows)
    # own random streams: not the reversal task's letters under another prefix
    assert [parse_prompt(r["prompt"]) for r in rows] != [parse_prompt(r["prompt"]) for r in make(30, 0)]
    with pytest.raises(ValueError, match="unknown task"):
        make(1, 0, task="shuffle")


def test_make_prompts():
    rows = make_prompts(300, 0, task="sort")
    assert all(set(r) == {"prompt", "target"} for r in rows)
    assert all(r["target"] == target_response(r["prompt"]) for r in rows)
    assert all(r["target"].split() == sorted(parse_prompt(r["prompt"])) for r in rows)
    assert {len(parse_prompt(r["prompt"])) for r in rows} == {3, 4, 5, 6}
    assert any(len(set(parse_prompt(r["prompt"]))) < len(parse_prompt(r["prompt"])) for r in rows)  # repeats
    excluded = {r["prompt"] for r in make_prompts(100, 7, task="sort", min_len=2, max_len=2)}  # 64 possible
    again = make_prompts(100, 8, task="sort", min_len=2, max_len=2, exclude=excluded)
    assert not excluded & {r["prompt"] for r in again}


def _mean_score(rows, key):
    return mean_oracle_score([r["prompt"] for r in rows], [r[key] for r in rows])


def test_demonstrations_are_imperfect():
    rows = make_demonstrations(2000, 0, task="sort")
    assert all(set(r) == {"prompt", "completion"} and r["completion"].startswith(" ") for r in rows)
    # ~75% sorted with error_rate 0.1 (score ~0.86, measured) + ~25% copies of the prompt (score ~0.40,
    # measured: a copy is partly in order): 0.75 * 0.86 + 0.25 * 0.40 ~ 0.745; measured 0.726-0.740 over
    # seeds 0-2 at n=4000 (the reversal task's demonstrations: 0.72)
    assert 0.65 < _mean_score(rows, "completion") < 0.80
    perfect = sum(r["completion"] == target_response(r["prompt"]) for r in rows) / len(rows)
    # measured 0.42: ~0.75 sorted x 0.9 unswapped x ~0.66 typo-free x 0.9 no drop/add ~ 0.40, + copies of
    # prompts that were already sorted
    assert 0.33 < perfect < 0.52


def _scores(row):
    return oracle_score(row["prompt"], row["chosen"]), oracle_score(row["prompt"], row["rejected"])


def test_pairs_and_label_noise():
    clean = make_pairs(2000, 0, label_noise=0.0, task="sort")
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in clean)
    assert all(c > r for c, r in map(_scores, clean))
    # measured at n=4000: chosen 0.856, rejected 0.411, the exact answer chosen in 61% of rows
    assert 0.8 < _mean_score(clean, "chosen") < 0.9 and 0.35 < _mean_score(clean, "rejected") < 0.47
    perfect = [r for r in clean if r["chosen"] == target_response(r["prompt"])]
    assert len(perfect) > 0.3 * len(clean)
    assert any(_scores(r)[1] >= 0.75 for r in perfect)  # perfect beats near-perfect
    noisy = make_pairs(2000, 0, label_noise=0.1, task="sort")
    assert [r["prompt"] for r in noisy] == [r["prompt"] for r in clean]  # noise has its own stream
    flipped = [n for n, c in zip(noisy, clean, strict=True) if n != c]
    assert all(c < r for c, r in map(_scores, flipped))
    assert 0.06 < len(flipped) / len(noisy) < 0.14


def test_rankings_follow_oracle_and_ties_share_ranks():
    rows = make_rankings(500, 0, k=4, task="sort")
    saw_tie = False
    for row in rows:
        assert set(row) == {"prompt", "responses", "ranks"} and len(set(row["responses"])) == 4
        scores = [oracle_score(row["prompt"], r) for r in row["responses"]]
        assert row["ranks"] == [sum(o > s for o in scores) for s in scores]
        for i in range(4):
            for j in range(4):
                if scores[i] > scores[j]:
                    assert row["ranks"][i] < row["ranks"][j]
                saw_tie |= i != j and scores[i] == scores[j]
        assert 0 in row["ranks"] and len(set(scores)) > 1
    assert saw_tie
    noisy = make_rankings(500, 0, k=4, label_noise=0.5, task="sort")
    assert [r["responses"] for r in noisy] == [r["responses"] for r in rows]
    assert 0.2 < sum(n["ranks"] != c["ranks"] for n, c in zip(noisy, rows, strict=True)) / 500 < 0.55


def test_ratings_are_likert():
    rows = make_ratings(300, 0, task="sort")
    for row in rows:
        scores = [oracle_score(row["prompt"], r) for r in row["responses"]]
        assert row["ratings"] == [round(1 + 6 * s) for s in scores]
    assert {x for r in rows for x in r["ratings"]} >= {1, 7}


NAMES = {f"{k}_{s}" for k in ("sft", "pairs", "rankings", "prompts") for s in ("train", "val")}


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_write_task_val_prompts_disjoint(tmp_path):
    paths = write_task(tmp_path / "sort", n_train=300, n_val=50, seed=3, task="sort")
    assert set(paths) == NAMES
    rows = {name: _read(path) for name, path in paths.items()}
    assert rows["sft_train"] == make_demonstrations(300, 3, task="sort")
    assert all(r["prompt"].startswith("Sort: ") for n in NAMES for r in rows[n])
    train = {r["prompt"] for n in NAMES if n.endswith("train") for r in rows[n]}
    val = {r["prompt"] for n in NAMES if n.endswith("val") for r in rows[n]}
    assert val and not train & val
    with pytest.raises(ValueError, match="unknown task"):
        write_task(tmp_path / "bad", n_train=2, n_val=2, task="shuffle")


def test_cli_task_flag(tmp_path):
    syn.main([str(tmp_path / "a"), "--task", "sort", "--n-train", "20", "--n-val", "5", "--seed", "1"])
    assert _read(tmp_path / "a" / "sft_val.jsonl")[0]["prompt"].startswith("Sort: ")
    args = [str(tmp_path / "b"), "--task", "sort", "--n-train", "20", "--n-val", "5", "--seed", "1"]
    cmd = [sys.executable, "-m", "datamodules.synthetic", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    assert "prompts_val" in out.stdout
    assert _read(tmp_path / "a" / "pairs_val.jsonl") == _read(tmp_path / "b" / "pairs_val.jsonl")
    with pytest.raises(SystemExit):
        syn.main([str(tmp_path / "c"), "--task", "shuffle"])


# The reversal task as written before the sort task existed (recorded with that code): sha256 of
# json.dumps(make_*(200, 5), sort_keys=True), first 16 hex digits, and a few literal rows.
REVERSE_DIGESTS = {
    make_prompts: "5d1a49e618c03cb4",
    make_demonstrations: "2be2c9e912c67591",
    make_pairs: "81efd772445fe711",
    make_rankings: "087cb75169debac5",
    make_ratings: "436ae1e4ce93e62e",
}


@pytest.mark.parametrize("make", list(REVERSE_DIGESTS), ids=lambda f: f.__name__)
def test_reverse_task_unchanged(make):
    rows = make(200, 5)
    assert hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16] == REVERSE_DIGESTS[make]
    assert make(200, 5, task="reverse") == rows


def test_reverse_task_rows_unchanged():
    assert make_demonstrations(3, 0) == [
        {"prompt": "Reverse: h e h\nAnswer:", "completion": " h e"},
        {"prompt": "Reverse: b f g f f a\nAnswer:", "completion": " b f g e f a"},
        {"prompt": "Reverse: d d a\nAnswer:", "completion": " a d c"},
    ]
    assert make_pairs(2, 0) == [
        {"prompt": "Reverse: h a g f\nAnswer:", "chosen": " f g a h g", "rejected": " g g a a"},
        {"prompt": "Reverse: c a c g g\nAnswer:", "chosen": " g g c a c", "rejected": " c a c g g d"},
    ]
    assert make_rankings(1, 0) == [
        {"prompt": "Reverse: b b g e\nAnswer:", "responses": [" b b e a", " e g b b", " e f b b", " g b e e"],
         "ranks": [2, 0, 1, 2]},
    ]
    assert make_ratings(1, 0) == [
        {"prompt": "Reverse: g f f f\nAnswer:", "responses": [" f f f e", " f f f g", " f f f f", " g c f d"],
         "ratings": [6, 7, 6, 2]},
    ]
    assert make_prompts(2, 0) == [{"prompt": "Reverse: d f h b e\nAnswer:", "target": " e b h f d"},
                                  {"prompt": "Reverse: f a h a\nAnswer:", "target": " a h a f"}]
