"""The quickstart runs its pipeline file end to end offline (two steps per stage), reports the oracle scores and
resumes; --prepare-only writes what the pipeline file reads."""

import json

import pytest

SMOKE = ["--n-train", "100", "--set", "trainer.max_steps=2", "--set", "trainer.val_check_interval=1",
         "--set", "trainer.limit_val_batches=1"]


@pytest.mark.slow
def test_quickstart_runs_the_pipeline_file_reports_every_stage_and_resumes(tmp_path, capsys, monkeypatch):
    """`rlhf quickstart` is configs/pipeline/quickstart.yaml run in OUT (two steps per stage here): every stage
    done in the manifest, each policy's oracle score and its win rate and KL against SFT in results.json (what
    benchmarks/alignment.py reads) and printed; the same command again runs nothing; another task in the same
    folder stops before anything runs."""
    from recipes.quickstart import main

    monkeypatch.setattr("sys.argv", ["rlhf quickstart"])
    out = tmp_path / "qs"
    main(["--out", str(out), *SMOKE])
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    names = [s["name"] for s in manifest["stages"]]
    assert names[:5] == ["sft", "reward", "rs", "dpo", "ppo"] and all(s["status"] == "done" for s in manifest["stages"])
    assert not any(s["round"] for s in manifest["stages"])  # --rounds 0 by default
    results = json.loads((out / "results.json").read_text())
    assert set(results["scores"]) == {"base (random init)", "sft", "reward model", "dpo", "rejection sampling", "ppo"}
    assert all(0.0 <= v <= 1.0 for v in results["scores"].values())
    assert set(results["versus_sft"]) == {"dpo", "rs", "ppo"} and results["rl_reward"] == "model"
    for stage in ("dpo", "rs", "ppo"):  # the numbers are the evals' own
        ev = json.loads((out / f"{stage}_eval" / "eval.json").read_text())
        assert results["versus_sft"][stage]["win_rate"] == ev["win_rate"]["win_rate"]
        assert results["versus_sft"][stage]["kl"] == ev["kl"]["kl"]
        assert ev["baseline"]["score"]["mean"] == results["scores"]["sft"]
    assert set(results["stage_wall_s"]) == {"sft", "reward", "dpo", "rs", "ppo"}
    assert "rejection sampling" in printed and "win rate against SFT" in printed
    assert (out / "report" / "report.html").is_file()

    main(["--out", str(out), *SMOKE])  # again: the pipeline skips every stage
    again = capsys.readouterr().out
    assert again.count("skipped (done, unchanged)") == len(names) and "running" not in again
    assert json.loads((out / "results.json").read_text())["scores"] == results["scores"]
    with pytest.raises(SystemExit, match="holds a run of"):
        main(["--out", str(out), "--task", "sort", *SMOKE])


def test_prepare_only_writes_the_data_a_fresh_prompt_pool_and_the_base_model_only(tmp_path, monkeypatch):
    """`--prepare-only`: what configs/pipeline/quickstart.yaml reads under its run folder, and nothing trained."""
    from recipes.quickstart import POOL, main

    monkeypatch.setattr("sys.argv", ["rlhf quickstart"])
    out = tmp_path / "qs"
    main(["--out", str(out), "--n-train", "100", "--prepare-only"])
    data = {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in (out / "data").glob("*.jsonl")}
    assert set(data) == {f"{kind}_{split}" for kind in ("sft", "pairs", "rankings", "prompts")
                         for split in ("train", "val")}
    pool = [json.loads(line)["prompt"] for line in (out / "pool" / "prompts_train.jsonl").read_text().splitlines()]
    assert len(pool) == len(set(pool)) == POOL
    assert not set(pool) & {row["prompt"] for rows in data.values() for row in rows}  # never trained or evaluated on
    assert ((out / "base" / "config.json").is_file()
            and sorted(p.name for p in out.iterdir()) == ["base", "data", "pool", "quickstart.json"])
