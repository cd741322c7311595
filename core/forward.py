"""Forward passes that run only the parts of a model a loss needs: the vocabulary head on completion positions
(padded, packed or prompt-shared rows), and the tree attention mask of prompt-shared rows."""

from __future__ import annotations

import torch

from core.models import unwrap_peft
from core.ops import IGNORE_INDEX, prefix_tree_mask


def lm_parts(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder trunk, vocabulary head) of a causal LM, peft-wrapped or not; None when it has no separate
    trunk or post-processes its logits (soft-capping, scaling): such a model takes the padded path."""
    inner = unwrap_peft(model)
    config, decoder, head = inner.config, getattr(inner, inner.base_model_prefix, None), inner.get_output_embeddings()
    if decoder is None or head is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    return decoder, head


def completion_logits(model, labels: torch.Tensor, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the labelled (completion) positions only: (n, v) and their targets (n,).

    The decoder runs on every token, but the vocabulary head only where a label follows: prompt tokens
    (often most of a conversation) cost no (t, v) logits, which is most of the memory and a fifth of the
    FLOPs of a small model. Models that post-process logits (soft-capping, scaling) get a full forward.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # (b, t-1): position i predicts token i + 1
    parts = lm_parts(model)
    if parts is None:
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        return logits[keep], targets[keep]
    hidden = parts[0](**inputs, use_cache=False).last_hidden_state[:, :-1]  # (b, t-1, h)
    return parts[1](hidden[keep]), targets[keep]  # (n, v), (n,)


def tree_attention_mask(model, tree: dict[str, torch.Tensor]) -> torch.Tensor:
    """The 4D mask of prompt-shared rows (core/packing.py) in the form the model's attention takes
    (transformers passes a 4D mask through as is): boolean for sdpa, additive (0 / lowest value) for eager."""
    allowed = prefix_tree_mask(tree["tree_ids"], tree["branch_ids"])  # (rows, 1, t, t)
    impl = str(getattr(model.config, "_attn_implementation", "eager"))
    if impl == "sdpa":
        return allowed
    if impl != "eager":
        raise ValueError(f"share_prompt needs sdpa or eager attention (a custom 4D mask), not {impl!r}")
    device = allowed.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else model.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device), torch.finfo(dtype).min)


def tree_completion_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt-shared rows: logits (n, v) at each completion token's predicting position (`source_index`) and
    the targets (n,). The vocabulary head runs on those n positions only."""
    parts = lm_parts(model)
    if parts is None:
        raise ValueError("share_prompt needs a plain decoder + vocabulary head (no logit soft-capping or scaling)")
    decoder, head = parts
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     attention_mask=tree_attention_mask(decoder, batch), use_cache=False).last_hidden_state
    return head(hidden.flatten(0, 1)[batch["source_index"]]), batch["target_ids"]  # (n, v), (n,)
