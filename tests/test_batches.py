"""Typed batch layouts (core/batches.py): Lightning moves them to the device whole, nested layouts and None
fields included, and the forward layer reads each layout by its type."""

import dataclasses

import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Trainer

from core.batches import PackedRows, PaddedRows, PairBatch, RankingBatch, SharedPromptRows, token_rows
from core.packing import collate_pairs_packed, collate_pairs_shared, collate_shared_prefix
from datamodules.preference import collate_pairs, collate_rankings
from datamodules.sft import collate_packed
from modules.reward import RewardModule
from tests.conftest import TINY_MODEL

PAIRS = [(([5, 6], [7, 2]), ([5, 6], [8, 9, 2]), 0.5, 3), (([4], [3, 2]), ([4], [9, 2]), 0.0, 7)]
GROUPS = [([([5, 6], [7, 2]), ([5, 6], [8, 2])], [0.0, 1.0], 0.0)]


def _tensors(batch) -> list[torch.Tensor]:
    """Every tensor of a batch, nested layouts included."""
    out = []
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        if dataclasses.is_dataclass(value):
            out += _tensors(value)
        elif value is not None:
            out.append(value)
    return out


def _batches():
    return [
        collate_pairs(PAIRS, pad_id=0),
        collate_pairs_packed(PAIRS, pad_id=0, max_length=8),
        collate_pairs_shared(PAIRS, pad_id=0, max_length=8),
        collate_rankings(GROUPS, pad_id=0),
        collate_packed([[([5], [7, 2]), ([6], [2])]], pad_id=0),
        collate_shared_prefix([[[1, 2, 3, 9], [1, 2, 4, 9]]], pad_id=0, max_length=8),  # no completion targets
    ]


def test_layouts_name_what_they_hold():
    pairs, packed, shared, rankings, sft_packed, scored_tree = _batches()
    assert isinstance(pairs, PairBatch) and isinstance(pairs.tokens, PaddedRows) and pairs.num_pairs == 2
    assert isinstance(packed.tokens, PackedRows) and isinstance(shared.tokens, SharedPromptRows)
    assert isinstance(rankings, RankingBatch) and isinstance(rankings.tokens, PaddedRows)
    assert isinstance(sft_packed, PackedRows) and token_rows(sft_packed) is sft_packed
    assert token_rows(shared) is shared.tokens
    assert scored_tree.target_ids is None and scored_tree.source_index is None and scored_tree.target_seq is None
    with pytest.raises(TypeError, match="not a batch layout"):
        token_rows({"input_ids": torch.zeros(1, 1)})


@pytest.mark.parametrize("index", range(6))
def test_move_data_to_device_keeps_type_nesting_and_none(index):
    batch = _batches()[index]
    moved = move_data_to_device(batch, torch.device("meta"))
    assert type(moved) is type(batch)
    assert all(t.device.type == "meta" for t in _tensors(moved))
    assert len(_tensors(moved)) == len(_tensors(batch))  # None fields stay None
    if isinstance(batch, (PairBatch, RankingBatch)):
        assert type(moved.tokens) is type(batch.tokens)
    assert all(t.device.type == "cpu" for t in _tensors(batch))  # a copy: the loader's batch is untouched


def test_strategy_batch_to_device_through_the_module_hooks():
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    module = RewardModule(str(TINY_MODEL))  # no weights needed: only the transfer hooks run
    trainer.strategy.connect(module)
    batch = collate_pairs_shared(PAIRS, pad_id=0, max_length=8)
    moved = trainer.strategy.batch_to_device(batch, torch.device("meta"))
    assert type(moved) is PairBatch and type(moved.tokens) is SharedPromptRows
    assert all(t.device.type == "meta" for t in _tensors(moved))


def test_layouts_are_not_frozen_because_lightning_sets_their_fields():
    @dataclasses.dataclass(frozen=True)
    class Frozen:
        x: torch.Tensor

    with pytest.raises(ValueError, match="frozen"):  # apply_to_collection copies, then setattr per field
        move_data_to_device(Frozen(torch.zeros(1)), torch.device("meta"))
    for cls in (PaddedRows, PackedRows, SharedPromptRows, PairBatch, RankingBatch):
        assert not cls.__dataclass_params__.frozen
