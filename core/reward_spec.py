"""RewardSpec: frozen reward models and reward functions that score text.

A model's score is read by `core.forward.sequence_scores`, the same function reward training (RewardModule)
uses, so training and use (PPO, rejection sampling) agree on where the score head is applied: at the last token of
prompt + response as the model's tokenizer writes it, where transformers' sequence classifiers read it too
(AutoModelForSequenceClassification, the text-classification pipeline, TRL's reward_funcs), so a saved reward
model gives one score in all of them. Reward models our reward stage saved before that (their lightning_rlhf.json
has stage "reward" and no SCORE_AT) were trained on prompt + response + EOS and are still scored that way, with a
warning.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from core.batches import PaddedRows
from core.forward import sequence_scores
from core.losses.reward import ensemble_scores, llama2_combine, weighted_sum, whiten_scores
from core.models import ModelSpec, as_spec, load_sequence_classifier, load_tokenizer
from core.outputs import MARKER, is_ours
from core.tokenize import cut_left, pad_right

log = logging.getLogger(__name__)
# a reward model's lightning_rlhf.json says where it is scored: {"score_at": SCORE_AT} (RewardModule's exports)
SCORE_AT = "last_text_token"


def appends_eos(path: str | Path) -> bool:
    """True for a reward model our reward stage saved before SCORE_AT existed (marker stage "reward", no score_at):
    it was trained, and is scored, on prompt + response + EOS. Anything else is scored at the text's last token."""
    marker = Path(path).expanduser() / MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("stage") == "reward" and "score_at" not in info


def legacy_warning(path: str | Path) -> str:
    return (f"{path}: reward model saved by an older lightning-rlhf (no score_at in its {MARKER}): it was trained "
            "on prompt + response + EOS and is scored that way here, while transformers' sequence classifiers "
            "(AutoModelForSequenceClassification, text-classification pipelines, TRL's reward_funcs) read the "
            "response's last token without EOS and give other scores. For one score everywhere retrain it with "
            "`rlhf reward fit` (or fine-tune it from this folder); until then append the tokenizer's EOS token to "
            "the texts you give those clients (exact where its saved pad differs from EOS)")


def _flag(value) -> bool:
    """A meta flag from json (bool/int) or csv (string)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y", "unsafe")
    return bool(value)


ORACLES = {"synthetic": "core.tasks:oracle_reward"}  # short name -> reward function path


def import_reward_function(path: str, what: str = "reward function") -> Callable:
    """"package.module:name" (name may be dotted, e.g. "mod:Class.method") -> the callable; else ValueError
    naming the path (as `what`, e.g. "relabel function"). Imported lazily from the string, so a function's module
    loads only when a spec names it."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {path!r}: expected 'package.module:name'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as err:  # missing module or dependency, or the module failed while importing
        hint = " (is its folder on PYTHONPATH?)" if isinstance(err, ModuleNotFoundError) else ""
        raise ValueError(f"{what} {path!r}: cannot import module {module_name!r}: {err!r}{hint}") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {path!r} is a {type(obj).__name__}, not a callable")
    return obj


def call_reward_function(
    path: str, fn: Callable, prompts: list[str], responses: list[str], meta: list[dict]
) -> torch.Tensor:
    """fn(prompts, responses, meta) checked: one finite float per pair, else ValueError naming `path`. -> (b,)"""
    out = fn(prompts, responses, meta)
    try:
        values = [float(x) for x in out]
    except (TypeError, ValueError) as err:
        raise ValueError(f"reward function {path!r} must return one float per pair, got {type(out).__name__}") from err
    if len(values) != len(responses):
        raise ValueError(f"reward function {path!r} returned {len(values)} scores for {len(responses)} responses")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"reward function {path!r} returned non-finite scores at rows {bad[:10]}: {values[bad[0]]}")
    return torch.tensor(values, dtype=torch.float32)


@dataclass
class RewardSpec:
    """Frozen reward model(s) and reward function(s) that score (prompt, response) text pairs, combined into
    one reward per pair.

    Call `load(device)` once (e.g. in a LightningModule's configure_model), then `score(...)`. Function paths
    are imported at construction, so a bad one fails before any model loads.

    Args:
        models: sequence-classification reward models (e.g. saved by `rlhf reward fit`); a causal LM
            would get an untrained head, so use trained reward models here. A path to a folder that holds
            no model but several saved reward models (subfolders with lightning_rlhf.json and config.json)
            stands for all of them, in name order, each with this entry's other settings.
        functions: reward functions as "package.module:name" import paths, each a callable
            `(prompts: list[str], responses: list[str], meta: list[dict]) -> list[float]` (one finite float
            per pair; meta holds each prompt row's extra fields): verifiable rewards (math, code, format).
        weights: for combine="sum", one weight per scorer in this order: models first (with an ensemble:
            one weight for the whole ensemble), then functions, then the oracle (default: all 1.0).
        combine: "sum" (weighted sum of all scorers) or "llama2" (arXiv 2307.09288, eq. 4): exactly two
            models, models[0] helpfulness, models[1] safety, and no functions or oracle (refused); the
            safety score is used where the prompt's meta flag "unsafe" is set or sigmoid(safety) <
            safety_threshold, else the helpfulness score.
        safety_threshold: safety probability below which llama2 uses the safety score.
        ensemble: "none", or the `models` (two or more) are members of one ensemble, e.g. trained with
            different seeds or bootstrap resamples, whose scores per pair are combined into one by "mean",
            "min" (worst case) or "mean_minus_std" (mean - ensemble_lambda * population std over members;
            Coste et al. 2023, arXiv 2310.02743); that score then counts as one model in the weighted sum.
            combine="sum" only.
        ensemble_lambda: weight of the members' std in "mean_minus_std" (>= 0; with two members, 1.0
            gives the same as "min").
        whiten: whiten the combined score (a logit) as Llama 2 does: with whiten_mean/whiten_std when
            given, else with the batch's mean and std.
        whiten_mean: fixed mean for whitening (e.g. measured on the reward model's training data).
        whiten_std: fixed std for whitening.
        oracle: "synthetic" is a short name for the function "core.tasks:oracle_reward", the
            built-in task's noise-free oracle (scored after `functions`); null to use models/functions only.
        batch_size: rows per reward-model forward pass.
        max_length: tokens per scored text; longer ones keep their last max_length tokens.
    """

    models: list[ModelSpec] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    combine: Literal["sum", "llama2"] = "sum"
    safety_threshold: float = 0.15
    ensemble: Literal["none", "mean", "min", "mean_minus_std"] = "none"
    ensemble_lambda: float = 1.0
    whiten: bool = False
    whiten_mean: float | None = None
    whiten_std: float | None = None
    oracle: Literal["synthetic"] | None = None
    batch_size: int = 16
    max_length: int = 1024

    def __post_init__(self):
        self.models = [member for m in self.models for member in _expand_members(as_spec(m))]
        self.functions = list(self.functions)
        if self.oracle is not None and self.oracle not in ORACLES:
            raise ValueError(f"unknown oracle {self.oracle!r}: the one built in is 'synthetic'")
        paths = [*self.functions, *([ORACLES[self.oracle]] if self.oracle is not None else [])]
        if not self.models and not paths:
            raise ValueError("RewardSpec needs reward models or oracle='synthetic' or functions=['module:name']")
        if self.combine == "llama2" and self.weights is not None:
            raise ValueError("combine='llama2' picks the helpfulness or the safety score per row: it takes no weights")
        if self.combine == "llama2" and (len(self.models) != 2 or paths):
            raise ValueError(
                f"combine='llama2' takes two models (helpfulness, safety) and no reward functions or oracle, got "
                f"{len(self.models)} models and functions {paths} (set oracle: null, or use combine='sum')"
            )
        if self.ensemble not in ("none", "mean", "min", "mean_minus_std"):
            raise ValueError(f"ensemble must be 'none', 'mean', 'min' or 'mean_minus_std', got {self.ensemble!r}")
        if self.ensemble != "none":
            if self.combine != "sum":
                raise ValueError(f"ensemble={self.ensemble!r} combines its members into one score, then combine='sum'; "
                                 f"combine={self.combine!r} needs separate models")
            if len(self.models) < 2:
                raise ValueError(f"ensemble={self.ensemble!r} needs two or more models (its members, or a folder "
                                 f"of member folders), got {[m.path for m in self.models]}")
            if not (math.isfinite(self.ensemble_lambda) and self.ensemble_lambda >= 0):
                raise ValueError(f"ensemble_lambda must be a finite number >= 0, got {self.ensemble_lambda}")
        n_models = 1 if self.ensemble != "none" and self.models else len(self.models)
        if self.weights is not None and len(self.weights) != n_models + len(paths):
            what = (f"one ensemble of {len(self.models)} models" if self.ensemble != "none"
                    else f"{len(self.models)} models")
            raise ValueError(f"{len(self.weights)} weights for {what} + {len(paths)} functions {paths}")
        # not config fields: (path, callable) per function, and (model, tokenizer) per spec filled by load()
        self._functions: list[tuple[str, Callable]] = [(p, import_reward_function(p)) for p in paths]
        self._loaded: list[tuple] = []
        self._eos: list[bool] = []  # per loaded model: an old reward model, scored on text + EOS (appends_eos)

    def load(self, device: str | torch.device = "cpu") -> RewardSpec:
        """Load the models frozen (eval mode, no grads) onto device; a second call does nothing."""
        if self._loaded:
            return self
        for spec in self.models:
            tok = load_tokenizer(spec, padding_side="right")
            model = load_sequence_classifier(spec, pad_token_id=tok.pad_token_id, device=device, trainable=False)
            if spec.quantization == "none":  # quantised weights were loaded onto device already
                model = model.to(device)
            self._loaded.append((model, tok))
            self._eos.append(appends_eos(spec.path))
            if self._eos[-1]:
                log.warning(legacy_warning(spec.path))
        return self

    @torch.no_grad()
    def score(
        self,
        prompts: list[str],
        responses: list[str],
        meta: list[dict] | None = None,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """Rewards of (rendered prompt, response) text pairs: b prompts, b responses -> (b,) float32.

        Each model reads prompt + response as its tokenizer writes it (special tokens added unless the text
        starts with BOS), right-padded, scored at the last token: what transformers' sequence classifiers read
        (an old reward model, appends_eos: prompt + response + EOS, as it was trained); each function gets the
        texts and meta as they are.
        meta: per-row dicts (default: empty); combine="llama2" reads their "unsafe" flag.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        if self.models and not self._loaded:
            raise RuntimeError("RewardSpec.score before load(device)")
        meta = [dict(m or {}) for m in (meta or [{}] * len(prompts))]
        scores = [self._model_scores(model, tok, prompts, responses, eos)
                  for (model, tok), eos in zip(self._loaded, self._eos)]
        if self.combine == "llama2":  # two models, no functions (checked at construction)
            unsafe = torch.tensor([_flag(m.get("unsafe", False)) for m in meta])
            combined = llama2_combine(scores[0], scores[1], unsafe, self.safety_threshold)
        else:
            if self.ensemble != "none":  # members -> one score, one place in the weighted sum
                scores = [ensemble_scores(torch.stack(scores), self.ensemble, self.ensemble_lambda)]
            scores += [call_reward_function(path, fn, prompts, responses, meta) for path, fn in self._functions]
            combined = weighted_sum(scores, self.weights or [1.0] * len(scores))
        if self.whiten:
            if combined.numel() == 1 and (self.whiten_mean is None or self.whiten_std is None):
                raise ValueError("whiten=True with batch statistics needs two or more responses per call (one "
                                 "would score 0 whatever it says): give whiten_mean and whiten_std")
            combined = whiten_scores(combined, self.whiten_mean, self.whiten_std)
        return combined.to(device) if device is not None else combined

    def _model_scores(self, model, tok, prompts: list[str], responses: list[str], eos: bool) -> torch.Tensor:
        texts = [p + r for p, r in zip(prompts, responses)]
        bos = tok.bos_token
        add = not (bos and all(t.startswith(bos) for t in texts))  # a chat template may have written BOS
        end = [tok.eos_token_id] if eos else []
        ids = [x + end for x in tok(texts, add_special_tokens=add)["input_ids"]]
        ids = [cut_left(x, self.max_length, tok.bos_token_id) for x in ids]  # as training cuts: BOS stays
        device = next(model.parameters()).device
        out = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]  # right-padded below: the score is read at the last real token
            rows = PaddedRows(
                input_ids=torch.tensor(pad_right(chunk, tok.pad_token_id), device=device),
                attention_mask=torch.tensor(pad_right([[1] * len(x) for x in chunk], 0), device=device),
            )
            out.append(sequence_scores(model, rows).cpu())  # (chunk,)
        return torch.cat(out)


def _expand_members(spec: ModelSpec) -> list[ModelSpec]:
    """A local folder holding no model but saved reward models (subfolders with lightning_rlhf.json and
    config.json, e.g. the members of an ensemble) -> one spec per subfolder, in name order; else [spec]."""
    root = Path(spec.path)
    if spec.gguf_file or not root.is_dir() or (root / "config.json").exists():
        return [spec]
    members = sorted(d for d in root.iterdir() if is_ours(d) and (d / "config.json").is_file())
    return [replace(spec, path=str(d)) for d in members] or [spec]


def as_reward_spec(spec: RewardSpec | dict) -> RewardSpec:
    """LightningCLI hands dataclass arguments over as objects, checkpoints as dicts: accept both."""
    return spec if isinstance(spec, RewardSpec) else RewardSpec(**dict(spec))
