"""The synthetic letter-reversal task: oracle by hand, noisy labeller, generators, files, CLI."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from core.tasks import (
    format_answer,
    format_prompt,
    mean_oracle_score,
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
    noisy_response,
    write_task,
)

ROOT = Path(__file__).resolve().parents[1]
P = "Reverse: c a f b\nAnswer:"  # target " b f a c"


def test_prompt_and_answer_format():
    assert format_prompt(["c", "a", "f", "b"]) == P
    assert format_answer(["b", "f", "a", "c"]) == " b f a c"
    assert parse_prompt(P) == ["c", "a", "f", "b"]
    assert target_response(P) == " b f a c"
    assert parse_prompt("System: be nice\nUser: " + P) == ["c", "a", "f", "b"]  # wrapped prompts work


@pytest.mark.parametrize(
    "response, expected",
    [
        (" b f a c", 4 / 4),  # perfect
        (" b f a", 3 / 4),  # b f a right, c missing: 3 hits / max(4, 3)
        (" b f a c x", 4 / 5),  # 4 hits / max(4, 5)
        (" c a f b", 0 / 4),  # forgot to reverse: c!=b, a!=f, f!=a, b!=c
        (" f a c", 0 / 4),  # dropped the first letter: everything shifts, f!=b, a!=f, c!=a
        (" b x a c", 3 / 4),  # one typo
        ("   b  f\ta c  ", 4 / 4),  # extra whitespace is fine
        ("", 0.0),
        ("   ", 0.0),
        ("hello world!", 0 / 4),  # junk: 2 items, 0 hits / max(4, 2)
        (" b f a c\nReverse: x y", 4 / 4),  # only the first line counts
        (" b f\n a c", 2 / 4),  # 2 hits / max(4, 2)
        ("\n b f a c", 0.0),  # first line empty
    ],
)
def test_oracle_score_by_hand(response, expected):
    assert oracle_score(P, response) == pytest.approx(expected)


def test_oracle_score_copy_of_palindrome_like_prompts():
    # "a b c a" -> target "a c b a"; the copy "a b c a" hits positions 0 (a=a) and 3 (a=a): 2 / 4
    assert oracle_score(format_prompt("abca"), " a b c a") == pytest.approx(2 / 4)
    # odd length: the middle letter of a copy is always right: "a b c" vs "c b a" -> 1 / 3
    assert oracle_score(format_prompt("abc"), " a b c") == pytest.approx(1 / 3)
    assert oracle_score(format_prompt("aba"), " a b a") == 1.0  # a true palindrome


@pytest.mark.parametrize("bad", ["Hello\nAnswer:", "Reverse:\nAnswer:", "Reverse:   \n b", ""])
def test_non_task_prompt_raises(bad):
    with pytest.raises(ValueError, match="not a reversal task prompt"):
        oracle_score(bad, " a")


def test_mean_oracle_score():
    assert mean_oracle_score([P, P], [" b f a c", " b f a"]) == pytest.approx((1 + 3 / 4) / 2)
    with pytest.raises(ValueError):
        mean_oracle_score([P], [])
    with pytest.raises(ValueError):
        mean_oracle_score([], [])


def test_noisy_response_extremes_and_determinism():
    letters = list("cafb")
    assert noisy_response(letters, random.Random(0), copy_prob=0.0, error_rate=0.0) == " b f a c"
    assert noisy_response(letters, random.Random(0), copy_prob=1.0, error_rate=0.0) == " c a f b"
    outs = [noisy_response(letters, random.Random(s), 0.5, 0.5) for s in range(50)]
    assert outs == [noisy_response(letters, random.Random(s), 0.5, 0.5) for s in range(50)]
    assert len(set(outs)) > 10
    for out in outs:  # one drop and one append at most, letters from the alphabet
        assert 3 <= len(out.split()) <= 5 and set("".join(out.split())) <= set(syn.LETTERS)


def test_noisy_response_copy_rate():
    rng = random.Random(0)
    outs = [noisy_response(list("abcd"), rng, copy_prob=0.25, error_rate=0.0) for _ in range(2000)]
    assert 0.20 < outs.count(" a b c d") / 2000 < 0.30
    assert outs.count(" a b c d") + outs.count(" d c b a") == 2000


@pytest.mark.parametrize("make", [make_prompts, make_demonstrations, make_pairs, make_rankings, make_ratings])
def test_generators_deterministic_in_seed(make):
    assert make(30, 0) == make(30, 0)
    assert make(30, 0) != make(30, 1)


def test_make_prompts():
    rows = make_prompts(300, 0)
    assert all(set(r) == {"prompt", "target"} for r in rows)
    assert all(r["target"] == target_response(r["prompt"]) for r in rows)
    assert {len(parse_prompt(r["prompt"])) for r in rows} == {3, 4, 5, 6}
    assert {len(parse_prompt(r["prompt"])) for r in make_prompts(20, 0, min_len=5, max_len=5)} == {5}
    excluded = {r["prompt"] for r in make_prompts(100, 7, min_len=2, max_len=2)}  # 64 possible prompts
    assert not excluded & {r["prompt"] for r in make_prompts(100, 8, min_len=2, max_len=2, exclude=excluded)}
    everything = {format_prompt(c) for c in syn.LETTERS}
    with pytest.raises(ValueError, match="exclude"):
        make_prompts(1, 0, min_len=1, max_len=1, exclude=everything)


def test_demonstrations_are_imperfect():
    rows = make_demonstrations(2000, 0)
    assert all(set(r) == {"prompt", "completion"} and r["completion"].startswith(" ") for r in rows)
    # ~75% reversed with ~9% typos (score ~0.85) + ~25% copies (score ~0.2): mean ~0.7
    mean = mean_oracle_score([r["prompt"] for r in rows], [r["completion"] for r in rows])
    assert 0.55 < mean < 0.85
    perfect = sum(r["completion"] == target_response(r["prompt"]) for r in rows) / len(rows)
    assert 0.35 < perfect < 0.7  # ~0.75 reversed x ~0.7 typo-free x ~0.9 no drop/append ~ 0.47


def _scores(row):
    return oracle_score(row["prompt"], row["chosen"]), oracle_score(row["prompt"], row["rejected"])


def test_pairs_and_label_noise():
    clean = make_pairs(2000, 0, label_noise=0.0)
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in clean)
    assert all(c > r for c, r in map(_scores, clean))  # scores always differ; no noise -> chosen wins
    # perfect beats near-perfect: exact answers are chosen, sometimes over good rejected answers
    perfect = [r for r in clean if r["chosen"] == target_response(r["prompt"])]
    assert len(perfect) > 0.3 * len(clean)
    assert any(_scores(r)[1] >= 0.75 for r in perfect)
    for noise, lo, hi in [(0.1, 0.06, 0.14), (0.5, 0.45, 0.55)]:
        noisy = make_pairs(2000, 0, label_noise=noise)
        # the noise has its own random stream: same prompts and candidates, some rows swapped
        assert [r["prompt"] for r in noisy] == [r["prompt"] for r in clean]
        kept = [n for n, c in zip(noisy, clean, strict=True) if n == c]
        flipped = [n for n, c in zip(noisy, clean, strict=True) if n != c]
        assert all((n["chosen"], n["rejected"]) == (c["rejected"], c["chosen"])
                   for n, c in zip(noisy, clean, strict=True) if n != c)
        assert all(c >= r for c, r in map(_scores, kept))
        assert all(c < r for c, r in map(_scores, flipped))
        assert lo < len(flipped) / len(noisy) < hi


def test_rankings_follow_oracle_and_ties_share_ranks():
    rows = make_rankings(500, 0, k=4)
    saw_tie = False
    for row in rows:
        assert set(row) == {"prompt", "responses", "ranks"} and len(row["responses"]) == 4
        assert len(set(row["responses"])) == 4  # distinct candidates
        scores = [oracle_score(row["prompt"], r) for r in row["responses"]]
        assert row["ranks"] == [sum(o > s for o in scores) for s in scores]
        for i in range(4):
            for j in range(4):
                if scores[i] == scores[j]:
                    assert row["ranks"][i] == row["ranks"][j]
                    saw_tie |= i != j
                elif scores[i] > scores[j]:
                    assert row["ranks"][i] < row["ranks"][j]
        assert 0 in row["ranks"] and len(set(scores)) > 1
    assert saw_tie
    assert 0.1 < sum(r["ranks"][0] == 0 for r in rows) / len(rows) < 0.9  # listed in random order
    assert {len(r["ranks"]) for r in make_rankings(5, 0, k=3)} == {3}
    noisy = make_rankings(500, 0, k=4, label_noise=0.5)
    assert [r["responses"] for r in noisy] == [r["responses"] for r in rows]
    assert 0.2 < sum(n["ranks"] != c["ranks"] for n, c in zip(noisy, rows, strict=True)) / 500 < 0.55
    with pytest.raises(ValueError):
        make_rankings(1, 0, k=1)


def test_ratings_are_likert():
    rows = make_ratings(300, 0)
    for row in rows:
        assert set(row) == {"prompt", "responses", "ratings"}
        scores = [oracle_score(row["prompt"], r) for r in row["responses"]]
        assert row["ratings"] == [round(1 + 6 * s) for s in scores]
        assert all(1 <= x <= 7 for x in row["ratings"])
    assert any(len(set(r["ratings"])) < len(r["ratings"]) for r in rows)  # ties happen
    assert {x for r in rows for x in r["ratings"]} >= {1, 7}


NAMES = {f"{k}_{s}" for k in ("sft", "pairs", "rankings", "prompts") for s in ("train", "val")}


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_write_task(tmp_path):
    paths = write_task(tmp_path / "task", n_train=300, n_val=50, seed=3)
    assert set(paths) == NAMES
    assert sorted(p.name for p in (tmp_path / "task").iterdir()) == sorted(f"{n}.jsonl" for n in NAMES)
    rows = {name: _read(path) for name, path in paths.items()}
    assert all(len(rows[n]) == (300 if n.endswith("train") else 50) for n in NAMES)
    assert rows["sft_train"] == make_demonstrations(300, 3)
    train = {r["prompt"] for n in NAMES if n.endswith("train") for r in rows[n]}
    val = {r["prompt"] for n in NAMES if n.endswith("val") for r in rows[n]}
    assert val and not train & val
    again = write_task(tmp_path / "again", n_train=300, n_val=50, seed=3)
    assert all(again[n].read_bytes() == paths[n].read_bytes() for n in NAMES)


def test_cli_main_and_module(tmp_path):
    syn.main([str(tmp_path / "a"), "--n-train", "20", "--n-val", "5", "--seed", "1"])
    assert len(_read(tmp_path / "a" / "pairs_train.jsonl")) == 20
    args = [str(tmp_path / "b"), "--n-train", "20", "--n-val", "5", "--seed", "1"]
    cmd = [sys.executable, "-m", "datamodules.synthetic", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    assert "prompts_val" in out.stdout
    assert (tmp_path / "a" / "sft_val.jsonl").read_bytes() == (tmp_path / "b" / "sft_val.jsonl").read_bytes()
