"""The quickstart runs end to end offline (small, SFT only) and reports the oracle scores."""

import json

import pytest


@pytest.mark.slow
def test_quickstart_sft_only(tmp_path, capsys, monkeypatch):
    from recipes.quickstart import main

    monkeypatch.setattr("sys.argv", ["rlhf quickstart"])
    main(["--out", str(tmp_path / "qs"), "--n-train", "300", "--stages", "sft"])
    out = capsys.readouterr().out
    assert "base (random init)" in out and "sft " in out
    assert (tmp_path / "qs" / "sft" / "model.safetensors").exists()
    results = json.loads((tmp_path / "qs" / "results.json").read_text())  # what benchmarks/alignment.py reads
    assert results["task"] == "reverse" and set(results["scores"]) == {"base (random init)", "sft"}
    assert results["stage_wall_s"]["sft"] > 0 and results["versus_sft"] == {}


def test_rounds_zero_writes_the_data_a_fresh_prompt_pool_and_the_base_model_only(tmp_path, monkeypatch):
    """`--rounds 0`: what configs/pipeline/quickstart.yaml reads under its run folder, and nothing trained."""
    from recipes.quickstart import POOL, main

    monkeypatch.setattr("sys.argv", ["rlhf quickstart"])
    out = tmp_path / "qs"
    main(["--out", str(out), "--n-train", "100", "--rounds", "0"])
    data = {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in (out / "data").glob("*.jsonl")}
    assert set(data) == {f"{kind}_{split}" for kind in ("sft", "pairs", "rankings", "prompts") for split in ("train", "val")}
    pool = [json.loads(line)["prompt"] for line in (out / "pool" / "prompts_train.jsonl").read_text().splitlines()]
    assert len(pool) == len(set(pool)) == POOL
    assert not set(pool) & {row["prompt"] for rows in data.values() for row in rows}  # never trained or evaluated on
    assert (out / "base" / "config.json").is_file() and sorted(p.name for p in out.iterdir()) == ["base", "data", "pool"]
