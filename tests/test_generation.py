"""Sampling: determinism, EOS/stop masking, KV cache and left padding against a no-cache loop."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from core.generation import Rollout, SamplingSpec, decode_responses, generate, prompt_batch, sample_next

PAD, EOS = 0, 1


def tiny_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        initializer_range=0.3,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama()


class ChainLM(torch.nn.Module):
    """Fake LM: the next token is table[last input token] (one-hot logits); counts its forward calls."""

    def __init__(self, table: dict[int, int], vocab: int):
        super().__init__()
        self.table = torch.full((vocab,), 7, dtype=torch.long)  # unlisted tokens (e.g. PAD) lead to 7
        for src, dst in table.items():
            self.table[src] = dst
        self.vocab, self.calls = vocab, 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, **kwargs):
        self.calls += 1
        logits = 10.0 * F.one_hot(self.table[input_ids[:, -1]], self.vocab).float()[:, None]  # (b, 1, v)
        return SimpleNamespace(logits=logits, cache=cache)


def word_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "<eos>", "<unk>", "a", "b", "c", "d", "e", "f", "g", "h"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def naive_greedy(model, input_ids, attention_mask, steps: int) -> torch.Tensor:
    """Greedy decoding that recomputes the full forward every step (no cache)."""
    seq, mask = input_ids, attention_mask
    with torch.no_grad():
        for _ in range(steps):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=seq, attention_mask=mask, position_ids=pos).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return seq[:, input_ids.size(1) :]


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    p = max(len(x) for x in prompts)
    ids = torch.tensor([[PAD] * (p - len(x)) + x for x in prompts])
    mask = torch.tensor([[0] * (p - len(x)) + [1] * len(x) for x in prompts])
    return ids, mask


def test_same_seed_same_sequences_different_seed_different(llama):
    ids, mask = left_pad([[5, 6, 7], [8, 9], [10], [11, 12, 13]])
    spec = SamplingSpec(max_new_tokens=24, temperature=1.0, top_k=20, top_p=0.95)

    def run(seed: int) -> torch.Tensor:
        return generate(llama, ids, mask, spec, EOS, PAD, torch.Generator().manual_seed(seed)).sequences

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_eos_masks_and_pads_after_first_eos():
    # row 0: 3 -> 4 -> EOS; row 1: 5 <-> 6 never ends; row 2: 8 -> EOS at once; row 3: 10 -> 9 (second EOS id)
    model = ChainLM({3: 4, 4: EOS, 5: 6, 6: 5, 8: EOS, 10: 9, 9: 10}, vocab=16)
    ids, mask = left_pad([[2, 3], [5, 5, 5], [8], [10]])
    out = generate(model, ids, mask, SamplingSpec(max_new_tokens=5, temperature=0), [EOS, 9], PAD)
    assert isinstance(out, Rollout) and out.prompt_length == 3
    response = out.sequences[:, 3:]
    # after EOS the model would emit 7 (table[PAD]); those tokens must come back as PAD
    assert response.tolist() == [
        [4, EOS, PAD, PAD, PAD],
        [6, 5, 6, 5, 6],
        [EOS, PAD, PAD, PAD, PAD],
        [9, PAD, PAD, PAD, PAD],
    ]
    assert out.response_mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert out.has_eos.tolist() == [True, False, True, True]
    assert torch.equal(out.attention_mask, torch.cat([mask, out.response_mask], dim=1))
    assert torch.equal(out.sequences[:, :3], ids)


def test_greedy_left_padded_batch_equals_each_prompt_alone(llama):
    short, long = [5, 17, 33], [40, 2, 9, 21, 60, 11]
    spec = SamplingSpec(max_new_tokens=10, temperature=0)
    ids, mask = left_pad([short, long])
    batched = generate(llama, ids, mask, spec, [], PAD).sequences[:, ids.size(1) :]
    for row, prompt in enumerate([short, long]):
        alone_ids = torch.tensor([prompt])
        alone = generate(llama, alone_ids, torch.ones_like(alone_ids), spec, [], PAD).sequences[
            :, len(prompt) :
        ]
        assert torch.equal(batched[row], alone[0])


def test_greedy_with_cache_equals_naive_loop_without_cache(llama):
    ids, mask = left_pad([[3, 14, 15, 9, 26], [53, 5]])
    out = generate(llama, ids, mask, SamplingSpec(max_new_tokens=6, temperature=0), [], PAD)
    assert torch.equal(out.sequences[:, ids.size(1) :], naive_greedy(llama, ids, mask, steps=6))


def test_num_samples_repeats_each_prompt_consecutively(llama):
    ids, mask = left_pad([[5, 6, 7], [8, 9]])
    sampled = generate(
        llama,
        ids,
        mask,
        SamplingSpec(max_new_tokens=4, num_samples=3),
        [],
        PAD,
        torch.Generator().manual_seed(0),
    )
    assert sampled.sequences.shape == (6, 3 + 4)
    assert torch.equal(sampled.sequences[:, :3], ids.repeat_interleave(3, dim=0))
    assert torch.equal(sampled.attention_mask[:, :3], mask.repeat_interleave(3, dim=0))
    greedy1 = generate(llama, ids, mask, SamplingSpec(max_new_tokens=4, temperature=0), [], PAD).sequences
    greedy3 = generate(
        llama, ids, mask, SamplingSpec(max_new_tokens=4, temperature=0, num_samples=3), [], PAD
    ).sequences
    assert torch.equal(greedy3, greedy1.repeat_interleave(3, dim=0))


def test_top_k_one_and_tiny_top_p_equal_greedy(llama):
    ids, mask = left_pad([[5, 6, 7], [8, 9], [30]])
    greedy = generate(llama, ids, mask, SamplingSpec(max_new_tokens=8, temperature=0), [], PAD).sequences
    for spec in (
        SamplingSpec(max_new_tokens=8, temperature=0.7, top_k=1),
        SamplingSpec(max_new_tokens=8, top_p=1e-6),
    ):
        sampled = generate(llama, ids, mask, spec, [], PAD, torch.Generator().manual_seed(3)).sequences
        assert torch.equal(sampled, greedy)


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(200, 1)  # (200, 4)
    gen = torch.Generator().manual_seed(0)
    # top_p 0.5: mass before token 1 is 0.5 >= 0.5, so only token 0 survives
    assert set(sample_next(logits, SamplingSpec(top_p=0.5), gen).tolist()) == {0}
    # top_p 0.7: mass before tokens 0, 1 is 0, 0.5 < 0.7; before token 2 it is 0.8 -> {0, 1}
    assert set(sample_next(logits, SamplingSpec(top_p=0.7), gen).tolist()) == {0, 1}
    assert set(sample_next(logits, SamplingSpec(top_k=3), gen).tolist()) == {0, 1, 2}


def test_training_mode_restored_and_dropout_off_while_sampling():
    model = tiny_llama(attention_dropout=0.5).train()
    seen = []
    model.register_forward_pre_hook(
        lambda module, args: seen.append(any(m.training for m in module.modules()))
    )
    ids, mask = left_pad([[5, 6, 7], [8, 9]])
    spec = SamplingSpec(max_new_tokens=5, temperature=0)
    out_train = generate(model, ids, mask, spec, [], PAD).sequences
    assert model.training and all(m.training for m in model.modules())
    assert seen and not any(seen)
    model.eval()
    assert torch.equal(out_train, generate(model, ids, mask, spec, [], PAD).sequences)
    assert not model.training

    class Boom(ChainLM):
        def forward(self, *args, **kwargs):
            raise RuntimeError("boom")

    boom = Boom({}, vocab=8).train()
    with pytest.raises(RuntimeError, match="boom"):
        generate(boom, ids, mask, spec, EOS, PAD)
    assert boom.training


def test_stop_string_finishes_the_row():
    tok = word_tokenizer()
    v = tok.vocab
    # "a" -> b c d e <eos>; "f" -> g h f g h ... (never stops)
    model = ChainLM(
        {
            v["a"]: v["b"],
            v["b"]: v["c"],
            v["c"]: v["d"],
            v["d"]: v["e"],
            v["e"]: EOS,
            v["f"]: v["g"],
            v["g"]: v["h"],
            v["h"]: v["f"],
        },
        vocab=len(v),
    )
    ids, mask = prompt_batch(tok, ["a", "f"])
    spec = SamplingSpec(max_new_tokens=6, temperature=0, stop_strings=["c d"])  # spans two tokens
    out = generate(model, ids, mask, spec, tok.eos_token_id, tok.pad_token_id, tokenizer=tok)
    assert out.response_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert out.sequences[0, 1:].tolist() == [v["b"], v["c"], v["d"], PAD, PAD, PAD]
    assert out.has_eos.tolist() == [True, False]
    assert decode_responses(tok, out) == [" b c d", " g h f g h f"]  # as it follows the prompt "a" / "f"
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, ids, mask, spec, tok.eos_token_id, tok.pad_token_id)


def test_stops_early_when_every_row_has_finished():
    model = ChainLM({3: 4, 4: EOS, 8: EOS}, vocab=16)
    ids, mask = left_pad([[2, 3], [8]])
    out = generate(model, ids, mask, SamplingSpec(max_new_tokens=20, temperature=0), EOS, PAD)
    assert out.sequences.shape == (2, 2 + 2)  # r = 2: the last row ended at its second token
    assert out.response_mask.tolist() == [[1, 1], [1, 0]]
    assert model.calls == 2  # prefill + one decoding step, nothing after the last EOS


def test_prompt_batch_pads_and_truncates_on_the_left_and_decode_drops_eos():
    tok = word_tokenizer()
    v = tok.vocab
    ids, mask = prompt_batch(tok, ["a b c d", "e"], max_prompt_length=3)
    assert ids.tolist() == [[v["b"], v["c"], v["d"]], [PAD, PAD, v["e"]]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert (tok.padding_side, tok.truncation_side) == ("right", "right")  # restored
    rollout = Rollout(
        sequences=torch.tensor([[v["a"], v["b"], EOS, PAD], [v["c"], v["d"], v["e"], v["f"]]]),
        attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        response_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]),
        prompt_length=1,
        has_eos=torch.tensor([True, False]),
    )
    assert decode_responses(tok, rollout) == [" b", " d e f"]  # the text after the prompt: a space apart


def test_a_sentencepiece_reply_is_decoded_as_it_follows_its_prompt():
    """Metaspace (Llama, Mistral): a first token "▁f" decoded alone loses its space; decoded after the prompt's
    last token it keeps it, so prompt + text re-tokenizes to the sampled tokens (what a reward model scores)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in ["▁Answer", ":", "▁f", "▁g", "f", "g", "▁"]:
        vocab[word] = len(vocab)
    raw = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix=""))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>")
    prompt = tok("Answer:", add_special_tokens=False)["input_ids"]
    sampled = tok("Answer: f g", add_special_tokens=False)["input_ids"][len(prompt):]
    assert tok.convert_ids_to_tokens(sampled) == ["▁f", "▁g"]
    assert tok.decode(sampled) == "f g"  # alone: the space is gone
    rollout = Rollout(sequences=torch.tensor([prompt + sampled + [2]]), attention_mask=torch.ones(1, 5),
                      response_mask=torch.tensor([[1, 1, 1]]), prompt_length=2, has_eos=torch.tensor([True]))
    (text,) = decode_responses(tok, rollout, 2)
    assert text == " f g" and tok("Answer:" + text, add_special_tokens=False)["input_ids"] == prompt + sampled
