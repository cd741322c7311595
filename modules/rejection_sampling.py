"""RejectionSamplingModule: best-of-K fine-tuning (Llama 2, Touvron et al. 2023, arXiv 2307.09288, sec 3.2.3).

Online scheme, one prompt batch at a time (as RAFT, Dong et al. 2023, arXiv 2304.06767): sample K responses
per prompt from the current policy, score them with a `RewardSpec`, keep the best per prompt (only if it
reaches `min_score`), and take SFT steps (NLL on the response tokens, EOS included) on the kept samples.
Each batch samples from the policy the previous batch left, so every batch is a small Llama 2 round; the
recipe links `rounds` to `trainer.max_epochs` (passes over the prompt set). Llama 2's whole-dataset rounds
are the offline flow: `rlhf rs predict` writes best-of-K jsonl, `rlhf sft fit` trains on it, repeat.
Manual optimization: `trainer.max_steps`/`global_step` count optimizer steps (sft_epochs x minibatches per
prompt batch, 1 by default); clip with `max_grad_norm`, not trainer.gradient_clip_val; no
accumulate_grad_batches.

ReST mode (`thresholds`; Gulcehre et al. 2023, arXiv 2308.08998, Reinforced Self-Training): one epoch is one
round. Grow: every prompt batch of the epoch samples K responses from the policy as the round began and scores
them into a buffer, training nothing. Improve, after the epoch's last batch: for each threshold tau_1 <= tau_2 <=
..., every buffered sample scoring at least tau (not only each prompt's best) is kept and the policy, continuing
from the previous Improve step, takes `sft_epochs` shuffled passes over them in minibatches of `sft_batch_size`
with the SFT loss. The buffer travels in checkpoints (`rest_buffer`), so a run resumed from a checkpoint taken
mid-round continues the round exactly. ModelCheckpoint saves by optimizer step and Grow takes none, so its
periodic checkpoints fall at round ends; a mid-round one comes from `trainer.save_checkpoint` or a SIGTERM save.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from core.batches import PaddedRows
from core.forward import completion_logps, response_logits
from core.generation import Rollout, SamplingSpec, decode_responses, generate
from core.losses.rejection_sampling import ThresholdKind, check_thresholds, kl_penalised_scores, threshold_keep
from core.models import ModelSpec, as_spec, load_causal_lm, load_tokenizer
from core.ops import masked_sum, token_logprobs
from core.optim import OPTIM_ARGS, OptimSpec, adamw
from core.packing import pad_completions
from core.reward_spec import RewardSpec, as_reward_spec
from modules.export import EXPORT_ARGS, HFExport
from modules.overoptimisation import JUDGE_ARGS, BestWeights, OveroptimisationMonitor
from modules.predict import JsonlPredictionWriter, batch_indexes
from modules.stage import StageHooks, output_path, root_device, shared_args


def select_best(scores: Tensor, min_score: float | None = None, by: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Best of K per prompt: scores (b, k) -> index of the best (b,), first index on ties; keep (b,) bool,
    False where the chosen sample's score is below `min_score`. `by` (b, k): what to choose on instead of the
    scores (e.g. KL-penalised ones); min_score still reads the chosen sample's own score."""
    by = scores if by is None else by
    k = by.shape[-1]
    top = by.max(-1, keepdim=True).values  # (b, 1)
    cols = torch.arange(k, device=by.device).expand_as(by)  # (b, k)
    best = torch.where(by == top, cols, k).min(-1).values  # lowest column holding the max
    chosen = scores.gather(-1, best[:, None]).squeeze(-1)  # (b,)
    keep = torch.ones_like(best, dtype=torch.bool) if min_score is None else chosen >= min_score
    return best, keep


def rollout_examples(rollout: Rollout, rows: Tensor) -> list[tuple[list[int], list[int]]]:
    """(prompt ids without the left padding, response ids up to and including EOS) of the chosen rollout rows.

    The ids are the sampled ones, not a re-tokenization of the decoded text; a truncated row has no EOS."""
    p = rollout.prompt_length
    out = []
    for j in rows.tolist():
        prompt = rollout.sequences[j, :p][rollout.attention_mask[j, :p].bool()]
        response = rollout.sequences[j, p:][rollout.response_mask[j].bool()]
        out.append((prompt.tolist(), response.tolist()))
    return out


@shared_args(JUDGE_ARGS, OPTIM_ARGS, EXPORT_ARGS)
class RejectionSamplingModule(StageHooks, LightningModule):
    """Rejection-sampling fine-tuning of a causal LM (full weights or LoRA) against a reward.

    The LR schedule steps once per prompt batch, over trainer.estimated_stepping_batches: warmup_steps counts
    prompt batches. In ReST mode (thresholds) the optimizer steps of a round depend on what each threshold keeps,
    so the schedule steps once per Improve step (threshold) instead, over rounds x len(thresholds): every optimizer
    step of one Improve step runs at one LR, warmup_steps counts Improve steps, and `decay: constant` keeps one LR.

    Args:
        policy: the model to sample from and fine-tune (usually the SFT policy).
        reward: what scores (prompt, response) pairs: reward models, reward functions or the oracle.
        sampling: how to sample; `num_samples` is K, the samples per prompt (validation draws one).
        rounds: passes over the prompt set; the recipe links trainer.max_epochs to it.
        min_score: keep a prompt's best sample only if its score reaches this (None keeps every best).
        kl_coef: select the best of K by score - kl_coef * log(pi(y|x) / pi_ref(y|x)), the sample's summed
            log-ratio to a frozen reference (core/losses/rejection_sampling.py), instead of the score alone; 0
            (default) loads no reference. Against a learned reward model it keeps the policy on text the
            reward model was trained on, where its scores can be trusted.
        reference: the frozen reference of kl_coef; None (default) is a copy of the initial policy. A round of the
            RLHF loop that continues from an earlier round's policy names the SFT policy here, so the KL budget
            does not restart each round (configs/pipeline/quickstart.yaml). Must share the policy's tokenizer.
        reward_norm: select on each prompt's K scores standardised (minus their mean, over their std), so kl_coef
            counts standard deviations per nat whatever the reward model's scale (min_score still reads raw scores).
        sft_epochs: passes over each batch's kept samples (gradient steps reuse one sampling pass).
        sft_batch_size: kept samples per gradient step (None: the whole prompt batch in one step; ReST needs one).
        max_grad_norm: clip the gradient norm to this before each step (None: no clipping).
        sampling_seed: seed of the sampling streams (each batch's depends on it, split, epoch, batch, rank).
        thresholds: ReST mode (see the module docstring): the Improve steps' non-decreasing, finite thresholds
            tau_1 <= tau_2 <= ...; None (default): online best-of-K. Needs sft_batch_size; refuses min_score
            (each threshold is the floor) and kl_coef > 0 (a threshold is in the score's units, not nats; Grow
            samples the round's starting policy, so the anchor is the number of rounds). With reward_norm each
            prompt's K scores are z-scored first, so a threshold counts standard deviations above the prompt's
            mean. Blank responses are never kept. A threshold that keeps nothing is skipped, with a warning.
        threshold_kind: "score" (default): keep scores >= tau; "quantile": tau in [0, 1] is a quantile of the
            round's scores (core/losses/rejection_sampling.py threshold_keep), e.g. 0.75 keeps the top quarter
            (under DDP: of each process's share of the round).
        predict_file: where `predict` writes best-of-K jsonl rows {prompt, completion, score, mean_score, index
            (the prompt's row)}, one file from all processes (default: <log dir>/best_of_k.jsonl); `rlhf sft fit`
            reads it as prompt/completion data. Rows below min_score or with a blank best completion are left out.
    """

    stage = "rs"

    def __init__(
        self,
        policy: ModelSpec,
        reward: RewardSpec,
        sampling: SamplingSpec = SamplingSpec(num_samples=4),
        rounds: int = 1,
        min_score: float | None = None,
        kl_coef: float = 0.0,
        reference: ModelSpec | None = None,
        reward_norm: bool = False,
        optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
        warmup_steps: int = 0,
        decay: Literal["constant", "linear", "cosine"] = "constant",
        sft_epochs: int = 1,
        sft_batch_size: int | None = None,
        max_grad_norm: float | None = None,
        sampling_seed: int = 0,
        save_dir: str | None = None,
        merge_lora: bool = True,
        overwrite: bool = False,
        thresholds: list[float] | None = None,
        threshold_kind: ThresholdKind = "score",
        predict_file: str | None = None,
        val_reward: RewardSpec | None = None,
        overopt_patience: int = 3,
        export_best: str | None = None,
        export_best_mode: Literal["max", "min"] = "max",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.automatic_optimization = False  # several SFT steps per sampled batch
        self.policy_spec, self.reward = as_spec(policy), as_reward_spec(reward)
        self.sampling = sampling if isinstance(sampling, SamplingSpec) else SamplingSpec(**sampling)
        self.rounds, self.min_score = rounds, min_score
        if not kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.kl_coef, self.reward_norm = kl_coef, reward_norm
        self.reference_spec = as_spec(reference) if reference is not None else None
        self.reference = None
        self.optim = OptimSpec(optimizer, scheduler, warmup_steps, decay)
        self.sft_epochs, self.sft_batch_size, self.max_grad_norm = sft_epochs, sft_batch_size, max_grad_norm
        self.sampling_seed, self.predict_file = sampling_seed, predict_file
        self.thresholds = self._check_rest(thresholds, threshold_kind)
        self.threshold_kind = threshold_kind
        self._buffer: dict | None = None  # ReST: the round's grown samples (grow / improve)
        self.policy = None
        self.tokenizer = None
        self.val_reward = MeanMetric()
        # held-out judge (modules/overoptimisation.py, StageHooks.judged_metrics); the spec is self.judge
        self.judge = dataclasses.replace(as_reward_spec(val_reward)) if val_reward is not None else None
        self.val_judge_reward = MeanMetric() if self.judge is not None else None
        self.judge_monitor = OveroptimisationMonitor(overopt_patience)
        logged = ["val/reward"] + (["val/judge_reward", "val/reward_gap"] if self.judge is not None else [])
        self.best_weights = BestWeights(export_best, export_best_mode, logged) if export_best else None
        self.export = HFExport(self.stage, save_dir, merge_lora, overwrite, best=self.best_weights)
        self.strict_loading = False  # checkpoints hold trainable weights only

    def _check_rest(self, thresholds: list[float] | None, kind: str) -> list[float] | None:
        """ReST's arguments, refused before any model loads when they make no sense together."""
        if thresholds is None:
            return None
        values = check_thresholds(thresholds, kind)
        if self.min_score is not None:
            raise ValueError(f"min_score ({self.min_score}) is best-of-K's floor; with thresholds each Improve step's "
                             "threshold is the floor: drop min_score or put it in the thresholds")
        if self.kl_coef > 0:
            raise ValueError(f"kl_coef ({self.kl_coef}) with thresholds: ReST keeps samples whose score reaches a "
                             "threshold in the score's units, and a KL penalty in nats would shift every bar; Grow "
                             "samples the round's starting policy, so fewer rounds is the anchor: set kl_coef 0")
        if self.sft_batch_size is None:
            raise ValueError("thresholds need sft_batch_size: Improve trains on the whole round's kept samples, "
                             "in minibatches of that many")
        return values

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        device = root_device(self)
        self.tokenizer = load_tokenizer(self.policy_spec, padding_side="left")
        self.policy = load_causal_lm(self.policy_spec, device=device)
        self.reward.load(device or "cpu")
        if self.judge is not None:
            self.judge.load(device or "cpu")
        if self.kl_coef > 0:
            # frozen initial policy (a LoRA policy's base: the adapter starts at zero) or the given one
            ref_spec = (self.reference_spec
                        or dataclasses.replace(self.policy_spec, lora=None, gradient_checkpointing=False))
            self.reference = load_causal_lm(ref_spec, device=device, trainable=False)

    def _generator(self, *keys, device=None) -> torch.Generator:
        # a fixed stream per (seed, rank, split, epoch, batch): reruns and resumed runs sample the same
        key = zlib.crc32(repr((self.sampling_seed, self.global_rank, *keys)).encode())
        return torch.Generator(device=device or self.device).manual_seed(key)

    def sample(
        self, batch: dict, spec: SamplingSpec, generator: torch.Generator
    ) -> tuple[Rollout, list[str], Tensor]:
        """spec.num_samples responses per prompt: the rollout (b*n rows), their texts and scores (b*n,)."""
        n = spec.num_samples
        with self.sampling_guard():
            rollout = generate(
                self.policy, batch["input_ids"], batch["attention_mask"], spec,
                self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, generator, self.tokenizer,
            )
        responses = decode_responses(self.tokenizer, rollout)
        prompts = [p for p in batch["prompts"] for _ in range(n)]  # rows i*n .. i*n+n-1 answer prompt i
        meta = [m for m in batch["meta"] for _ in range(n)] if batch.get("meta") is not None else None
        scores = self.reward.score(prompts, responses, meta, self.device)
        return rollout, responses, scores.to(self.device, torch.float32)

    @torch.no_grad()
    def log_ratio(self, rollout: Rollout) -> Tensor:
        """Each sample's summed response log-ratio log pi(y|x) - log pi_ref(y|x) at the sampling temperature: (b*n,)."""
        t = self.sampling.temperature if self.sampling.temperature > 0 else 1.0
        p, mask = rollout.prompt_length, rollout.response_mask.bool()
        tokens = rollout.sequences[:, p:]
        logps = []
        for model in (self.policy, self.reference):
            logits = response_logits(model, rollout.sequences, rollout.attention_mask, p)[0]  # (b*n, r, v)
            logps.append(masked_sum(token_logprobs(logits, tokens, t), mask, dim=-1))
        return logps[0] - logps[1]

    def best_of_k(self, batch: dict, generator: torch.Generator):
        """K samples per prompt -> rollout, texts, scores (b, k), best index (b,), keep (b,), log-ratio to the
        reference (b, k) or None. min_score applies to the score itself, the selection to the KL-penalised one."""
        rollout, responses, scores = self.sample(batch, self.sampling, generator)
        scores = scores.view(-1, self.sampling.num_samples)  # (b, k)
        kl = None
        if self.reference is not None:
            was_training = self.policy.training
            self.policy.eval()  # no dropout in the log-probs
            kl = self.log_ratio(rollout).view_as(scores).to(scores.device)
            self.policy.train(was_training)
        best, keep = select_best(scores, self.min_score,
                                 kl_penalised_scores(scores, kl, self.kl_coef, self.reward_norm))
        return rollout, responses, scores, best, keep, kl

    def sft_loss(self, batch: PaddedRows, keep: Tensor) -> Tensor:
        """Mean NLL on the response tokens of kept rows: batch (b, t), keep (b,) -> scalar (0 if none kept);
        under DDP scaled so the gradient averaged over ranks is that of the mean over all ranks' kept tokens."""
        logps = completion_logps(self.policy, batch)  # per row: sums (b,), counts (b,)
        # dropped rows stay in the batch with no weight: every rank runs the same steps (DDP); the mean is over
        # the kept tokens of all ranks, so a rank that kept nothing does not halve the others' gradient
        return self.global_mean(masked_sum(-logps.sums, keep), masked_sum(logps.counts, keep))[0]

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if self.thresholds is not None:
            return self.grow(batch, batch_idx)
        epoch = self.current_epoch
        rollout, _, scores, best, keep, kl = self.best_of_k(batch, self._generator("train", epoch, batch_idx))
        b, k = scores.shape
        examples = rollout_examples(rollout, torch.arange(b, device=best.device) * k + best)
        best_scores = scores.gather(1, best[:, None]).squeeze(1)  # (b,)
        for name, value in [
            ("train/reward", scores.mean()),  # mean over all K samples
            ("train/best_reward", best_scores.mean()),
            ("train/reward_gain", best_scores.mean() - scores.mean()),
            ("train/kept_fraction", keep.float().mean()),
            *([("train/kl", kl.mean()), ("train/best_kl", kl.gather(1, best[:, None]).mean())]
              if kl is not None else []),
        ]:
            prog_bar = name == "train/best_reward"
            self.log(name, value, on_step=True, on_epoch=True, batch_size=b, prog_bar=prog_bar)

        opt = self.optimizers()
        shuffle = self._generator("shuffle", epoch, batch_idx, device="cpu")
        losses = []
        for _ in range(self.sft_epochs):
            order = torch.randperm(b, generator=shuffle) if self.sft_epochs > 1 else torch.arange(b)
            for chunk in order.split(self.sft_batch_size or b):
                mb = pad_completions([examples[i] for i in chunk.tolist()], self.tokenizer.pad_token_id)
                mb = move_data_to_device(mb, self.device)
                loss = self.sft_loss(mb, keep[chunk.to(keep.device)])
                opt.zero_grad()
                self.manual_backward(loss)
                if self.max_grad_norm is not None:
                    self.clip_gradients(opt, self.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                losses.append(loss.detach())
        self.lr_schedulers().step()
        self.log("train/loss", torch.stack(losses).mean(), prog_bar=True, batch_size=b)

    # ----- ReST (thresholds): Grow during the epoch, Improve after its last batch -----

    def grow(self, batch: dict, batch_idx: int) -> None:
        """K samples per prompt from the policy as the round began, scored, appended to the round's buffer (prompt
        ids, response ids with EOS as rollout_examples gives them, score (b, k), not blank (b, k)); trains nothing
        until the round's last batch, then runs Improve."""
        epoch = self.current_epoch
        buf = self._buffer
        if batch_idx == 0:
            buf = self._buffer = {"epoch": epoch, "batches": 0, "examples": [], "scores": [], "valid": []}
        elif buf is None or buf["epoch"] != epoch or buf["batches"] != batch_idx:
            held = "none" if buf is None else f"epoch {buf['epoch']}, {buf['batches']} batches"
            raise RuntimeError(f"rs (ReST): prompt batch {batch_idx} of epoch {epoch}, but the round's buffer holds "
                               f"{held}: was the run resumed from a mid-round checkpoint without its rest_buffer?")
        rollout, responses, scores = self.sample(batch, self.sampling, self._generator("train", epoch, batch_idx))
        scores = scores.view(-1, self.sampling.num_samples)  # (b, k); rows i*k .. i*k+k-1 answer prompt i
        b, k = scores.shape
        buf["examples"] += rollout_examples(rollout, torch.arange(b * k))
        buf["scores"].append(scores.detach().float().cpu())
        buf["valid"].append(torch.tensor([bool(r.strip()) for r in responses]).view(b, k))  # blank: never kept
        buf["batches"] += 1
        for name, value in [("train/reward", scores.mean()), ("train/best_reward", scores.max(-1).values.mean())]:
            self.log(name, value, on_step=True, on_epoch=True, batch_size=b, prog_bar=name == "train/best_reward")
        if self.trainer.is_last_batch or batch_idx + 1 >= self.trainer.num_training_batches:
            self.improve()

    def _max_over_ranks(self, n: int) -> int:
        if self._trainer is None or self.trainer.world_size == 1:
            return n
        return int(self.all_gather(torch.tensor(n, device=self.device)).max().item())

    def improve(self) -> None:
        """ReST's Improve steps on the round's buffer, one per threshold: keep every sample reaching it
        (threshold_keep), then sft_epochs shuffled passes in minibatches of sft_batch_size with the SFT loss,
        continuing from the previous step. Under DDP every rank takes the steps of the rank that kept the most
        (a rank out of kept samples steps on a zero-weight row). The buffer is emptied."""
        buf, self._buffer = self._buffer, None
        scores, valid, examples = torch.cat(buf["scores"]), torch.cat(buf["valid"]), buf["examples"]  # (n, k)
        opt, scheduler, epoch = self.optimizers(), self.lr_schedulers(), self.current_epoch
        losses = []
        # once a round: logged at the epoch's end (a step-logged value of the last batch would fall between
        # log_every_n_steps and be lost)
        once = {"on_step": False, "on_epoch": True, "batch_size": 1}
        for t, tau in enumerate(self.thresholds, start=1):
            keep = threshold_keep(scores, tau, self.threshold_kind, valid, self.reward_norm)  # (n, k)
            kept = keep.flatten().nonzero().squeeze(1)  # rows of examples
            n_kept = torch.tensor(float(len(kept)), device=self.device)
            fraction = self.global_mean(n_kept, torch.tensor(float(keep.numel()), device=self.device))[1]
            self.log(f"train/t{t}_kept_fraction", fraction, **once)  # of all ranks' samples
            steps = math.ceil(self._max_over_ranks(len(kept)) / self.sft_batch_size)
            if steps == 0:
                rank_zero_warn(f"rs (ReST): round {epoch}, threshold {t} ({tau}) kept no sample: Improve step skipped")
                scheduler.step()
                continue
            kept_score = masked_sum(scores.to(self.device), keep.to(self.device))  # raw scores, not z-scored
            self.log(f"train/t{t}_kept_score", self.global_mean(kept_score, n_kept)[1], **once)
            shuffle = self._generator("improve", epoch, t, device="cpu")
            step_losses = []
            for _ in range(self.sft_epochs):
                chunks = kept[torch.randperm(len(kept), generator=shuffle)].split(self.sft_batch_size)
                for i in range(steps):
                    rows, weight = (chunks[i], True) if i < len(chunks) else (torch.zeros(1, dtype=torch.long), False)
                    mb = pad_completions([examples[j] for j in rows.tolist()], self.tokenizer.pad_token_id)
                    mb = move_data_to_device(mb, self.device)
                    loss = self.sft_loss(mb, torch.full((len(rows),), weight, device=self.device))
                    opt.zero_grad()
                    self.manual_backward(loss)
                    if self.max_grad_norm is not None:
                        self.clip_gradients(opt, self.max_grad_norm, gradient_clip_algorithm="norm")
                    opt.step()
                    step_losses.append(loss.detach())
            scheduler.step()
            self.log(f"train/t{t}_loss", torch.stack(step_losses).mean(), **once)
            if self.global_rank == 0:
                print(f"rs (ReST): round {epoch}, threshold {t} ({tau}): kept {len(kept)} of {keep.numel()} samples "
                      f"(mean score {kept_score.item() / max(len(kept), 1):.4g}), {steps * self.sft_epochs} optimizer "
                      f"steps, mean loss {torch.stack(step_losses).mean().item():.4g}")
            losses += step_losses
        if losses:
            self.log("train/loss", torch.stack(losses).mean(), prog_bar=True, **once)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._buffer is not None:  # mid-round: what Grow has sampled so far (rank 0's, as the checkpoint is)
            checkpoint["rest_buffer"] = self._buffer

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._buffer = checkpoint.get("rest_buffer")
        if self._buffer is not None and self._trainer is not None and self.trainer.world_size > 1:
            raise RuntimeError("rs (ReST): this checkpoint was taken mid-round and holds one process's grown samples; "
                               "resume it in one process, or from a checkpoint taken at a round's end")

    # `test` evaluates the DataModule's validation file, reported under test/
    def test_step(self, batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # one sample per prompt from the same stream every time: validations differ only by the policy
        spec = dataclasses.replace(self.sampling, num_samples=1)
        _, responses, scores = self.sample(batch, spec, self._generator("val", batch_idx))
        self.val_reward.update(scores)
        if self.judge is not None:  # the held-out judge scores the same responses
            judged = self.judge.score(batch["prompts"], responses, batch.get("meta"), self.device)
            self.val_judge_reward.update(judged.float())

    def on_validation_epoch_end(self) -> None:
        metrics = {"reward": self.val_reward}
        if self.judge is not None:
            metrics["judge_reward"] = self.val_judge_reward
        self.log_judged("test" if self.trainer.testing else "val", metrics)

    def configure_optimizers(self):
        if self.thresholds is None:
            return self.optim.configure(self.parameters(), self.trainer.estimated_stepping_batches)
        rounds = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else self.rounds
        return self.optim.configure(self.parameters(), rounds * len(self.thresholds))  # one step per Improve step

    def configure_callbacks(self):
        if self._trainer is None or not self.trainer.predicting:
            return [self.export]
        path = lambda: output_path(self.trainer, self.predict_file, "best_of_k.jsonl")  # noqa: E731
        noun = f"best-of-{self.sampling.num_samples} samples"
        return [self.export, JsonlPredictionWriter(path, key=lambda row: (row["index"],), unique=True, noun=noun)]

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        _, responses, scores, best, keep, _ = self.best_of_k(batch, self._generator("predict", batch_idx))
        k, indexes = scores.shape[1], batch_indexes(self, batch, batch_idx)
        return [
            {
                "prompt": batch["prompts"][i],
                "completion": responses[i * k + j],
                "score": scores[i, j].item(),
                "mean_score": scores[i].mean().item(),
                "index": indexes[i],
            }
            for i, j in enumerate(best.tolist())
            if keep[i] and responses[i * k + j].strip()  # a blank completion cannot be SFT data
        ]
