"""ResumableLoader: seeded per-epoch order, and a restored loader continues where the saved one stopped."""

from __future__ import annotations

import torch

from datamodules.resumable import ResumableLoader


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
