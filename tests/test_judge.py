"""The AI judge (core/judge.py): option probabilities in both orders by hand with a stub model whose logits we set,
the principle draw shared by both orders, templates and options refused, the pairwise labeller's aggregation by
hand, and the labeller and `rlhf eval --pairwise_judge` end to end with the tiny model as the judge."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import core.judge
from core.judge import JudgeSpec, as_judge_spec, both_orders, fill, pick_principle, position_bias, water_level
from core.models import load_tokenizer
from tests.conftest import TINY_MODEL

GOOD, BAD = "good answer", "bad answer"


class StubJudge(torch.nn.Module):
    """Reads each row's text: the option shown with GOOD gets logit 2, the other 0, and option A gets +1 on top
    (a judge that likes the first position). Logits of every other token are 0."""

    def __init__(self, tok, ids):
        super().__init__()
        self.tok, self.ids = tok, ids
        self.weight = torch.nn.Parameter(torch.zeros(1))  # for next(parameters()).device

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
        assert logits_to_keep == 1
        assert (position_ids[:, -1] + 1 == attention_mask.sum(-1)).all()  # left padding: the last row counts from 0
        logits = torch.zeros(input_ids.shape[0], 1, len(self.tok))
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            text = self.tok.decode(ids[mask.bool()])
            good_first = text.index(GOOD) < text.index(BAD)
            logits[row, 0, self.ids[0]] = (2.0 if good_first else 0.0) + 1.0
            logits[row, 0, self.ids[1]] = 0.0 if good_first else 2.0
        return SimpleNamespace(logits=logits)


@pytest.fixture
def stub_judge(monkeypatch):
    tok = load_tokenizer(str(TINY_MODEL))
    monkeypatch.setattr(core.judge, "load_causal_lm", lambda spec, device, trainable: StubJudge(tok, [35, 36]))
    return JudgeSpec(model=str(TINY_MODEL), batch_size=2).load("cpu")


def test_both_orders_by_hand():
    # order 1, a shown as A: logits (2, 0) -> p1 = e^2 / (e^2 + e^0); order 2, a shown as B: logits (0, 1) -> p2 =
    # e^1 / (e^0 + e^1)
    pref = both_orders(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    p1, p2 = math.exp(2) / (math.exp(2) + 1), math.e / (1 + math.e)
    assert pref.p1.item() == pytest.approx(p1) and pref.p2.item() == pytest.approx(p2)
    assert pref.prob.item() == pytest.approx((p1 + p2) / 2)
    # P(first option): p1 in order 1, 1 - p2 in order 2
    assert position_bias(pref) == pytest.approx((p1 + 1 - p2) / 2)
    with pytest.raises(ValueError, match="n, 2"):
        both_orders(torch.zeros(2, 3), torch.zeros(2, 3))


def test_stub_judge_probabilities_by_hand(stub_judge):
    # GOOD as A: logits A = 2 + 1 = 3, B = 0 -> p1 = e^3 / (e^3 + 1)
    # GOOD as B (BAD as A): A = 0 + 1 = 1, B = 2 -> P(B) = e^2 / (e^1 + e^2) = e / (1 + e)
    pref = stub_judge.compare(["p", "q", "r"], [GOOD] * 3, [BAD] * 3)
    p1, p2 = math.exp(3) / (math.exp(3) + 1), math.e / (1 + math.e)
    torch.testing.assert_close(pref.p1, torch.full((3,), p1, dtype=torch.float64))
    torch.testing.assert_close(pref.p2, torch.full((3,), p2, dtype=torch.float64))
    torch.testing.assert_close(stub_judge.prefer(["p"], [GOOD], [BAD]), torch.tensor([(p1 + p2) / 2],
                                                                                      dtype=torch.float64))
    # the other way round: BAD as A gets A = 1, B = 2 -> p1 = e / (e + e^2) = 1 / (1 + e); BAD as B: A = 3, B = 0
    # -> p2 = 1 / (e^3 + 1); the average is 1 - the above, as the two orders' roles swap
    worse = stub_judge.compare(["p"], [BAD], [GOOD])
    assert worse.p1.item() == pytest.approx(1 / (1 + math.e))
    assert worse.p2.item() == pytest.approx(1 / (math.exp(3) + 1))
    assert worse.prob.item() == pytest.approx(1 - (p1 + p2) / 2)
    # the stub likes position A: mean P(first) = (p1 + 1 - p2) / 2 = (0.9526 + 0.2689) / 2, above 0.5
    assert position_bias(pref) == pytest.approx((p1 + 1 - p2) / 2) and position_bias(pref) > 0.6


def test_principle_draw_is_seeded_and_shared_by_both_orders(tmp_path):
    constitution = tmp_path / "c.yaml"
    constitution.write_text("principles:\n" + "".join(
        f"  - {{name: p{i}, comparison: 'QUESTION{i}?', critique: c, revision: r}}\n" for i in range(3)))
    spec = JudgeSpec(model=str(TINY_MODEL), constitution=str(constitution))
    spec._loaded = (None, None, None, False)  # _fit reads whether a chat template is used
    tok = load_tokenizer(str(TINY_MODEL))
    prompts = [f"prompt {i}" for i in range(30)]
    a, b = [f"x{i}" for i in range(30)], [f"y{i}" for i in range(30)]
    forward, backward = spec.questions(prompts, a, b, tok), spec.questions(prompts, b, a, tok)
    drawn = [next(k for k in range(3) if f"QUESTION{k}?" in q) for q in forward]
    assert drawn == [next(k for k in range(3) if f"QUESTION{k}?" in q) for q in backward]
    assert drawn == [pick_principle(3, 0, p, x, y) for p, x, y in zip(prompts, a, b)]
    assert spec.questions(prompts[5:], a[5:], b[5:], tok) == forward[5:]  # keyed on the row, not its batch place
    assert set(drawn) == {0, 1, 2}  # 30 draws of 3 (each missing one: (2/3)^30 ~ 5e-6)
    assert [pick_principle(3, 1, p, x, y) for p, x, y in zip(prompts, a, b)] != drawn  # the seed matters


def test_templates_and_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"\{a\}"):
        JudgeSpec(model="m", template="{prompt} {b}")
    with pytest.raises(ValueError, match="no constitution"):
        JudgeSpec(model="m", template="{prompt} {a} {b} {principle}")
    constitution = tmp_path / "c.yaml"
    constitution.write_text("principles:\n  - {name: h, critique: c, revision: r, comparison: 'Less harmful?'}\n")
    with pytest.raises(ValueError, match=r"\{principle\}"):
        JudgeSpec(model="m", template="{prompt} {a} {b}", constitution=str(constitution))
    constitution.write_text("principles:\n  - {name: h, critique: c, revision: r}\n")
    with pytest.raises(ValueError, match="comparison"):
        JudgeSpec(model="m", constitution=str(constitution))
    with pytest.raises(ValueError, match="two different"):
        JudgeSpec(model="m", options=["A", "A"])
    tok = load_tokenizer(str(TINY_MODEL))
    with pytest.raises(ValueError, match="not one token"):
        JudgeSpec(model=str(TINY_MODEL), options=["Yes", "No"]).option_ids(tok, False)
    assert JudgeSpec(model=str(TINY_MODEL)).option_ids(tok, False) == tok.convert_tokens_to_ids(["A", "B"])
    with pytest.raises(ValueError, match="judge spec"):
        as_judge_spec("{model: m, nope: 1}")


def test_fill_reads_no_text_twice_and_water_level_by_hand():
    assert fill("{prompt}|{a}|{b}", prompt="{b}", a="x", b="y") == "{b}|x|y"
    # lengths 10, 3, 8, budget 15: cap 6 keeps 6 + 3 + 6 = 15; cap 7 would need 7 + 3 + 7 = 17
    assert water_level([10, 3, 8], 15) == 6
    assert water_level([10, 3, 8], 100) == 10


def test_long_questions_are_shortened_to_max_length(stub_judge):
    stub_judge.max_length = 256  # the template alone is 152 tokens of the tiny tokenizer
    tok = stub_judge._loaded[1]
    long = " ".join(["word"] * 200)  # ~ 1000 tokens
    (question,) = stub_judge.questions([long + " END"], [GOOD + " " + long], [BAD], tok)
    assert len(tok(question)["input_ids"]) <= 256
    assert GOOD in question and BAD in question and "END" in question  # responses' starts, the prompt's end
    assert stub_judge.prefer([long], [GOOD + " " + long], [BAD]).item() > 0.5


def test_max_length_is_lowered_to_what_the_model_reads(caplog):
    judge = JudgeSpec(model=str(TINY_MODEL), max_length=1024)
    assert judge.max_length == 1024  # nothing is loaded before load()
    with caplog.at_level("WARNING"):
        judge.load("cpu")
    assert judge.max_length == 256  # the tiny model's max_position_embeddings
    assert "max_length 1024 is more than" in caplog.text and "shortened to 256 tokens" in caplog.text
    assert JudgeSpec(model=str(TINY_MODEL), max_length=128).load("cpu").max_length == 128  # below it: kept


def test_shortened_parts_carry_no_bos_into_the_question(bos_model_dir):
    """A tokenizer that adds BOS (Llama 2/3, Mistral, Gemma): the parts are cut as plain text, so the question
    holds one BOS, at its start, and no "<s>" text before the responses."""
    tok = load_tokenizer(str(bos_model_dir), padding_side="left")
    bos = tok.bos_token_id
    assert tok("hi")["input_ids"][0] == bos  # it does add BOS
    judge = JudgeSpec(model=str(bos_model_dir), max_length=200)
    judge._loaded = (None, tok, None, False)  # questions() needs the tokenizer only, plain text (no chat)
    (question,) = judge.questions(["the prompt is long " * 10], ["answer a words " * 10], ["answer b words " * 10],
                                  tok)
    ids = tok(question)["input_ids"]
    assert "<s>" not in question and ids.count(bos) == 1 and ids[0] == bos
    assert len(ids) <= 200 and "answer a words" in question and "answer b words" in question  # it was shortened


# ---- the labeller and rlhf eval ----

def test_pairwise_scores_by_hand():
    from datamodules.labelling import label_groups, pairwise_scores

    table = {("r0", "r1"): 0.8, ("r0", "r2"): 0.6, ("r1", "r2"): 0.3, ("x", "y"): 0.5}
    asked = []

    def prefer(prompts, a, b):
        asked.extend(zip(a, b))
        return [table[pair] for pair in zip(a, b)]

    groups = [{"prompt": "p", "responses": ["r0", "r1", "r2"], "meta": {}},
              {"prompt": "q", "responses": ["x", "y"], "meta": {}}, {"prompt": "s", "responses": ["z"], "meta": {}}]
    scores = pairwise_scores(groups, prefer)
    assert asked == [("r0", "r1"), ("r0", "r2"), ("r1", "r2"), ("x", "y")]  # C(3, 2) + C(2, 2) pairs, one call
    # r0: (0.8 + 0.6) / 2 = 0.7; r1: (1 - 0.8 + 0.3) / 2 = 0.25; r2: (1 - 0.6 + 1 - 0.3) / 2 = 0.55; x, y: 0.5 each;
    # a lone response: 0.5
    assert scores == pytest.approx([0.7, 0.25, 0.55, 0.5, 0.5, 0.5])
    rows, stats = label_groups(groups, lambda p, r, m: scores)
    assert rows == [{"prompt": "p", "responses": ["r0", "r1", "r2"], "ranks": [0, 2, 1]}]  # x, y tie: left out
    assert stats["all_tied"] == 2
    # tolerance 0.2: 0.7 is within 0.2 of 0.55 (0.7 > 0.75 fails) but 0.25 is not -> ranks 0, 2, 0
    rows, _ = label_groups(groups[:1], lambda p, r, m: scores[:3], tie_tolerance=0.2)
    assert rows[0]["ranks"] == [0, 2, 0]


def _samples(tmp_path):
    from core.tasks import format_prompt

    rows = [{"prompt": format_prompt(letters), "response": r, "sample": s, "index": i, "meta": {}}
            for i, letters in enumerate([["a", "b", "c"], ["d", "e"]])
            for s, r in enumerate([" c b a", " a b c", " b a", " c b a"][: 3 if i == 0 else 2])]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ai_labeller_with_the_tiny_model_writes_rankings(tmp_path, capsys):
    from datamodules.labelling import build_parser, main
    from datamodules.preference_formats import read_preferences

    samples, out = _samples(tmp_path), tmp_path / "labels.jsonl"
    argv = [f"--samples={samples}", f"--out={out}", "--labeller=ai", f"--ai_judge={{model: {TINY_MODEL}}}"]
    build_parser().parse_args(argv)  # what rlhf pipeline checks a label stage's args with
    main(argv)
    said = capsys.readouterr().out
    assert "AI judge: 4 pairs, position bias" in said  # C(3, 2) + C(2, 2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:  # the tiny model's preferences are meaningless: the format is what is checked
        assert set(row) == {"prompt", "responses", "ranks"} and len(row["ranks"]) == len(row["responses"])
        assert min(row["ranks"]) == 0 and len(set(row["ranks"])) > 1
    assert len(read_preferences(str(out))) == len(rows) >= 1


def test_a_killed_ai_labeller_continues_from_its_saved_pairs(tmp_path, capsys, monkeypatch):
    import subprocess
    import sys

    import datamodules.labelling as labelling
    from core.outputs import progress_path
    from tests.conftest import ROOT

    samples = _samples(tmp_path)
    argv = [f"--samples={samples}", "--labeller=ai", f"--ai_judge={{model: {TINY_MODEL}}}"]
    monkeypatch.setattr(labelling, "AI_CHUNK", 1)  # the 4 pairs in 4 chunks
    labelling.main([*argv, f"--out={tmp_path / 'whole.jsonl'}"])
    calls, real = [], JudgeSpec.compare

    def compare(self, prompts, a, b):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while judging the third chunk
        return real(self, prompts, a, b)

    monkeypatch.setattr(JudgeSpec, "compare", compare)
    out = tmp_path / "labels.jsonl"
    with pytest.raises(KeyboardInterrupt):
        labelling.main([*argv, f"--out={out}"])
    assert not out.exists()
    assert [json.loads(x)["key"] for x in progress_path(out).read_text().splitlines()[1:]] == [["pairs", 0],
                                                                                              ["pairs", 1]]
    # another judge refuses the saved pairs, before any model loads (as `rlhf pipeline` runs the labeller)
    other = subprocess.run([sys.executable, "-m", "datamodules.labelling", f"--samples={samples}", f"--out={out}",
                            "--labeller=ai", f"--ai_judge={{model: {TINY_MODEL}, max_length: 128}}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert other.returncode == 5 and "progress of a run with other judge; nothing was changed" in other.stderr
    calls.clear()
    capsys.readouterr()
    labelling.main([*argv, f"--out={out}"])
    assert calls == [1, 1]  # only the two chunks not saved
    assert "continuing: 2 chunk(s) of pairs saved" in capsys.readouterr().err
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text() and not progress_path(out).exists()
    with pytest.raises(SystemExit):  # --restart belongs to the AI labeller
        labelling.main([f"--samples={samples}", f"--out={out}", "--restart"])


def test_ai_labeller_flags_are_checked_before_any_model_loads(tmp_path):
    from datamodules.labelling import main

    samples, out = _samples(tmp_path), tmp_path / "labels.jsonl"
    for extra in (["--labeller=ai"], ["--ai_judge={model: m}"], ["--labeller=ai", "--ai_judge={model: m, x: 1}"],
                  ["--labeller=ai", "--ai_judge={model: m, template: 'no fields'}"]):
        with pytest.raises(SystemExit) as err:
            main([f"--samples={samples}", f"--out={out}", *extra])
        assert err.value.code == 2
    assert not out.exists()


def test_eval_pairwise_judge_on_the_tiny_model(tmp_path):
    from recipes.cli import main as rlhf
    from tests.test_eval_recipe import write_generations

    policy, baseline = tmp_path / "policy.jsonl", tmp_path / "baseline.jsonl"
    write_generations(policy, correct=True)
    write_generations(baseline, correct=False)
    out = tmp_path / "eval"
    assert rlhf(["eval", "--policy", str(policy), "--baseline", str(baseline), "--judge", "{oracle: synthetic}",
                 "--pairwise_judge", str(TINY_MODEL), "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["win_rate"]["win_rate"] == 1.0  # the oracle's win rate is still there
    pair = result["pairwise"]
    assert pair["n"] == 6 and pair["low"] <= pair["win_rate"] <= pair["high"]
    d = pair["decisions"]
    assert d["wins"] + d["ties"] + d["losses"] == 6 and 0 <= pair["position_bias"] <= 1
    assert "Pairwise judge: P(policy beats baseline)" in (out / "eval.md").read_text()

    # a file against itself: both orders show the same text, so p2 = 1 - p1 and every P is 1/2 exactly
    same = tmp_path / "same"
    assert rlhf(["eval", "--policy", str(policy), "--baseline", str(policy), "--pairwise_judge",
                 f"{{model: {TINY_MODEL}, batch_size: 4}}", "--tie_tolerance", "1e-9", "--out", str(same),
                 "--device", "cpu"]) == 0
    pair = json.loads((same / "eval.json").read_text())["pairwise"]
    assert pair["win_rate"] == pytest.approx(0.5, abs=1e-12) and pair["stderr"] == pytest.approx(0, abs=1e-12)
    assert (pair["decisions"]["ties"], pair["decisions"]["n"]) == (6, 6)
    assert "win_rate" not in json.loads((same / "eval.json").read_text())  # no --judge: no score win rate


def test_eval_pairwise_judge_needs_a_baseline_and_a_good_spec(tmp_path):
    from recipes.cli import main as rlhf
    from tests.test_eval_recipe import write_generations

    policy = tmp_path / "policy.jsonl"
    write_generations(policy, correct=True)
    for extra in (["--pairwise_judge", str(TINY_MODEL)],
                  ["--baseline", str(policy), "--pairwise_judge", "{model: m, options: [A]}"]):
        with pytest.raises(SystemExit) as err:
            rlhf(["eval", "--policy", str(policy), "--out", str(tmp_path / "x"), *extra])
        assert err.value.code == 2


def test_a_pipeline_label_stage_takes_the_ai_labeller(tmp_path):
    from recipes import pipeline

    path = tmp_path / "p.yaml"
    path.write_text("out: runs/x\nstages:\n  - name: labels\n    stage: label\n    args: {samples: s.jsonl, "
                    "add_to: a.jsonl, labeller: ai, ai_judge: '{model: runs/sft, seed: 1}', tie_tolerance: 0.05}\n")
    pipeline.check_tools(pipeline.load(str(path)))
    path.write_text(path.read_text().replace("ai_judge", "ai_judges"))
    with pytest.raises(pipeline.PipelineConfigError, match="unrecognized arguments: --ai_judges"):
        pipeline.check_tools(pipeline.load(str(path)))
