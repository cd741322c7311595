"""Batched sampling with a KV cache, shared by rejection sampling, PPO and evaluation.

Prompts come left-padded; every row decodes one token per step against the model's cache
(`cache`), with position ids taken from the attention mask so left padding does not shift
positions. Rows finish on EOS (or a stop string); their later tokens are padding and the loop ends as
soon as every row has finished. Works with any Hugging Face causal LM and with peft-wrapped models.

Hand-written rather than transformers' `generate`, which samples from the global RNG: here every call draws
from the torch.Generator it is given, seeded per call (PPO's rollout stream, rejection sampling's per-batch
streams, predict's per-batch seeds), so reruns, resumed runs and each DDP rank sample reproducibly without
touching the RNG that orders the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from core.guard import NonFiniteError
from core.ops import positions_from_mask


@dataclass
class SamplingSpec:
    """How to sample responses.

    Args:
        max_new_tokens: most response tokens per row.
        temperature: logits are divided by it; 0 means greedy (argmax). Use the training temperature.
        top_k: keep only the k most likely tokens (0 = off).
        top_p: nucleus sampling, keep the smallest set of tokens whose probability reaches top_p (1.0 = off).
        num_samples: responses per prompt (n); rows i*n .. i*n+n-1 come from prompt i.
        stop_strings: a row also finishes once its decoded response contains one of these (the stop string
            stays in the response); needs `tokenizer` in `generate`.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    stop_strings: list[str] = field(default_factory=list)

    def __post_init__(self):
        # a negative temperature samples the least likely tokens, top_p 0 keeps none, "" stops every row at once
        problems = [f"{name} {value!r}: {rule}" for name, value, ok, rule in (
            ("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, "at least 1"),
            ("temperature", self.temperature, self.temperature >= 0, ">= 0 (0 = greedy)"),
            ("top_k", self.top_k, self.top_k >= 0, ">= 0 (0 = off)"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
            ("num_samples", self.num_samples, self.num_samples >= 1, "at least 1"),
        ) if not ok]
        problems += [f"stop string {s!r}: must be non-empty text" for s in self.stop_strings
                     if not isinstance(s, str) or not s]
        if problems:
            raise ValueError("sampling: " + "; ".join(problems))


class Rollout(NamedTuple):
    """Output of `generate`; b*n rows, p prompt columns, r response columns.

    sequences (b*n, p + r): left-padded prompt + response, right-padded with pad_token_id after it ends.
    attention_mask (b*n, p + r): 1 on real prompt tokens and on response tokens up to and including EOS.
    response_mask (b*n, r): 1 up to and including the first EOS (or the stop-string token), 0 after.
    prompt_length: p.
    has_eos (b*n,): True where the response ended with EOS or a stop string, False where truncated.
    """

    sequences: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    prompt_length: int
    has_eos: Tensor


def sample_next(logits: Tensor, spec: SamplingSpec, generator: torch.Generator | None = None) -> Tensor:
    """Next tokens from last-position logits (b, v) -> (b,): temperature, top-k, top-p, multinomial.
    Non-finite logits (a diverged model) raise NonFiniteError instead of sampling garbage."""
    logits = logits.float()
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteError("logits while sampling")
    if spec.temperature == 0:
        return logits.argmax(-1)
    logits = logits / spec.temperature
    if spec.top_k > 0 and spec.top_k < logits.size(-1):
        kth = torch.topk(logits, spec.top_k, dim=-1).values[:, -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if spec.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (b, v)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p; the most likely token always stays
        drop = (probs.cumsum(-1) - probs) >= spec.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    spec: SamplingSpec,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    tokenizer=None,
) -> Rollout:
    """Sample `spec.num_samples` responses per left-padded prompt, using the model's KV cache.

    Args:
        model: a causal LM called as `model(input_ids=, attention_mask=, position_ids=, cache=,
            use_cache=True, logits_to_keep=1)` returning `.logits` and `.cache` (HF or peft).
        input_ids: (b, p) LEFT-padded prompts.
        attention_mask: (b, p) 1 on real prompt tokens.
        spec: the sampling settings.
        eos_token_id: one id or several that end a row (None: only stop strings / max_new_tokens end rows).
        pad_token_id: written after a row has finished.
        generator: torch.Generator on the model's device; the same seed gives identical sequences.
        tokenizer: needed only for `spec.stop_strings`.

    Returns:
        A `Rollout` with b * num_samples rows. Dropout is off while sampling; `model.training` is restored.
    """
    if spec.stop_strings and tokenizer is None:
        raise ValueError("SamplingSpec.stop_strings needs a tokenizer")
    was_training = model.training
    model.eval()
    try:
        # no_grad rather than inference_mode: the returned tensors (and any buffers a model fills lazily)
        # must stay usable in later autograd forwards (PPO scores these sequences with gradients)
        with torch.no_grad():
            return _generate(
                model, input_ids, attention_mask, spec, eos_token_id, pad_token_id, generator, tokenizer
            )
    finally:
        model.train(was_training)


def _generate(
    model, input_ids, attention_mask, spec, eos_token_id, pad_token_id, generator, tokenizer
) -> Rollout:
    device = input_ids.device
    n, max_new = spec.num_samples, spec.max_new_tokens
    if n > 1:
        input_ids = input_ids.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)
    rows, p = input_ids.shape
    if eos_token_id is None:
        eos_token_id = []
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)

    # one model-facing mask for the whole run, sliced each step: finished rows keep attending (their
    # tokens are discarded), so no row is ever fully masked
    full_mask = torch.ones(rows, p + max_new, dtype=attention_mask.dtype, device=device)
    full_mask[:, :p] = attention_mask
    position_ids = positions_from_mask(attention_mask)  # (b*n, p)
    next_pos = attention_mask.long().sum(-1, keepdim=True)  # (b*n, 1) position of the first response token

    # (b*n, max_new) response tokens; (b*n,) step each row finished at (max_new = never)
    response = torch.full((rows, max_new), pad_token_id, dtype=input_ids.dtype, device=device)
    end = torch.full((rows,), max_new, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    stops = list(spec.stop_strings)
    window = max((len(s.encode()) for s in stops), default=0) + 8  # tokens to decode; each is >= 1 byte

    r = 0
    if max_new > 0:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
        )
    for t in range(max_new):
        token = sample_next(out.logits[:, -1], spec, generator)  # (b*n,)
        token = torch.where(finished, pad_token_id, token)
        response[:, t] = token
        newly = ~finished & torch.isin(token, eos)
        end = torch.where(newly, t, end)
        finished = finished | newly
        if stops:
            running = (~finished).nonzero().flatten().tolist()
            if running:
                texts = tokenizer.batch_decode(
                    response[running, max(0, t + 1 - window) : t + 1].tolist(), skip_special_tokens=True
                )
                hit = [i for i, text in zip(running, texts) if any(s in text for s in stops)]
                if hit:
                    hit = torch.tensor(hit, device=device)
                    end[hit] = t
                    finished[hit] = True
        r = t + 1
        if r == max_new or bool(finished.all()):  # one host sync per step buys the early exit
            break
        out = model(
            input_ids=token[:, None],
            attention_mask=full_mask[:, : p + r],
            position_ids=next_pos + t,
            cache=out.cache,  # transformers 5 name; `past_key_values` is deprecated
            use_cache=True,
            logits_to_keep=1,
        )

    response = response[:, :r]
    response_mask = torch.arange(r, device=device)[None, :] <= end[:, None]  # (b*n, r) through EOS/stop
    return Rollout(
        sequences=torch.cat([input_ids, response], dim=1),
        attention_mask=torch.cat([attention_mask, response_mask.to(attention_mask.dtype)], dim=1),
        response_mask=response_mask.to(attention_mask.dtype),
        prompt_length=p,
        has_eos=end < max_new,
    )


def decode_responses(tokenizer, rollout: Rollout, eos_token_id: int | list[int] | None = None) -> list[str]:
    """Response text per row: tokens under response_mask, special tokens (and `eos_token_id`) removed.

    Decoded after the prompt's last token and cut at its text, so the text is what follows the prompt: a
    SentencePiece tokenizer (Llama, Mistral) drops the leading space of a first token decoded alone ("▁f" -> "f"),
    and prompt + response would then be scored (and trained) glued together ("Answer:f" for "Answer: f")."""
    drop = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    p = rollout.prompt_length
    responses = rollout.sequences[:, p:].tolist()
    masks = rollout.response_mask.tolist()
    ids = [[tok for tok, keep in zip(row, m) if keep and tok not in drop] for row, m in zip(responses, masks)]
    last = rollout.sequences[:, p - 1].tolist() if p else [None] * len(ids)
    real = rollout.attention_mask[:, p - 1].tolist() if p else [0] * len(ids)
    contexts = [[t] if ok and t not in drop else [] for t, ok in zip(last, real)]
    plain = tokenizer.batch_decode(ids, skip_special_tokens=True)
    heads = tokenizer.batch_decode(contexts, skip_special_tokens=True)
    joined = tokenizer.batch_decode([c + r for c, r in zip(contexts, ids)], skip_special_tokens=True)
    # the context's text must prefix the joined text; else (bytes split across the seam) the plain decode
    return [j[len(h):] if j.startswith(h) else t for j, h, t in zip(joined, heads, plain)]


def prompt_batch(
    tokenizer, prompts: list[str], max_prompt_length: int | None = None
) -> tuple[Tensor, Tensor]:
    """Tokenize prompts LEFT-padded (and left-truncated to max_prompt_length): -> input_ids, attention_mask (b, p).

    Adds only what `tokenizer(...)` adds by default (e.g. BOS); the tokenizer needs a pad token.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "prompt_batch needs tokenizer.pad_token (set it to the EOS token if the model has none)"
        )
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    try:
        enc = tokenizer(
            prompts,
            padding=True,
            truncation=max_prompt_length is not None,
            max_length=max_prompt_length,
            return_tensors="pt",
        )
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    return enc["input_ids"], enc["attention_mask"]
