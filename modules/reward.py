"""RewardModule: a scalar-head model trained on preferences (pairwise with margin, or K-wise rankings)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.aggregation import MeanMetric

from core.batches import PreferenceBatch, RankingBatch
from core.forward import sequence_scores
from core.losses.reward import RewardLossOutput, pairwise_loss, ranking_loss
from core.models import PAD_TOKEN, ModelSpec, as_spec, distinct_pad, load_sequence_classifier, load_tokenizer
from core.ops import IGNORE_INDEX
from core.optim import OPTIM_ARGS, OptimSpec, adamw
from core.reward_spec import SCORE_AT, appends_eos, legacy_warning
from modules.export import EXPORT_ARGS, HFExport
from modules.predict import JsonlPredictionWriter, batch_indexes
from modules.stage import StageHooks, output_path, root_device, shared_args

log = logging.getLogger(__name__)


@shared_args(OPTIM_ARGS, EXPORT_ARGS)
class RewardModule(StageHooks, LightningModule):
    """Reward model: r(prompt, response) read at the response's last token, as transformers reads it.

    Trained on prompt + response as the tokenizer writes them, no EOS appended (the data's rows, `completion_eos`),
    and saved with a pad token no text can end with (core.models.distinct_pad: a tokenizer whose pad is EOS or an
    end-of-turn token gets a new <|pad|> token and one more embedding row), its lightning_rlhf.json marked with
    score_at (core.reward_spec.SCORE_AT): AutoModelForSequenceClassification, a text-classification pipeline and
    TRL's reward_funcs then score the saved model as RewardSpec does.

    Pairs (InstructGPT, arXiv 2203.02155; Llama 2 margin, arXiv 2307.09288 eq. 2): -log sigmoid(r_w - r_l - m).
    Rankings: every non-tied pair of a prompt's K responses, averaged per prompt, then over prompts.

    Metrics (torchmetrics, synced across processes), each also under test/ for `test`:
    val/loss; val/rewards/accuracies, the fraction of pairs with r_w > r_l (ties count as wrong), averaged per
    prompt for rankings (like the loss); val/rewards/margins, mean r_w - r_l over pairs; rankings add
    val/ranking_accuracy, the same fraction counted over all pairs of all prompts together.

    The Hugging Face export at the end of fit (save_dir) loads with AutoModelForSequenceClassification.

    Args:
        backbone: the model to train: a causal LM (its vocabulary head is replaced by a new scalar head, e.g.
            the SFT policy) or a sequence-classification checkpoint (an earlier reward model, an encoder).
        center_coef: weight of the reward-centering term c * mean((r_w + r_l)^2) (arXiv 2312.09244); 0 = off.
        predict_file: where `predict` writes one json line per (prompt, response) row of the validation data with
            its score: {prompt, response, score} plus pair, chosen (pairs) or group, rank (rankings); one file from
            all processes (default: <log dir>/scores.jsonl).
    """

    stage = "reward"

    def __init__(
        self,
        backbone: ModelSpec,
        optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
        warmup_steps: int = 0,
        decay: Literal["constant", "linear", "cosine"] = "constant",
        center_coef: float = 0.0,
        save_dir: str | None = None,
        merge_lora: bool = True,
        overwrite: bool = False,
        predict_file: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.backbone_spec = as_spec(backbone)
        self.hparams["backbone"] = asdict(self.backbone_spec)  # plain data: checkpoints load with weights_only=True
        self.optim = OptimSpec(optimizer, scheduler, warmup_steps, decay)
        self.export = HFExport(self.stage, save_dir, merge_lora, overwrite, model="backbone", name="reward model",
                               info={"score_at": SCORE_AT})
        self.center_coef, self.predict_file = center_coef, predict_file
        self.backbone = None
        self.tokenizer = None
        # val and test never run at once: one set of metrics serves both
        self.eval_loss, self.eval_accuracy = MeanMetric(), MeanMetric()
        self.eval_margin, self.eval_ranking_accuracy = MeanMetric(), MeanMetric()
        self.strict_loading = False  # checkpoints hold trainable weights only

    def configure_model(self) -> None:
        if self.backbone is not None:
            return
        self.tokenizer = load_tokenizer(self.backbone_spec)
        if distinct_pad(self.tokenizer):
            spec, fitting = self.backbone_spec, getattr(getattr(self._trainer, "state", None), "fn", None) == "fit"
            if fitting and spec.lora is not None and (not self.export.merge_lora or spec.quantization != "none"):
                raise ValueError(f"reward model: the pad token of {spec.path} could end a text, so the saved model "
                                 f"gets a new pad token {PAD_TOKEN} and one more embedding row, which a LoRA adapter "
                                 "saved unmerged (merge_lora false, or a quantised base) cannot carry: set "
                                 "merge_lora true on a full-precision base, or give the tokenizer a pad token of "
                                 "its own")
            log.info(f"reward model: pad token {PAD_TOKEN} added (the tokenizer's pad could end a text)")
        device = root_device(self)
        self.backbone = load_sequence_classifier(self.backbone_spec, pad_token_id=self.tokenizer.pad_token_id,
                                                 device=device, vocab_size=len(self.tokenizer))

    def completion_eos(self, stage: str) -> bool:
        """Whether the data's responses end with an appended EOS (PreferenceDataModule asks at setup): never in
        fit; validate, test and predict of an old reward model (core.reward_spec.appends_eos) keep its layout."""
        if stage == "fit" or not appends_eos(self.backbone_spec.path):
            return False
        log.warning(legacy_warning(self.backbone_spec.path))
        return True

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if getattr(self.trainer.datamodule, "layout", "pairs") == "unpaired":  # before configure_model: no weights yet
            raise ValueError("reward models train on pairs or rankings: data.layout 'unpaired' is for `rlhf dpo` with "
                             "loss_type kto")

    def forward(self, batch: PreferenceBatch) -> torch.Tensor:
        """Scores of a preference batch's sequences: (2b,) chosen then rejected, or (N,) ranking rows."""
        return sequence_scores(self.backbone, batch)

    def _loss(self, batch: PreferenceBatch, scores: torch.Tensor) -> RewardLossOutput:
        if isinstance(batch, RankingBatch):  # (N,) scores, group (N,), ranks (N,)
            return ranking_loss(scores, batch.group, batch.ranks, self.center_coef)
        chosen, rejected = scores.chunk(2)  # (b,), (b,)
        return pairwise_loss(chosen, rejected, batch.margin.to(scores.dtype), self.center_coef)

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor:
        out = self._loss(batch, self(batch))
        n = int(batch.margin.shape[0])  # pairs, or prompts for rankings
        self.log("train/loss", out.loss, prog_bar=True, batch_size=n)
        self.log("train/rewards/accuracies", out.accuracy, batch_size=out.num_pairs)
        self.log("train/rewards/margins", out.margin, batch_size=out.num_pairs)
        return out.loss

    def _eval_step(self, batch: PreferenceBatch, split: str) -> None:
        scores = self(batch)
        out = self._loss(batch, scores)
        n = int(batch.margin.shape[0])
        self.eval_loss.update(out.loss.detach(), n)
        self.eval_margin.update(out.margin, out.num_pairs)
        if isinstance(batch, RankingBatch):
            per_prompt = group_accuracies(scores.detach(), batch.group, batch.ranks)  # (prompts with pairs,)
            self.eval_accuracy.update(per_prompt.mean(), per_prompt.numel())
            self.eval_ranking_accuracy.update(out.accuracy, out.num_pairs)
            self.log(f"{split}/ranking_accuracy", self.eval_ranking_accuracy, on_step=False, on_epoch=True)
        else:
            self.eval_accuracy.update(out.accuracy, out.num_pairs)
        # metric objects: Lightning computes them (synced across processes) at epoch end, then resets them
        self.log(f"{split}/loss", self.eval_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{split}/rewards/accuracies", self.eval_accuracy, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{split}/rewards/margins", self.eval_margin, on_step=False, on_epoch=True)

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        return self.optim.configure(self.parameters(), self.trainer.estimated_stepping_batches)

    def configure_callbacks(self):
        if self._trainer is None or not self.trainer.predicting:
            return [self.export]
        path = lambda: output_path(self.trainer, self.predict_file, "scores.jsonl")  # noqa: E731
        return [self.export, JsonlPredictionWriter(path, key=score_key, noun="scores")]

    def predict_step(self, batch: PreferenceBatch, batch_idx: int) -> list[dict]:
        """One row per scored response; predict batches are padded rows (PreferenceDataModule padded=True)."""
        scores = self(batch).tolist()
        tokens = batch.tokens
        ids, mask, labels = tokens.input_ids, tokens.attention_mask.bool(), tokens.labels
        response = labels != IGNORE_INDEX  # (rows, t)
        decode = self.tokenizer.decode
        if isinstance(batch, RankingBatch):  # each group is one record of the loader's dataset
            groups = batch_indexes(self, {}, batch_idx, size=int(batch.group.max()) + 1)
        rows = []
        for i, score in enumerate(scores):
            row = {
                "prompt": decode(ids[i][mask[i] & ~response[i]], skip_special_tokens=True),
                "response": decode(ids[i][response[i]], skip_special_tokens=True),
                "score": score,
            }
            if isinstance(batch, RankingBatch):  # the prompt's record among the validation records, and the rank
                row["group"], row["rank"] = groups[int(batch.group[i])], float(batch.ranks[i])
            else:  # pairs: rows [0, b) chosen, [b, 2b) rejected
                b = len(scores) // 2
                row["pair"], row["chosen"] = int(batch.index[i % b]), i < b
            rows.append(row)
        return rows  # trainer.predict(...) returns these rows too


def score_key(row: dict) -> tuple:
    """File order: by pair, chosen row first; rankings by record, rows of one record in their order."""
    return (row["pair"], not row["chosen"]) if "pair" in row else (row["group"],)


def group_accuracies(scores: torch.Tensor, group: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Per prompt, the fraction of its non-tied pairs ordered right: (N,) x3 -> (prompts with a pair,)."""
    pair = (group[:, None] == group[None, :]) & (ranks[:, None] < ranks[None, :])  # (N, N): i better than j
    correct = pair & (scores[:, None] > scores[None, :])  # (N, N)
    _, gid = torch.unique(group, return_inverse=True)  # (N,)
    total = torch.zeros(int(gid.max()) + 1, device=scores.device).index_add_(0, gid, pair.sum(1).float())
    right = torch.zeros_like(total).index_add_(0, gid, correct.sum(1).float())
    keep = total > 0
    return right[keep] / total[keep]
