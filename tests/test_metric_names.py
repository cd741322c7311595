"""`rlhf <stage> test` reports under test/, with the names validation uses under val/ (README: Metrics)."""

from __future__ import annotations

import pytest

TEST_METRICS = {
    "sft": {"loss", "perplexity"},
    "reward": {"loss", "rewards/accuracies", "rewards/margins"},
    "dpo": {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"},
    "rs": {"reward"},
    "ppo": {"reward", "kl", "value_loss", "response_length"},
}


@pytest.mark.parametrize("stage", list(TEST_METRICS))
def test_test_subcommand_reports_under_test(run_recipe, stage):
    cli = run_recipe(stage, "test", "--config", f"configs/{stage}/tiny.yaml", "--trainer.limit_test_batches=1")
    logged = set(cli.trainer.callback_metrics)
    assert logged == {f"test/{name}" for name in TEST_METRICS[stage]}
    assert not any(name.startswith("val/") for name in logged)


def test_model_summary_has_no_flops_and_can_be_turned_off(run_recipe, capsys):
    run_recipe("sft", "fit", "--config", "configs/sft/tiny.yaml", "--trainer.max_steps=1")
    out = capsys.readouterr().out
    assert "Total params" in out and "FLOPs" not in out and "Flops" not in out  # FLOPs read 0 without example input
    run_recipe("sft", "fit", "--config", "configs/sft/tiny.yaml", "--trainer.max_steps=1",
               "--trainer.enable_model_summary=false")
    assert "Total params" not in capsys.readouterr().out
