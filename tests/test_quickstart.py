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
