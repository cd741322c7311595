"""A callback for the DDP parity tests (tests/test_ddp.py): what each rank saw, dumped to $RLHF_PROBE_DIR/rank<r>.pt.

Added on the command line (`--trainer.callbacks+=tests.ddp_probe.Probe`), so the real `rlhf` CLI runs unchanged.
Per train step: this rank's logged scalars (unsynced) and the KL coefficient after the step. Per validation: each
MeanMetric's local (weighted sum, weight) before the epoch-end sync, and the val/* values the module logged.
At the start and end of training: this rank's trainable weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torchmetrics.aggregation import MeanMetric

PREFIXES = ("train/",)


class Probe(Callback):
    def __init__(self):
        self.steps: list[dict] = []
        self.val: list[dict] = []
        self._local: dict = {}
        self.start: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = trainable(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(PREFIXES)}
        if getattr(pl_module, "kl_ctl", None) is not None:
            row["kl_ctl"] = pl_module.kl_ctl.value
        self.steps.append(row)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # callbacks run before the module's hook: the metrics still hold this rank's own, unsynced state
        self._local = {name: (float(m.mean_value), float(m.weight)) for name, m in pl_module.named_modules()
                       if isinstance(m, MeanMetric)}

    def on_validation_end(self, trainer, pl_module) -> None:
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.val.append({"local": self._local, "logged": logged})

    def on_fit_end(self, trainer, pl_module) -> None:
        out = Path(os.environ["RLHF_PROBE_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"steps": self.steps, "val": self.val, "start": self.start, "weights": trainable(pl_module),
                    "world_size": trainer.world_size},
                   out / f"rank{trainer.global_rank}.pt")


def trainable(module) -> dict:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}
