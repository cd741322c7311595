"""Module and pieces tier: one step on the tiny model, packing isolation, LoRA, 8-bit/4-bit on CPU, HF save."""

import copy

import pytest
import torch
from lightning.pytorch import Trainer

from core.models import LoraSpec, ModelSpec, save_hf
from core.ops import shifted_logprobs
from core.packing import pad_completions
from datamodules.sft import SFTDataModule, collate_packed
from modules.sft import SFTModule


def _dm(synthetic_dir, tiny_model_dir, **kw):
    return SFTDataModule(
        train_file=str(synthetic_dir / "sft_train.jsonl"), val_file=str(synthetic_dir / "sft_val.jsonl"),
        tokenizer=str(tiny_model_dir), max_length=48, max_prompt_length=32, batch_size=8, **kw,
    )


def _fit(module, dm, steps=1):
    trainer = Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(module, dm)
    return trainer


def test_one_step_updates_all_weights(synthetic_dir, tiny_model_dir, tmp_path):
    module = SFTModule(ModelSpec(path=str(tiny_model_dir)), save_dir=str(tmp_path / "hf"))
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    _fit(module, _dm(synthetic_dir, tiny_model_dir))
    changed = [n for n, p in module.policy.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == len(before)
    assert (tmp_path / "hf" / "model.safetensors").exists()



def test_each_validation_is_its_own_token_mean_and_perplexity_its_exp(synthetic_dir, tiny_model_dir):
    module, dm = SFTModule(ModelSpec(path=str(tiny_model_dir))), _dm(synthetic_dir, tiny_model_dir)
    results = []
    for batches in (1, 2, 1):  # the logged metric object is reset after each validation: nothing carries over
        trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                          limit_val_batches=batches)
        results.append(trainer.validate(module, dm, verbose=False)[0])
    one, two, again = results
    assert again["val/loss"] == one["val/loss"] and two["val/loss"] != one["val/loss"]
    assert one["val/perplexity"] == pytest.approx(torch.tensor(one["val/loss"]).exp().item(), rel=1e-6)

def test_packing_does_not_attend_across_examples(tiny_model_dir):
    module = SFTModule(ModelSpec(path=str(tiny_model_dir)))
    module.configure_model()
    rows = [([5, 6, 7], [8, 9, 2]), ([10, 11], [12, 2]), ([13], [14, 15, 16, 2])]
    nll_plain = module(pad_completions(rows, pad_id=0))
    nll_packed = module(collate_packed([rows], pad_id=0))
    # same tokens scored, same values: position ids restart and the mask is block-diagonal
    assert nll_plain.numel() == nll_packed.numel() == 9
    torch.testing.assert_close(nll_plain, nll_packed, rtol=1e-4, atol=1e-5)


def test_completion_only_head_equals_full_forward(tiny_model_dir):
    module = SFTModule(ModelSpec(path=str(tiny_model_dir), lora=LoraSpec(r=4, dropout=0.0)))
    module.configure_model()
    batch = pad_completions([([5, 6, 7], [8, 9, 2]), ([10], [11, 2])], pad_id=0)
    logits = module.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logps, mask = shifted_logprobs(logits, batch.labels)
    torch.testing.assert_close(module(batch), -logps[mask], rtol=1e-5, atol=1e-5)


def test_lora_trains_adapters_only_and_adapter_off_is_base(synthetic_dir, tiny_model_dir, tmp_path):
    module = SFTModule(ModelSpec(path=str(tiny_model_dir), lora=LoraSpec(r=4, dropout=0.0)),
                       save_dir=str(tmp_path / "hf"))
    module.configure_model()
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base = SFTModule(ModelSpec(path=str(tiny_model_dir)))
    base.configure_model()
    batch = pad_completions([([5, 6, 7], [8, 9, 2])], pad_id=0)
    frozen_before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if not p.requires_grad}
    _fit(module, _dm(synthetic_dir, tiny_model_dir), steps=2)
    with torch.no_grad(), module.policy.disable_adapter():
        off = module.policy(input_ids=batch.input_ids).logits
        on_base = base.policy(input_ids=batch.input_ids).logits
    torch.testing.assert_close(off, on_base)
    assert all(torch.equal(frozen_before[n], p) for n, p in module.policy.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_quantized_lora_forward_backward_on_cpu(tiny_model_dir, quantization):
    module = SFTModule(ModelSpec(path=str(tiny_model_dir), quantization=quantization, lora=LoraSpec(r=4)))
    module.configure_model()
    loss = module(pad_completions([([5, 6, 7], [8, 9, 2]), ([10], [11, 2])], pad_id=0)).mean()
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in module.policy.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_quantization_without_lora_fails_clearly(tiny_model_dir):
    with pytest.raises(ValueError, match="LoRA"):
        SFTModule(ModelSpec(path=str(tiny_model_dir), quantization="int8")).configure_model()


def test_saved_lora_model_merges_and_reloads(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    module = SFTModule(ModelSpec(path=str(tiny_model_dir), lora=LoraSpec(r=4, dropout=0.0)))
    module.configure_model()
    with torch.no_grad():  # make the adapter non-zero so merging matters
        for n, p in module.policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = module.policy(input_ids=ids).logits
    policy_before = copy.deepcopy(module.policy.state_dict())
    save_hf(module.policy, module.tokenizer, tmp_path / "merged", merge_lora=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    # saving did not merge into the live training model
    assert all(torch.equal(policy_before[k], v) for k, v in module.policy.state_dict().items())


def test_merging_a_lora_on_a_tied_lm_head_keeps_embeddings(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = ModelSpec(path=str(tiny_model_dir), lora=LoraSpec(r=4, dropout=0.0, target_modules=["q_proj", "lm_head"]))
    module = SFTModule(spec)
    module.configure_model()
    with torch.no_grad():
        for n, p in module.policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = module.policy(input_ids=ids).logits
    save_hf(module.policy, module.tokenizer, tmp_path / "merged", merge_lora=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
