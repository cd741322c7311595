"""Prompt-shared packed rows for reward models (core/packing.py, ops.prefix_tree_mask): the layout by
hand, the mask by hand, and scores/gradients equal to padded rows on the tiny model."""

import pytest
import torch

from core.models import ModelSpec
from core.ops import first_fit, prefix_tree_mask
from core.packing import collate_pairs_shared, collate_shared_prefix, common_prefix_length
from datamodules.preference import collate_pairs, collate_rankings
from modules.reward import RewardModule


def test_first_fit_by_hand():
    # lengths 5, 4, 3, 2 into capacity 7: 5 -> bin 0; 4 -> bin 1 (5 + 4 > 7); 3 -> bin 1 (4 + 3 = 7); 2 -> bin 0
    assert first_fit([5, 4, 3, 2], 7) == [[0, 3], [1, 2]]


def test_first_fit_over_long_item_gets_its_own_bin():
    assert first_fit([9, 1], 7) == [[0], [1]]  # 9 alone overflows bin 0; 9 + 1 > 7 opens bin 1


def test_common_prefix_length_by_hand():
    assert common_prefix_length([[1, 2, 3, 9], [1, 2, 4, 5, 9]]) == 2  # [1, 2] shared, 3 != 4
    assert common_prefix_length([[1, 2, 9], [1, 2, 9, 7]]) == 2  # the shorter one keeps its last token
    assert common_prefix_length([[4, 9], [5, 9]]) == 0
    assert common_prefix_length([[1, 2, 3, 9], [1, 2, 4, 9], [1, 7, 9]]) == 1  # all three share [1]


def test_shared_prefix_layout_by_hand():
    # unit 0: [1, 2, 3, 9] and [1, 2, 4, 5, 9] -> prefix [1, 2], branches [3, 9] and [4, 5, 9]: 7 tokens
    # unit 1: [6, 9] and [7, 9] -> no common prefix, branches [6, 9] and [7, 9]: 4 tokens
    # capacity max(8, 7) = 8: unit 0 -> row 0, unit 1 (7 + 4 > 8) -> row 1; width 7, row 1 padded by 3
    batch = collate_shared_prefix([[[1, 2, 3, 9], [1, 2, 4, 5, 9]], [[6, 9], [7, 9]]], pad_id=0, max_length=8)
    assert batch.input_ids.tolist() == [[1, 2, 3, 9, 4, 5, 9], [6, 9, 7, 9, 0, 0, 0]]
    # branches restart at the prefix length: [0, 1] prefix, [2, 3] and [2, 3, 4]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 0, 1, 0, 1, 2]]
    assert batch.tree_ids.tolist() == [[0] * 7, [1, 1, 1, 1, -1, -1, -1]]
    assert batch.branch_ids.tolist() == [[0, 0, 1, 1, 2, 2, 2], [1, 1, 2, 2, 0, 0, 0]]
    # last tokens: row 0 positions 3 and 6; row 1 (flat offset 7) positions 1 and 3 -> 8 and 10
    assert batch.score_index.tolist() == [3, 6, 8, 10]


def test_pairs_shared_orders_chosen_then_rejected():
    rows = [(([1, 2], [3, 9]), ([1, 2], [4, 9]), 0.5, 7), (([6], [9]), ([6], [8, 9]), 0.0, 8)]
    batch = collate_pairs_shared(rows, pad_id=0, max_length=16)
    # one row: unit 0 = [1, 2 | 3, 9 | 4, 9] (flat 0..5), unit 1 = [6 | 9 | 8, 9] (flat 6..9)
    # sequence order (c0, r0, c1, r1) = last tokens 3, 5, 7, 9 -> pairs layout (c0, c1, r0, r1)
    assert batch.tokens.score_index.tolist() == [3, 7, 5, 9]
    assert batch.margin.tolist() == [0.5, 0.0] and batch.index.tolist() == [7, 8]


def test_prefix_tree_mask_by_hand():
    # one row: prefix [a, b], branch 1 [c], branch 2 [d, e], one padding token
    tree = torch.tensor([[0, 0, 0, 0, 0, -1]])
    branch = torch.tensor([[0, 0, 1, 2, 2, 0]])
    mask = prefix_tree_mask(tree, branch)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],  # a
        [1, 1, 0, 0, 0, 0],  # b
        [1, 1, 1, 0, 0, 0],  # c: prefix + itself
        [1, 1, 0, 1, 0, 0],  # d: prefix, not c
        [1, 1, 0, 1, 1, 0],  # e: prefix, d, itself
        [0, 0, 0, 0, 0, 1],  # padding: itself only
    ]


def _module(tiny_model_dir, attn="sdpa"):
    module = RewardModule(ModelSpec(path=str(tiny_model_dir), attn_implementation=attn))
    module.configure_model()
    return module


PAIRS = [
    (([5, 6, 7], [8, 9, 2]), ([5, 6, 7], [10, 2]), 0.0, 0),
    (([11], [12, 13, 14, 2]), ([11], [15, 2]), 0.0, 1),
    (([16, 17, 18, 19], [20, 2]), ([17, 18, 19], [21, 22, 23, 2]), 0.0, 2),  # prompts cut differently
]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_pairs_score_and_grad_like_padded(tiny_model_dir, attn):
    module = _module(tiny_model_dir, attn)
    padded = module(collate_pairs(PAIRS, pad_id=0))
    shared_batch = collate_pairs_shared(PAIRS, pad_id=0, max_length=8)
    assert shared_batch.tokens.input_ids.numel() < collate_pairs(PAIRS, pad_id=0).tokens.input_ids.numel()
    shared = module(shared_batch)
    torch.testing.assert_close(shared, padded, rtol=1e-5, atol=1e-5)
    params = [p for p in module.parameters() if p.requires_grad]
    g_padded = torch.autograd.grad(padded.sum(), params)
    g_shared = torch.autograd.grad(shared.sum(), params)
    for a, b in zip(g_shared, g_padded):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_shared_rankings_score_like_padded(tiny_model_dir):
    module = _module(tiny_model_dir)
    groups = [
        ([([5, 6], [7, 2]), ([5, 6], [8, 9, 2]), ([5, 6], [10, 2]), ([5, 6], [7, 11, 2])], [1.0, 2.0, 3.0, 4.0], 0.0),
        ([([12], [13, 2]), ([12], [14, 2])], [1.0, 1.0], 0.0),
    ]
    units = [[p + c for p, c in enc] for enc, _, _ in groups]
    with torch.no_grad():
        padded = module(collate_rankings(groups, pad_id=0))
        shared = module(collate_shared_prefix(units, pad_id=0, max_length=4))
    torch.testing.assert_close(shared, padded, rtol=1e-5, atol=1e-5)


def test_datamodule_share_prompt_batches(tiny_model_dir, synthetic_dir):
    from datamodules.preference import PreferenceDataModule

    kw = dict(train_file=str(synthetic_dir / "pairs_train.jsonl"), val_file=str(synthetic_dir / "pairs_val.jsonl"),
              tokenizer=str(tiny_model_dir), max_length=64, max_prompt_length=32, batch_size=4)
    plain, shared = PreferenceDataModule(**kw), PreferenceDataModule(**kw, share_prompt=True)
    plain.setup("fit"), shared.setup("fit")
    a, b = next(iter(plain.val_dataloader())), next(iter(shared.val_dataloader()))
    assert b.tokens.score_index.shape == (8,) and torch.equal(a.margin, b.margin)
    # every sequence's last token is its EOS, and the shared rows hold fewer tokens than the padded ones
    eos = shared.tokenizer.eos_token_id
    assert (b.tokens.input_ids.flatten()[b.tokens.score_index] == eos).all()
    assert int((b.tokens.tree_ids >= 0).sum()) < int(a.tokens.attention_mask.sum())


def test_completion_targets_by_hand():
    # [1, 2 | 3, 9 | 4, 5, 9], prompts of 2 tokens: token j of a sequence is predicted by its token j - 1
    batch = collate_shared_prefix([[[1, 2, 3, 9], [1, 2, 4, 5, 9]]], pad_id=0, max_length=8,
                                  prompt_lengths=[[2, 2]])
    # seq 0: 3 <- coord 1 (prefix, flat 1), 9 <- coord 2 (branch 1, flat 2)
    # seq 1: 4 <- coord 1 (prefix, flat 1), 5 <- coord 2 (branch 2 starts at flat 4), 9 <- coord 3 (flat 5)
    assert batch.target_ids.tolist() == [3, 9, 4, 5, 9]
    assert batch.source_index.tolist() == [1, 2, 1, 4, 5]
    assert batch.target_seq.tolist() == [0, 0, 1, 1, 1]
    # a shared prefix reaching into the completions: prompts of 1 token, token 2 is labelled in both sequences
    batch = collate_shared_prefix([[[1, 2, 3, 9], [1, 2, 4, 5, 9]]], pad_id=0, max_length=8,
                                  prompt_lengths=[[1, 1]])
    assert batch.target_ids.tolist() == [2, 3, 9, 2, 4, 5, 9]
    assert batch.source_index.tolist() == [0, 1, 2, 0, 1, 4, 5]
    assert batch.target_seq.tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_pairs_shared_targets_use_pairs_order():
    rows = [(([1, 2], [3, 9]), ([1, 2], [4, 9]), 0.0, 0), (([6], [7, 9]), ([6], [8, 9]), 0.0, 1)]
    batch = collate_pairs_shared(rows, pad_id=0, max_length=16)
    # unit order c0, r0, c1, r1 -> pairs order c0 = 0, c1 = 1, r0 = 2, r1 = 3; two completion tokens each
    assert batch.tokens.target_seq.tolist() == [0, 0, 2, 2, 1, 1, 3, 3]
    assert batch.tokens.target_ids.tolist() == [3, 9, 4, 9, 7, 9, 8, 9]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dpo_logps_and_grads_on_shared_rows_equal_padded(tiny_model_dir, attn):
    from modules.dpo import DPOModule

    module = DPOModule(ModelSpec(path=str(tiny_model_dir), attn_implementation=attn))
    module.configure_model()
    padded = module.sequence_logps(module.policy, collate_pairs(PAIRS, pad_id=0))[0]
    shared = module.sequence_logps(module.policy, collate_pairs_shared(PAIRS, pad_id=0, max_length=8))[0]
    assert shared.shape == (6,)
    torch.testing.assert_close(shared, padded, rtol=1e-5, atol=1e-5)
    params = [p for p in module.policy.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(shared.sum(), params), torch.autograd.grad(padded.sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dpo_lora_adapter_reference_on_shared_rows_equals_padded(tiny_model_dir):
    from core.models import LoraSpec
    from modules.dpo import DPOModule

    spec = ModelSpec(path=str(tiny_model_dir), lora=LoraSpec(r=4, dropout=0.0))
    module = DPOModule(spec, reference="adapter")
    module.configure_model()
    with torch.no_grad():
        padded = module.reference_logps(collate_pairs(PAIRS, pad_id=0))
        shared = module.reference_logps(collate_pairs_shared(PAIRS, pad_id=0, max_length=8))
        policy = module.sequence_logps(module.policy, collate_pairs_shared(PAIRS, pad_id=0, max_length=8))[0]
    torch.testing.assert_close(shared, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(policy, padded, rtol=1e-5, atol=1e-5)  # a fresh adapter (B = 0) changes nothing


@pytest.mark.parametrize("reference", ["copy", "precomputed"])
def test_dpo_recipe_trains_with_shared_prompt(run_recipe, tmp_path, reference):
    run_recipe("dpo", "fit", "--config", "configs/dpo/tiny.yaml", "--data.share_prompt", "true",
               "--model.reference", reference, "--trainer.max_steps", "2", f"--model.save_dir={tmp_path / 'dpo'}")
    assert (tmp_path / "dpo" / "config.json").exists()


def test_reward_recipe_trains_with_shared_prompt(run_recipe, tmp_path):
    run_recipe("reward", "fit", "--config", "configs/reward/tiny.yaml", "--data.share_prompt", "true",
               "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
               f"--model.save_dir={tmp_path / 'rm'}")
    assert (tmp_path / "rm" / "config.json").exists()


def test_train_top_layers_freezes_embeddings_and_lower_blocks(tiny_model_dir):
    from core.models import load_sequence_classifier

    model = load_sequence_classifier(ModelSpec(path=str(tiny_model_dir), train_top_layers=1), pad_token_id=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    n_layers = model.config.num_hidden_layers
    assert trainable, "something must train"
    assert all(n.startswith(f"model.layers.{n_layers - 1}.") or n in ("model.norm.weight", "score.weight")
               for n in trainable), trainable
    assert {"model.norm.weight", "score.weight"} <= trainable
    # backward never reaches the frozen part: no grads there after a step
    ids = torch.tensor([[5, 6, 7, 2]])
    model(input_ids=ids).logits.sum().backward()
    assert all((p.grad is None) != p.requires_grad for p in model.parameters())


def test_train_top_layers_bad_config_fails_before_loading():
    from core.models import LoraSpec

    with pytest.raises(ValueError, match="train_top_layers"):
        ModelSpec(path="nowhere", train_top_layers=0)
    with pytest.raises(ValueError, match="without lora"):
        ModelSpec(path="nowhere", train_top_layers=2, lora=LoraSpec(r=4))
