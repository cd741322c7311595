"""Recipe tier: `rlhf reward fit` on the tiny config, then validate (saved model and checkpoint) and predict;
every reward YAML parses against the recipe."""

import json
import math
import sys

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_configs import documented_command

TINY = "configs/reward/tiny.yaml"
CONFIGS = sorted((ROOT / "configs" / "reward").glob("*.yaml"))


def test_fit_validate_predict_tiny(run_recipe, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    run_recipe("reward", "fit", "--config", TINY, f"--model.save_dir={out}", "--trainer.max_steps=10",
               "--trainer.val_check_interval=5")
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    metrics = next((tmp_path / "runs").rglob("metrics.csv")).read_text()
    assert "train/loss" in metrics and "val/rewards/accuracies" in metrics and "val/rewards/margins" in metrics
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    capsys.readouterr()

    # validate the saved Hugging Face model: Lightning prints the metrics table
    cli = run_recipe("reward", "validate", "--config", TINY, f"--model.backbone.path={out}")
    accuracy = cli.trainer.callback_metrics["val/rewards/accuracies"].item()
    assert 0.0 <= accuracy <= 1.0 and "val/rewards/accuracies" in capsys.readouterr().out
    # ... and the checkpoint of the same weights: the same accuracy and loss
    cli_ckpt = run_recipe("reward", "validate", "--config", TINY, f"--ckpt_path={last}")
    assert cli_ckpt.trainer.callback_metrics["val/rewards/accuracies"].item() == pytest.approx(accuracy)
    assert cli_ckpt.trainer.callback_metrics["val/loss"].item() == pytest.approx(
        cli.trainer.callback_metrics["val/loss"].item(), rel=1e-4)

    scores = tmp_path / "scores.jsonl"
    run_recipe("reward", "predict", "--config", TINY, f"--model.backbone.path={out}", f"--model.predict_file={scores}")
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(rows) == 2 * 32  # 32 validation pairs: the chosen and the rejected row of each
    assert set(rows[0]) == {"prompt", "response", "score", "pair", "chosen"}
    assert rows[0]["prompt"].startswith("Reverse:") and all(math.isfinite(r["score"]) for r in rows)
    assert sorted(r["pair"] for r in rows) == sorted(list(range(32)) * 2)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_reward_config_parses(path, monkeypatch, capsys):
    from recipes.reward import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["rlhf reward"])
    with pytest.raises(SystemExit) as exit_:
        # an overlay config parses on top of the configs its header's command names; no weights are loaded
        main(["fit", *[a for c in documented_command(path)[1] for a in ("--config", c)], "--print_config"])
    assert exit_.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["backbone"]["path"] and config["data"]["train_file"]
    assert "tokenizer" not in config["data"]  # linked from model.backbone.path


def test_help_documents_reward_arguments(capsys):
    from recipes.reward import main

    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    for arg in ["--model.backbone.path", "--model.center_coef", "--model.predict_file", "--data.layout",
                "--data.strength_map"]:
        assert arg in text, arg


@pytest.mark.parametrize("stage,config", [("reward", TINY), ("dpo", "configs/dpo/tiny.yaml")])
def test_killed_and_resumed_preference_run_logs_the_same_losses(resume_runs, stage, config):
    """The preference train loader resumes mid-epoch (32 batches an epoch; killed after 3 steps)."""
    from datamodules.preference import PreferenceDataModule
    from datamodules.resumable import ResumableLoader

    dm = PreferenceDataModule(str(ROOT / "tests/fixtures/synthetic/pairs_train.jsonl"),
                              tokenizer=str(ROOT / "tests/fixtures/tiny-llama"))
    dm.setup("fit")
    assert isinstance(dm.train_dataloader(), ResumableLoader)
    full, resumed = resume_runs(stage, config, 3, 6)
    after = {step: loss for step, loss in resumed.items() if step >= 3}
    assert sorted(after) == [3, 4, 5]
    for step, loss in after.items():
        assert loss == pytest.approx(full[step], rel=1e-5), step


@pytest.mark.parametrize("flag", ["--data.share_prompt", "--data.packing"])
def test_predict_writes_one_row_per_response_from_packed_configs(run_recipe, tmp_path, flag):
    scores = tmp_path / "scores.jsonl"
    run_recipe("reward", "predict", "--config", TINY, flag, "true", f"--model.predict_file={scores}")
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(rows) == 2 * 32 and rows[0]["prompt"].startswith("Reverse:")


def test_rankings_with_shared_prompt_fit_and_validate(run_recipe, tmp_path, capsys):
    data = ["--data.layout", "rankings", "--data.share_prompt", "true",
            "--data.train_file", "tests/fixtures/synthetic/rankings_train.jsonl",
            "--data.val_file", "tests/fixtures/synthetic/rankings_val.jsonl"]
    run_recipe("reward", "fit", "--config", TINY, *data, "--trainer.max_steps", "2",
               f"--model.save_dir={tmp_path / 'rm'}")
    run_recipe("reward", "validate", "--config", TINY, *data, f"--model.backbone.path={tmp_path / 'rm'}")
    assert "val/ranking_accuracy" in capsys.readouterr().out
