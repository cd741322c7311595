"""Padding-free PPO forwards (core/packing.pack_sequences): the packed layout by hand, transformers' reading of its
position ids, and packed log-probs / values / reference log-probs equal to the left-padded rows' on every
response position, for both layouts, with a response that stopped at EOS early."""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import find_packed_sequence_indices

from core.forward import lm_parts, response_slice
from core.generation import SamplingSpec
from core.models import LoraSpec, ModelSpec, load_causal_lm, unwrap_peft
from core.ops import positions_from_mask
from core.packing import pack_sequences
from core.reward_spec import RewardSpec
from modules.ppo import PPOModule

# p = 4, r = 2. Row 0: prompt [11, 12] (2 left pads), response [21, EOS]; row 1: prompt [13, 14, 15] (1 pad),
# response [23, 24]. Sequence lengths: 2 + 2 = 4 and 3 + 2 = 5.
SEQ = torch.tensor([[0, 0, 11, 12, 21, 2], [0, 13, 14, 15, 23, 24]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])


def test_pack_default_row_length_keeps_padded_width():
    # capacity p + r = 6; longest first: row 1 (5) opens packed row 0, row 0 (4) does not fit (5 + 4 > 6) and
    # opens packed row 1. T = longest packed row = 5; packed row 1's tail (1 token) restarts at position 0.
    packed = pack_sequences(SEQ, MASK, 4)
    torch.testing.assert_close(packed.input_ids, torch.tensor([[13, 14, 15, 23, 24], [11, 12, 21, 2, 0]]))
    torch.testing.assert_close(packed.position_ids, torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 3, 0]]))
    # row 0 starts at flat 1 * 5 + 0 = 5 with 2 prompt tokens: token i is predicted at 5 + (2 - 1) + i = 6, 7
    # row 1 starts at flat 0 with 3 prompt tokens: 0 + (3 - 1) + i = 2, 3
    torch.testing.assert_close(packed.index, torch.tensor([[6, 7], [2, 3]]))
    # flat 6 = token 12 (last prompt token, predicts 21), 7 = 21 (predicts EOS); 2 = 15, 3 = 23
    torch.testing.assert_close(packed.input_ids.flatten()[packed.index], torch.tensor([[12, 21], [15, 23]]))
    # transformers' packed detection: the tail is a sequence of its own
    torch.testing.assert_close(find_packed_sequence_indices(packed.position_ids),
                               torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]))


def test_pack_two_sequences_in_one_row():
    # capacity 9 = 5 + 4: row 1 at flat 0..4, row 0 at flat 5..8
    packed = pack_sequences(SEQ, MASK, 4, row_length=9)
    torch.testing.assert_close(packed.input_ids, torch.tensor([[13, 14, 15, 23, 24, 11, 12, 21, 2]]))
    torch.testing.assert_close(packed.position_ids, torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]]))
    torch.testing.assert_close(packed.index, torch.tensor([[5 + 1 + 0, 5 + 1 + 1], [2, 3]]))
    torch.testing.assert_close(find_packed_sequence_indices(packed.position_ids),
                               torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1]]))


def test_pack_gathers_what_the_padded_slice_reads_and_rejects_empty_prompts():
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(3, 50, (5, 9), generator=g)  # p = 6, r = 3
    mask = (torch.arange(9)[None] >= torch.tensor([[5], [0], [3], [1], [4]])).long()  # prompt lengths 1, 6, 3, 5, 2
    for row_length in (None, 3, 12, 40):  # 3 < longest sequence: raised to it
        packed = pack_sequences(seq, mask, 6, row_length=row_length)
        torch.testing.assert_close(packed.input_ids.flatten()[packed.index], response_slice(seq, 6))
        torch.testing.assert_close(packed.position_ids.flatten()[packed.index],
                                   response_slice(positions_from_mask(mask), 6))
        assert packed.input_ids.numel() - mask.sum() < packed.input_ids.shape[1]  # at most one row's worth of tail
    with pytest.raises(ValueError, match="prompt token"):
        pack_sequences(seq, torch.cat([torch.zeros(5, 6), torch.ones(5, 3)], 1).long(), 6)


def test_lm_parts_falls_back_on_post_processed_logits(tiny_model_dir):
    module = PPOModule(ModelSpec(path=str(tiny_model_dir)), RewardSpec(oracle="synthetic"))
    module.configure_model()
    trunk, head = lm_parts(module.policy)
    assert trunk is module.policy.model and head is module.policy.lm_head
    module.policy.config.final_logit_softcapping = 30.0
    assert lm_parts(module.policy) is None


def test_unwrap_peft_reaches_inside_a_peft_wrapper_only(tiny_model_dir):
    lora = load_causal_lm(ModelSpec(path=str(tiny_model_dir), lora=LoraSpec(r=2)))  # PeftModel(LoraModel(Llama))
    assert unwrap_peft(lora) is lora.base_model.model and type(unwrap_peft(lora)).__name__ == "LlamaForCausalLM"
    plain = unwrap_peft(lora)
    assert unwrap_peft(plain) is plain

    class LoadedAdapter:  # a transformers-loaded adapter: a peft_config, but no wrapper to unwrap
        peft_config = {"default": None}

    loaded = LoadedAdapter()
    assert unwrap_peft(loaded) is loaded


def _batch():
    # p = 8, r = 4; prompt lengths 2, 8, 1, 3 -> sequences of 6, 12, 5, 7 tokens; rows of 12: [12], [7, 5], [6].
    # Row 0 stops at EOS (2) after 2 response tokens, pads (0) after; the others run to r tokens.
    prompts = [[7, 8], [5, 6, 7, 8, 9, 10, 11, 12], [13], [20, 21, 22]]
    responses = [[30, 2, 0, 0], [31, 32, 33, 34], [35, 36, 37, 38], [40, 41, 42, 43]]
    seq = torch.tensor([[0] * (8 - len(q)) + q + a for q, a in zip(prompts, responses)])
    mask = torch.tensor([[0] * (8 - len(q)) + [1] * len(q) + [1, 1, 1, 1] for q in prompts])
    resp = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]).bool()  # through EOS
    mask[:, 8:] = resp.long()  # as generation leaves it: 0 after EOS
    packed = pack_sequences(seq, mask, 8)
    assert packed.input_ids.shape == (3, 12) and packed.position_ids[1].tolist() == [*range(7), *range(5)]
    return seq, mask, resp


@pytest.mark.parametrize("attn", [None, "eager"])
@pytest.mark.parametrize("layout", ["separate", "shared"])
def test_packed_forwards_equal_padded(tiny_model_dir, layout, attn):
    lora = LoraSpec(r=4, alpha=8, dropout=0.0) if layout == "shared" else None
    module = PPOModule(ModelSpec(path=str(tiny_model_dir), lora=lora, attn_implementation=attn),
                       RewardSpec(oracle="synthetic"), SamplingSpec(temperature=0.7), layout=layout)
    module.configure_model()
    module._no_dropout()
    torch.manual_seed(0)
    with torch.no_grad():  # policy != reference, non-zero values
        for n, p in module.policy.named_parameters():
            if layout == "separate" or "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.05)
        if layout == "shared":
            module.value_head.weight.normal_(0, 1.0)
    seq, mask, resp = _batch()
    outs = {}
    for packing in (False, True):
        module.packing = packing
        module.zero_grad(set_to_none=True)
        logp, values, logits = module.policy_forward(seq, mask, 8)
        (logp[resp].sum() + values[resp].sum()).backward()
        with torch.no_grad():
            ref = module.reference_logp(seq, mask, 8)
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}  # policy, value
        outs[packing] = (logp[resp], values[resp], ref[resp], logits[resp], grads)
    (lp0, v0, ref0, lg0, g0), (lp1, v1, ref1, lg1, g1) = outs[False], outs[True]
    assert not torch.allclose(lp1, ref1, atol=1e-3)  # the reference path is a different model
    for a, b in ((lp0, lp1), (v0, v1), (ref0, ref1), (lg0, lg1)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5)
