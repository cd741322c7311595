"""Hooks every stage's LightningModule shares: the optimizer and LR schedule, trainable-only checkpoints, and the
Hugging Face save at the end of fit."""

from __future__ import annotations

import os

from modules.models import save_hf
from modules.optim import configure_optim, keep_trainable


class StageHooks:
    """Mix in before LightningModule. The module provides optimizer_factory, scheduler_factory, warmup_steps,
    decay, save_dir, merge_lora and tokenizer; `saved_model()` (default: self.policy) is what fit saves."""

    saved_name = "policy"

    def saved_model(self):
        return self.policy

    def optimizer_steps(self) -> int:
        """Optimizer steps the LR schedule spans."""
        return self.trainer.estimated_stepping_batches

    def configure_optimizers(self):
        return configure_optim(self, self.optimizer_factory, self.scheduler_factory, self.warmup_steps, self.decay,
                               self.optimizer_steps())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep_trainable(self, checkpoint)  # frozen weights (references, quantised bases) stay out

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero and not self.trainer.interrupted:
            out = self.save_dir or os.path.join(self.trainer.log_dir or ".", "hf_model")
            path = save_hf(self.saved_model(), self.tokenizer, out, merge_lora=self.merge_lora)
            print(f"saved {self.saved_name} (Hugging Face format) to {path}")
