"""Over-optimisation defences against a learned reward model: PPO's running reward normalisation and rejection
sampling's KL-penalised selection, each against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from core.forward import response_logits
from core.generation import SamplingSpec
from core.losses.normalise import RunningMoments
from core.losses.rejection_sampling import kl_penalised_scores
from core.models import ModelSpec
from core.ops import masked_sum, token_logprobs
from core.reward_spec import RewardSpec
from datamodules.prompts import PromptDataModule
from modules.ppo import PPOModule
from modules.rejection_sampling import RejectionSamplingModule, select_best


def test_running_moments_merge_batches_exactly():
    m = RunningMoments()
    m.update(3, 1 + 2 + 3, 1 + 4 + 9)  # [1, 2, 3]: mean 2, squared deviations 1 + 0 + 1 = 2
    assert (m.count, m.mean, m.m2) == (3, 2.0, 2.0)
    m.update(1, 5, 25)  # [5]: delta 5 - 2 = 3, n 4 -> mean 2 + 3 * 1/4, m2 2 + 0 + 3^2 * 3 * 1 / 4
    assert m.mean == pytest.approx(2.75) and m.m2 == pytest.approx(8.75)
    # the same as all four at once: deviations from 2.75 are -1.75, -0.75, 0.25, 2.25
    assert m.m2 == pytest.approx(1.75**2 + 0.75**2 + 0.25**2 + 2.25**2)
    assert m.std == pytest.approx(math.sqrt(8.75 / 4))  # population std
    assert m.normalise(5.0) == pytest.approx((5 - 2.75) / math.sqrt(2.1875))
    restored = RunningMoments()
    restored.load_state_dict(m.state_dict())
    assert (restored.count, restored.mean, restored.m2) == (m.count, m.mean, m.m2)


def test_running_moments_leave_a_constant_reward_unscaled():
    m = RunningMoments()
    assert m.normalise(3.0) == 3.0  # nothing seen: mean 0, std 1
    m.update(2, 4.0, 8.0)  # [2, 2]: std 0 -> only the mean is taken away
    assert m.normalise(3.0) == 1.0
    m.update(0, 0.0, 0.0)  # an empty batch changes nothing
    assert m.count == 2


def test_kl_penalised_selection_prefers_the_sample_the_reference_finds_likely():
    scores = torch.tensor([[1.0, 0.8, 0.2], [0.5, 0.4, 0.9]])
    log_ratio = torch.tensor([[3.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    penalised = kl_penalised_scores(scores, log_ratio, kl_coef=0.1)
    # row 0: 1.0 - 0.3 = 0.7, 0.8 - 0.05 = 0.75, 0.2; row 1: 0.5, 0.4, 0.9 - 0.1 = 0.8
    torch.testing.assert_close(penalised, torch.tensor([[0.7, 0.75, 0.2], [0.5, 0.4, 0.8]]))
    assert select_best(penalised)[0].tolist() == [1, 2]
    assert select_best(scores)[0].tolist() == [0, 2]
    # chosen on the penalised scores, kept on the chosen sample's own score: 0.8 < 0.85 <= 0.9
    best, keep = select_best(scores, min_score=0.85, by=penalised)
    assert best.tolist() == [1, 2] and keep.tolist() == [False, True]
    assert kl_penalised_scores(scores, log_ratio, 0.0) is scores
    assert kl_penalised_scores(scores, None, 0.1) is scores


def test_standardised_selection_counts_kl_in_standard_deviations():
    scores = torch.tensor([[1.0, 3.0], [10.0, 30.0], [2.0, 2.0]])
    log_ratio = torch.tensor([[0.0, 5.0], [0.0, 5.0], [1.0, 0.0]])
    z = kl_penalised_scores(scores, None, 0.0, standardise=True)
    # each row: mean of the two, population std = half the gap -> -1, +1; a tied row: 0, 0
    torch.testing.assert_close(z, torch.tensor([[-1.0, 1.0], [-1.0, 1.0], [0.0, 0.0]]), atol=1e-5, rtol=0)
    picked = kl_penalised_scores(scores, log_ratio, 0.3, standardise=True)
    # rows 0 and 1 alike whatever the scale: -1 - 0 = -1 vs 1 - 0.3 * 5 = -0.5; a tie goes to the smaller log-ratio
    torch.testing.assert_close(picked, torch.tensor([[-1.0, -0.5], [-1.0, -0.5], [-0.3, 0.0]]), atol=1e-5, rtol=0)
    assert select_best(picked)[0].tolist() == [1, 1, 1]
    assert select_best(kl_penalised_scores(scores, log_ratio, 0.5, standardise=True))[0].tolist() == [0, 0, 1]


def _prompts(synthetic_dir, tiny_model_dir, batch_size=4) -> PromptDataModule:
    dm = PromptDataModule(
        train_file=str(synthetic_dir / "prompts_train.jsonl"), val_file=str(synthetic_dir / "prompts_val.jsonl"),
        tokenizer=str(tiny_model_dir), max_prompt_length=32, batch_size=batch_size,
    )
    dm.setup()
    return dm


def test_rs_log_ratio_is_the_summed_policy_minus_reference_logprob(synthetic_dir, tiny_model_dir):
    module = RejectionSamplingModule(ModelSpec(path=str(tiny_model_dir)), RewardSpec(oracle="synthetic"),
                                     SamplingSpec(max_new_tokens=6, num_samples=3), kl_coef=0.5)
    module.configure_model()
    assert module.reference is not None and not any(p.requires_grad for p in module.reference.parameters())
    batch = next(iter(_prompts(synthetic_dir, tiny_model_dir).train_dataloader()))
    rollout, _, scores = module.sample(batch, module.sampling, module._generator("train", 0, 0))
    torch.testing.assert_close(module.log_ratio(rollout), torch.zeros(12))  # policy == reference at the start
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    p, mask = rollout.prompt_length, rollout.response_mask.bool()
    expected = []
    for model in (module.policy, module.reference):
        with torch.no_grad():
            logits = response_logits(model, rollout.sequences, rollout.attention_mask, p)[0]
        expected.append(masked_sum(token_logprobs(logits, rollout.sequences[:, p:]), mask, dim=-1))
    ratio = module.log_ratio(rollout)
    torch.testing.assert_close(ratio, expected[0] - expected[1])
    assert ratio.abs().sum() > 0
    # best_of_k selects on score - 0.5 * log-ratio, and returns the raw scores and the log-ratio
    rollout2, _, raw, best, keep, kl = module.best_of_k(batch, module._generator("train", 0, 0))
    assert torch.equal(raw, scores.view(4, 3)) and kl.shape == (4, 3) and keep.all()
    assert torch.equal(best, select_best(raw - 0.5 * kl)[0])


def test_rs_without_kl_loads_no_reference(tiny_model_dir):
    module = RejectionSamplingModule(ModelSpec(path=str(tiny_model_dir)), RewardSpec(oracle="synthetic"))
    module.configure_model()
    assert module.reference is None
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        RejectionSamplingModule(ModelSpec(path=str(tiny_model_dir)), RewardSpec(oracle="synthetic"), kl_coef=-1.0)


def test_ppo_reward_norm_uses_running_moments_and_keeps_raw_scores_for_logging(tiny_model_dir):
    module = PPOModule(ModelSpec(path=str(tiny_model_dir)), RewardSpec(oracle="synthetic"), reward_norm=True)
    first = module.normalise_scores(torch.tensor([1.0, 2.0, 3.0]), update=True)
    # mean 2, population std sqrt(2/3)
    torch.testing.assert_close(first, (torch.tensor([1.0, 2.0, 3.0]) - 2) / math.sqrt(2 / 3))
    # validation does not move the moments
    val = module.normalise_scores(torch.tensor([5.0]), update=False)
    torch.testing.assert_close(val, torch.tensor([(5 - 2) / math.sqrt(2 / 3)]))
    assert module.reward_moments.count == 3
    off = PPOModule(ModelSpec(path=str(tiny_model_dir)), RewardSpec(oracle="synthetic"))
    scores = torch.tensor([1.0, 2.0])
    assert off.normalise_scores(scores, update=True) is scores


def test_rs_kl_reference_can_be_another_model_than_the_initial_policy(synthetic_dir, tiny_model_dir, tmp_path):
    """A round that continues from a later policy keeps its KL to SFT: `reference` names the model to compare with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(0)))
    other.save_pretrained(tmp_path / "sft")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "sft")
    module = RejectionSamplingModule(ModelSpec(path=str(tiny_model_dir)), RewardSpec(oracle="synthetic"),
                                     SamplingSpec(max_new_tokens=6, num_samples=3), kl_coef=0.5,
                                     reference=ModelSpec(path=str(tmp_path / "sft")))
    module.configure_model()
    ref = dict(module.reference.named_parameters())
    for name, p in other.named_parameters():  # the named model, frozen; not a copy of the policy
        torch.testing.assert_close(ref[name], p)
        assert not ref[name].requires_grad
    batch = next(iter(_prompts(synthetic_dir, tiny_model_dir).train_dataloader()))
    rollout, _, _ = module.sample(batch, module.sampling, module._generator("train", 0, 0))
    p, mask = rollout.prompt_length, rollout.response_mask.bool()
    expected = []
    for model in (module.policy, other):
        with torch.no_grad():
            logits = response_logits(model, rollout.sequences, rollout.attention_mask, p)[0]
        expected.append(masked_sum(token_logprobs(logits, rollout.sequences[:, p:]), mask, dim=-1))
    torch.testing.assert_close(module.log_ratio(rollout), expected[0] - expected[1])  # nonzero from the start
    assert module.log_ratio(rollout).abs().sum() > 0
