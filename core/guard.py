"""Non-finite guard: a NaN/inf loss, gradient norm or weight stops the run before it reaches the weights, a
checkpoint or the Hugging Face export. Imports torch and the standard library only."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class NonFiniteError(RuntimeError):
    """A stage met a non-finite quantity; str() is one line naming the stage, the step and the quantity."""


def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients of params (those without a gradient are skipped): a 0-d float32 tensor."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]], limit: int = 3) -> list[str]:
    """Names of the first `limit` tensors holding a NaN or inf."""
    bad = []
    for name, t in named:
        if not torch.isfinite(local_part(t.detach())).all():
            bad.append(name)
            if len(bad) == limit:
                break
    return bad


def local_part(t: torch.Tensor) -> torch.Tensor:
    """What of a sharded tensor (an FSDP sharded checkpoint's ShardedTensor, a DTensor) this process holds; a
    plain tensor as it is. Each process checks its own part."""
    if hasattr(t, "to_local"):  # DTensor
        return t.to_local()
    if hasattr(t, "local_shards"):  # ShardedTensor
        shards = [s.tensor.reshape(-1) for s in t.local_shards()]
        return torch.cat(shards) if shards else torch.zeros(0)
    return t
