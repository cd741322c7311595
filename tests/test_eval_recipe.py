"""Recipe tier: `rlhf eval` on two generation files judged by the synthetic oracle, and the KL path on the tiny
model."""

import json
from types import SimpleNamespace

import pytest
import torch

from core.losses.eval import wilson_interval
from core.tasks import format_prompt, target_response
from recipes.cli import main as rlhf
from tests.conftest import TINY_MODEL

LETTERS = [["a", "b", "c"], ["c", "a", "f", "b"], ["h", "e"]]


def write_generations(path, correct: bool, samples: int = 2) -> None:
    rows = []
    for letters in LETTERS:
        prompt = format_prompt(letters)
        for s in range(samples):
            # wrong: the letters unreversed (scores 1/3, 0 and 0 on these prompts, never 1)
            response = target_response(prompt) if correct else " " + " ".join(letters)
            rows.append({"prompt": prompt, "response": response, "sample": s,
                         "finish_reason": "eos" if s == 0 else "length", "tokens": 4, "meta": {}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def files(tmp_path):
    policy, baseline = tmp_path / "policy.jsonl", tmp_path / "baseline.jsonl"
    write_generations(policy, correct=True)
    write_generations(baseline, correct=False)
    return policy, baseline


def test_win_rate_against_a_wrong_baseline(files, tmp_path, capsys):
    policy, baseline = files
    out = tmp_path / "eval"
    code = rlhf(["eval", "--policy", str(policy), "--baseline", str(baseline), "--judge", "{oracle: synthetic}",
                 "--out", str(out)])
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    assert set(result) == {"policy", "baseline", "judge", "win_rate", "confidence"}
    won = result["win_rate"]
    assert (won["wins"], won["ties"], won["losses"], won["n"]) == (6, 0, 0, 6)
    assert won["win_rate"] == 1.0 and won["unpaired_policy"] == won["unpaired_baseline"] == 0
    # 3 prompts x 2 samples, every one won: no spread within or across prompts, so the prompts count once each
    # (n_effective 3, core/losses/eval.py win_tie_loss); Wilson's low end at p = 1 is n / (n + z^2)
    assert won["n_effective"] == 3 and (won["low"], won["high"]) == pytest.approx(wilson_interval(1.0, 3))
    assert won["low"] == pytest.approx(3 / (3 + 1.959964**2), abs=1e-6)  # 0.4385
    assert result["policy"]["score"]["mean"] == 1.0 and result["policy"]["score"]["stderr"] == 0.0
    # baseline: "a b c" vs target "c b a": 1/3; "c a f b" vs "b f a c": 0; "h e" vs "e h": 0; two samples each
    assert result["baseline"]["score"]["mean"] == pytest.approx((1 / 3) / 3)
    assert result["policy"]["eos_rate"] == 0.5 and result["policy"]["mean_tokens"] == 4.0
    assert result["policy"]["mean_length"] == pytest.approx((3 + 4 + 2) / 3)  # words per response
    assert "kl" not in result
    table = (out / "eval.md").read_text()
    assert "**1.000**" in table and "6 wins, 0 ties, 0 losses of 6 pairs" in table
    assert table in capsys.readouterr().out


def test_kl_of_a_model_to_itself_is_exactly_zero(files, tmp_path):
    policy, _ = files
    rows = [json.loads(line) for line in policy.read_text().splitlines()]
    rows[1]["response"] = ""  # an immediate EOS still has one token scored
    policy.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "kl"
    code = rlhf(["eval", "--policy", str(policy), "--policy_model", str(TINY_MODEL), "--reference_model",
                 str(TINY_MODEL), "--out", str(out), "--batch_size", "4", "--device", "cpu"])
    assert code == 0
    kl = json.loads((out / "eval.json").read_text())["kl"]
    assert (kl["kl"], kl["stderr"], kl["n"]) == (0.0, 0.0, 6)


def test_batched_logps_equal_one_row_at_a_time():
    from core.models import load_saved_causal_lm, load_tokenizer
    from recipes.eval import encode_responses, response_logps

    tok = load_tokenizer(str(TINY_MODEL))
    rows = [{"prompt": format_prompt(x), "response": r, "finish_reason": f, "where": "t"}
            for x, r, f in zip(LETTERS, [" c b a", " b", " e h e h"], ["eos", "length", "eos"])]
    encoded = encode_responses(tok, rows)
    assert encoded[0][1][-1] == tok.eos_token_id and encoded[1][1][-1] != tok.eos_token_id
    spec = load_saved_causal_lm(str(TINY_MODEL))
    one = response_logps(spec, encoded, tok.pad_token_id, SimpleNamespace(batch_size=1, temperature=1.0), "cpu")
    batched = response_logps(spec, encoded, tok.pad_token_id, SimpleNamespace(batch_size=3, temperature=1.0), "cpu")
    assert [len(x) for x in one] == [len(r) for _, r in encoded]
    for a, b in zip(one, batched):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert (a < 0).all()


def test_a_model_against_itself_ties_everywhere_with_zero_kl(tmp_path, synthetic_dir):
    out = tmp_path / "self"
    code = rlhf(["eval", "--policy", str(TINY_MODEL), "--baseline", str(TINY_MODEL), "--prompts",
                 str(synthetic_dir / "prompts_val.jsonl"), "--num_samples", "2", "--max_new_tokens", "4",
                 "--batch_size", "4", "--judge", "{oracle: synthetic}", "--reference_model", str(TINY_MODEL),
                 "--out", str(out), "--device", "cpu"])
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    n = 2 * len((synthetic_dir / "prompts_val.jsonl").read_text().splitlines())
    assert result["policy"]["file"] == str(out / "policy.jsonl") and result["policy"]["model"] == str(TINY_MODEL)
    assert (out / "policy.jsonl").read_text() == (out / "baseline.jsonl").read_text()  # same model, same seeds
    won = result["win_rate"]
    assert (won["wins"], won["ties"], won["losses"], won["n"], won["win_rate"]) == (0, n, 0, n, 0.5)
    kl = result["kl"]  # the policy model defaults to --policy
    assert (kl["kl"], kl["stderr"], kl["n"], kl["policy_model"]) == (0.0, 0.0, n, str(TINY_MODEL))


def test_a_prompt_repeated_in_the_prompt_file_pairs_by_its_index(tmp_path):
    prompt = format_prompt(["a", "b"])
    right, wrong = target_response(prompt), " a b"
    for name, responses in (("p", [right, wrong]), ("b", [wrong, wrong])):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"prompt": prompt, "response": r, "sample": 0, "index": i}) + "\n"
            for i, r in enumerate(responses)))
    out = tmp_path / "e"
    assert rlhf(["eval", "--policy", str(tmp_path / "p.jsonl"), "--baseline", str(tmp_path / "b.jsonl"),
                 "--judge", "{oracle: synthetic}", "--out", str(out)]) == 0
    won = json.loads((out / "eval.json").read_text())["win_rate"]
    assert (won["wins"], won["ties"], won["losses"]) == (1, 1, 0)


def test_a_model_needs_prompts(tmp_path):
    with pytest.raises(SystemExit) as err:
        rlhf(["eval", "--policy", str(TINY_MODEL), "--judge", "{oracle: synthetic}", "--out", str(tmp_path)])
    assert err.value.code == 2


def test_bad_inputs_stop_before_any_model_loads(files, tmp_path):
    policy, baseline = files
    out = str(tmp_path / "x")
    with pytest.raises(SystemExit) as err:  # win rate without a judge
        rlhf(["eval", "--policy", str(policy), "--baseline", str(baseline), "--out", out])
    assert err.value.code == 2
    with pytest.raises(SystemExit):
        rlhf(["eval", "--policy", str(policy), "--judge", "{oracle: nope}", "--out", out])
    with pytest.raises(SystemExit):  # KL needs both models
        rlhf(["eval", "--policy", str(policy), "--policy_model", str(TINY_MODEL), "--out", out])
    baseline.write_text(baseline.read_text() + baseline.read_text().splitlines()[0] + "\n")
    assert rlhf(["eval", "--policy", str(policy), "--baseline", str(baseline), "--judge", "{oracle: synthetic}",
                 "--out", out]) == 3  # DataError: a repeated (prompt, sample), naming its line


# ---- found in review: tokenization at the boundary, BOS, pairing, identical answers ----

def test_a_prompt_ending_in_a_space_is_scored_not_refused(capsys):
    from core.models import load_tokenizer
    from recipes.eval import encode_responses

    tok = load_tokenizer(str(TINY_MODEL))
    prompt = format_prompt(["a", "b"]) + " "  # "...Answer: ": the space would merge into the response's first token
    rows = [{"prompt": prompt, "response": "b a", "finish_reason": "eos", "where": "t:1"},
            {"prompt": format_prompt(["a", "b"]), "response": " b a", "finish_reason": None, "where": "t:2"}]
    (p1, r1), (p2, r2) = encode_responses(tok, rows)
    assert p1 == tok(prompt)["input_ids"]
    assert r1 == tok("b a", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # as it was sampled
    assert r2 == tok(rows[1]["prompt"] + " b a")["input_ids"][len(p2):]  # no finish_reason: no EOS assumed
    assert "KL: 1 of 2 responses tokenized apart from their prompt" in capsys.readouterr().err


def test_prompts_are_sampled_after_one_bos_as_training_reads_them(bos_model_dir):
    from core.models import load_tokenizer
    from core.tokenize import encode_prompts
    from datamodules.formats import read_prompts

    tok = load_tokenizer(str(bos_model_dir), padding_side="left")
    records = [SimpleNamespace(prompt=[{"role": "user", "content": "hi"}], where="f:1", meta={})]
    (row,) = encode_prompts(records, tok, None)
    assert row["prompt"].startswith("<s>") and row["input_ids"].count(tok.bos_token_id) == 1  # not <s><s>
    assert read_prompts  # the same reader `rlhf generate` uses hands encode_prompts these records


def test_one_baseline_row_is_never_paired_twice_and_identical_answers_tie(tmp_path, capsys):
    """The policy file (rlhf generate, a prompt twice in the prompt file: index 0 and 1) and a baseline without
    index: one pair, the other policy row unpaired. Identical texts tie even where a judge's scores differ."""
    prompt = format_prompt(["a", "b"])
    policy, baseline = tmp_path / "p.jsonl", tmp_path / "b.jsonl"
    policy.write_text("".join(json.dumps({"prompt": prompt, "response": " b a", "sample": 0, "index": i}) + "\n"
                              for i in (0, 1)))
    baseline.write_text(json.dumps({"prompt": prompt, "response": " b a", "sample": 0}) + "\n")
    out = tmp_path / "e"
    assert rlhf(["eval", "--policy", str(policy), "--baseline", str(baseline), "--judge", "{oracle: synthetic}",
                 "--out", str(out)]) == 0
    won = json.loads((out / "eval.json").read_text())["win_rate"]
    assert (won["n"], won["unpaired_policy"], won["unpaired_baseline"]) == (1, 1, 0)
    assert (won["ties"], won["identical_pairs"]) == (1, 1)
    assert "1 pairs; unpaired rows: 1 policy, 0 baseline" in capsys.readouterr().err


def test_identical_texts_tie_although_the_judge_scores_them_apart(tmp_path, monkeypatch):
    import core.reward_spec

    rows = [{"prompt": format_prompt(list(x)), "response": " z", "sample": 0} for x in ("ab", "cd")]
    policy, baseline = tmp_path / "p.jsonl", tmp_path / "b.jsonl"
    policy.write_text("".join(json.dumps(r) + "\n" for r in rows))
    baseline.write_text("".join(json.dumps(dict(r, response=" y" if i else " z")) + "\n" for i, r in enumerate(rows)))
    # a judge whose score of one text drifts by position (as batch padding does): policy rows a bit higher
    monkeypatch.setattr(core.reward_spec.RewardSpec, "score",
                        lambda self, prompts, responses, metas, device=None: torch.tensor(
                            [1.0 + 1e-6, 1.0 + 1e-6, 1.0, 0.5]))
    out = tmp_path / "e"
    assert rlhf(["eval", "--policy", str(policy), "--baseline", str(baseline), "--judge", "{oracle: synthetic}",
                 "--out", str(out)]) == 0
    won = json.loads((out / "eval.json").read_text())["win_rate"]
    assert (won["wins"], won["ties"], won["losses"], won["identical_pairs"]) == (1, 1, 0, 1)  # not 2 wins
