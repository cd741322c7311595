"""Reading a reward model's score, and RewardSpec: frozen reward models (or an oracle) that score text.

`sequence_scores` is the one place a score is read, so training (RewardModule) and use (PPO, rejection
sampling through RewardSpec) agree: the score head applied at the LAST REAL token, found from the
attention mask, never from pad_token_id (pad == EOS is common and would make the EOS look like padding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from modules.forward import tree_attention_mask
from modules.losses.reward import llama2_combine, weighted_sum, whiten_scores
from modules.models import ModelSpec, as_spec, is_peft, load_sequence_classifier, load_tokenizer
from modules.ops import last_true_index


def sequence_scores(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, sequence_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None, tree: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scalar score per sequence: (b, t), (b, t) -> (b,) float32, for left or right padding; or, for packed
    rows (no attention mask; `sequence_ids` (rows, t) says which sequence each token is, -1 on padding, and
    position ids restart per sequence), one score per sequence id; or, for prompt-shared rows
    (datamodules/packing.py), `tree` = {tree_ids, branch_ids, score_index} -> (n_seq,) in score_index order.

    Decoder classifiers (`score` head on a base model: Llama, Qwen, GPT-2, ..., also inside a peft wrapper):
    run the base model, take the hidden state at the last real token, apply the head. Anything else (an
    encoder that pools its first token) is called whole and its (b, 1) logits are the scores.
    """
    inner = model.get_base_model() if is_peft(model) else model  # LoRA layers stay active in place
    prefix = getattr(inner, "base_model_prefix", "")
    if hasattr(inner, "score") and prefix and hasattr(inner, prefix):
        if tree is not None:  # prompt-shared rows: a tree mask instead of a padding mask
            attention_mask = tree_attention_mask(inner, tree)
        elif position_ids is None:  # right padding keeps positions 0..n-1; left padding needs them restarted
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (b, t)
        hidden = getattr(inner, prefix)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (b, t, h)
        if tree is not None:
            return inner.score(hidden.flatten(0, 1)[tree["score_index"]]).squeeze(-1).float()  # (n_seq,)
        if sequence_ids is not None:  # packed: the last flat position of each sequence id
            flat, where = sequence_ids.flatten(), torch.arange(sequence_ids.numel(), device=hidden.device)
            real = flat >= 0  # -1 marks the padding tail
            last = torch.full((int(flat.max()) + 1,), -1, device=hidden.device)
            last = last.scatter_reduce(0, flat[real], where[real], "amax")
            return inner.score(hidden.flatten(0, 1)[last]).squeeze(-1).float()  # (n_seq,)
        last = last_true_index(attention_mask)  # (b,): the score goes on the last real token
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (b, h)
        return inner.score(picked).squeeze(-1).float()  # (b,)
    if sequence_ids is not None or tree is not None:
        raise ValueError("packed batches need a decoder reward model (a `score` head on a base model)")
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()


def _flag(value) -> bool:
    """A meta flag from json (bool/int) or csv (string)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y", "unsafe")
    return bool(value)


@dataclass
class RewardSpec:
    """Frozen reward model(s) that score (prompt, response) text pairs, combined into one reward per pair.

    Call `load(device)` once (e.g. in a LightningModule's configure_model), then `score(...)`.

    Args:
        models: sequence-classification reward models (e.g. saved by `rlhf reward fit`); a causal LM
            would get an untrained head, so use trained reward models here.
        weights: one weight per model for combine="sum" (default: all 1.0).
        combine: "sum" (weighted sum) or "llama2" (arXiv 2307.09288, eq. 4): models[0] is helpfulness,
            models[1] safety; the safety score is used where the prompt's meta flag "unsafe" is set or
            sigmoid(safety) < safety_threshold, else the helpfulness score.
        safety_threshold: safety probability below which llama2 uses the safety score.
        whiten: whiten the combined score (a logit) as Llama 2 does: with whiten_mean/whiten_std when
            given, else with the batch's mean and std.
        whiten_mean: fixed mean for whitening (e.g. measured on the reward model's training data).
        whiten_std: fixed std for whitening.
        oracle: "synthetic" scores with the built-in task's oracle (datamodules.synthetic.oracle_score)
            instead of models: a noise-free reward to show the learning signal.
        batch_size: rows per reward-model forward pass.
        max_length: tokens per scored text; longer ones keep their last max_length tokens.
    """

    models: list[ModelSpec] = field(default_factory=list)
    weights: list[float] | None = None
    combine: Literal["sum", "llama2"] = "sum"
    safety_threshold: float = 0.15
    whiten: bool = False
    whiten_mean: float | None = None
    whiten_std: float | None = None
    oracle: Literal["synthetic"] | None = None
    batch_size: int = 16
    max_length: int = 1024

    def __post_init__(self):
        self.models = [as_spec(m) for m in self.models]
        if self.oracle is None and not self.models:
            raise ValueError("RewardSpec needs reward models or oracle='synthetic'")
        if self.oracle is not None and self.oracle != "synthetic":
            raise ValueError(f"unknown oracle {self.oracle!r}: the one built in is 'synthetic'")
        if self.combine == "llama2" and self.oracle is None and len(self.models) != 2:
            raise ValueError(f"combine='llama2' takes two models (helpfulness, safety), got {len(self.models)}")
        if self.weights is not None and len(self.weights) != len(self.models):
            raise ValueError(f"{len(self.weights)} weights for {len(self.models)} models")
        self._loaded: list[tuple] = []  # (model, tokenizer) per spec, filled by load(); not a config field

    def load(self, device: str | torch.device = "cpu") -> RewardSpec:
        """Load the models frozen (eval mode, no grads) onto device; a second call does nothing."""
        if self.oracle is not None or self._loaded:
            return self
        for spec in self.models:
            tok = load_tokenizer(spec, padding_side="right")
            model = load_sequence_classifier(spec, pad_token_id=tok.pad_token_id, device=device, trainable=False)
            if spec.quantization == "none":  # quantised weights were loaded onto device already
                model = model.to(device)
            self._loaded.append((model, tok))
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

        Each model reads prompt + response + EOS (the layout it was trained on), right-padded.
        meta: per-row dicts; combine="llama2" reads their "unsafe" flag.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        if self.oracle is not None:
            from datamodules.synthetic import oracle_score

            combined = torch.tensor([oracle_score(p, r) for p, r in zip(prompts, responses)], dtype=torch.float32)
        else:
            if not self._loaded:
                raise RuntimeError("RewardSpec.score before load(device)")
            scores = [self._model_scores(model, tok, prompts, responses) for model, tok in self._loaded]
            if self.combine == "llama2":
                unsafe = torch.tensor([_flag((m or {}).get("unsafe", False)) for m in (meta or [{}] * len(prompts))])
                combined = llama2_combine(scores[0], scores[1], unsafe, self.safety_threshold)
            else:
                combined = weighted_sum(scores, self.weights or [1.0] * len(scores))
        if self.whiten:
            combined = whiten_scores(combined, self.whiten_mean, self.whiten_std)
        return combined.to(device) if device is not None else combined

    def _model_scores(self, model, tok, prompts: list[str], responses: list[str]) -> torch.Tensor:
        texts = [p + r for p, r in zip(prompts, responses)]
        bos = tok.bos_token
        add = not (bos and all(t.startswith(bos) for t in texts))  # a chat template may have written BOS
        ids = [x + [tok.eos_token_id] for x in tok(texts, add_special_tokens=add)["input_ids"]]
        ids = [x[-self.max_length :] for x in ids]
        device = next(model.parameters()).device
        out = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            width = max(len(x) for x in chunk)
            input_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in chunk], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk], device=device)
            out.append(sequence_scores(model, input_ids, mask).cpu())  # (chunk,)
        return torch.cat(out)


def as_reward_spec(spec: RewardSpec | dict) -> RewardSpec:
    """LightningCLI hands dataclass arguments over as objects, checkpoints as dicts: accept both."""
    return spec if isinstance(spec, RewardSpec) else RewardSpec(**dict(spec))
