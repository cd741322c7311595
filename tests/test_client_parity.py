"""What we save works the same in the tools users already run (issue 18): a saved reward model scores as RewardSpec
does through AutoModelForSequenceClassification, a text-classification pipeline and TRL's call (left and right
padding, batch 1 and 4, a tokenizer whose pad was EOS, chat text ending in an end-of-turn token); a saved policy
generates greedily through a text-generation pipeline what `rlhf generate` does; an unmerged LoRA adapter loads with
PeftModel and AutoPeftModelForCausalLM from another folder; chat data round-trips through the saved chat template;
an old reward model (no score_at in its marker) still scores on text + EOS and warns.

The models are trained here by the recipes (a few steps on the committed tiny Llama), once for the module."""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch

from core.batches import PaddedRows
from core.forward import sequence_scores
from core.models import PAD_TOKEN, ModelSpec, load_saved_causal_lm, load_tokenizer
from core.outputs import MARKER
from core.reward_spec import SCORE_AT, RewardSpec
from core.tokenize import encode_completions, render_prompt
from tests.conftest import ROOT, SYNTHETIC, TINY_MODEL

pytestmark = pytest.mark.slow  # the module's fixture trains four models (~45 s on 2 cores)

# turns end with EOS, as in ChatML-style templates whose end-of-turn token is the EOS
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PROMPTS = ["Reverse: a b c\nAnswer:", "Reverse: h a g f\nAnswer:", "Reverse: e\nAnswer:", "Reverse: c a c g g\nAnswer:"]
RESPONSES = [" c b a", " f g a h g h", " e", " g"]


def chat_base(out):
    """The tiny model with no pad token of its own (so pad == EOS) and a chat template whose turns end in EOS."""
    shutil.copytree(TINY_MODEL, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("pad_token")
    config["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def fit(stage: str, root, name: str, *args: str):
    """`rlhf <stage> fit` in-process from the repository root, its outputs under root/name."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.setattr(sys, "argv", [f"rlhf {stage}"])
        from recipes.cli import STAGES

        importlib.import_module(STAGES[stage]).main([
            "fit", "--config", f"configs/{stage}/tiny.yaml", "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={root / (name + '.run')}",
            f"--trainer.logger.init_args.save_dir={root / (name + '.run')}", f"--model.save_dir={root / name}", *args])
    return root / name


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    base = chat_base(root / "chat-base")
    for split in ("train", "val"):  # the synthetic pairs with chat-message prompts
        rows = [json.loads(line) for line in (SYNTHETIC / f"pairs_{split}.jsonl").read_text().splitlines()]
        with (root / f"chat_{split}.jsonl").open("w") as f:
            for r in rows:
                f.write(json.dumps({**r, "prompt": [{"role": "user", "content": r["prompt"]}]}) + "\n")
    return SimpleNamespace(
        base=base,
        rm=fit("reward", root, "rm"),
        rm_chat=fit("reward", root, "rm_chat", f"--model.backbone.path={base}",
                    f"--data.train_file={root / 'chat_train.jsonl'}", f"--data.val_file={root / 'chat_val.jsonl'}"),
        policy=fit("sft", root, "policy", "--trainer.max_steps=60"),  # ~10 s: writes more than EOS
        adapter=fit("sft", root, "adapter", "--model.policy.lora.r=2", "--model.merge_lora=false"),
    )


def texts_of(saved, name: str) -> tuple[list[str], list[str]]:
    """(prompts, responses) the clients see: plain text, or (rm_chat) a chat-rendered prompt and a reply that ends
    the assistant's turn with the template's end-of-turn token (the EOS), as TRL's conversational texts do."""
    if name == "rm":
        return PROMPTS, RESPONSES
    tok = load_tokenizer(str(saved.rm_chat))
    prompts = [render_prompt([{"role": "user", "content": p}], tok) for p in PROMPTS]
    return prompts, [r + tok.eos_token for r in RESPONSES]


def ours(path, prompts, responses) -> torch.Tensor:
    return RewardSpec(models=[ModelSpec(path=str(path))], batch_size=3).load("cpu").score(prompts, responses)


def test_reward_exports_are_marked_and_get_a_pad_no_text_ends_with(saved):
    from transformers import AutoConfig, AutoTokenizer

    for path in (saved.rm, saved.rm_chat):
        marker = json.loads((path / MARKER).read_text())
        assert marker["stage"] == "reward" and marker["score_at"] == SCORE_AT
    tok, config = AutoTokenizer.from_pretrained(saved.rm), AutoConfig.from_pretrained(saved.rm)
    assert tok.pad_token == "<pad>" and config.pad_token_id == tok.pad_token_id  # already distinct: kept
    tok, config = AutoTokenizer.from_pretrained(saved.rm_chat), AutoConfig.from_pretrained(saved.rm_chat)
    assert load_tokenizer(str(saved.base)).pad_token_id == tok.eos_token_id  # the base's pad was EOS
    assert tok.pad_token == PAD_TOKEN and config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert config.vocab_size == len(tok) == len(load_tokenizer(str(saved.base))) + 1
    assert tok.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("name", ["rm", "rm_chat"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("batch", [1, 4])
def test_auto_model_and_pipeline_score_as_reward_spec(saved, name, side, batch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    path = getattr(saved, name)
    prompts, responses = texts_of(saved, name)
    expected = ours(path, prompts, responses)
    texts = [p + r for p, r in zip(prompts, responses)]
    tok = AutoTokenizer.from_pretrained(path, padding_side=side)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    got = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            inputs = tok(texts[i : i + batch], padding=True, return_tensors="pt")
            got.append(model(**inputs).logits[:, 0])
    torch.testing.assert_close(torch.cat(got), expected, rtol=0, atol=1e-4)
    pipe = pipeline("text-classification", model=str(path), function_to_apply="none", batch_size=batch)
    pipe.tokenizer.padding_side = side
    scores = [out["score"] for out in pipe(texts)]
    torch.testing.assert_close(torch.tensor(scores), expected, rtol=0, atol=1e-4)
    assert expected.std() > 1e-3  # the texts score apart: a wrong pooling position would show


@pytest.mark.parametrize("name", ["rm", "rm_chat"])
def test_trl_grpo_call_scores_as_reward_spec(saved, name):
    """GRPOTrainer 1.16's reward-model call (trl/trainer/grpo_trainer.py, _calculate_rewards), done here without
    TRL; benchmarks/trl_reward_client.py runs TRL itself."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = getattr(saved, name)
    prompts, responses = texts_of(saved, name)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path)
    model.config.pad_token_id = tok.pad_token_id  # what TRL sets
    inputs = tok(text=[p + c for p, c in zip(prompts, responses)], return_tensors="pt", padding=True,
                 padding_side="right", add_special_tokens=False)
    with torch.no_grad():
        theirs = model(**inputs).logits[:, 0]
    torch.testing.assert_close(theirs, ours(path, prompts, responses), rtol=0, atol=1e-4)


def test_reward_rows_are_the_text_the_clients_tokenize(saved):
    """Training rows: prompt + response tokens as the saved tokenizer writes the whole text, no EOS appended; chat
    prompts render the same through the saved chat template as through the base's."""
    from datamodules.preference import PreferenceDataModule
    from modules.reward import RewardModule

    tok, base_tok = load_tokenizer(str(saved.rm_chat)), load_tokenizer(str(saved.base))
    messages = [{"role": "user", "content": PROMPTS[0]}]
    assert render_prompt(messages, tok) == render_prompt(messages, base_tok) == f"<|user|>{PROMPTS[0]}</s><|assistant|>"
    prompt = render_prompt(messages, tok)
    ((p, c),) = encode_completions(tok, [prompt], [RESPONSES[0]], ["x:1"], 64, 32, eos=False)
    assert p + c == tok(prompt + RESPONSES[0])["input_ids"] and c[-1] != tok.eos_token_id
    ((_, c_eos),) = encode_completions(tok, [prompt], [RESPONSES[0]], ["x:1"], 64, 32)
    assert c_eos == c + [tok.eos_token_id]  # SFT and DPO keep their EOS
    dm = PreferenceDataModule(str(SYNTHETIC / "pairs_train.jsonl"), str(SYNTHETIC / "pairs_val.jsonl"),
                              tokenizer=str(TINY_MODEL), max_length=64, max_prompt_length=32)
    dm.trainer = SimpleNamespace(lightning_module=RewardModule(ModelSpec(path=str(TINY_MODEL))))
    dm.setup("fit")
    chosen = dm.train_rows[0][0]
    eos = load_tokenizer(str(TINY_MODEL)).eos_token_id
    assert chosen[1][-1] != eos and not any(r[0][1][-1] == eos or r[1][1][-1] == eos for r in dm.train_rows)


def test_text_generation_pipeline_greedy_equals_rlhf_generate(saved, tmp_path):
    from transformers import pipeline

    from recipes import generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "samples.jsonl"
    generate.main(["--model", str(saved.policy), "--prompts", str(prompts), "--out", str(out), "--temperature", "0",
                   "--max_new_tokens", "8", "--batch_size", "4", "--device", "cpu"])
    ours_ = [json.loads(line)["response"] for line in out.read_text().splitlines()]
    pipe = pipeline("text-generation", model=str(saved.policy))
    theirs = [o[0]["generated_text"] for o in pipe(PROMPTS, do_sample=False, max_new_tokens=8, return_full_text=False)]
    assert theirs == ours_ and len(set(ours_)) > 1


def test_unmerged_lora_adapter_loads_with_peft_from_another_folder(saved, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = saved.adapter
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    base_path = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    assert base_path == str(TINY_MODEL.resolve())  # the config said tests/fixtures/tiny-llama: resolved, absolute
    ids = AutoTokenizer.from_pretrained(adapter)([PROMPTS[0] + RESPONSES[0]], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = load_saved_causal_lm(adapter)(ids).logits
        monkeypatch.chdir(tmp_path)  # another working folder: nothing relative to the repository may be needed
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(adapter)).eval()
        auto = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
        base = AutoModelForCausalLM.from_pretrained(base_path)(ids).logits
        torch.testing.assert_close(peft_model(ids).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(auto(ids).logits, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(base, expected, atol=1e-4)  # the adapter was trained and is applied


def test_old_reward_model_still_scores_text_plus_eos_and_warns(saved, tmp_path, caplog):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from modules.reward import RewardModule

    old = tmp_path / "old-rm"
    shutil.copytree(saved.rm, old)
    marker = json.loads((old / MARKER).read_text())
    del marker["score_at"]  # as reward models were saved before issue 18
    (old / MARKER).write_text(json.dumps(marker))
    with caplog.at_level(logging.WARNING):
        got = ours(old, PROMPTS, RESPONSES)
    assert "older lightning-rlhf" in caplog.text and "retrain" in caplog.text
    tok, model = AutoTokenizer.from_pretrained(old), AutoModelForSequenceClassification.from_pretrained(old)
    ids = [x + [tok.eos_token_id] for x in tok([p + r for p, r in zip(PROMPTS, RESPONSES)])["input_ids"]]
    with torch.no_grad():  # as before: text + EOS, scored one row at a time
        before = torch.stack([sequence_scores(model, PaddedRows(torch.tensor([x]), torch.ones(1, len(x)).long()))[0]
                              for x in ids])
    torch.testing.assert_close(got, before, rtol=0, atol=1e-5)
    assert not torch.allclose(got, ours(saved.rm, PROMPTS, RESPONSES), atol=1e-3)  # text alone: other scores
    module = RewardModule(ModelSpec(path=str(old)))  # `rlhf reward validate` of it keeps its layout; fit retrains
    assert module.completion_eos("validate") and not module.completion_eos("fit")
    assert not RewardModule(ModelSpec(path=str(saved.rm))).completion_eos("validate")


def test_an_added_pad_with_an_unmerged_lora_reward_model_stops_fit_before_weights_load(saved):
    from core.models import LoraSpec
    from modules.reward import RewardModule

    module = RewardModule(ModelSpec(path=str(saved.base), lora=LoraSpec(r=2)), merge_lora=False)
    module._trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    with pytest.raises(ValueError, match="merge_lora true"):
        module.configure_model()
    assert module.backbone is None
