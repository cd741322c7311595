"""FlexAttention for packed and prompt-shared rows (`attn_implementation: flex_attention`): a BlockMask instead of
a dense 4D mask, so attention can skip the blocks no query sees.

On CPU (torch 2.13, transformers 5.24) FlexAttention runs forward only: any input that requires grad raises
`NotImplementedError: FlexAttention does not support backward on CPU. Please set the input requires_grad to False
or use another device.` So here the scores and log-probs are compared without grad (frozen models: references,
reward models, rollout scoring); training through it, gradients included, is the `gpu` test below.
"""

import pytest
import torch

from core.models import ModelSpec
from core.packing import collate_pairs_packed, collate_pairs_shared
from datamodules.preference import collate_pairs
from modules.dpo import DPOModule
from modules.reward import RewardModule

PAIRS = [
    (([5, 6, 7], [8, 9, 2]), ([5, 6, 7], [10, 2]), 0.0, 0),
    (([11], [12, 13, 14, 2]), ([11], [15, 2]), 0.0, 1),
    (([16, 17, 18, 19], [20, 2]), ([17, 18, 19], [21, 22, 23, 2]), 0.0, 2),  # prompts cut differently
]
LAYOUTS = {"shared": lambda: collate_pairs_shared(PAIRS, pad_id=0, max_length=8),
           "packed": lambda: collate_pairs_packed(PAIRS, pad_id=0, max_length=16)}


def _built(cls, tiny_model_dir, attn, device="cpu"):
    module = cls(ModelSpec(path=str(tiny_model_dir), attn_implementation=attn))
    torch.manual_seed(0)  # the reward model's new score head: the same in both
    module.configure_model()
    return module.to(device)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_flex_scores_equal_padded_sdpa(tiny_model_dir, layout):
    sdpa, flex = _built(RewardModule, tiny_model_dir, "sdpa"), _built(RewardModule, tiny_model_dir, "flex_attention")
    assert flex.backbone.config._attn_implementation == "flex_attention"
    with torch.no_grad():
        padded = sdpa(collate_pairs(PAIRS, pad_id=0))
        scored = flex(LAYOUTS[layout]())
    torch.testing.assert_close(scored, padded, rtol=0, atol=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_flex_logps_equal_padded_sdpa(tiny_model_dir, layout):
    sdpa, flex = _built(DPOModule, tiny_model_dir, "sdpa"), _built(DPOModule, tiny_model_dir, "flex_attention")
    with torch.no_grad():
        padded = sdpa.sequence_logps(sdpa.policy, collate_pairs(PAIRS, pad_id=0))[0]
        logps = flex.sequence_logps(flex.policy, LAYOUTS[layout]())[0]
    assert logps.shape == (6,)
    torch.testing.assert_close(logps, padded, rtol=0, atol=1e-4)


def test_flex_has_no_backward_on_cpu(tiny_model_dir):
    flex = _built(DPOModule, tiny_model_dir, "flex_attention")
    with pytest.raises(NotImplementedError, match="FlexAttention does not support backward on CPU"):
        flex.sequence_logps(flex.policy, LAYOUTS["shared"]())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: FlexAttention has no backward on CPU")
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_flex_logps_and_grads_equal_padded_on_gpu(tiny_model_dir, layout):
    sdpa = _built(DPOModule, tiny_model_dir, "sdpa", "cuda")
    flex = _built(DPOModule, tiny_model_dir, "flex_attention", "cuda")
    from lightning.fabric.utilities.apply_func import move_data_to_device

    padded = sdpa.sequence_logps(sdpa.policy, move_data_to_device(collate_pairs(PAIRS, pad_id=0), "cuda"))[0]
    logps = flex.sequence_logps(flex.policy, move_data_to_device(LAYOUTS[layout](), "cuda"))[0]
    torch.testing.assert_close(logps, padded, rtol=0, atol=1e-4)
    params = [[p for p in m.policy.parameters() if p.requires_grad] for m in (sdpa, flex)]
    for a, b in zip(torch.autograd.grad(logps.sum(), params[1]), torch.autograd.grad(padded.sum(), params[0])):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
