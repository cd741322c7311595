"""Hindsight instruction relabelling: the built-in task's relabeller (expected prompts written out by hand), the
`rlhf relabel` tool (counts, rows, errors naming file:line) and a one-round HIR pipeline on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.tasks import _nearest_order, hindsight_prompt
from recipes import cli, pipeline, relabel
from tests.conftest import ROOT, SYNTHETIC, printed_config

REV = "Reverse: c a f b\nAnswer:"
SORT = "Sort: d a c b\nAnswer:"
CHAT = "<|im_start|>user\nReverse: c a f b\nAnswer:<|im_end|>\n<|im_start|>assistant\n"


# ---- core.tasks:hindsight_prompt ----

@pytest.mark.parametrize("prompt, response, expected", [
    (REV, " b f a c", REV),  # correct: the prompt as it stands
    (REV, " c a f b", "Reverse: b f a c\nAnswer:"),  # copied instead of reversed: it reverses "b f a c"
    ("Reverse: a b c d\nAnswer:", " d c a", "Reverse: a c d\nAnswer:"),  # dropped b: reverse of d c a
    ("Reverse: a b c\nAnswer:", " a a b", "Reverse: b a a\nAnswer:"),  # repeated letters
    ("Reverse: h h h\nAnswer:", " h h h", "Reverse: h h h\nAnswer:"),
    ("Reverse: a b c\nAnswer:", " a b c d e f", "Reverse: f e d c b a\nAnswer:"),  # 6 letters: the longest
    (CHAT, " c a f b", "<|im_start|>user\nReverse: b f a c\nAnswer:<|im_end|>\n<|im_start|>assistant\n"),
    ("User: Reverse: c a f b", " c a f b", "User: Reverse: b f a c"),  # no newline after the letters
    ("Sort: Reverse: c a f b\nAnswer:", " c a f b", "Sort: Reverse: b f a c\nAnswer:"),  # the last prefix counts
])
def test_reverse_relabels_a_well_formed_answer_with_its_own_reverse(prompt, response, expected):
    assert hindsight_prompt(prompt, response) == expected
    assert hindsight_prompt(prompt, response, None) == expected


@pytest.mark.parametrize("response", [
    "", " ", " \n", "b f a c",  # empty; no leading space
    " b f a c ", " b  f a c", " b f a c\n", " b f a c\nAnswer: x",  # extra spaces, a second line
    " b f a x", " b f a c i", " B F A C", " bf a c", " b f a 1", " b, f, a, c",  # letters the task never uses
    " a b", " a b c d e f g",  # 2 and 7 letters: outside 3..6
])
def test_malformed_responses_are_dropped(response):
    assert hindsight_prompt(REV, response) is None
    assert hindsight_prompt(SORT, response) is None
    assert hindsight_prompt(REV, response, 1.0) is None  # a perfect score does not make a malformed answer a demo


def test_a_judges_score_never_overrides_what_the_answer_fulfils():
    # a reward model's scores are unbounded: 2.3 says nothing about which prompt " c a f b" reverses
    for score in (None, 0.0, 0.99, 1.0, 2.3):
        assert hindsight_prompt(REV, " c a f b", score) == "Reverse: b f a c\nAnswer:"
        assert hindsight_prompt(REV, " b f a c", score) == REV  # the correct answer keeps its prompt
        assert hindsight_prompt(SORT, " a c b d", score) is None  # unsorted answers no sort prompt


@pytest.mark.parametrize("prompt, response, expected", [
    (SORT, " a b c d", SORT),  # correct
    (SORT, " a b c e", "Sort: e a c b\nAnswer:"),  # d (missing from the answer) replaced in place by e
    (SORT, " a b c", "Sort: a c b\nAnswer:"),  # d dropped: its place deleted, the rest in the prompt's order
    (SORT, " a b c d e", "Sort: d a c b e\nAnswer:"),  # an added e: appended
    (SORT, " e f g h", "Sort: e f g h\nAnswer:"),  # nothing in common: the answer's letters, in its order
    ("Sort: b a b\nAnswer:", " a a b", "Sort: b a a\nAnswer:"),  # b, a stay; the 2nd b (no b left) becomes a
    ("Sort: a a b\nAnswer:", " a b b", "Sort: a b b\nAnswer:"),  # the 2nd a becomes the left-over b
    ("Sort: c c\nAnswer:", " a b c", "Sort: c a b\nAnswer:"),  # c stays, the 2nd c becomes a, then b appended
    ("<|im_start|>user\nSort: d a c b\nAnswer:<|im_end|>\n", " a b c e", "<|im_start|>user\nSort: e a c b\nAnswer:"
     "<|im_end|>\n"),
])
def test_sort_relabels_a_sorted_answer_with_the_nearest_order(prompt, response, expected):
    assert hindsight_prompt(prompt, response) == expected


def test_an_unsorted_sort_answer_is_dropped_and_a_non_task_prompt_raises():
    assert hindsight_prompt(SORT, " a c b d") is None
    assert hindsight_prompt(SORT, " d c b a") is None
    with pytest.raises(ValueError, match="not a reversal task prompt nor a sort task prompt"):
        hindsight_prompt("Translate: c a\nAnswer:", " a c")
    with pytest.raises(ValueError, match="not a reversal task prompt"):
        hindsight_prompt("Reverse:\nAnswer:", " a b c")


def test_nearest_order_by_hand():
    # prompt c a c a, answer a a b: c (none in the answer) -> left-over b, a stays, c -> nothing left: deleted,
    # a stays -> b a a
    assert _nearest_order(["a", "a", "b"], ["c", "a", "c", "a"]) == ["b", "a", "a"]
    assert _nearest_order(["a", "b"], ["b", "a"]) == ["b", "a"]
    assert _nearest_order(["a", "b", "c"], []) == ["a", "b", "c"]


# ---- the tool ----

def returns_a_number(prompt, response, score):
    return 3


def fails(prompt, response, score):
    raise KeyError("boom")


def hindsight_or_keep(prompt, response, score):
    """The built-in relabeller, else the original prompt: a tiny untrained model's samples are kept."""
    return hindsight_prompt(prompt, response, score) or prompt


def sample(prompt, response, finish="eos", index=0, k=0):
    return {"prompt": prompt, "response": response, "sample": k, "finish_reason": finish, "tokens": 5,
            "index": index, "meta": {"target": " b f a c"}}


SAMPLES = [sample(REV, " b f a c"), sample(REV, " c a f b", k=1), sample(REV, " x y", k=2),
           sample(REV, " b f a c", "length", k=3), sample(REV, "", k=4)]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_relabel_writes_sft_rows_and_counts(tmp_path, capsys):
    from datamodules.formats import read_demonstrations

    samples, out = write_rows(tmp_path / "samples.jsonl", SAMPLES), tmp_path / "sft.jsonl"
    assert cli.main(["relabel", "--samples", str(samples), "--relabel", "core.tasks:hindsight_prompt",
                     "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert ("5 samples: 1 relabelled, 1 kept as is, 3 dropped (1 by the function, 1 unfinished, 1 blank) -> "
            f"{out}: 2 rows") in said
    meta = {"original_prompt": REV, "score": None, "index": 0}
    assert read_rows(out) == [
        {"prompt": REV, "completion": " b f a c", "meta": {**meta, "relabelled": False, "sample": 0}},
        {"prompt": "Reverse: b f a c\nAnswer:", "completion": " c a f b",
         "meta": {**meta, "relabelled": True, "sample": 1}},
    ]
    demos = read_demonstrations(str(out))  # what rlhf sft fit reads
    assert [(d.prompt, d.completion) for d in demos] == [(REV, " b f a c"), ("Reverse: b f a c\nAnswer:", " c a f b")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.jsonl", "sft.jsonl"]  # no temp file left


def test_the_judge_scores_each_sample_and_unfinished_ones_can_be_kept(tmp_path, capsys):
    samples, out = write_rows(tmp_path / "samples.jsonl", SAMPLES[:4]), tmp_path / "sft.jsonl"
    relabel.main(["--samples", str(samples), "--relabel", "core.tasks:hindsight_prompt", "--out", str(out),
                  "--judge", "{oracle: synthetic}", "--keep_unfinished"])
    rows = read_rows(out)
    # oracle of " b f a c" for c a f b: 4 of 4 positions right = 1.0; " c a f b": c/b, a/f, f/a, b/c all wrong = 0.0
    assert [(r["completion"], r["meta"]["score"], r["meta"]["relabelled"]) for r in rows] == [
        (" b f a c", 1.0, False), (" c a f b", 0.0, True), (" b f a c", 1.0, False)]
    assert "4 samples: 1 relabelled, 2 kept as is, 1 dropped (1 by the function, 0 unfinished, 0 blank)" in (
        capsys.readouterr().out)
    parse = relabel.build_parser().parse_args  # as a pipeline passes it: --keep_unfinished=true / false
    base = ["--samples", "s.jsonl", "--relabel", "m:f", "--out", "o.jsonl"]
    assert parse([*base, "--keep_unfinished=true"]).keep_unfinished is True
    assert parse([*base, "--keep_unfinished=false"]).keep_unfinished is False and parse(base).keep_unfinished is False


def test_mix_adds_demonstrations_per_row_kept(tmp_path, capsys):
    samples, out = write_rows(tmp_path / "samples.jsonl", SAMPLES), tmp_path / "sft.jsonl"
    demos = SYNTHETIC / "sft_train.jsonl"
    relabel.main(["--samples", str(samples), "--relabel", "core.tasks:hindsight_prompt", "--out", str(out),
                  "--mix", str(demos), "--mix_ratio", "1.5"])
    rows = read_rows(out)
    assert len(rows) == 2 + 3  # round(1.5 x 2 rows kept)
    lines = demos.read_text().splitlines()
    for row in rows[2:]:
        line = int(row["meta"]["source"].rsplit(":", 1)[1])
        original = json.loads(lines[line - 1])
        assert (row["prompt"], row["completion"]) == (original["prompt"], original["completion"])
    assert f"-> {out}: 2 rows + 3 demonstrations of {demos}" in capsys.readouterr().out


def test_a_bad_function_path_fails_before_reading_anything(tmp_path, capsys):
    for path, why in [("core.tasks:nope", "'core.tasks' has no attribute 'nope'"),
                      ("core.tasks", "expected 'package.module:name'"),
                      ("no_such_module:f", "cannot import module 'no_such_module'"),
                      ("core.tasks:LETTERS", "is a str, not a callable")]:
        with pytest.raises(SystemExit) as exit_:  # the samples file does not exist: it was never opened
            relabel.main(["--samples", str(tmp_path / "missing.jsonl"), "--relabel", path,
                          "--out", str(tmp_path / "o.jsonl")])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"--relabel: relabel function {path!r}" in err and why in err
    with pytest.raises(SystemExit):
        relabel.main(["--samples", "s.jsonl", "--relabel", "core.tasks:hindsight_prompt", "--out", "o.txt"])
    assert "a .jsonl file is needed" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("rows, function, where, reason", [
    ([SAMPLES[0], SAMPLES[1]], "tests.test_relabel:returns_a_number", 1,
     "the relabel function tests.test_relabel:returns_a_number returned int 3 for this sample"),
    ([SAMPLES[4], SAMPLES[1]], "tests.test_relabel:fails", 2,
     "the relabel function tests.test_relabel:fails failed on this sample (KeyError: 'boom')"),
    ([SAMPLES[0], {"prompt": REV}], "core.tasks:hindsight_prompt", 2, "field 'response' is not a string (got missing"),
    ([SAMPLES[0], {"prompt": REV, "response": 3}], "core.tasks:hindsight_prompt", 2,
     "field 'response' is not a string (got int"),
    ([SAMPLES[0], "{not json"], "core.tasks:hindsight_prompt", 2, "invalid JSON"),
    ([sample("Translate: a b\nAnswer:", " b a")], "core.tasks:hindsight_prompt", 1,
     "failed on this sample (ValueError: not a reversal task prompt"),
])
def test_bad_rows_and_bad_returns_name_the_samples_line(rows, function, where, reason, tmp_path, capsys):
    samples, out = write_rows(tmp_path / "samples.jsonl", rows), tmp_path / "sft.jsonl"
    assert cli.main(["relabel", "--samples", str(samples), "--relabel", function, "--out", str(out)]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{samples}:{where}: ") and reason in err, err
    assert len(err.splitlines()) == 1 and not out.exists()  # nothing written


# ---- the pipeline: configs/pipeline/hir.yaml and one tiny round ----

def test_the_hir_pipeline_keeps_the_shared_sft_stage_and_its_stages_parse(monkeypatch, capsys):

    monkeypatch.chdir(ROOT)
    hir, shared = pipeline.load("configs/pipeline/hir.yaml"), pipeline.load("configs/pipeline/critic-free.yaml")
    assert hir.args == shared.args and hir.rounds == 3
    # the same sft command: a copied run folder's finished SFT is skipped (same config hash)
    assert pipeline.config_hash(hir, hir.stages[0]) == pipeline.config_hash(shared, shared.stages[0])
    pipeline.check_tools(hir)
    stage = next(s for s in hir.stages if s.name == "r2.hir")
    args = pipeline.stage_args(hir, stage, "/tmp/out")
    assert "--model.policy.path=/tmp/out/r1.hir" in args and "--data.train_file=/tmp/out/r2.relabel.jsonl" in args
    assert "/tmp/out/r2.hir" in printed_config("sft", args[1:], monkeypatch, capsys)


TINY_HIR = """stages:
  - name: sft
    stage: sft
    config: [configs/sft/tiny.yaml]
    args: {trainer.max_steps: 2, trainer.limit_val_batches: 0}
rounds:
  count: 1
  stages:
    - name: samples
      stage: generate
      args: {model: "${hir|sft}", prompts: tests/fixtures/synthetic/prompts_val.jsonl, part: "${round}", parts: 4,
             num_samples: 2, max_new_tokens: 6, device: cpu}
    - name: relabel
      stage: relabel
      args: {samples: "${samples}", relabel: "tests.test_relabel:hindsight_or_keep", keep_unfinished: true,
             mix: tests/fixtures/synthetic/sft_train.jsonl, mix_ratio: 0.5}
    - name: hir
      stage: sft
      config: [configs/sft/tiny.yaml, configs/sft/synthetic-hir.yaml]
      args: {model.policy.path: "${hir|sft}", data.train_file: "${relabel}", data.val_file: null,
             trainer.max_steps: 2, trainer.max_epochs: null, trainer.limit_val_batches: 0}
    - name: eval
      stage: eval
      args: {policy: "${samples}", judge: "{oracle: synthetic}", device: cpu}
"""


@pytest.mark.slow
def test_one_tiny_hir_round_samples_relabels_and_fine_tunes(tmp_path):
    from core.outputs import MARKER

    config, out = tmp_path / "hir.yaml", tmp_path / "out"
    config.write_text(TINY_HIR)
    done = subprocess.run([sys.executable, "-m", "recipes.cli", "pipeline", "--config", str(config), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    stages = {e["name"]: e for e in json.loads((out / "manifest.json").read_text())["stages"]}
    assert [e["status"] for e in stages.values()] == ["done"] * 5
    rows, samples = read_rows(out / "r1.relabel.jsonl"), read_rows(out / "r1.samples.jsonl")
    kept = [s for s in samples if s["response"].strip()]  # 8 prompts x 2 samples, all but blank ones kept
    assert len(samples) == 16 and len(rows) == len(kept) + round(0.5 * len(kept))  # + demonstrations
    assert [(r["meta"]["original_prompt"], r["completion"]) for r in rows[:len(kept)]] == [
        (s["prompt"], s["response"]) for s in kept]
    assert stages["r1.relabel"]["metrics"] == {"rows": len(rows)}
    assert "16 samples:" in (out / "r1.relabel.log").read_text()
    assert f"--data.train_file={out / 'r1.relabel.jsonl'}" in stages["r1.hir"]["command"]
    assert (out / "r1.hir" / MARKER).is_file() and (out / "r1.eval" / "eval.json").is_file()
