"""SFTModule: next-token loss on completion tokens of demonstrations."""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.aggregation import MeanMetric

from core.batches import PackedRows, PaddedRows
from core.forward import completion_logps
from core.generation import SamplingSpec
from core.models import ModelSpec, as_spec, load_causal_lm, load_tokenizer
from core.optim import OPTIM_ARGS, OptimSpec, adamw
from modules.export import EXPORT_ARGS, HFExport
from modules.predict import response_writer, sample_rows
from modules.stage import StageHooks, root_device, shared_args


@shared_args(OPTIM_ARGS, EXPORT_ARGS)
class SFTModule(StageHooks, LightningModule):
    """Supervised fine-tuning of a causal LM (full weights or LoRA) on prompt/completion demonstrations.

    Args:
        policy: the model to fine-tune.
        sampling: how `predict` samples responses to the DataModule's validation prompts.
        sampling_seed: seed of predict's sampling streams (batch i samples from one seeded by (seed, i), as
            `rlhf generate --seed`; other processes add their rank).
        predict_file: where `predict` writes one json line per response {prompt, response, sample, finish_reason,
            tokens, index, meta}, as `rlhf generate` (default: <log dir>/predictions.jsonl).
    """

    stage = "sft"

    def __init__(
        self,
        policy: ModelSpec,
        optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
        warmup_steps: int = 0,
        decay: Literal["constant", "linear", "cosine"] = "constant",
        save_dir: str | None = None,
        merge_lora: bool = True,
        overwrite: bool = False,
        sampling: SamplingSpec = SamplingSpec(),  # never mutated: a shared default is safe
        sampling_seed: int = 0,
        predict_file: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.policy_spec = as_spec(policy)
        self.hparams["policy"] = asdict(self.policy_spec)  # plain data: checkpoints load with weights_only=True
        self.optim = OptimSpec(optimizer, scheduler, warmup_steps, decay)
        self.export = HFExport(self.stage, save_dir, merge_lora, overwrite)
        self.sampling = sampling if isinstance(sampling, SamplingSpec) else SamplingSpec(**dict(sampling))
        self.hparams["sampling"] = asdict(self.sampling)
        self.sampling_seed, self.predict_file = sampling_seed, predict_file
        self.policy = None
        self.tokenizer = None
        self.val_nll = MeanMetric()
        self.strict_loading = False  # checkpoints hold trainable weights only

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.tokenizer = load_tokenizer(self.policy_spec)
        device = root_device(self)
        self.policy = load_causal_lm(self.policy_spec, device=device)

    def forward(self, batch: PaddedRows | PackedRows) -> torch.Tensor:
        """NLL of every completion token of the batch: (n,), in batch order."""
        return -completion_logps(self.policy, batch).tokens

    def training_step(self, batch: PaddedRows | PackedRows, batch_idx: int) -> torch.Tensor:
        nll = self(batch)
        loss, mean = self.global_mean(nll.sum(), nll.new_tensor(nll.numel()))  # over all ranks' completion tokens
        self.log("train/loss", mean, prog_bar=True, batch_size=batch.input_ids.shape[0])
        self.log("train/tokens", float(nll.numel()), reduce_fx="sum", batch_size=1)
        return loss

    def validation_step(self, batch: PaddedRows | PackedRows, batch_idx: int) -> None:
        self.val_nll.update(self(batch), 1.0)  # token-weighted mean over the whole split

    def on_validation_epoch_end(self) -> None:
        split = "test" if self.trainer.testing else "val"
        self.log(f"{split}/loss", self.val_nll, prog_bar=True)  # the object: Lightning computes (synced) and resets it
        self.log(f"{split}/perplexity", self.val_nll.compute().exp(), sync_dist=False)  # the same synced value, cached

    # `test` evaluates the DataModule's validation file, reported under test/
    def test_step(self, batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def configure_optimizers(self):
        return self.optim.configure(self.parameters(), self.trainer.estimated_stepping_batches)

    # `predict`: sample from the policy for the DataModule's prompts (left-padded prompt batches)
    def configure_callbacks(self):
        return [self.export, *response_writer(self)]

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        return sample_rows(self, batch, self.sampling, self.sampling_seed, batch_idx)
