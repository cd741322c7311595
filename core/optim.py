"""OptimSpec, what every stage optimises with (its optimizer, scheduler, warmup_steps and decay arguments), and
trainable-only checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from transformers.optimization import get_scheduler

from core.guard import NonFiniteError, nonfinite_names

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
Decay = Literal["constant", "linear", "cosine"]

# `decay` -> the transformers schedule of that name (each starts with the linear warm-up)
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}

# the Args: lines of the four arguments, shared by every stage's docstring (modules/stage.py: shared_args)
OPTIM_ARGS = """
optimizer: optimizer factory over the trainable parameters (default AdamW, lr 1e-5).
scheduler: LR scheduler factory; None uses `warmup_steps` of linear warm-up, then `decay`, stepped per
    optimizer step (rejection sampling: per prompt batch) over the steps the trainer will take.
warmup_steps: warm-up steps of the built-in schedule: step s runs at s / warmup_steps of the LR (0 at the
    first step, the full LR from step warmup_steps on), as transformers' schedules.
decay: built-in schedule after warm-up: constant, linear or cosine (to 0 at the last step).
"""


def adamw(params: Iterable) -> torch.optim.Optimizer:
    """Default optimizer: AdamW, lr 1e-5 (override in YAML with class_path/init_args)."""
    return torch.optim.AdamW(params, lr=1e-5)


@dataclass
class OptimSpec:
    """A stage's optimizer and LR schedule, from its `optimizer`, `scheduler`, `warmup_steps` and `decay`
    arguments (OPTIM_ARGS). The built-in schedule is transformers' `get_scheduler` (a LambdaLR, whose step
    count Lightning saves in checkpoints, so a resume continues the schedule exactly)."""

    optimizer: OptimizerFactory = adamw
    scheduler: SchedulerFactory | None = None
    warmup_steps: int = 0
    decay: Decay = "constant"

    def schedule(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        """The injected scheduler, else warm-up then `decay` over total_steps scheduler steps."""
        if self.scheduler is not None:
            return self.scheduler(optimizer)
        if self.decay not in SCHEDULES:
            raise ValueError(f"decay must be one of {', '.join(SCHEDULES)}, got {self.decay!r}")
        return get_scheduler(SCHEDULES[self.decay], optimizer, num_warmup_steps=self.warmup_steps,
                             num_training_steps=total_steps)

    def configure(self, parameters: Iterable[torch.nn.Parameter], total_steps: int) -> dict:
        """configure_optimizers' answer: the optimizer over the trainable parameters and its schedule, stepped
        every optimizer step."""
        optimizer = self.optimizer([p for p in parameters if p.requires_grad])
        scheduler = self.schedule(optimizer, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def keep_trainable(module, checkpoint: dict) -> None:
    """Drop frozen weights (references, quantised or LoRA bases) from a checkpoint: they come back from the
    ModelSpec on resume (a sharded checkpoint keeps them: each rank writes its own shard). Pair with
    `module.strict_loading = False`. Non-finite trainable weights raise NonFiniteError, so the last checkpoint
    written stays the last finite one."""
    trainable = {unwrapped_name(name) for name, p in module.named_parameters() if p.requires_grad}
    bad = nonfinite_names((k, v) for k, v in checkpoint["state_dict"].items() if k in trainable)
    if bad:  # the last good checkpoint stays the last one
        raise NonFiniteError(f"{type(module).__name__}: non-finite weights ({', '.join(bad)}) at step "
                             f"{checkpoint.get('global_step')}: checkpoint not written")
    if any(hasattr(v, "local_shards") or hasattr(v, "to_local") for v in checkpoint["state_dict"].values()):
        return  # a sharded checkpoint (FSDP): torch's distributed checkpoint loads every key the module has
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


# wrappers that sharding strategies and torch.compile put around submodules (FSDP units, activation checkpointing);
# their state dicts leave these names out, named_parameters keeps them
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def unwrapped_name(name: str) -> str:
    """A parameter's name as the model's own state dict writes it, wrapper modules left out."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name
