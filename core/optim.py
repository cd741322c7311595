"""Optimizer/scheduler wiring and trainable-only checkpoints, shared by the five LightningModules."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from core.guard import NonFiniteError, nonfinite_names

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]


def adamw(params: Iterable) -> torch.optim.Optimizer:
    """Default optimizer: AdamW, lr 1e-5 (override in YAML with class_path/init_args)."""
    return torch.optim.AdamW(params, lr=1e-5)


def warmup_decay(warmup_steps: int, total_steps: int, decay: str) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over warmup_steps, then constant, linear or cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def configure_optim(module, optimizer: OptimizerFactory, scheduler, warmup_steps: int, decay: str, total_steps: int):
    """Optimizer over the trainable parameters, and the injected scheduler or warm-up + decay per step."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = optimizer(params)
    sched = scheduler(opt) if scheduler is not None else LambdaLR(opt, warmup_decay(warmup_steps, total_steps, decay))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def keep_trainable(module, checkpoint: dict) -> None:
    """Drop frozen weights (references, quantised or LoRA bases) from a checkpoint: they come back from the
    ModelSpec on resume. Pair with `module.strict_loading = False`. Non-finite trainable weights raise
    NonFiniteError, so the last checkpoint written stays the last finite one."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    bad = nonfinite_names((k, v) for k, v in checkpoint["state_dict"].items() if k in trainable)
    if bad:  # the last good checkpoint stays the last one
        raise NonFiniteError(f"{type(module).__name__}: non-finite weights ({', '.join(bad)}) at step "
                             f"{checkpoint.get('global_step')}: checkpoint not written")
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
