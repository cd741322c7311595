"""DPOModule: direct preference optimisation on chosen/rejected pairs (Rafailov et al. 2023,
arXiv 2305.18290), its reference-free relatives SimPO, ORPO and CPL, and KTO on unpaired labelled completions."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Iterable
from typing import Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics.aggregation import MeanMetric

from core.batches import PairBatch, UnpairedBatch
from core.forward import completion_logps
from core.generation import SamplingSpec
from core.losses.dpo import LOSS_TYPES, dpo_loss, uses_average_logprobs
from core.losses.kto import kto_loss
from core.losses.reference_free import AVERAGED, REFERENCE_FREE, cpl_loss, orpo_loss, simpo_loss
from core.models import ModelSpec, as_spec, is_peft, load_causal_lm, load_tokenizer
from core.optim import OPTIM_ARGS, OptimSpec, adamw
from modules.export import EXPORT_ARGS, HFExport
from modules.predict import response_writer, sample_rows
from modules.stage import StageHooks, root_device, shared_args

REFERENCES = ("copy", "adapter", "precomputed", "none")
VAL_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")
KTO_VAL_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "kl", "logps/chosen", "logps/rejected")
SPLITS = ("train", "val")


@shared_args(OPTIM_ARGS, EXPORT_ARGS)
class DPOModule(StageHooks, LightningModule):
    """DPO and its variants (IPO, SLiC hinge, robust DPO, RPO's NLL term) and the reference-free SimPO, ORPO and
    CPL on a `PreferenceDataModule` with layout "pairs": one forward pass over the (2b, t) batch scores chosen rows
    [0, b) and rejected rows [b, 2b). Sequence log-probs are sums over completion tokens (per-token means for ipo,
    simpo and orpo). KTO trains on layout "unpaired" instead: b labelled completions (chosen = desirable,
    rejected = undesirable in its metrics) and b mismatched prompt/completion rows for its KL estimate.

    Args:
        policy: the model to train (full weights, or LoRA; quantised bases need LoRA).
        reference: where the reference log-probs come from. "copy": a frozen second model.
            "adapter": the policy with its LoRA adapter switched off (needs `policy.lora`; one model).
            "precomputed": one no-grad pass over the train and val pairs before the first step stores
            them (and checkpoints keep them), so training holds one model. "none": no reference at all; the
            reference-free losses (simpo, orpo, cpl) need it and only they accept it. kto takes copy or adapter (its
            KL estimate reads mismatched rows that change with every batch, so they cannot be precomputed).
        reference_model: the reference's weights; None means the policy's weights before training
            (its spec without LoRA). For "precomputed" with None, the untrained policy itself is the
            reference, so no second model is ever loaded. Not allowed with "adapter".
        beta: strength of the implicit KL penalty towards the reference (> 0). simpo: the reward scale (the
            paper's is ~2-2.5, not DPO's 0.1); orpo: the weight lambda of the odds-ratio term (paper 0.1-0.25);
            cpl: the temperature alpha.
        loss_type: sigmoid (DPO), ipo, hinge (SLiC), robust (robust DPO); reference-free, with reference none:
            simpo (Meng et al. 2024: -log sigmoid(beta (avg logp_w - avg logp_l) - simpo_gamma)) or orpo (Hong et
            al. 2024: chosen NLL + beta * -log sigmoid(log odds_w - log odds_l), on per-token-average log-probs)
            or cpl (Hejna et al. 2023, Contrastive Preference Learning: -log sigmoid(beta S_w - cpl_lambda beta
            S_l), S a completion's SUMMED log-prob, so it favours short completions; simpo is the length-normalised
            choice);
            on unpaired data (data.layout unpaired): kto (Ethayarajh et al. 2024, core/losses/kto.py: desirable
            rows cost desirable_weight (1 - sigmoid(beta (r - z0))), undesirable ones undesirable_weight
            (1 - sigmoid(beta (z0 - r))), r the summed log-ratio to the reference, z0 = max(0, the batch's mean
            log-ratio of mismatched prompt/completion pairs), detached).
        label_smoothing: assumed preference-flip rate, sigmoid (conservative DPO) and robust only.
        nll_weight: weight of an NLL (SFT) term on the chosen completions (RPO; CPO's with simpo; CPL's
            behaviour-cloning term "CPL + BC" with cpl); 0 turns it off. Not for orpo, whose loss has its own NLL
            term.
        simpo_gamma: simpo's target reward margin gamma (paper range (0, 1.5]); other losses ignore it.
        cpl_lambda: cpl's conservative bias lambda in (0, 1] (CPL(lambda)): below 1 the rejected completion weighs
            less, so the loss also raises the chosen one's likelihood; 1 is DPO's sigmoid loss with no reference.
            Other losses ignore it.
        desirable_weight: kto's lambda_D; the paper advises desirable_weight * n_desirable /
            (undesirable_weight * n_undesirable) in [1, 4/3]. Other losses ignore it.
        undesirable_weight: kto's lambda_U. Other losses ignore it.
        sampling: how `predict` samples responses to the prompts of the DataModule's validation pairs.
        sampling_seed: seed of predict's sampling streams (batch i samples from one seeded by (seed, i), as
            `rlhf generate --seed`; other processes add their rank).
        predict_file: where `predict` writes one json line per response {prompt, response, sample, finish_reason,
            tokens, index, meta}, as `rlhf generate` (default: <log dir>/predictions.jsonl).
    """

    stage = "dpo"
    predict_input = "prompts"  # PreferenceDataModule's predict loader yields the prompts alone

    def __init__(
        self,
        policy: ModelSpec,
        reference: Literal["copy", "adapter", "precomputed", "none"] = "copy",
        reference_model: ModelSpec | None = None,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "cpl", "kto"] = "sigmoid",
        label_smoothing: float = 0.0,
        nll_weight: float = 0.0,
        simpo_gamma: float = 0.5,
        cpl_lambda: float = 1.0,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
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
        for key in ("policy", "reference_model"):  # plain dicts, so weights_only checkpoint loading works
            if dataclasses.is_dataclass(self.hparams[key]):
                self.hparams[key] = dataclasses.asdict(self.hparams[key])
        self.policy_spec = as_spec(policy)
        self._check_config(reference, reference_model, beta, loss_type, label_smoothing, nll_weight, simpo_gamma,
                           (desirable_weight, undesirable_weight), cpl_lambda)
        # the policy's weights before training: its own spec minus the adapter
        default_ref = dataclasses.replace(self.policy_spec, lora=None, gradient_checkpointing=False)
        self.reference_spec = as_spec(reference_model) if reference_model is not None else default_ref
        self.reference_given = reference_model is not None
        self.reference_mode = reference
        self.beta, self.loss_type = beta, loss_type
        self.label_smoothing, self.nll_weight, self.simpo_gamma = label_smoothing, nll_weight, simpo_gamma
        self.kto_weights, self.cpl_lambda = (desirable_weight, undesirable_weight), cpl_lambda
        self.average = loss_type in AVERAGED or (loss_type in LOSS_TYPES and uses_average_logprobs(loss_type))
        self.optim = OptimSpec(optimizer, scheduler, warmup_steps, decay)
        self.export = HFExport(self.stage, save_dir, merge_lora, overwrite)
        self.sampling = sampling if isinstance(sampling, SamplingSpec) else SamplingSpec(**dict(sampling))
        self.hparams["sampling"] = dataclasses.asdict(self.sampling)
        self.sampling_seed, self.predict_file = sampling_seed, predict_file
        self.policy = None
        self.reference = None
        self.tokenizer = None
        self._policy_is_initial = True  # False once an optimizer step ran or a checkpoint was loaded
        # precomputed reference log-probs, (n_pairs, 2) = [chosen, rejected] per pair index; NaN = not seen
        self.register_buffer("ref_train", torch.empty(0, 2))
        self.register_buffer("ref_val", torch.empty(0, 2))
        self.val_names = KTO_VAL_METRICS if loss_type == "kto" else VAL_METRICS
        self.val_metrics = torch.nn.ModuleDict({name.replace("/", "_"): MeanMetric() for name in self.val_names})
        self.strict_loading = False  # checkpoints hold trainable weights (and ref_* buffers) only

    def _check_config(self, reference, reference_model, beta, loss_type, label_smoothing, nll_weight,
                      simpo_gamma, kto_weights, cpl_lambda=1.0) -> None:
        """Fail on a bad combination before any model loads."""
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
        if loss_type in REFERENCE_FREE and reference != "none":
            raise ValueError(f"loss_type={loss_type!r} uses no reference model: set reference='none' "
                             f"(--model.reference none); {reference!r} would load or compute one for nothing")
        if reference == "none" and loss_type not in REFERENCE_FREE:
            raise ValueError(f"reference='none' loads no reference, but loss_type={loss_type!r} needs one: use "
                             "reference copy, adapter or precomputed, or a reference-free loss "
                             f"({', '.join(REFERENCE_FREE)})")
        if reference == "none" and reference_model is not None:
            raise ValueError("reference='none' loads no reference: drop reference_model")
        if reference == "adapter" and self.policy_spec.lora is None:
            raise ValueError("reference='adapter' reads the reference with the LoRA adapter off: set lora")
        if reference == "adapter" and reference_model is not None:
            raise ValueError("reference='adapter' uses the policy's own base weights: drop reference_model")
        if self.policy_spec.quantization != "none" and self.policy_spec.lora is None:
            raise ValueError(f"quantization={self.policy_spec.quantization} trains only with a LoRA adapter: set lora")
        if loss_type == "kto" and reference == "precomputed":
            raise ValueError("loss_type='kto' needs reference copy or adapter: its KL estimate scores mismatched "
                             "prompt/completion rows that change with every batch, so they cannot be precomputed")
        if loss_type == "kto" and nll_weight:
            raise ValueError("nll_weight applies to the pairs losses, not kto: drop it")
        if loss_type in (*REFERENCE_FREE, "kto") and label_smoothing:
            raise ValueError(f"label_smoothing applies to sigmoid and robust only, not {loss_type!r}: set it to 0 "
                             "(--model.label_smoothing 0; configs/dpo/synthetic.yaml sets 0.1)")
        if loss_type == "orpo" and nll_weight:
            raise ValueError("orpo's loss has its own NLL term on the chosen completions: drop nll_weight")
        # the loss checks its own arguments: run it once on zeros so a bad combination fails here
        z = torch.zeros(1)
        if loss_type == "simpo":
            simpo_loss(z, z, beta, simpo_gamma, chosen_nll=z, nll_weight=nll_weight)
        elif loss_type == "cpl":
            cpl_loss(z, z, beta, cpl_lambda, chosen_nll=z, nll_weight=nll_weight)
        elif loss_type == "orpo":
            orpo_loss(z - 1, z - 1, beta)
        elif loss_type == "kto":
            kto_loss(z, z, z.bool(), z, beta, *kto_weights)
        elif loss_type in LOSS_TYPES:
            dpo_loss(z, z, z, z, beta, loss_type, label_smoothing, chosen_nll=z, nll_weight=nll_weight)
        else:
            valid = ", ".join((*LOSS_TYPES, *REFERENCE_FREE, "kto"))
            raise ValueError(f"unknown loss_type {loss_type!r}; valid: {valid}")

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        device = root_device(self, self.device)
        self.tokenizer = load_tokenizer(self.policy_spec)
        self.policy = load_causal_lm(self.policy_spec, device=device)
        if self.reference_mode == "copy":
            self.reference = load_causal_lm(self.reference_spec, device=device, trainable=False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # the frozen copy never runs dropout
        return self

    def setup(self, stage: str) -> None:
        super().setup(stage)
        layout = getattr(self.trainer.datamodule, "layout", "pairs")
        if self.loss_type == "kto" and layout != "unpaired":  # runs before configure_model: no weights loaded yet
            raise ValueError(f"loss_type kto trains on labelled single completions: set data.layout: unpaired, "
                             f"not {layout!r}")
        if self.loss_type != "kto" and layout != "pairs":
            raise ValueError(f"DPO trains on chosen/rejected pairs: set data.layout: pairs, not {layout!r}"
                             + (" (unpaired data: loss_type kto)" if layout == "unpaired" else ""))

    def sequence_logps(self, model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence log-probs for the loss (sums, cpl's too; per-token means for ipo, simpo, orpo) and mean token
        log-probs: (2b,) each."""
        # the vocabulary head runs on completion positions only: (n, v) logits, not (2b, t, v)
        logps = completion_logps(model, batch)
        return (logps.means if self.average else logps.sums), logps.means

    def reference_logps(self, batch: PairBatch, split: str = "train") -> torch.Tensor:
        """Reference sequence log-probs (2b,), chosen rows first, without grad."""
        if self.reference_mode == "precomputed":
            table, index = getattr(self, f"ref_{split}"), batch.index  # (n, 2), (b,)
            if table.shape[0] == 0:
                raise RuntimeError(f"no precomputed reference log-probs for the {split} split")
            ref = table[index.clamp(max=table.shape[0] - 1)]  # (b, 2)
            if bool(((index >= table.shape[0]) | ref.isnan().any(-1)).any()):
                raise RuntimeError(f"a {split} batch has pair indexes the precompute pass did not see")
            return torch.cat([ref[:, 0], ref[:, 1]])
        with torch.no_grad():
            if self.reference_mode == "adapter":
                with self.policy.disable_adapter():
                    return self.sequence_logps(self.policy, batch)[0]
            return self.sequence_logps(self.reference, batch)[0]

    def forward(self, batch: PairBatch | UnpairedBatch, split: str = "train"):
        """(DPOLossOutput, policy sequence log-probs (2b,) detached) for a pairs batch; (KTOLossOutput, policy
        log-probs (b,) detached) for an unpaired batch (kto)."""
        if self.loss_type == "kto":
            return self.kto_forward(batch, gather=split == "train")
        b = batch.num_pairs
        policy_logps, mean_logps = self.sequence_logps(self.policy, batch)  # (2b,), (2b,)
        chosen_nll = -mean_logps[:b] if self.nll_weight > 0 else None  # (b,) mean token NLL of chosen
        if self.loss_type == "simpo":
            out = simpo_loss(*policy_logps.chunk(2), self.beta, self.simpo_gamma, chosen_nll, self.nll_weight)
            return out, policy_logps.detach()
        if self.loss_type == "orpo":
            return orpo_loss(*policy_logps.chunk(2), self.beta), policy_logps.detach()
        if self.loss_type == "cpl":  # summed log-probs, as the paper's segment scores
            out = cpl_loss(*policy_logps.chunk(2), self.beta, self.cpl_lambda, chosen_nll, self.nll_weight)
            return out, policy_logps.detach()
        ref_logps = self.reference_logps(batch, split)  # (2b,)
        out = dpo_loss(
            *policy_logps.chunk(2),
            *ref_logps.chunk(2),
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            chosen_nll=chosen_nll,
            nll_weight=self.nll_weight,
        )
        return out, policy_logps.detach()

    def kto_forward(self, batch: UnpairedBatch, gather: bool = True):
        """(KTOLossOutput, policy log-probs (b,) detached). With `gather` under DDP, z0 is estimated from every
        process's mismatched rows (training only: evaluation ranks may run different numbers of batches, so a
        collective there could wait forever; each process then uses its own batch)."""
        policy_logps = self.sequence_logps(self.policy, batch)[0]  # (b,) sums
        ref_logps = self.reference_logps(batch)  # (b,)
        with torch.no_grad():  # z0 is detached: the mismatched rows need no graph
            kl = self.sequence_logps(self.policy, batch.kl_tokens)[0] - self.reference_logps(batch.kl_tokens)  # (b,)
        if gather and self._trainer is not None and self.trainer.world_size > 1:  # one estimate for the global batch
            kl = self.all_gather(kl.mean()).reshape(-1)  # (world,)
        out = kto_loss(policy_logps, ref_logps, batch.desirable, kl, self.beta, *self.kto_weights)
        return out, policy_logps.detach()

    def kto_rows(self, out, logps: torch.Tensor, desirable: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row values of the kto metrics, (k,) each: chosen = desirable rows, rejected = undesirable ones."""
        return {"rewards/chosen": out.rewards[desirable], "rewards/rejected": out.rewards[~desirable],
                "logps/chosen": logps[desirable], "logps/rejected": logps[~desirable]}

    def training_step(self, batch: PairBatch | UnpairedBatch, batch_idx: int) -> torch.Tensor:
        out, logps = self(batch, "train")
        if self.loss_type == "kto":
            b = logps.shape[0]
            self.log("train/loss", out.loss, prog_bar=True, batch_size=b)
            self.log("train/kl", out.kl, batch_size=b)
            for name, value in self.kto_rows(out, logps, batch.desirable).items():
                if value.numel():  # a batch may hold one label only
                    self.log(f"train/{name}", value.mean(), batch_size=value.numel())
            return out.loss
        chosen, rejected = logps.chunk(2)
        b = chosen.shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=b)
        self.log("train/rewards/chosen", out.chosen_rewards.mean(), batch_size=b)
        self.log("train/rewards/rejected", out.rejected_rewards.mean(), batch_size=b)
        self.log("train/rewards/accuracies", out.accuracy, prog_bar=True, batch_size=b)
        self.log("train/rewards/margins", out.margin, batch_size=b)
        self.log("train/logps/chosen", chosen.mean(), batch_size=b)
        self.log("train/logps/rejected", rejected.mean(), batch_size=b)
        return out.loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._policy_is_initial = False

    # `test` evaluates the DataModule's validation file, reported under test/
    def test_step(self, batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_start(self) -> None:
        self.on_validation_start()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def validation_step(self, batch: PairBatch | UnpairedBatch, batch_idx: int) -> None:
        out, logps = self(batch, "val")
        if self.loss_type == "kto":
            self.val_metrics["loss"].update(out.loss.detach(), logps.shape[0])  # row-weighted over the split
            self.val_metrics["kl"].update(out.kl, logps.shape[0])
            for name, value in self.kto_rows(out, logps, batch.desirable).items():
                if value.numel():
                    self.val_metrics[name.replace("/", "_")].update(value)
            return
        chosen, rejected = logps.chunk(2)  # (b,), (b,)
        rows = {
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "logps/chosen": chosen,
            "logps/rejected": rejected,
        }
        self.val_metrics["loss"].update(out.loss.detach(), chosen.shape[0])  # pair-weighted over the split
        for name, value in rows.items():
            self.val_metrics[name.replace("/", "_")].update(value)

    def on_validation_epoch_end(self) -> None:
        split = "test" if self.trainer.testing else "val"
        # metric objects: Lightning computes them (synced across processes), then resets them
        for name in self.val_names:
            self.log(f"{split}/{name}", self.val_metrics[name.replace("/", "_")], prog_bar=name == "loss")

    # ---- predict: sample from the policy for the prompts of the validation pairs (left-padded prompt batches) ----

    def configure_callbacks(self):
        return [self.export, *response_writer(self)]

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        return sample_rows(self, batch, self.sampling, self.sampling_seed, batch_idx)

    # ---- precomputed reference ----

    def on_train_start(self) -> None:
        if self.reference_mode == "precomputed":
            self._ensure_precomputed(SPLITS)

    def on_validation_start(self) -> None:
        if self.reference_mode == "precomputed":
            self._ensure_precomputed(("val",))

    def _ensure_precomputed(self, splits: Iterable[str]) -> None:
        # a resumed run got its tables from the checkpoint: only missing splits are computed
        loaders = {s: self._unshuffled(s) for s in splits if getattr(self, f"ref_{s}").shape[0] == 0}
        loaders = {s: loader for s, loader in loaders.items() if loader is not None}
        if loaders:
            self.precompute_reference(loaders)

    def _unshuffled(self, split: str):
        """The split's loader rebuilt without shuffling or touching the global RNG (rows are stored by pair
        index), sharded across processes."""
        trainer = self.trainer
        loader = trainer.train_dataloader if split == "train" else trainer.val_dataloaders
        if loader is None and trainer.datamodule is not None:
            dm = trainer.datamodule
            loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None or getattr(loader, "batch_size", None) is None:
            return loader  # none, or a custom batch sampler: use it as it is
        sampler = None
        if trainer.world_size > 1:
            world, rank = trainer.world_size, trainer.global_rank
            sampler = DistributedSampler(loader.dataset, world, rank, shuffle=False)
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=sampler,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            generator=torch.Generator(),  # iterating draws a seed: keep the global RNG (data order) untouched
        )

    @torch.no_grad()
    def precompute_reference(self, loaders: dict[str, Iterable[PairBatch]]) -> None:
        """One no-grad pass per split ("train"/"val") over pairs batches: each pair's reference log-probs
        go to `ref_<split>` (n_pairs, 2) at row batch.index. Then only the policy stays in memory."""
        # before any update the policy is the default reference: use it instead of loading a second copy
        own = not self.reference_given and self._policy_is_initial
        if own:
            model = self.policy
        else:
            model = load_causal_lm(self.reference_spec, root_device(self, self.device), trainable=False)
        adapter_off = self.policy.disable_adapter() if own and is_peft(model) else contextlib.nullcontext()
        trainer = self._trainer
        # the same autocast as the training step, so step 0 sees policy == reference exactly
        autocast = contextlib.nullcontext if trainer is None else trainer.precision_plugin.forward_context
        was_training = model.training
        model.eval()  # no dropout in the reference
        try:
            with adapter_off:
                for split, loader in loaders.items():
                    indexes, values = [], []
                    for batch in loader:
                        batch = move_data_to_device(batch, self.device)
                        with autocast():
                            logps = self.sequence_logps(model, batch)[0].float()  # (2b,)
                        indexes.append(batch.index)
                        values.append(torch.stack(logps.chunk(2), dim=-1))  # (b, 2)
                    index, value = torch.cat(indexes), torch.cat(values)
                    if trainer is not None and trainer.world_size > 1:
                        index, value = self.all_gather(index).flatten(), self.all_gather(value).reshape(-1, 2)
                    table = torch.full((int(index.max()) + 1, 2), float("nan"), device=self.device)
                    table[index] = value
                    setattr(self, f"ref_{split}", table)
        finally:
            model.train(was_training)
        if not own:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # ---- optimisation and checkpoints ----

    def configure_optimizers(self):
        return self.optim.configure(self.parameters(), self.trainer.estimated_stepping_batches)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        tables = {f"ref_{s}": state[f"ref_{s}"] for s in SPLITS if f"ref_{s}" in state}
        super().on_save_checkpoint(checkpoint)  # drops the frozen copy and frozen bases
        checkpoint["state_dict"].update(tables)  # a resume must not recompute the reference pass

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._policy_is_initial = False
        for name in (f"ref_{s}" for s in SPLITS):
            if name in checkpoint["state_dict"]:  # size the buffer so load_state_dict can copy into it
                setattr(self, name, torch.empty_like(checkpoint["state_dict"][name], device=self.device))
