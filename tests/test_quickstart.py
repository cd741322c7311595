"""The quickstart runs end to end offline (small, SFT only) and reports the oracle scores."""

import pytest


@pytest.mark.slow
def test_quickstart_sft_only(tmp_path, capsys, monkeypatch):
    from recipes.quickstart import main

    monkeypatch.setattr("sys.argv", ["rlhf quickstart"])
    main(["--out", str(tmp_path / "qs"), "--n-train", "300", "--stages", "sft"])
    out = capsys.readouterr().out
    assert "base (random init)" in out and "sft " in out
    assert (tmp_path / "qs" / "sft" / "model.safetensors").exists()
