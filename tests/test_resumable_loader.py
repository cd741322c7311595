"""ResumableLoader: seeded per-epoch order, and a restored loader continues where the saved one stopped, also
through a Trainer resume under max_epochs (recipes.common.RestoreLoaderState)."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.resumable import ResumableLoader, held_out
from recipes.common import RestoreLoaderState


def _epoch(loader: ResumableLoader, epoch: int, take: int | None = None) -> list[list[int]]:
    loader.epoch_sampler.set_epoch(epoch)  # what Lightning does at every epoch start
    out = []
    for batch in loader:
        out.append(batch.tolist())
        if take is not None and len(out) == take:
            break
    return out


def test_order_is_a_function_of_seed_and_epoch():
    a, b = ResumableLoader(list(range(10)), 3, seed=5), ResumableLoader(list(range(10)), 3, seed=5)
    assert _epoch(a, 0) == _epoch(b, 0)
    assert _epoch(a, 1) == _epoch(b, 1) != _epoch(a, 0)
    assert sorted(sum(_epoch(a, 2), [])) == list(range(10))
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5 + 1)).tolist()
    assert sum(_epoch(a, 1), []) == expected
    assert sum(_epoch(ResumableLoader(list(range(10)), 3, shuffle=False), 0), []) == list(range(10))


def test_restored_loader_continues_mid_epoch():
    full = _epoch(ResumableLoader(list(range(10)), 3, seed=1), 2)  # 4 batches: 3 + 3 + 3 + 1
    saved = ResumableLoader(list(range(10)), 3, seed=1)
    assert _epoch(saved, 2, take=2) == full[:2]
    state = saved.state_dict()
    assert state == {"epoch": 2, "seen": 2}
    restored = ResumableLoader(list(range(10)), 3, seed=1)
    restored.load_state_dict(state)
    assert len(restored) == 4  # Lightning counts the whole epoch; the fit loop knows 2 are done
    assert _epoch(restored, 2) == full[2:]
    assert _epoch(restored, 3) == _epoch(ResumableLoader(list(range(10)), 3, seed=1), 3)  # next epoch: whole


def test_state_saved_at_the_end_of_an_epoch_starts_the_next_one_whole():
    saved = ResumableLoader(list(range(10)), 3, seed=1)
    _epoch(saved, 0)
    restored = ResumableLoader(list(range(10)), 3, seed=1)
    restored.load_state_dict(saved.state_dict())  # {"epoch": 0, "seen": 4}
    assert _epoch(restored, 1) == _epoch(ResumableLoader(list(range(10)), 3, seed=1), 1)


class _Recorder(LightningModule):
    """Records the rows of every training batch; its LR schedule length asks estimated_stepping_batches, which
    under max_epochs builds the train loader before a checkpoint is restored (as every stage's does)."""

    def __init__(self):
        super().__init__()
        self.layer, self.seen = torch.nn.Linear(1, 1), []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.tolist())
        return self.layer(batch.float().unsqueeze(-1)).sum()

    def configure_optimizers(self):
        assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return ResumableLoader(list(range(10)), 3, seed=1)


def _fit(tmp_path, callbacks, max_steps=-1, ckpt_path=None) -> list[list[int]]:
    module = _Recorder()
    checkpoint = ModelCheckpoint(tmp_path, every_n_train_steps=2, save_last=True)
    Trainer(max_epochs=1, max_steps=max_steps, callbacks=[checkpoint, *callbacks], logger=False,
            enable_progress_bar=False, enable_model_summary=False).fit(module, ckpt_path=ckpt_path)
    return module.seen


def test_max_epochs_resume_continues_mid_epoch_only_with_restore_loader_state(tmp_path):
    full = _fit(tmp_path / "full", [])  # 4 batches: 3 + 3 + 3 + 1
    assert _fit(tmp_path / "killed", [], max_steps=2) == full[:2]
    last = str(tmp_path / "killed" / "last.ckpt")
    assert _fit(tmp_path / "lightning", [], ckpt_path=last) == full[:2]  # Lightning alone: the state is dropped
    assert _fit(tmp_path / "resumed", [RestoreLoaderState()], ckpt_path=last) == full[2:]


def test_held_out_split_size_order_and_row_numbers():
    # 10 rows, fraction 0.25: int(2.5) = 2 held out; the order is random.Random(0)'s shuffle, pinned here because
    # every run's validation set (SFT, prompts, preferences) is this split
    train, val = held_out(list(range(10)), 0.25, seed=0)
    assert (train, val) == ([1, 5, 3, 4, 2, 0, 9, 6], [7, 8])
    assert held_out(list("abc"), 0.05, seed=0)[1] == ["a"]  # int(0.15) = 0, but at least one row
    # the permutation depends on (n, seed) only: row numbers 0..9 name the same rows as the rows themselves
    rows = [f"row {i}" for i in range(10)]
    assert held_out(rows, 0.25, seed=0)[1] == [rows[i] for i in held_out(list(range(10)), 0.25, seed=0)[1]]
    assert held_out(rows, 0.25, seed=0) != held_out(rows, 0.25, seed=1)
    assert held_out([], 0.25, seed=0) == ([], [])
