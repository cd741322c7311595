"""EvalSampler: each validation row on exactly one process, in order, without Lightning's padding."""

from torch.utils.data import DistributedSampler

from datamodules import resumable
from datamodules.resumable import EvalSampler


def _shares(n: int, world: int, monkeypatch) -> list[list[int]]:
    out = []
    for rank in range(world):
        monkeypatch.setattr(resumable, "_replicas", lambda rank=rank: {"num_replicas": world, "rank": rank})
        sampler = EvalSampler(n)
        out.append(list(sampler))
        assert len(sampler) == len(out[-1])
    return out


def test_every_row_once_without_padding(monkeypatch):
    assert _shares(7, 1, monkeypatch) == [[0, 1, 2, 3, 4, 5, 6]]
    assert _shares(7, 2, monkeypatch) == [[0, 2, 4, 6], [1, 3, 5]]  # DistributedSampler: rank 1 also gets row 0
    assert list(DistributedSampler(range(7), num_replicas=2, rank=1, shuffle=False)) == [1, 3, 5, 0]
    assert _shares(8, 3, monkeypatch) == [[0, 3, 6], [1, 4, 7], [2, 5]]


def test_fewer_rows_than_processes_pads_so_no_rank_is_empty(monkeypatch):
    assert _shares(1, 2, monkeypatch) == [[0], [0]]


def test_one_process_without_torch_distributed():
    assert list(EvalSampler(3)) == [0, 1, 2]
