"""Seeded data order: the held-out validation split (`held_out`), and a DataLoader that resumes mid-epoch: seeded
per-epoch shuffling plus a count of batches handed out.

Lightning saves `state_dict()` of every train loader that has one into the checkpoint and calls
`load_state_dict()` on resume (a plain DataLoader restarts its epoch from a fresh, unseeded shuffle, so a
resumed run sees other prompts than the uninterrupted one). Lightning drops that state when the loader was built
before the restore, as under max_epochs: the recipes' RestoreLoaderState callback hands it over then. The order
is a pure function of (seed, epoch); the state is (epoch, batches seen), and a restored loader skips the batches
already seen.

Hand-written on purpose: torch's DataLoader and Lightning cannot resume a shuffled epoch mid-way, and the
exact resume (tests/test_resumable_loader.py, test_resume_contract.py) needs only this sampler and counter, not
a new dependency (torchdata's StatefulDataLoader).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sized

import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler


def held_out(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val) when there is no val_file: the rows shuffled by random.Random(seed), the first
    max(1, int(n * fraction)) held out. The permutation depends only on (n, seed), so the split of the rows can be
    recomputed on any n items that stand for them (their row numbers in the file, as predict's prompts do)."""
    order = list(rows)
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(order) * fraction))
    return order[n_val:], order[:n_val]


class EpochSampler(DistributedSampler):
    """Indices 0..n-1, shuffled by a generator seeded with seed + epoch (Lightning calls set_epoch), this
    process's share of them under DDP. Being a DistributedSampler, Lightning keeps it instead of injecting its own.

    Args:
        n: dataset length.
        shuffle: permute (True) or keep order (False).
        seed: base seed of the permutation.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0):
        super().__init__(range(n), shuffle=shuffle, seed=seed, **_replicas())
        self.n, self.start = n, 0  # start: indices of this epoch to skip on the next __iter__

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(order[start:])


class EvalSampler(DistributedSampler):
    """Indices 0..n-1 in order, this process's share under DDP without padding: rank r gets r, r + world, ...

    Lightning's injected sampler repeats rows until every rank has as many, and a metric synced over ranks then
    counts those rows twice. Evaluation needs no equal counts (metrics sync once, at epoch end), so every row
    counts once. With fewer rows than processes it pads as Lightning does: a rank without batches would skip
    the epoch-end sync the others wait in.

    Args:
        n: dataset length.
    """

    def __init__(self, n: int):
        super().__init__(range(n), shuffle=False, **_replicas())
        if n >= self.num_replicas:
            self.total_size, self.num_samples = n, len(range(self.rank, n, self.num_replicas))


def _replicas() -> dict:
    """One process, unless torch.distributed is initialised (then the sampler reads world size and rank)."""
    single = not (dist.is_available() and dist.is_initialized())
    return {"num_replicas": 1, "rank": 0} if single else {}


class ResumableLoader(DataLoader):
    """DataLoader over `dataset` in `EpochSampler` order whose position survives a checkpoint.

    Args:
        dataset: a sized dataset (e.g. a list of rows).
        batch_size: rows per batch.
        shuffle: shuffle each epoch.
        seed: base seed of the shuffle.
        **kwargs: other DataLoader arguments (collate_fn, num_workers, ...); not sampler/batch_sampler.
    """

    def __init__(self, dataset: Sized, batch_size: int = 1, shuffle: bool = True, seed: int = 0, **kwargs):
        sampler = EpochSampler(len(dataset), shuffle, seed)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.epoch_sampler = sampler
        self.seen = 0  # batches of the current epoch handed out so far
        self._resume: tuple[int, int] | None = None  # (epoch, batches seen) from load_state_dict

    def __iter__(self):
        # the body runs at the first next(), after Lightning's set_epoch: skip only within the saved epoch
        resume, self._resume = self._resume, None
        skip = resume[1] if resume is not None and resume[0] == self.epoch_sampler.epoch else 0
        self.epoch_sampler.start = skip * self.batch_size
        self.seen = skip
        for batch in super().__iter__():
            self.seen += 1  # counted when handed out: a checkpoint after batch k stores k
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch_sampler.epoch, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.epoch_sampler.set_epoch(int(state["epoch"]))
        self._resume = (int(state["epoch"]), int(state["seen"]))


def train_loader(rows, batch_size: int, seed: int, collate, num_workers: int = 0) -> ResumableLoader:
    """The training rows in a seeded per-epoch order; a run resumed from a mid-epoch checkpoint continues at the
    same batch (exact resume)."""
    return ResumableLoader(rows, batch_size=batch_size, shuffle=True, seed=seed, collate_fn=collate,
                           num_workers=num_workers)


def eval_loader(rows, batch_size: int, collate, num_workers: int = 0) -> DataLoader:
    """Every row exactly once across processes, in order (Lightning's DistributedSampler would repeat rows to even
    out the ranks, counting them twice in validation metrics)."""
    return DataLoader(rows, batch_size=batch_size, sampler=EvalSampler(len(rows)), collate_fn=collate,
                      num_workers=num_workers)
