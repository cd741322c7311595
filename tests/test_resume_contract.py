"""Resume contract (recipes/common.StageCLI): on `--ckpt_path`, the model keys that say where the export goes and
how (save_dir, merge_lora, predict_file, overwrite) take the value given now; any other model key that differs
from the checkpoint's is refused, naming it, before a model loads."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

# one changed model hyperparameter per stage, nested ones included (the message names the dotted key)
UNSAFE = {
    "sft": ("--model.warmup_steps=5", "model.warmup_steps: checkpoint 0, given 5"),
    "reward": ("--model.backbone.path=elsewhere",
               "model.backbone.path: checkpoint 'tests/fixtures/tiny-llama', given 'elsewhere'"),
    "dpo": ("--model.beta=0.3", "model.beta: checkpoint 0.1, given 0.3"),
    "ppo": ("--model.kl_coef=0.2", "model.kl_coef: checkpoint 0.05, given 0.2"),
    "rs": ("--model.sampling.num_samples=2", "model.sampling.num_samples: checkpoint 4, given 2"),
}


class _Stop(Exception):
    """Raised from a patched CLI hook: the run got that far."""


def _fit(stage: str, monkeypatch, tmp_path, *args: str) -> None:
    from recipes.cli import STAGES

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [f"rlhf {stage}"])
    importlib.import_module(STAGES[stage]).main(
        ["fit", "--config", f"configs/{stage}/tiny.yaml", f"--trainer.default_root_dir={tmp_path}", *args])


def _hparams_checkpoint(stage: str, monkeypatch, tmp_path, *args: str) -> Path:
    """A file holding what a checkpoint of `rlhf STAGE fit ARGS` stores as hyper_parameters (no weights load:
    models are built in configure_model, after these hooks). Afterwards a run stops with _Stop once it gets past
    the resume check."""
    from recipes.common import StageCLI

    ckpt = tmp_path / "hparams.ckpt"

    def save_hparams(cli):
        torch.save({"hyper_parameters": dict(cli.model.hparams)}, ckpt)
        raise _Stop

    monkeypatch.setattr(StageCLI, "after_instantiate_classes", save_hparams)
    with pytest.raises(_Stop):
        _fit(stage, monkeypatch, tmp_path, *args)
    monkeypatch.setattr(StageCLI, "before_instantiate_classes", lambda cli: (_ for _ in ()).throw(_Stop()))
    return ckpt


@pytest.mark.parametrize("stage", sorted(UNSAFE))
def test_checkpoint_hparams_match_their_config_and_a_changed_one_is_refused(stage, monkeypatch, tmp_path):
    """The module's stored hparams (specs normalised to dicts) compare equal to the config they came from; no
    weights load (models are built in configure_model, after these hooks)."""
    ckpt = _hparams_checkpoint(stage, monkeypatch, tmp_path)
    with pytest.raises(_Stop):  # same config, safe keys changed: passes the check
        _fit(stage, monkeypatch, tmp_path, f"--ckpt_path={ckpt}", f"--model.save_dir={tmp_path / 'new'}",
             "--model.overwrite=true", "--model.merge_lora=false")
    flag, line = UNSAFE[stage]
    with pytest.raises(SystemExit) as refused:
        _fit(stage, monkeypatch, tmp_path, f"--ckpt_path={ckpt}", flag)
    message = str(refused.value)
    assert f"rlhf {stage}: --ckpt_path {ckpt}" in message and f"  {line}\n" in message
    assert "Drop these overrides" in message
    assert f"--model.{'backbone' if stage == 'reward' else 'policy'}.path <its save_dir>" in message
    assert message.count(": checkpoint ") == 1  # only the key that changed


def test_sft_resume_honours_a_new_save_dir_and_refuses_a_new_warmup(run_recipe, tmp_path):
    runs = tmp_path / "runs"
    run_recipe("sft", "fit", "--config", "configs/sft/tiny.yaml", "--trainer.max_steps=3",
               f"--model.save_dir={tmp_path / 'a'}")
    last = next(runs.rglob("last.ckpt"))
    first_export = (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns

    with pytest.raises(SystemExit) as refused:
        run_recipe("sft", "fit", "--config", "configs/sft/tiny.yaml", "--trainer.max_steps=5", f"--ckpt_path={last}",
                   "--model.warmup_steps=5", f"--model.save_dir={tmp_path / 'b'}")
    assert "model.warmup_steps: checkpoint 0, given 5" in str(refused.value)
    assert sorted(p.name for p in (runs / "sft").iterdir()) == ["version_0"]  # refused before a trainer ran
    assert not (tmp_path / "b").exists()

    run_recipe("sft", "fit", "--config", "configs/sft/tiny.yaml", "--trainer.max_steps=5", f"--ckpt_path={last}",
               f"--model.save_dir={tmp_path / 'b'}")
    assert (tmp_path / "b" / "model.safetensors").exists()  # before the contract: the checkpoint's save_dir, a/
    assert (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns == first_export
    ckpt = torch.load(runs / "sft" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 5 and ckpt["hyper_parameters"]["save_dir"] == str(tmp_path / "b")

    # another stage's checkpoint is refused by name, before a model loads (sft's hparams are a subset of dpo's,
    # so only the stage tag tells them apart)
    assert ckpt["stage"] == "sft"
    with pytest.raises(SystemExit) as wrong:
        run_recipe("dpo", "fit", "--config", "configs/dpo/tiny.yaml", f"--ckpt_path={last}")
    assert str(wrong.value) == (f"rlhf dpo: --ckpt_path {last} is a checkpoint of `rlhf sft`, not of `rlhf dpo`: "
                                "resume it with `rlhf sft fit`, or start this stage from that run's exported model "
                                "(without --ckpt_path)")
    assert not (runs / "dpo").exists()


def test_predict_from_a_checkpoint_may_sample_otherwise_but_fit_may_not(monkeypatch, tmp_path):
    ckpt = _hparams_checkpoint("ppo", monkeypatch, tmp_path)
    monkeypatch.setattr(sys, "argv", ["rlhf ppo"])
    from recipes.ppo import main

    with pytest.raises(_Stop):  # predict: a new temperature and seed are how to sample, not the trained model
        main(["predict", "--config", "configs/ppo/tiny.yaml", f"--ckpt_path={ckpt}",
              "--model.sampling.temperature=0.5", "--model.seed=3", "--data.seed=3"])
    with pytest.raises(SystemExit, match="model.sampling.temperature: checkpoint"):
        _fit("ppo", monkeypatch, tmp_path, f"--ckpt_path={ckpt}", "--model.sampling.temperature=0.5")


def test_ppo_resume_refuses_another_advantage_estimator(monkeypatch, tmp_path):
    """A GRPO checkpoint holds no value model: resuming it as gae (or as rloo, or with another loss_agg) is refused."""
    grpo = ("--model.advantage=grpo", "--model.sampling.num_samples=2")
    ckpt = _hparams_checkpoint("ppo", monkeypatch, tmp_path, *grpo)
    with pytest.raises(_Stop):  # the same options resume
        _fit("ppo", monkeypatch, tmp_path, f"--ckpt_path={ckpt}", *grpo)
    for flag, line in [("--model.advantage=rloo", "model.advantage: checkpoint 'grpo', given 'rloo'"),
                       ("--model.loss_agg=seq_mean", "model.loss_agg: checkpoint 'token_mean', given 'seq_mean'")]:
        with pytest.raises(SystemExit) as refused:
            _fit("ppo", monkeypatch, tmp_path, f"--ckpt_path={ckpt}", *grpo, flag)
        assert f"  {line}\n" in str(refused.value)
    with pytest.raises(SystemExit) as refused:  # back to gae (the default) and one sample per prompt
        _fit("ppo", monkeypatch, tmp_path, f"--ckpt_path={ckpt}")
    assert "  model.advantage: checkpoint 'grpo', given 'gae'\n" in str(refused.value)


@pytest.mark.parametrize("loss, flag, line", [
    (["--model.loss_type=simpo", "--model.reference=none", "--model.beta=2.0"], "--model.simpo_gamma=1.0",
     "model.simpo_gamma: checkpoint 0.5, given 1.0"),
    (["--model.loss_type=orpo", "--model.reference=none"], "--model.loss_type=simpo",
     "model.loss_type: checkpoint 'orpo', given 'simpo'"),
    (["--model.loss_type=cpl", "--model.reference=none", "--model.cpl_lambda=0.5"], "--model.cpl_lambda=1.0",
     "model.cpl_lambda: checkpoint 0.5, given 1.0"),
    (["--config=configs/dpo/tiny-kto.yaml"], "--model.undesirable_weight=1.5",
     "model.undesirable_weight: checkpoint 1.0, given 1.5"),
])
def test_dpo_loss_options_are_part_of_the_contract(monkeypatch, tmp_path, loss, flag, line):
    """The reference-free options are plain hparams: the same ones resume, a changed one is refused by name."""
    ckpt = _hparams_checkpoint("dpo", monkeypatch, tmp_path, *loss)
    with pytest.raises(_Stop):
        _fit("dpo", monkeypatch, tmp_path, *loss, f"--ckpt_path={ckpt}")
    with pytest.raises(SystemExit) as refused:
        _fit("dpo", monkeypatch, tmp_path, *loss, f"--ckpt_path={ckpt}", flag)
    assert f"  {line}\n" in str(refused.value) and str(refused.value).count(": checkpoint ") == 1
