"""Recipe tier: `rlhf eval` on two generation files judged by the synthetic oracle, and the KL path on the tiny model."""

import json
from types import SimpleNamespace

import pytest
import torch

from datamodules.synthetic import format_prompt, target_response
from modules.losses.eval import wilson_interval
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
    assert (won["low"], won["high"]) == pytest.approx(wilson_interval(1.0, 6))
    assert won["low"] == pytest.approx(0.6096, abs=1e-4)  # (1 + z^2/12 - z sqrt(z^2/144)) / (1 + z^2/6)
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
    from modules.models import ModelSpec, load_tokenizer
    from recipes.eval import encode_responses, response_logps

    tok = load_tokenizer(str(TINY_MODEL))
    rows = [{"prompt": format_prompt(x), "response": r, "finish_reason": f, "where": "t"}
            for x, r, f in zip(LETTERS, [" c b a", " b", " e h e h"], ["eos", "length", "eos"])]
    encoded = encode_responses(tok, rows)
    assert encoded[0][1][-1] == tok.eos_token_id and encoded[1][1][-1] != tok.eos_token_id
    spec = ModelSpec(path=str(TINY_MODEL))
    one = response_logps(spec, encoded, tok.pad_token_id, SimpleNamespace(batch_size=1, temperature=1.0), "cpu")
    batched = response_logps(spec, encoded, tok.pad_token_id, SimpleNamespace(batch_size=3, temperature=1.0), "cpu")
    assert [len(x) for x in one] == [len(r) for _, r in encoded]
    for a, b in zip(one, batched):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert (a < 0).all()


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
