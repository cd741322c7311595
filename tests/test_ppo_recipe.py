"""Recipe tier for PPO: `rlhf ppo fit` on the tiny config, exact resume mid-epoch and at an epoch boundary, the
critic-free advantages (grpo, rloo, reinforce_pp) trained and resumed, every configs/ppo YAML parsed against the
recipe (no weights loaded), --help."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

TINY = "configs/ppo/tiny.yaml"
CONFIGS = sorted((ROOT / "configs" / "ppo").glob("*.yaml"))


def _run(monkeypatch, out: Path, *args: str) -> None:
    from recipes.ppo import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["rlhf ppo"])  # LightningCLI warns if argv and args both carry args
    main(["fit", "--config", TINY, f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
          f"--model.save_dir={out / 'hf'}", *args])


def _metrics(out: Path) -> dict[tuple[int, str], float]:
    """(step, metric) -> value from the run's CSV log."""
    rows = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
    return {(int(r["step"]), k): float(v) for r in rows for k, v in r.items() if v and k not in ("step", "epoch")}


def test_fit_tiny_trains_and_saves_policy(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    _run(monkeypatch, tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf") is not None
    metrics = _metrics(tmp_path)
    names = {k for _, k in metrics}
    for name in ["train/kl", "train/entropy", "train/reward", "train/rlhf_reward", "train/policy_clipfrac",
                 "train/approxkl", "train/token_entropy", "train/loss", "train/value_loss", "train/policy_loss",
                 "train/value_clipfrac", "train/kl_coef", "train/response_length", "val/reward", "val/kl",
                 "val/value_loss", "val/response_length"]:
        assert name in names, name
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    ckpt = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert ckpt["global_step"] == 8  # optimizer steps: 4 rollouts x ppo_epochs 2
    assert not any(k.startswith("reference.") for k in ckpt["state_dict"])  # frozen weights stay out
    assert set(ckpt["ppo_state"]) == {"kl_ctl", "generator"}


def test_data_seed_and_rollout_seed_may_differ(monkeypatch, tmp_path):
    """data.seed (split, batch order) and model.seed (rollout sampler) are separate knobs: a run with only one of
    them changed starts and trains (Lightning used to refuse the module's and datamodule's `seed` hparams)."""
    _run(monkeypatch, tmp_path, "--data.seed=3", "--trainer.max_steps=2")
    ckpt = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["hyper_parameters"]["seed"] == 0 and ckpt["datamodule_hyper_parameters"]["seed"] == 3


@pytest.mark.parametrize("where", ["mid_epoch", "epoch_boundary"])
def test_killed_and_resumed_run_logs_the_same_metrics(monkeypatch, tmp_path, where):
    from datamodules.prompts import PromptDataModule
    from datamodules.resumable import ResumableLoader

    dm = PromptDataModule(str(ROOT / "tests/fixtures/synthetic/prompts_train.jsonl"),
                          tokenizer=str(ROOT / "tests/fixtures/tiny-llama"))
    dm.setup()
    assert isinstance(dm.train_dataloader(), ResumableLoader), (
        "mid-epoch resume needs PromptDataModule to use ResumableLoader")
    # adaptive KL so the controller state matters; 4 rollouts x 2 PPO epochs = 8 optimizer steps; a checkpoint
    # every 4 optimizer steps = after rollout 2; the epoch is 32 rollouts long, or 2 at the epoch boundary
    args = ["--model.adaptive_kl=true", "--model.kl_horizon=50", "--checkpoint.every_n_train_steps=4"]
    if where == "epoch_boundary":
        args.append("--trainer.limit_train_batches=2")
    _assert_resume_is_exact(monkeypatch, tmp_path, *args)


def _assert_resume_is_exact(monkeypatch, tmp_path, *args: str) -> dict[tuple[int, str], float]:
    """Runs to 8 optimizer steps, to 4, and from that checkpoint to 8: rollouts 3 and 4 log the same metrics."""
    _run(monkeypatch, tmp_path / "full", *args, "--trainer.max_steps=8")
    _run(monkeypatch, tmp_path / "killed", *args, "--trainer.max_steps=4")
    ckpt = next((tmp_path / "killed").rglob("last.ckpt"))
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    _run(monkeypatch, tmp_path / "resumed", *args, "--trainer.max_steps=8", f"--ckpt_path={ckpt}")
    full, resumed = _metrics(tmp_path / "full"), _metrics(tmp_path / "resumed")
    after = {key: v for key, v in resumed.items() if key[0] >= 2}  # rollouts 3 and 4 (CSV step = rollout index)
    assert {k for _, k in after} >= {"train/kl", "train/reward", "train/kl_coef", "train/approxkl", "val/reward"}
    for key, value in after.items():
        assert value == pytest.approx(full[key], rel=1e-5, abs=1e-7), key
    return after


# critic-free advantages: 4 prompts x 2 samples per rollout (groups of 2), the same 8 rows as the tiny config
CRITIC_FREE = {
    "grpo": ["--model.advantage=grpo"],
    "dr_grpo_seq_mean": ["--model.advantage=grpo", "--model.group_std=false", "--model.loss_agg=seq_mean"],
    "rloo": ["--model.advantage=rloo"],
    "reinforce_pp": ["--model.advantage=reinforce_pp"],
}
GROUPS = ["--model.sampling.num_samples=2", "--data.batch_size=4"]


@pytest.mark.parametrize("option", sorted(CRITIC_FREE))
def test_critic_free_fit_tiny_trains_without_a_value_model(option, monkeypatch, tmp_path):
    _run(monkeypatch, tmp_path, *CRITIC_FREE[option], *GROUPS, "--model.kl_coef=0.1", "--trainer.max_steps=4")
    metrics = _metrics(tmp_path)
    names = {k for _, k in metrics}
    for name in ["train/kl", "train/entropy", "train/reward", "train/rlhf_reward", "train/policy_clipfrac",
                 "train/approxkl", "train/token_entropy", "train/loss", "train/policy_loss", "train/kl_coef",
                 "train/response_length", "val/reward", "val/kl", "val/response_length"]:
        assert name in names, name
    assert not {n for n in names if "value" in n}  # no critic, so no value metrics at all
    assert ("train/kl_loss" in names) == CRITIC_FREE[option][0].endswith("grpo")
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    ckpt = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["hyper_parameters"]["advantage"] == CRITIC_FREE[option][0].split("=")[1]
    assert ckpt["state_dict"] and all(k.startswith("policy.") for k in ckpt["state_dict"])  # no value model saved
    assert (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.parametrize("option", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_killed_and_resumed_run_logs_the_same_metrics(option, monkeypatch, tmp_path):
    # adaptive KL so the controller state matters; a checkpoint after rollout 2 of 4, mid-epoch
    after = _assert_resume_is_exact(monkeypatch, tmp_path, *CRITIC_FREE[option], *GROUPS, "--model.adaptive_kl=true",
                                    "--model.kl_horizon=50", "--checkpoint.every_n_train_steps=4")
    assert {k for _, k in after} >= {"train/loss", "train/policy_loss"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, monkeypatch, capsys):
    import yaml

    from recipes.ppo import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["rlhf ppo"])
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--print_config"])  # parses and type-checks, builds nothing
    assert exit_.value.code in (None, 0)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["policy"]["path"] and "tokenizer" not in resolved["data"]  # linked from the policy


def test_config_layouts():
    import yaml

    shared = yaml.safe_load((ROOT / "configs/ppo/synthetic-shared.yaml").read_text())["model"]
    separate = yaml.safe_load((ROOT / "configs/ppo/synthetic.yaml").read_text())["model"]
    assert shared["layout"] == "shared" and shared["policy"]["lora"]
    assert separate.get("layout", "separate") == "separate"
    assert shared["reward"] == separate["reward"] == {"oracle": "synthetic"}


def test_help_documents_arguments(capsys):
    from recipes.ppo import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for arg in ["--model.layout", "--model.kl_coef", "--model.adaptive_kl", "--model.sampling.temperature",
                "--model.reward.oracle", "--model.value_model", "--model.ppo_epochs", "--model.grad_accum",
                "--model.advantage", "--model.group_std", "--model.loss_agg"]:
        assert arg in text, arg
    assert "adapter switched off" in text or "adapter off" in text  # the Args block is the help text
