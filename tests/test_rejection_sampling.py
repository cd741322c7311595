"""Rejection sampling: best-of-K selection, examples from rollouts, one step, seeds, predict, recipe, configs."""

import json
import sys

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from core.generation import Rollout, SamplingSpec
from core.models import ModelSpec
from core.ops import IGNORE_INDEX
from core.packing import pad_completions
from core.reward_spec import RewardSpec
from datamodules.formats import read_demonstrations
from datamodules.prompts import PromptDataModule
from modules.rejection_sampling import (
    RejectionSamplingModule,
    rollout_examples,
    select_best,
)
from tests.conftest import ROOT

TINY = "configs/rs/tiny.yaml"


def test_select_best_takes_first_argmax_per_prompt():
    scores = torch.tensor([[0.1, 0.7, 0.3], [0.5, 0.5, 0.2], [0.0, 0.0, 0.0], [-1.0, -3.0, -0.5]])
    best, keep = select_best(scores)
    # row 0: 0.7 at 1; row 1: tie 0.5 at 0 and 1 -> 0; row 2: all tied -> 0; row 3: -0.5 at 2
    assert best.tolist() == [1, 0, 0, 2]
    assert keep.tolist() == [True, True, True, True]


def test_select_best_min_score_keeps_best_at_or_above_threshold():
    scores = torch.tensor([[0.1, 0.7, 0.3], [0.5, 0.5, 0.2], [0.0, 0.0, 0.0], [-1.0, -3.0, -0.5]])
    best, keep = select_best(scores, min_score=0.5)
    assert best.tolist() == [1, 0, 0, 2]  # the filter drops prompts, it does not move the choice
    assert keep.tolist() == [True, True, False, False]  # 0.7 >= 0.5, 0.5 >= 0.5, 0.0 < 0.5, -0.5 < 0.5


def _rollout() -> Rollout:
    # two rows, prompt width 3 (row 0 left-padded by one), response width 4; pad 0, EOS 2
    sequences = torch.tensor([[0, 5, 6, 7, 8, 2, 0], [9, 10, 11, 12, 13, 14, 15]])
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    response_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # row 1 truncated: no EOS
    return Rollout(sequences, attention_mask, response_mask, 3, torch.tensor([True, False]))


def test_examples_from_rollout_strip_padding_and_keep_eos():
    examples = rollout_examples(_rollout(), torch.tensor([0, 1]))
    assert examples == [([5, 6], [7, 8, 2]), ([9, 10, 11], [12, 13, 14, 15])]
    batch = pad_completions(examples, pad_id=0)
    x = IGNORE_INDEX
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 2, 0, 0], [9, 10, 11, 12, 13, 14, 15]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]
    # -100 on the prompt and on padding; the response, EOS included, is the target
    assert batch.labels.tolist() == [[x, x, 7, 8, 2, x, x], [x, x, x, 12, 13, 14, 15]]


def _module(tiny_model_dir, **kw) -> RejectionSamplingModule:
    module = RejectionSamplingModule(
        ModelSpec(path=str(tiny_model_dir)),
        RewardSpec(oracle="synthetic"),
        SamplingSpec(max_new_tokens=8, num_samples=3),
        **kw,
    )
    module.configure_model()
    return module


def _dm(synthetic_dir, tiny_model_dir, batch_size=4) -> PromptDataModule:
    dm = PromptDataModule(
        train_file=str(synthetic_dir / "prompts_train.jsonl"), val_file=str(synthetic_dir / "prompts_val.jsonl"),
        tokenizer=str(tiny_model_dir), max_prompt_length=32, batch_size=batch_size,
    )
    dm.setup()
    return dm


def _trainer(**kw) -> Trainer:
    return Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **kw,
    )


def test_one_step_finite_loss_and_policy_changes(synthetic_dir, tiny_model_dir, tmp_path):
    module = _module(tiny_model_dir, save_dir=str(tmp_path / "hf"), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    trainer = _trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, _dm(synthetic_dir, tiny_model_dir))
    assert trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    changed = [n for n, p in module.policy.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == len(before)
    for name in ["train/reward_step", "train/best_reward_step", "train/reward_gain_step", "train/kept_fraction_step"]:
        assert name in trainer.callback_metrics
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_sft_epochs_and_minibatches_set_the_optimizer_steps(synthetic_dir, tiny_model_dir, tmp_path):
    module = _module(tiny_model_dir, sft_epochs=2, sft_batch_size=2, max_grad_norm=1.0, save_dir=str(tmp_path / "hf"))
    trainer = _trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, _dm(synthetic_dir, tiny_model_dir, batch_size=4))
    assert trainer.global_step == 2 * 2  # 2 passes x (4 prompts / 2 per step); global_step counts optimizer steps


def test_sft_loss_ignores_dropped_rows(tiny_model_dir):
    module = _module(tiny_model_dir)
    examples = [([5, 6], [7, 8, 2]), ([9, 10, 11], [12, 13, 2]), ([20], [21, 22, 23, 2])]
    batch = pad_completions(examples, pad_id=0)
    keep = torch.tensor([True, False, True])
    loss = module.sft_loss(batch, keep)
    # the same loss as a batch holding only the kept rows: a dropped row changes nothing
    alone = module.sft_loss(pad_completions([examples[0], examples[2]], pad_id=0), torch.tensor([True, True]))
    torch.testing.assert_close(loss, alone)
    none = module.sft_loss(batch, torch.zeros(3, dtype=torch.bool))
    none.backward()  # nothing kept: 0 with a graph (every DDP rank still steps), and no gradient
    assert none.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in module.policy.parameters())


def test_sampling_is_deterministic_under_the_seed(synthetic_dir, tiny_model_dir):
    batch = next(iter(_dm(synthetic_dir, tiny_model_dir).train_dataloader()))
    runs = []
    for _ in range(2):
        module = _module(tiny_model_dir, sampling_seed=7)
        rollout, texts, scores = module.sample(batch, module.sampling, module._generator("train", 0, 0))
        runs.append((rollout.sequences, texts, scores))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1] and torch.equal(runs[0][2], runs[1][2])
    other, _, _ = module.sample(batch, module.sampling, module._generator("train", 0, 1))  # next batch's stream
    assert not torch.equal(other.sequences, runs[0][0])


def test_predict_writes_best_of_k_that_sft_reads(synthetic_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "best.jsonl"
    module = _module(tiny_model_dir, predict_file=str(out))
    dm = _dm(synthetic_dir, tiny_model_dir)
    # batch_size by keyword: Lightning rebuilds predict loaders (PromptDataModule passes it positionally)
    loader = DataLoader(dm.val_rows, batch_size=4, collate_fn=dm.collate)
    _trainer(limit_predict_batches=2).predict(module, loader, return_predictions=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(set(r) == {"prompt", "completion", "score", "mean_score", "index"} for r in rows)
    assert [r["index"] for r in rows] == sorted({r["index"] for r in rows})  # one row per prompt, in order
    assert all(r["score"] >= r["mean_score"] - 1e-6 for r in rows)
    assert all(r["prompt"].startswith("Reverse:") for r in rows)
    demos = read_demonstrations(str(out))
    assert [d.completion for d in demos] == [r["completion"] for r in rows]


@pytest.mark.slow
def test_fit_tiny_recipe_writes_loadable_model(run_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    run_recipe("rs", "fit", "--config", TINY, f"--model.save_dir={out}", "--trainer.max_steps=2")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 6]])).logits).all()
    metrics = next((tmp_path / "runs").rglob("metrics.csv")).read_text()
    assert "train/reward_gain_step" in metrics and "train/loss" in metrics and "val/reward" in metrics
    ckpt = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["state_dict"] and all(k.startswith("policy.") for k in ckpt["state_dict"])


def test_killed_and_resumed_run_logs_the_same_losses(resume_runs):
    """rs links rounds to max_epochs, so its train loader is built before the checkpoint is restored; the
    resumed run still continues the epoch at prompt batch 2 (of 32), with the same samples and losses."""
    full, resumed = resume_runs("rs", TINY, 2, 4)
    assert sorted(resumed) == [2, 3]
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], rel=1e-5), step


@pytest.mark.parametrize("config", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "rs").glob("*.yaml")))
def test_config_parses(config, capsys, monkeypatch):
    from recipes.rejection_sampling import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["rlhf rs"])
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", config, "--print_config"])
    assert exit_.value.code in (0, None)
    parsed = yaml.safe_load(capsys.readouterr().out)
    # link targets are computed, never written: the tokenizer follows the policy, max_epochs the rounds
    assert "tokenizer" not in parsed["data"] and "max_epochs" not in parsed["trainer"]
    assert parsed["model"]["policy"]["path"] and parsed["model"]["rounds"] >= 1
    assert parsed["model"]["sampling"]["num_samples"] >= 2
