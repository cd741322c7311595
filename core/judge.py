"""JudgeSpec: a causal LM asked which of two responses is better (AI feedback: RLAIF, Lee et al. 2023,
arXiv 2309.00267; Constitutional AI's feedback model, Bai et al. 2022, arXiv 2212.08073).

The judge reads a question (the template filled with the prompt, the two responses and, with a constitution, one
principle's comparison text) and the probability of each option is the softmax over the two option tokens' logits
at the answer position. Every pair is asked in both orders: p1 = P(A) with a shown as A, p2 = P(B) with a shown as
B; P(a beats b) = (p1 + p2) / 2, which cancels the judge's preference for a position (RLAIF section 2.1: small
models prefer the first answer far more often than they should).

With a chat template the question is the user turn and the answer is read where the assistant turn starts (after
`answer_prefix`, if any); without one the plain text (template + answer_prefix) is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from core.constitution import ConstitutionError, Principle, load_constitution
from core.models import ModelSpec, as_spec, load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)
FIELDS = ("prompt", "a", "b", "principle")
PLACEHOLDER = re.compile(r"\{(prompt|a|b|principle)\}")


def default_template(options: list[str], principle: bool) -> str:
    """The built-in question: a plain preference question, or (principle=True) one that asks the principle's
    comparison question."""
    a, b = options
    question = "{principle}" if principle else "Which answer is better: more helpful, correct and honest?"
    return (f"Here is a conversation and two possible answers from the assistant.\n\n"
            f"Conversation:\n{{prompt}}\n\nAnswer ({a}):\n{{a}}\n\nAnswer ({b}):\n{{b}}\n\n"
            f"{question} Reply with {a} or {b} only.")


def fill(template: str, **values: str) -> str:
    """One pass over the template's {prompt}, {a}, {b}, {principle}: text put in is never read again (a response
    holding "{b}" stays as written), other braces stay literal."""
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def check_template(template: str, principle: bool, where: str = "template") -> None:
    """{prompt}, {a}, {b} each exactly once, and {principle} exactly when a constitution is used."""
    need = ["prompt", "a", "b"] + (["principle"] if principle else [])
    found = PLACEHOLDER.findall(template)
    for name in need:
        if found.count(name) != 1:
            raise ValueError(f"{where}: needs {{{name}}} exactly once, found it {found.count(name)} times in "
                             f"{template!r}")
    if not principle and "principle" in found:
        raise ValueError(f"{where}: has {{principle}} but no constitution is given to fill it")


def read_constitution(path: str | Path) -> tuple[list[Principle], str | None]:
    """The judge's view of a constitution file (read and checked by core.constitution, the one reader): its
    principles, each of which must hold a `comparison` question, and its judge_template or None."""
    constitution = load_constitution(path)
    missing = [p.name for p in constitution.principles if not p.comparison]
    if missing:
        raise ConstitutionError(f"{constitution.path}: the AI judge asks each principle's `comparison` question; "
                                f"principles {missing} have none")
    return list(constitution.principles), constitution.judge_template


def pick_principle(count: int, seed: int, prompt: str, a: str, b: str) -> int:
    """Index of the principle for one comparison: a seeded draw keyed on (seed, prompt, {a, b}), so the same
    pair gets the same principle in both orders, in any batch, in every run."""
    key = json.dumps([seed, prompt, sorted([a, b])])
    digest = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16)
    return random.Random(digest).randrange(count)


class Preference(NamedTuple):
    """prob: P(a beats b) = (p1 + p2) / 2 (n,); p1: P(a) with a shown first (option A) (n,); p2: P(a) with a
    shown second (option B) (n,)."""

    prob: torch.Tensor
    p1: torch.Tensor
    p2: torch.Tensor


def both_orders(first: torch.Tensor, second: torch.Tensor) -> Preference:
    """Option logits of the two orders -> Preference. first: (n, 2) logits of (A, B) with a as A;
    second: (n, 2) logits of (A, B) with b as A, a as B. p1 = softmax(first)[:, 0]; p2 = softmax(second)[:, 1]."""
    if first.shape != second.shape or first.dim() != 2 or first.shape[1] != 2:
        raise ValueError(f"need two (n, 2) option-logit tensors, got {tuple(first.shape)}, {tuple(second.shape)}")
    p1 = first.double().softmax(-1)[:, 0]
    p2 = second.double().softmax(-1)[:, 1]
    return Preference((p1 + p2) / 2, p1, p2)


def position_bias(pref: Preference) -> float:
    """Mean probability the judge gives the option shown first, over both orders: P(A) is p1 in the first order
    and 1 - p2 in the second. 0.5 = no preference for a position; 1 = always the first."""
    if pref.p1.numel() == 0:
        return float("nan")
    return float(((pref.p1 + (1 - pref.p2)) / 2).mean())


@dataclass
class JudgeSpec:
    """A frozen causal LM that compares two responses to a prompt.

    Args:
        model: the judge: a ModelSpec or the path of a causal LM (an instruction-tuned chat model reads the
            question best).
        template: the question, with {prompt}, {a}, {b} and, with a constitution, {principle}; None: the
            constitution's judge_template, else a built-in plain preference question.
        constitution: path of a constitution YAML (principles with a `comparison` question each, an optional
            judge_template); each comparison asks one principle, drawn by a seeded rng keyed on the pair.
        options: the two answer labels; each must be one token where the answer is read.
        answer_prefix: text the answer starts with (the assistant turn's opening, or appended to a plain
            question), after which the option token is read.
        seed: seed of the principle draw.
        batch_size: questions per forward pass.
        max_length: tokens per question; longer ones shorten the prompt (keeping its end) and the responses
            (keeping their starts) to fit. At most the model's max_position_embeddings (lowered to it at load).
    """

    model: ModelSpec | str
    template: str | None = None
    constitution: str | None = None
    options: list[str] = field(default_factory=lambda: ["A", "B"])
    answer_prefix: str = ""
    seed: int = 0
    batch_size: int = 8
    max_length: int = 1024

    def __post_init__(self):
        self.model = as_spec(self.model)
        self.options = list(self.options)
        if len(self.options) != 2 or len(set(self.options)) != 2 or not all(
                isinstance(o, str) and o.strip() for o in self.options):
            raise ValueError(f"options must be two different non-blank labels, got {self.options}")
        if self.batch_size < 1 or self.max_length < 16:
            raise ValueError(f"batch_size must be >= 1 and max_length >= 16, got {self.batch_size}, {self.max_length}")
        self.principles: list[Principle] = []
        template = self.template
        if self.constitution is not None:
            self.principles, constitution_template = read_constitution(self.constitution)
            template = template if template is not None else constitution_template
        uses_principle = bool(self.principles)
        if template is None:
            template = default_template(self.options, uses_principle)
        check_template(template, uses_principle, "template" if self.template is not None else
                       f"judge_template of {self.constitution}" if self.constitution else "template")
        self._template = template
        self._loaded = None  # (model, tokenizer, option ids, chat)

    # ---- loading ----

    def load(self, device: str | torch.device = "cpu") -> JudgeSpec:
        """Load the judge frozen onto device and find the option tokens; a second call does nothing."""
        if self._loaded is not None:
            return self
        tok = load_tokenizer(self.model, padding_side="left")
        chat = bool(getattr(tok, "chat_template", None))
        ids = self.option_ids(tok, chat)
        model = load_causal_lm(self.model, device, trainable=False)
        if self.model.quantization == "none":
            model = model.to(device)
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(positions, int) and self.max_length > positions:
            log.warning("judge: max_length %d is more than %s reads (max_position_embeddings %d): questions are "
                        "shortened to %d tokens", self.max_length, self.model.path, positions, positions)
            self.max_length = positions
        self._loaded = (model, tok, ids, chat)
        return self

    def render(self, tok, question: str, chat: bool) -> str:
        """The text the judge reads, up to the answer position."""
        if chat:
            return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True) + self.answer_prefix
        return question + self.answer_prefix

    def option_ids(self, tok, chat: bool) -> list[int]:
        """The token id of each option where the answer is read: its form "A" or " A" (the one that fits the
        text before it first) must add exactly one token to that text. Else ValueError."""
        context = self.render(tok, fill(self._template, prompt="p", a="x", b="y", principle="q"), chat)
        base = encode(tok, context)
        forms = (" {}", "{}") if context and not context[-1].isspace() else ("{}", " {}")
        ids = []
        for option in self.options:
            for form in forms:
                full = encode(tok, context + form.format(option))
                if len(full) == len(base) + 1 and full[: len(base)] == base:
                    ids.append(full[-1])
                    break
            else:
                raise ValueError(f"judge option {option!r} is not one token after {context[-40:]!r} for the "
                                 f"tokenizer of {self.model.path} (tried {option!r} and ' {option}'): choose other "
                                 "options (e.g. A and B) or another answer_prefix")
        if ids[0] == ids[1]:
            raise ValueError(f"judge options {self.options} are the same token {ids[0]}")
        return ids

    # ---- asking ----

    def questions(self, prompts: list[str], first: list[str], second: list[str], tok) -> list[str]:
        """The filled templates, shortened to max_length tokens with the template itself (the principle draw
        is keyed on the unordered pair, so both orders ask the same principle)."""
        out = []
        for prompt, x, y in zip(prompts, first, second):
            principle = (self.principles[pick_principle(len(self.principles), self.seed, prompt, x, y)].comparison
                         if self.principles else "")
            out.append(self._fit(tok, prompt.strip(), x.strip(), y.strip(), principle))
        return out

    def _fit(self, tok, prompt: str, a: str, b: str, principle: str) -> str:
        fixed = len(encode(tok, self.render(tok, fill(self._template, prompt="", a="", b="",
                                                      principle=principle), self._loaded[3])))
        budget = self.max_length - fixed - 4  # a few tokens of slack for merges at the seams
        parts = [tok(t, add_special_tokens=False)["input_ids"] for t in (prompt, a, b)]  # no BOS inside a question
        if sum(map(len, parts)) > budget:
            cap = water_level([len(p) for p in parts], max(budget, 3))
            prompt = tok.decode(parts[0][len(parts[0]) - min(cap, len(parts[0])):])  # the prompt's end
            a, b = (tok.decode(p[:cap]) for p in parts[1:])  # the responses' starts
        return fill(self._template, prompt=prompt, a=a, b=b, principle=principle)

    @torch.no_grad()
    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> Preference:
        """Each pair in both orders -> Preference (probabilities, float64, on the CPU)."""
        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"{len(prompts)} prompts, {len(a)} and {len(b)} responses")
        if self._loaded is None:
            raise RuntimeError("JudgeSpec.compare before load(device)")
        model, tok, ids, chat = self._loaded
        texts = [self.render(tok, q, chat) for q in self.questions(prompts, a, b, tok) + self.questions(prompts, b, a,
                                                                                                          tok)]
        logits = self.option_logits(model, tok, texts, ids)  # (2n, 2)
        n = len(prompts)
        return both_orders(logits[:n], logits[n:])

    def prefer(self, prompts: list[str], a: list[str], b: list[str]) -> torch.Tensor:
        """P(a is the better response) per pair, both orders averaged: (n,) float64."""
        return self.compare(prompts, a, b).prob

    def option_logits(self, model, tok, texts: list[str], ids: list[int]) -> torch.Tensor:
        """The two option tokens' logits at each text's last position: (len(texts), 2), left-padded batches."""
        device = next(model.parameters()).device
        encoded = [encode(tok, t)[-self.max_length :] for t in texts]
        if any(len(encode(tok, t)) > self.max_length for t in texts):
            log.warning("judge: a question is longer than max_length after shortening; its start is cut")
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths batch together
        out = torch.empty(len(texts), 2)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.tensor([[tok.pad_token_id] * (width - len(encoded[i])) + encoded[i] for i in rows],
                                     device=device)
            mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in rows],
                                device=device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row starts at position 0
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                           logits_to_keep=1).logits[:, -1]  # (rows, vocab): the answer position
            out[torch.tensor(rows)] = logits[:, ids].float().cpu()
        return out


def encode(tok, text: str) -> list[int]:
    """Token ids as the judge reads text: special tokens added unless the text starts with BOS (a chat template
    may have written it)."""
    bos = tok.bos_token
    return tok(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def water_level(lengths: list[int], budget: int) -> int:
    """The largest cap c with sum(min(l, c)) <= budget: long parts are cut to c, short ones kept whole."""
    low, high = 0, max(lengths)
    while low < high:
        mid = (low + high + 1) // 2
        if sum(min(x, mid) for x in lengths) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def as_judge_spec(value: JudgeSpec | dict | str) -> JudgeSpec:
    """A JudgeSpec from itself, a dict of its fields, a model folder, a YAML file or YAML/JSON text."""
    import yaml

    if isinstance(value, JudgeSpec):
        return value
    if isinstance(value, str):
        path = Path(value).expanduser()
        if path.is_dir():
            return JudgeSpec(model=value)
        try:
            value = yaml.safe_load(path.read_text() if path.is_file() else value)
        except yaml.YAMLError as err:
            raise ValueError(f"judge spec: not YAML/JSON text, a file or a model folder: {' '.join(str(err).split())}"
                             ) from err
    if not isinstance(value, dict):
        raise ValueError(f"judge spec: expected a mapping such as '{{model: runs/sft}}', got {value!r}")
    try:
        return JudgeSpec(**value)
    except TypeError as err:
        raise ValueError(f"judge spec: {err}") from err
