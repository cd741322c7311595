"""RewardSpec reward functions ("package.module:name" callables): weighted with models, the oracle as one of
them, bad import paths refused at construction (no model loaded), bad returns refused naming the function,
and a function written here driving `rlhf ppo fit` on the tiny config."""

from __future__ import annotations

import csv
import json
import math
import textwrap

import pytest
import torch

from core.reward_spec import RewardSpec, as_reward_spec

PROMPT = "Reverse: a b c\nAnswer:"
RESPONSES = [" c b a", " a b c", " c b"]

FUNCTIONS = '''
def length(prompts, responses, meta):
    return [float(len(r)) for r in responses]

def has_b(prompts, responses, meta):
    return [1.0 if "b" in r.split() else 0.0 for r in responses]

def short(prompts, responses, meta):
    return [1.0]

def nan(prompts, responses, meta):
    return [float("nan")] * len(responses)

def not_a_list(prompts, responses, meta):
    return None

def echo_meta(prompts, responses, meta):
    return [float(m.get("bonus", 0)) for m in meta]

NOT_CALLABLE = 3
'''


@pytest.fixture
def fns(tmp_path, monkeypatch):
    """A module `rf_test_fns` with the functions above, importable for this test."""
    (tmp_path / "rf_test_fns.py").write_text(FUNCTIONS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "rf_test_fns"


def test_weights_combine_two_functions(fns):
    # length: " c b a" 6, " a b c" 6, " c b" 4; has_b: 1, 1, 1 -> 0.5 * len + 2 * has_b
    spec = RewardSpec(functions=[f"{fns}:length", f"{fns}:has_b"], weights=[0.5, 2.0]).load()
    got = spec.score([PROMPT] * 3, RESPONSES)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([0.5 * 6 + 2.0, 0.5 * 6 + 2.0, 0.5 * 4 + 2.0]))
    # default weights 1.0; whitening applies to the combined score: x = [7, 7, 5], mean 19/3, std(ddof=1) sqrt(4/3)
    spec = RewardSpec(functions=[f"{fns}:length", f"{fns}:has_b"], whiten=True)
    x, mean, std = torch.tensor([7.0, 7.0, 5.0]), 19 / 3, math.sqrt(((2 / 3) ** 2 * 2 + (4 / 3) ** 2) / 2)
    torch.testing.assert_close(spec.score([PROMPT] * 3, RESPONSES), (x - mean) / std)
    # meta reaches the function, one dict per row (missing meta -> empty dicts)
    spec = RewardSpec(functions=[f"{fns}:echo_meta"])
    assert spec.score([PROMPT] * 2, RESPONSES[:2], [{"bonus": 3}, {}]).tolist() == [3.0, 0.0]
    assert spec.score([PROMPT] * 2, RESPONSES[:2]).tolist() == [0.0, 0.0]


def test_oracle_short_name_is_the_shipped_function(fns):
    short = RewardSpec(oracle="synthetic").score([PROMPT] * 3, RESPONSES)
    path = RewardSpec(functions=["core.tasks:oracle_reward"]).score([PROMPT] * 3, RESPONSES)
    # target " c b a": all 3 right; " a b c": only the middle b; " c b": 2 right of max(3, 2)
    torch.testing.assert_close(short, torch.tensor([1.0, 1 / 3, 2 / 3]))
    torch.testing.assert_close(path, short)
    # the oracle counts after `functions` for the weights: 1 * length + 3 * oracle
    both = RewardSpec(functions=[f"{fns}:length"], oracle="synthetic", weights=[1.0, 3.0])
    torch.testing.assert_close(both.score([PROMPT] * 3, RESPONSES), torch.tensor([6.0 + 3.0, 6.0 + 1.0, 4.0 + 2.0]))
    assert as_reward_spec({"functions": [f"{fns}:length"]}).functions == [f"{fns}:length"]


@pytest.mark.parametrize(
    "path, message",
    [
        ("no_such_module_xyz:reward", "cannot import module 'no_such_module_xyz'"),
        ("{fns}:missing", "has no attribute 'missing'"),
        ("{fns}:NOT_CALLABLE", "not a callable"),
        ("{fns}.length", "expected 'package.module:name'"),
        ("{fns}:", "expected 'package.module:name'"),
    ],
)
def test_bad_paths_fail_at_construction_naming_the_path(fns, path, message):
    path = path.format(fns=fns)
    # a model that does not exist: construction must fail on the function before anything loads
    with pytest.raises(ValueError, match=message) as err:
        RewardSpec(models=[{"path": "does/not/exist"}], functions=[path])
    assert repr(path) in str(err.value)
    with pytest.raises(ValueError, match=message):
        as_reward_spec({"functions": [path]})  # what the modules call on LightningCLI's config


def test_bad_returns_raise_naming_the_function(fns):
    for name, message in [("short", "returned 1 scores for 3 responses"), ("nan", "non-finite"),
                          ("not_a_list", "one float per pair")]:
        with pytest.raises(ValueError, match=message) as err:
            RewardSpec(functions=[f"{fns}:{name}"]).score([PROMPT] * 3, RESPONSES)
        assert f"{fns}:{name}" in str(err.value)


def test_combination_errors(fns):
    with pytest.raises(ValueError, match="no reward functions"):  # llama2 takes two models and nothing else
        RewardSpec(models=[{"path": "h"}, {"path": "s"}], functions=[f"{fns}:length"], combine="llama2")
    with pytest.raises(ValueError, match="no reward functions"):
        RewardSpec(models=[{"path": "h"}, {"path": "s"}], oracle="synthetic", combine="llama2")
    with pytest.raises(ValueError, match=r"3 weights for 1 models \+ 1 functions"):
        RewardSpec(models=[{"path": "m"}], functions=[f"{fns}:length"], weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="reward models or oracle"):
        RewardSpec()


LENGTH_REWARD = '''
import json, os

def reward(prompts, responses, meta):
    with open(os.environ["LENGTH_REWARD_LOG"], "a") as f:
        f.write(json.dumps({"responses": responses, "meta": meta}) + "\\n")
    return [float(len(r)) for r in responses]
'''


def test_function_drives_ppo_fit(run_recipe, tmp_path, monkeypatch):
    (tmp_path / "length_reward.py").write_text(textwrap.dedent(LENGTH_REWARD))
    monkeypatch.syspath_prepend(str(tmp_path))
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("LENGTH_REWARD_LOG", str(log))
    run_recipe("ppo", "fit", "--config", "configs/ppo/tiny.yaml", "--model.reward.oracle=null",
               "--model.reward.functions=[length_reward:reward]", "--trainer.max_steps=2",
               f"--model.save_dir={tmp_path / 'hf'}")
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    first = calls[0]  # the first rollout: 8 prompts x 1 sample, before any validation
    assert len(first["responses"]) == 8 and all("target" in m for m in first["meta"])  # prompt rows' extra fields
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    name = "train/reward"  # mean score of the rollout's responses
    logged = next(float(r[name]) for r in rows if r.get(name))
    expected = sum(len(r) for r in first["responses"]) / len(first["responses"])
    assert logged == pytest.approx(expected, rel=1e-6)


# ---- found in review ----

def test_batch_whitening_of_one_response_and_llama2_weights_are_refused():
    import pytest

    from core.reward_spec import RewardSpec

    spec = RewardSpec(functions=["tests.test_reward_functions:_length"], whiten=True)
    with pytest.raises(ValueError, match="needs two or more responses per call"):
        spec.score(["p"], ["abc"])
    assert spec.score(["p", "q"], ["a", "abc"]).tolist() == pytest.approx([-0.7071068, 0.7071068], abs=1e-6)
    fixed = RewardSpec(functions=["tests.test_reward_functions:_length"], whiten=True, whiten_mean=1.0,
                       whiten_std=2.0)
    assert fixed.score(["p"], ["abc"]).tolist() == pytest.approx([(3 - 1) / 2])  # fixed statistics: fine alone
    with pytest.raises(ValueError, match="takes no weights"):
        RewardSpec(models=["a", "b"], combine="llama2", weights=[1.0, 1.0])


def _length(prompts, responses, meta=None):
    return [float(len(r)) for r in responses]
