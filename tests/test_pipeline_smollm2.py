"""configs/pipeline/smollm2-hh.yaml and its CPU slice: both load, and every training stage's command parses against
its recipe (--print_config exits before any model loads, so neither the converted model nor the data is needed)."""

from __future__ import annotations

import pytest

from recipes import pipeline
from tests.conftest import ROOT, printed_config

FILES = ["smollm2-hh", "smollm2-hh-cpu"]


@pytest.mark.parametrize("name", FILES)
def test_the_smollm2_pipeline_stages_parse_against_their_recipes(name, monkeypatch, capsys):

    monkeypatch.chdir(ROOT)
    loaded = pipeline.load(f"configs/pipeline/{name}.yaml")
    trained = [s for s in loaded.stages if not s.tool]
    assert [s.stage for s in trained] == ["sft", "reward", "dpo", "ppo"]
    for stage in trained:
        printed = printed_config(stage.stage, pipeline.stage_args(loaded, stage, "/tmp/out")[1:], monkeypatch, capsys)
        assert "/tmp/out/" + stage.name in printed
        if name.endswith("-cpu"):
            assert "accelerator: cpu" in printed, stage.name


@pytest.mark.parametrize("name", FILES)
def test_the_smollm2_evals_pair_samples_of_the_same_held_out_prompts(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    loaded = pipeline.load(f"configs/pipeline/{name}.yaml")
    base = "/tmp/out"
    samples = {s.name: dict(s.args) for s in loaded.stages if s.stage == "generate"}
    evals = {s.name: dict(s.args) for s in loaded.stages if s.stage == "eval"}
    assert set(samples) == {"sft_samples", "dpo_samples", "ppo_samples"}
    assert set(evals) == {"dpo_eval", "ppo_eval"}
    sampling = {k: v for k, v in samples["sft_samples"].items() if k != "model"}
    assert sampling["prompts"].endswith("hh-rlhf-harmless/validation.jsonl")  # held out: never trained on
    for args in samples.values():  # same prompts, slice, seed and temperature: rows pair up
        assert {k: v for k, v in args.items() if k != "model"} == sampling
    for stage in ("dpo", "ppo"):
        args = evals[f"{stage}_eval"]
        assert args["judge"] == "${reward}" and args["baseline"] == "${sft_samples}"
        assert args["policy_model"] == "${" + stage + "}" and args["reference_model"] == "${sft}"
        assert args["temperature"] == sampling["temperature"]  # the KL's temperature is the samples'
    tool = next(s for s in loaded.stages if s.name == "ppo_eval")
    assert f"--judge={base}/reward" in pipeline.stage_args(loaded, tool, base)
