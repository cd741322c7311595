"""Recipe tier: `rlhf sft` end to end on the tiny config, --help, --print_config, config composition, DDP."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import ROOT

TINY = "configs/sft/tiny.yaml"


def test_fit_tiny_writes_loadable_model_and_config(run_recipe, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    run_recipe("sft", "fit", "--config", TINY, f"--model.save_dir={out}", "--trainer.max_steps=10")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Reverse: a b c\nAnswer:", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()
    configs = list((tmp_path / "runs").rglob("config.yaml"))  # the resolved config lands in the run's log dir
    assert configs and yaml.safe_load(configs[0].read_text())["model"]["policy"]["path"] == "tests/fixtures/tiny-llama"
    assert list((tmp_path / "runs").rglob("last.ckpt"))
    metrics = (next((tmp_path / "runs").rglob("metrics.csv"))).read_text()
    assert "train/loss" in metrics and "val/perplexity" in metrics


def test_resume_from_last_checkpoint(run_recipe, tmp_path):
    run_recipe("sft", "fit", "--config", TINY, "--trainer.max_steps=3", f"--model.save_dir={tmp_path / 'a'}")
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 3
    assert all("policy." in k for k in ckpt["state_dict"])
    (tmp_path / "a" / "model.safetensors").unlink()
    run_recipe("sft", "fit", "--config", TINY, "--trainer.max_steps=5", f"--ckpt_path={last}",
               f"--model.save_dir={tmp_path / 'a'}")
    assert (tmp_path / "a" / "model.safetensors").exists()
    resumed = sorted((tmp_path / "runs").rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    assert torch.load(resumed, weights_only=True)["global_step"] == 5


def test_help_documents_every_argument(capsys):
    from recipes.sft import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for arg in ["--model.policy.path", "--model.policy.quantization", "--model.policy.lora", "--model.merge_lora",
                "--data.packing", "--data.max_prompt_length", "--data.skip_bad_rows",
                "--checkpoint.every_n_train_steps"]:
        assert arg in text, arg
    assert "prompt is cut from the left" in text  # docstrings become the help text


def test_configs_compose_left_to_right(tmp_path, capsys, monkeypatch):
    from recipes.sft import main

    override = tmp_path / "override.yaml"
    override.write_text("model:\n  merge_lora: false\ndata:\n  batch_size: 3\n")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["rlhf sft"])
    with pytest.raises(SystemExit):
        main(["fit", "--config", TINY, "--config", str(override), "--data.batch_size=5", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["batch_size"] == 5 and config["model"]["merge_lora"] is False
    assert config["data"]["max_length"] == 64  # from tiny.yaml
    assert "tokenizer" not in config["data"]  # linked from model.policy.path, not a second value to keep in sync


def test_malformed_data_stops_before_training_naming_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Reverse: a\nAnswer:", "completion": " a"}) + "\n"
                   + '{"prompt": 3, "completion": "x"}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.cli", "sft", "fit", "--config", TINY, f"--data.train_file={bad}",
         f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert f"{bad}:2" in proc.stderr and "prompt" in proc.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


def test_killed_and_resumed_epoch_run_logs_the_same_losses(resume_runs):
    """Under max_epochs the train loader is built before the checkpoint is restored (the LR schedule asks for
    estimated_stepping_batches); the resumed run still continues the epoch at batch 3 of 6, not at batch 0."""
    full, resumed = resume_runs("sft", TINY, 3, -1, "--trainer.max_epochs=1", "--trainer.limit_train_batches=6")
    assert sorted(resumed) == [3, 4, 5]
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], rel=1e-5), step
