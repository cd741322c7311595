"""Module tier for PPO: one step per layout (what trains, what stays frozen), KL at the start, one base in
layout shared, adapter-off = base, score on the last real token of a response that stopped at EOS early."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from core.forward import response_slice
from core.generation import Rollout, SamplingSpec
from core.models import LoraSpec, ModelSpec, load_causal_lm
from core.ops import positions_from_mask
from core.reward_spec import RewardSpec
from datamodules.prompts import PromptDataModule
from modules.ppo import PPOModule
from modules.rollout import minibatches, repeat_each

ORACLE = RewardSpec(oracle="synthetic")
LORA = LoraSpec(r=4, alpha=8, dropout=0.0)


def _module(tiny_model_dir, **kw) -> PPOModule:
    kw.setdefault("sampling", SamplingSpec(max_new_tokens=6))
    kw.setdefault("ppo_epochs", 1)
    return PPOModule(ModelSpec(path=str(tiny_model_dir), lora=kw.pop("lora", None)), ORACLE, **kw)


def _fit(module, synthetic_dir, tiny_model_dir, root, steps=1, batch_size=4):
    dm = PromptDataModule(
        train_file=str(synthetic_dir / "prompts_train.jsonl"), val_file=str(synthetic_dir / "prompts_val.jsonl"),
        tokenizer=str(tiny_model_dir), max_prompt_length=32, batch_size=batch_size,
    )
    trainer = Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
    )
    trainer.fit(module, dm)
    return trainer


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(model, before) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


def test_separate_step_trains_policy_and_value_not_reference(synthetic_dir, tiny_model_dir, tmp_path):
    module = _module(tiny_model_dir, save_dir=str(tmp_path / "hf"), kl_coef=0.1)
    module.configure_model()
    policy, value, ref = _snapshot(module.policy), _snapshot(module.value_model), _snapshot(module.reference)
    trainer = _fit(module, synthetic_dir, tiny_model_dir, tmp_path)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["train/value_loss"])
    # policy == reference at the first rollout: the k1 KL is exactly 0, so rlhf_reward == score
    assert metrics["train/kl"] == 0.0
    torch.testing.assert_close(metrics["train/rlhf_reward"], metrics["train/reward"])
    assert metrics["train/response_length"] > 0 and metrics["train/kl_coef"] == pytest.approx(0.1)
    assert _changed(module.policy, policy) == set(policy)
    assert "score.weight" in _changed(module.value_model, value)
    assert not _changed(module.reference, ref)
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_kl_grows_after_updates_and_zero_coef_leaves_score_as_reward(synthetic_dir, tiny_model_dir, tmp_path):
    module = _module(tiny_model_dir, kl_coef=0.0, ppo_epochs=2)
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-2)  # noqa: E731  big steps: the policy moves
    module.optim.optimizer = optimizer
    trainer = _fit(module, synthetic_dir, tiny_model_dir, tmp_path, steps=4)  # 2 rollouts x 2 epochs
    metrics = trainer.callback_metrics
    assert metrics["train/kl"] != 0.0  # the second rollout comes from an updated policy
    torch.testing.assert_close(metrics["train/rlhf_reward"], metrics["train/reward"])  # no penalty


def test_adaptive_kl_updates_coefficient_after_each_rollout(synthetic_dir, tiny_model_dir, tmp_path):
    module = _module(tiny_model_dir, adaptive_kl=True, kl_coef=0.2, kl_target=6.0, kl_horizon=100)
    _fit(module, synthetic_dir, tiny_model_dir, tmp_path)
    # first rollout: KL 0, error clipped to -0.2 -> coef * (1 - 0.2 * 4 / 100)
    assert module.kl_ctl.value == pytest.approx(0.2 * (1 - 0.2 * 4 / 100))


def test_shared_layout_holds_one_base_and_trains_adapter_and_head(synthetic_dir, tiny_model_dir, tmp_path, monkeypatch):
    module = _module(tiny_model_dir, layout="shared", lora=LORA)
    module.configure_model()
    base = load_causal_lm(ModelSpec(path=str(tiny_model_dir)), trainable=False)
    n_base = sum(p.numel() for p in base.parameters())
    n_extra = sum(p.numel() for n, p in module.named_parameters() if "lora_" in n or n.startswith("value_head."))
    assert module.reference is None and module.value_model is None
    assert sum(p.numel() for p in module.parameters()) == n_base + n_extra  # no second copy of the base
    before = _snapshot(module)
    monkeypatch.setattr(module.reward, "score",
                        lambda prompts, responses, meta=None, device=None: torch.ones(len(prompts)))
    _fit(module, synthetic_dir, tiny_model_dir, tmp_path)
    changed = _changed(module, before)
    assert any("lora_" in n for n in changed) and "value_head.weight" in changed
    assert all("lora_" in n or n.startswith("value_head.") for n in changed)


def test_shared_reference_is_the_base_with_adapter_off(tiny_model_dir):
    module = _module(tiny_model_dir, layout="shared", lora=LORA, sampling=SamplingSpec(temperature=0.7))
    module.configure_model()
    with torch.no_grad():  # a non-zero adapter, so "off" differs from "on"
        for n, p in module.policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    base = load_causal_lm(ModelSpec(path=str(tiny_model_dir)), trainable=False)
    seq = torch.tensor([[0, 5, 6, 7, 10, 11, 2], [4, 5, 6, 7, 12, 13, 14]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = module.reference_logp(seq, mask, p=4)
        on = module.policy_forward(seq, mask, p=4)[0]
        logits = base(input_ids=seq, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    expected = torch.log_softmax(response_slice(logits, 4) / 0.7, -1).gather(-1, seq[:, 4:, None]).squeeze(-1)
    torch.testing.assert_close(ref, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(on, ref)


def test_shared_layout_with_8bit_base_runs_a_step(synthetic_dir, tiny_model_dir, tmp_path):
    module = PPOModule(ModelSpec(path=str(tiny_model_dir), quantization="int8", lora=LORA), ORACLE,
                       SamplingSpec(max_new_tokens=4), layout="shared", ppo_epochs=1)
    module.configure_model()
    before = _snapshot(module)
    trainer = _fit(module, synthetic_dir, tiny_model_dir, tmp_path, batch_size=2)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all("lora_" in n or n.startswith("value_head.") for n in _changed(module, before))


def test_score_lands_on_last_real_token_of_early_eos_row(tiny_model_dir, monkeypatch):
    # row 0 stops at EOS (id 2) after 2 of 4 response tokens; row 1 runs to max_new_tokens without EOS.
    # shared layout: value head is zero-initialised, so V = 0; with kl_coef 0, lam 0 and no whitening
    # returns_t = r_t + V_{t+1} = r_t: the token rewards themselves
    module = _module(tiny_model_dir, layout="shared", lora=LORA, kl_coef=0.0, lam=0.0, whiten_advantages=False,
                     missing_eos_penalty=0.5)
    module.configure_model()
    rollout = Rollout(
        sequences=torch.tensor([[0, 5, 6, 10, 2, 0, 0], [4, 5, 6, 11, 12, 13, 14]]),
        attention_mask=torch.tensor([[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]),
        response_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]),
        prompt_length=3,
        has_eos=torch.tensor([True, False]),
    )
    monkeypatch.setattr("modules.ppo.generate", lambda *args, **kwargs: rollout)
    monkeypatch.setattr(module.reward, "score",
                        lambda prompts, responses, meta=None, device=None: torch.tensor([2.0, 3.0]))
    batch = {"input_ids": rollout.sequences[:, :3], "attention_mask": rollout.attention_mask[:, :3],
             "prompts": ["Reverse: a\nAnswer:", "Reverse: b\nAnswer:"], "meta": [{}, {}]}
    exp, stats = module.rollout(batch, torch.Generator().manual_seed(0), kl_coef=0.0, chunk=2)
    expected = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0 - 0.5]])  # penalty: row 1 has no EOS
    torch.testing.assert_close(exp.returns, expected)
    torch.testing.assert_close(exp.advantages, expected)  # advantages = returns - V, V = 0
    torch.testing.assert_close(stats["scores"], torch.tensor([2.0, 3.0]))  # raw scores are logged
    torch.testing.assert_close(stats["response_length"], torch.tensor([2.0, 4.0]))


def test_layout_shared_needs_lora(tiny_model_dir):
    with pytest.raises(ValueError, match="LoRA"):
        PPOModule(ModelSpec(path=str(tiny_model_dir)), ORACLE, layout="shared")


def test_rollout_helpers():
    assert repeat_each(["a", "b"], 2) == ["a", "a", "b", "b"]
    x = torch.arange(6).view(1, 6)  # p = 4: positions 3 and 4 predict the 2 response tokens
    torch.testing.assert_close(response_slice(x, 4), torch.tensor([[3, 4]]))
    parts = minibatches(10, 2, 3, torch.Generator().manual_seed(0))
    assert [[len(i) for i in mb] for mb in parts] == [[2, 2, 1], [2, 2, 1]]
    assert sorted(torch.cat([i for mb in parts for i in mb]).tolist()) == list(range(10))
    short = minibatches(3, 2, 2)  # an epoch's short last batch: 2 minibatches of 1 chunk, none empty
    assert [[len(i) for i in mb] for mb in short] == [[2], [1]]


# ----- critic-free advantages (core/losses/critic_free.py): no value model, group baselines -----

GROUPS = SamplingSpec(max_new_tokens=6, num_samples=2)


@pytest.mark.parametrize("advantage,layout", [("grpo", "separate"), ("rloo", "separate"), ("reinforce_pp", "separate"),
                                              ("grpo", "shared"), ("rloo", "shared"), ("reinforce_pp", "shared")])
def test_critic_free_step_loads_no_value_model_and_trains_the_policy(advantage, layout, synthetic_dir, tiny_model_dir,
                                                                      tmp_path):
    module = _module(tiny_model_dir, advantage=advantage, layout=layout, sampling=GROUPS, kl_coef=0.1,
                     lora=LORA if layout == "shared" else None)
    module.configure_model()
    assert module.value_model is None and module.value_head is None
    assert not any(n.startswith(("value_model.", "value_head.")) for n, _ in module.named_parameters())
    before = _snapshot(module)
    trainer = _fit(module, synthetic_dir, tiny_model_dir, tmp_path, batch_size=2)  # 2 prompts x 2 samples
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["train/policy_loss"])
    assert "train/value_loss" not in metrics and "train/value_clipfrac" not in metrics
    assert ("train/kl_loss" in metrics) == (advantage == "grpo")
    changed = _changed(module, before)
    assert changed and all(n.startswith("policy.") for n in changed)
    if layout == "shared":
        assert all("lora_" in n for n in changed)
    else:
        assert module.reference is not None and not any(n.startswith("reference.") for n in changed)


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_group_advantages_need_two_samples_per_prompt(advantage, tiny_model_dir):
    with pytest.raises(ValueError, match="num_samples >= 2"):
        _module(tiny_model_dir, advantage=advantage)  # num_samples 1
    with pytest.raises(ValueError, match="value_model"):
        _module(tiny_model_dir, advantage=advantage, sampling=GROUPS, value_model=ModelSpec(path=str(tiny_model_dir)))
    # no critic, no value loss
    with pytest.raises(ValueError, match="'val/value_loss' is not a metric this module logs"):
        _module(tiny_model_dir, advantage=advantage, sampling=GROUPS, export_best="val/value_loss")


def _group_rollout(module, monkeypatch, scores):
    """One prompt, 2 samples: row 0 stops at EOS after 2 of 4 response tokens, row 1 runs to 4 tokens."""
    rollout = Rollout(
        sequences=torch.tensor([[4, 5, 6, 10, 2, 0, 0], [4, 5, 6, 11, 12, 13, 14]]),
        attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]),
        response_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]),
        prompt_length=3,
        has_eos=torch.tensor([True, False]),
    )
    monkeypatch.setattr("modules.ppo.generate", lambda *args, **kwargs: rollout)
    monkeypatch.setattr(module.reward, "score", lambda prompts, responses, meta=None, device=None: torch.tensor(scores))
    batch = {"input_ids": rollout.sequences[:1, :3], "attention_mask": rollout.attention_mask[:1, :3],
             "prompts": ["Reverse: a\nAnswer:"], "meta": [{}]}
    return module.rollout(batch, torch.Generator().manual_seed(0), kl_coef=0.0, chunk=2)[0]


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_rollout_advantages_by_hand(advantage, tiny_model_dir, monkeypatch):
    # kl_coef 0: the rewards are the scores [1, 3] of one group of 2
    module = _module(tiny_model_dir, advantage=advantage, sampling=GROUPS, whiten_advantages=False)
    module.configure_model()
    exp = _group_rollout(module, monkeypatch, [1.0, 3.0])
    assert exp.old_values is None
    if advantage == "grpo":  # mean 2, sample std sqrt(((-1)^2 + 1^2) / 1) = sqrt(2), eps 1e-4
        a = 1.0 / (2.0**0.5 + 1e-4)
        expected = torch.tensor([[-a, -a, 0.0, 0.0], [a, a, a, a]])
        assert exp.returns is None
    elif advantage == "rloo":  # 1 - 3 and 3 - 1, on every real token
        expected = torch.tensor([[-2.0, -2.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
        assert exp.returns is None
    else:  # gamma 1, no whitening: the score on every real token up to the last
        expected = torch.tensor([[1.0, 1.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0]])
        torch.testing.assert_close(exp.returns, expected)
    torch.testing.assert_close(exp.advantages, expected)


@pytest.mark.parametrize("advantage,loss_agg", [("grpo", "token_mean"), ("grpo", "seq_mean"), ("gae", "token_mean")])
def test_micro_batch_losses_add_up_to_the_minibatch_loss(advantage, loss_agg, tiny_model_dir, monkeypatch):
    # grad_accum splits rows [0] (2 tokens) and [1] (4 tokens): weighted by tokens (gae and token_mean: token-mean
    # losses) or rows (seq_mean), as training_step weighs them, the micro-batch losses and gradients are those of
    # the whole minibatch in one piece
    from modules.rollout import micro_batch_weights

    module = _module(tiny_model_dir, advantage=advantage, sampling=GROUPS, loss_agg=loss_agg, entropy_coef=0.01)
    module.configure_model()
    exp = _group_rollout(module, monkeypatch, [1.0, 3.0])
    exp = exp._replace(ref_logp=exp.ref_logp - 0.3 * exp.mask)  # a reference apart from the policy: KL term != 0
    params = [p for p in module.parameters() if p.requires_grad]
    whole = module.ppo_losses(exp, torch.tensor([0, 1]), kl_coef=0.1).loss
    micro = [torch.tensor([0]), torch.tensor([1])]
    weights = micro_batch_weights(exp.mask, micro, by_tokens=module.micro_batches_weigh_tokens)  # training_step's
    assert weights == ([0.5, 0.5] if loss_agg == "seq_mean" else [2 / 6, 4 / 6])
    split = sum(w * module.ppo_losses(exp, idx, kl_coef=0.1).loss for idx, w in zip(micro, weights))
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    for g_split, g_whole in zip(torch.autograd.grad(split, params), torch.autograd.grad(whole, params)):
        torch.testing.assert_close(g_split, g_whole, rtol=1e-4, atol=1e-6)
