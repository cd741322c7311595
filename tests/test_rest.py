"""ReST (rejection sampling with `thresholds`): the threshold rule and its schedule check by hand, the refused
combinations, Improve training on exactly the kept samples, and an exact resume from a mid-round checkpoint."""

import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer

import modules.rejection_sampling as rs_module
from core.losses.rejection_sampling import check_thresholds, threshold_keep
from datamodules.prompts import PromptDataModule
from modules.rejection_sampling import RejectionSamplingModule
from recipes.common import RestoreLoaderState


def length_reward(prompts, responses, meta):
    """A reward with many distinct values on the tiny model's random text: the response's length in characters."""
    return [float(len(r)) for r in responses]


# ----- the rule -----

def test_check_thresholds_accepts_a_rising_schedule_and_refuses_the_rest():
    assert check_thresholds([0, 0.5, 0.5, 2]) == [0.0, 0.5, 0.5, 2.0]  # equal neighbours are allowed (<=)
    assert check_thresholds([0.25, 1], "quantile") == [0.25, 1.0]
    with pytest.raises(ValueError, match=r"must not decrease .*thresholds\[2\] = 0.2 < thresholds\[1\] = 0.5"):
        check_thresholds([0.1, 0.5, 0.2])
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"thresholds\[1\] is .*: every threshold must be finite"):
            check_thresholds([0.0, bad])
    with pytest.raises(ValueError, match=r"thresholds\[0\] is 1.5: a quantile threshold must lie in \[0, 1\]"):
        check_thresholds([1.5], "quantile")
    with pytest.raises(ValueError, match="at least one"):
        check_thresholds([])
    with pytest.raises(ValueError, match="threshold_kind"):
        check_thresholds([0.0], "rank")


def test_threshold_keep_scores_keeps_every_sample_at_or_above_the_bar():
    scores = torch.tensor([[0.1, 0.7, 0.3], [0.5, 0.5, 0.2]])
    # 0.5: 0.7 and both 0.5s reach it (>=); 0.1, 0.3 and 0.2 do not. Not only the best per prompt: row 1 keeps two
    assert threshold_keep(scores, 0.5).tolist() == [[False, True, False], [True, True, False]]
    assert threshold_keep(scores, 0.8).tolist() == [[False, False, False], [False, False, False]]  # nothing
    valid = torch.tensor([[True, False, True], [True, True, True]])  # row 0's 0.7 is a blank response
    assert threshold_keep(scores, 0.3, valid=valid).tolist() == [[False, False, True], [True, True, False]]


def test_threshold_keep_standardised_counts_standard_deviations_per_prompt():
    scores = torch.tensor([[1.0, 2.0, 3.0, 6.0], [2.0, 2.0, 2.0, 2.0]])
    # row 0: mean (1+2+3+6)/4 = 3, population variance (4+1+0+9)/4 = 3.5, z = (x-3)/sqrt(3.5)
    # = -1.069, -0.535, 0, 1.604; row 1: all equal -> z = 0 for all four
    z = (torch.tensor([1.0, 2.0, 3.0, 6.0]) - 3) / math.sqrt(3.5)
    assert z[1] < 0 <= z[2] and z[2] < 1 < z[3]  # the hand values' order, from the formula
    assert threshold_keep(scores, 0.0, standardise=True).tolist() == [[False, False, True, True], [True] * 4]
    assert threshold_keep(scores, 1.0, standardise=True).tolist() == [[False, False, False, True], [False] * 4]
    # raw, 1.0 keeps all of row 0 and (2 >= 1) all of row 1
    assert threshold_keep(scores, 1.0).tolist() == [[True] * 4, [True] * 4]


def test_threshold_keep_quantile_takes_the_higher_neighbour():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.7, 0.2]])
    # sorted: 0.1 0.2 0.3 0.5 0.7 0.9 (m = 6, positions 0..5); bar = position ceil(q * 5)
    # q 0.5: ceil(2.5) = 3 -> 0.5, keeps 0.9, 0.5, 0.7
    assert threshold_keep(scores, 0.5, "quantile").tolist() == [[False, True, True], [False, True, False]]
    # q 0.7: ceil(3.5) = 4 -> 0.7, keeps 0.9 and 0.7
    assert threshold_keep(scores, 0.7, "quantile").tolist() == [[False, True, False], [False, True, False]]
    assert threshold_keep(scores, 0.0, "quantile").all()  # position 0: the lowest, everything
    assert threshold_keep(scores, 1.0, "quantile").sum() == 1  # position 5: 0.9 alone
    # a blank response neither counts in the quantile nor is kept: 0.9 blank -> sorted 0.1 0.2 0.3 0.5 0.7 (m = 5),
    # q 0.5: position ceil(0.5 * 4) = 2 -> 0.3, keeps 0.5, 0.3 and 0.7
    valid = torch.tensor([[True, False, True], [True, True, True]])
    assert threshold_keep(scores, 0.5, "quantile", valid).tolist() == [[False, False, True], [True, True, False]]
    # 0.7 * 10 = 7.000000000000001 in floats: still position 7 of 0.0 .. 1.0 (11 values), keeping 0.7 .. 1.0 = 4
    assert threshold_keep(torch.arange(11.0)[None] / 10, 0.7, "quantile").sum() == 4


# ----- the module -----

def _module(tiny_model_dir, load=True, **kw) -> RejectionSamplingModule:
    kw = {"sft_batch_size": 3, **kw}
    # specs as dicts, as LightningCLI passes them: the checkpoint's hparams then load with weights_only
    module = RejectionSamplingModule(
        {"path": str(tiny_model_dir)}, {"functions": ["tests.test_rest:length_reward"]},
        {"max_new_tokens": 8, "num_samples": 3}, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), **kw)
    if load:
        module.configure_model()
    return module


def _dm(synthetic_dir, tiny_model_dir) -> PromptDataModule:
    return PromptDataModule(
        train_file=str(synthetic_dir / "prompts_train.jsonl"), val_file=str(synthetic_dir / "prompts_val.jsonl"),
        tokenizer=str(tiny_model_dir), max_prompt_length=32, batch_size=4)


def _trainer(root, **kw) -> Trainer:
    return Trainer(accelerator="cpu", default_root_dir=root, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **kw)


@pytest.mark.parametrize("kw, message", [
    ({"thresholds": [1.0, 0.5]}, "must not decrease"),
    ({"thresholds": [0.0, float("nan")]}, "must be finite"),
    ({"thresholds": [0.5], "min_score": 0.2}, "drop min_score"),
    ({"thresholds": [0.5], "kl_coef": 0.1}, "set kl_coef 0"),
    ({"thresholds": [0.5], "sft_batch_size": None}, "thresholds need sft_batch_size"),
    ({"thresholds": [0.5, 2.0], "threshold_kind": "quantile"}, "must lie in"),
])
def test_bad_rest_arguments_are_refused_before_a_model_loads(kw, message):
    with pytest.raises(ValueError, match=message):
        _module("no/such/model", load=False, **kw)  # no model loads: the path is never read


def test_improve_trains_on_exactly_the_kept_samples(synthetic_dir, tiny_model_dir, monkeypatch, tmp_path):
    module = _module(tiny_model_dir, thresholds=[0.0, 0.5, 0.9], threshold_kind="quantile", sft_epochs=2)
    rounds = []  # the buffer each Improve saw
    improve = module.improve
    monkeypatch.setattr(module, "improve", lambda: (rounds.append(module._buffer), improve())[1])
    trained = []  # (prompt ids, response ids) of each minibatch the SFT loss saw
    pad = rs_module.pad_completions
    monkeypatch.setattr(rs_module, "pad_completions", lambda ex, pad_id: (trained.append(ex), pad(ex, pad_id))[1])

    class NoStepInGrow(Callback):
        def on_train_batch_end(self, trainer, *args):
            steps.append(trainer.global_step)

    steps = []
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[NoStepInGrow()])
    trainer.fit(module, _dm(synthetic_dir, tiny_model_dir))

    [buf] = rounds
    scores, valid = torch.cat(buf["scores"]), torch.cat(buf["valid"])
    assert scores.shape == (2 * 4, 3) and len(buf["examples"]) == 2 * 4 * 3  # 2 batches x 4 prompts x K 3
    expected, expected_steps = [], 0
    for tau in (0.0, 0.5, 0.9):
        rows = threshold_keep(scores, tau, "quantile", valid).flatten().nonzero().squeeze(1).tolist()
        kept = sorted(buf["examples"][i] for i in rows)
        expected += kept * 2  # sft_epochs 2: each kept sample twice
        expected_steps += 2 * math.ceil(len(rows) / 3)  # 2 passes of minibatches of 3
    assert sorted(ex for mb in trained for ex in mb) == sorted(expected)
    assert steps == [0, expected_steps]  # Grow batch 0 stepped nothing; batch 1 ended with Improve's steps
    assert trainer.global_step == expected_steps
    assert any(not torch.equal(before[n], p) for n, p in module.policy.named_parameters())
    assert module._buffer is None  # emptied after the round
    metrics = trainer.callback_metrics
    frac = [metrics[f"train/t{t}_kept_fraction"].item() for t in (1, 2, 3)]
    assert frac[0] == pytest.approx(valid.float().mean().item())  # quantile 0 keeps every non-blank sample
    assert frac[0] >= frac[1] >= frac[2] > 0
    assert all(torch.isfinite(metrics[f"train/t{t}_loss"]) for t in (1, 2, 3))


def test_a_threshold_that_keeps_nothing_is_skipped(synthetic_dir, tiny_model_dir, tmp_path):
    module = _module(tiny_model_dir, thresholds=[0.0, 1e9])  # no response is a billion characters long
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=1)
    with pytest.warns(UserWarning, match=r"threshold 2 \(1000000000.0\) kept no sample: Improve step skipped"):
        trainer.fit(module, _dm(synthetic_dir, tiny_model_dir))
    assert trainer.callback_metrics["train/t2_kept_fraction"].item() == 0.0
    assert "train/t2_loss" not in trainer.callback_metrics
    assert module.lr_schedulers().last_epoch == 2  # the schedule counts Improve steps, skipped ones too


def test_a_run_resumed_mid_round_ends_with_the_same_weights(synthetic_dir, tiny_model_dir, tmp_path):
    """Round 2 (epoch 1) is checkpointed after its second Grow batch; the resumed run restores the buffer and
    ends with exactly the uninterrupted run's weights. Without the buffer it stops with an error."""
    ckpt = tmp_path / "mid.ckpt"

    class SaveMidRound(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 1:
                trainer.save_checkpoint(ckpt)

    def run(*callbacks, ckpt_path=None):
        module = _module(tiny_model_dir, thresholds=[0.0, 0.5], threshold_kind="quantile")
        trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[RestoreLoaderState(), *callbacks])
        trainer.fit(module, _dm(synthetic_dir, tiny_model_dir), ckpt_path=ckpt_path)
        return module, trainer

    full, full_trainer = run(SaveMidRound())
    saved = torch.load(ckpt, weights_only=True)
    assert saved["rest_buffer"]["epoch"] == 1 and saved["rest_buffer"]["batches"] == 2
    resumed, trainer = run(ckpt_path=str(ckpt))
    assert trainer.global_step == full_trainer.global_step
    for (name, p), q in zip(full.policy.named_parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)

    del saved["rest_buffer"]
    torch.save(saved, tmp_path / "no_buffer.ckpt")
    with pytest.raises(RuntimeError, match="prompt batch 2 of epoch 1, but the round's buffer holds none"):
        run(ckpt_path=str(tmp_path / "no_buffer.ckpt"))


def test_tiny_recipe_in_rest_mode_logs_each_threshold(run_recipe, tmp_path):
    """`rlhf rs fit --config configs/rs/tiny.yaml --model.thresholds [...]`: the per-threshold metrics reach
    metrics.csv once per round (logged on the epoch, not on a step that log_every_n_steps could skip)."""
    import csv

    run_recipe("rs", "fit", "--config", "configs/rs/tiny.yaml", "--model.thresholds=[0.0, 0.5]",
               "--model.threshold_kind=quantile", "--model.sft_batch_size=8", "--trainer.max_steps=-1",
               "--trainer.limit_train_batches=2", "--trainer.log_every_n_steps=50",
               f"--model.save_dir={tmp_path / 'hf'}")
    rows = list(csv.DictReader(next((tmp_path / "runs").rglob("metrics.csv")).open()))
    logged = {k: float(v) for r in rows for k, v in r.items() if v and k.startswith("train/t")}
    assert set(logged) == {f"train/t{t}_{m}" for t in (1, 2) for m in ("kept_fraction", "kept_score", "loss")}
    assert logged["train/t1_kept_fraction"] >= logged["train/t2_kept_fraction"] > 0
    assert (tmp_path / "hf" / "model.safetensors").exists()
