"""Module tier for the reward model: one step (full / LoRA), the score at the last real token, metrics,
Hugging Face save and reload, and RewardSpec (sum, Llama 2 rule, oracle, whitening)."""

import math

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from core.batches import PaddedRows, PairBatch
from core.forward import sequence_scores
from core.models import LoraSpec, ModelSpec, load_tokenizer, save_hf
from core.reward_spec import RewardSpec, as_reward_spec
from datamodules.preference import PreferenceDataModule, collate_pairs, collate_rankings
from modules.reward import RewardModule, group_accuracies
from tests.conftest import TINY_MODEL

PROMPT = "Reverse: a b c\nAnswer:"


def _module(tiny_model_dir, **spec):
    module = RewardModule(ModelSpec(path=str(tiny_model_dir), **spec))
    module.configure_model()
    return module


def _pairs(tok, n=4):
    """n (prompt, chosen, rejected) rows tokenized as the DataModule does: prompt ids + response ids + EOS."""
    def enc(response):
        p = tok(PROMPT)["input_ids"]
        return p, tok(PROMPT + response)["input_ids"][len(p) :] + [tok.eos_token_id]

    good, bad = [" c b a", " c b a a", " c", " c b"], [" a b c", " a", " b b a c", " a a a"]
    return collate_pairs([(enc(good[i]), enc(bad[i]), 0.0, i) for i in range(n)], tok.pad_token_id)


def _score_alone(module, ids, mask):
    """The score of one unpadded row."""
    return sequence_scores(module.backbone, PaddedRows(ids, mask))[0]


def _sgd_step(module, batch, lr=0.5):
    params = [p for p in module.parameters() if p.requires_grad]
    out = module._loss(batch, module(batch))
    out.loss.backward()
    torch.optim.SGD(params, lr=lr).step()
    return out


def test_one_fit_step_trains_head_and_backbone(tiny_model_dir, synthetic_dir, tmp_path):
    module = RewardModule(ModelSpec(path=str(tiny_model_dir)), save_dir=str(tmp_path / "hf"))
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    dm = PreferenceDataModule(str(synthetic_dir / "pairs_train.jsonl"), str(synthetic_dir / "pairs_val.jsonl"),
                              tokenizer=str(tiny_model_dir), max_length=48, max_prompt_length=32, batch_size=4)
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, dm)
    assert math.isfinite(trainer.callback_metrics["train/loss"])
    changed = {n for n, p in module.backbone.named_parameters() if not torch.equal(before[n], p)}
    assert "score.weight" in changed and changed == set(before)  # head and every backbone weight
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_lora_trains_adapters_and_score_head_only(tiny_model_dir):
    module = _module(tiny_model_dir, lora=LoraSpec(r=4, dropout=0.0))
    trainable = {n for n, p in module.backbone.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".score." in n for n in trainable)
    assert any(".score." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    out = _sgd_step(module, _pairs(module.tokenizer))
    assert torch.isfinite(out.loss)
    changed = {n for n, p in module.backbone.named_parameters() if not torch.equal(before[n], p)}
    assert {n for n in changed if "lora_B" in n or ".score." in n} and changed <= trainable
    # the trainable-only checkpoint keeps exactly the adapters and the head
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all("lora_" in k or ".score." in k for k in ckpt["state_dict"])


def test_score_read_at_last_real_token(tiny_model_dir):
    module = _module(tiny_model_dir)
    torch.nn.init.normal_(module.backbone.score.weight)  # a head that tells tokens apart
    batch = _pairs(module.tokenizer)
    ids, mask = batch.tokens.input_ids, batch.tokens.attention_mask
    with torch.no_grad():
        padded = module(batch)  # (8,), right padding
        alone = torch.stack([_score_alone(module, ids[i : i + 1, : n], mask[i : i + 1, : n])
                             for i, n in enumerate(mask.sum(1).tolist())])
        # Hugging Face's own pooling agrees here, where pad (0) != EOS (2)
        hf = module.backbone(input_ids=ids, attention_mask=mask).logits[:, 0]
        # left padding: same scores (positions restart at the first real token)
        left = torch.stack([torch.roll(r, int((m == 0).sum())) for r, m in zip(ids, mask)])
        left_mask = torch.stack([torch.roll(m, int((m == 0).sum())) for m in mask])
        left_scores = sequence_scores(module.backbone, PaddedRows(left, left_mask))
    assert mask.sum(1).unique().numel() > 1  # rows of different lengths, so padding is really there
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded, hf, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(left_scores, alone, rtol=1e-4, atol=1e-5)


def test_pad_equal_to_eos_still_scores_the_eos(tiny_model_dir):
    module = _module(tiny_model_dir)
    torch.nn.init.normal_(module.backbone.score.weight)
    eos = module.tokenizer.eos_token_id
    module.backbone.config.pad_token_id = eos
    batch = _pairs(module.tokenizer)
    ids, mask = batch.tokens.input_ids.clone(), batch.tokens.attention_mask
    ids[mask == 0] = eos  # padded with EOS: only the mask tells padding from the real EOS
    with torch.no_grad():
        ours = module(PaddedRows(ids, mask))
        alone = torch.stack([_score_alone(module, ids[i : i + 1, : n], mask[i : i + 1, : n])
                             for i, n in enumerate(mask.sum(1).tolist())])
        hf = module.backbone(input_ids=ids, attention_mask=mask).logits[:, 0]  # pools the token before EOS
    torch.testing.assert_close(ours, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, hf, atol=1e-3)


@pytest.mark.parametrize("lora", [False, True])
def test_saved_model_loads_as_sequence_classifier_with_same_scores(tiny_model_dir, tmp_path, lora):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    module = _module(tiny_model_dir, **({"lora": LoraSpec(r=4, dropout=0.0)} if lora else {}))
    _sgd_step(module, _pairs(module.tokenizer))
    _sgd_step(module, _pairs(module.tokenizer))  # twice: LoRA's B starts at 0, A moves on the second step
    module.backbone.eval()
    batch = _pairs(module.tokenizer)
    with torch.no_grad():
        ours = module(batch)
    save_hf(module.backbone, module.tokenizer, tmp_path / "rm", merge_lora=True)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert loaded.config.pad_token_id == module.tokenizer.pad_token_id and loaded.config.num_labels == 1
    assert AutoTokenizer.from_pretrained(tmp_path / "rm").eos_token_id == module.tokenizer.eos_token_id
    with torch.no_grad():
        theirs = loaded(input_ids=batch.tokens.input_ids, attention_mask=batch.tokens.attention_mask).logits[:, 0]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def _validate(module, batches):
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(module, DataLoader(batches, batch_size=None), verbose=False)[0]


def test_pairwise_loss_and_validation_metrics(tiny_model_dir):
    module = _module(tiny_model_dir)
    torch.nn.init.normal_(module.backbone.score.weight)
    batch = _pairs(module.tokenizer)
    batch.margin = torch.tensor([0.0, 1.0, 0.0, 0.5])
    with torch.no_grad():
        scores = module(batch)
        out = module._loss(batch, scores)
    chosen, rejected = scores.chunk(2)
    # -log sigmoid(r_w - r_l - m), averaged over the 4 pairs
    expected = sum(math.log(1 + math.exp(-(w - r - m)))
                   for w, r, m in zip(chosen.tolist(), rejected.tolist(), [0.0, 1.0, 0.0, 0.5])) / 4
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    # two batches (4 pairs, then its first 2): metrics are pair-weighted over the whole split
    rows = batch.tokens
    keep = [0, 1, 4, 5]  # chosen and rejected rows of the first 2 pairs
    half_rows = PaddedRows(rows.input_ids[keep], rows.attention_mask[keep], rows.labels[keep])
    half = PairBatch(half_rows, batch.margin[:2], batch.index[:2])
    metrics = _validate(module, [batch, half])
    right = (chosen > rejected).float()
    assert metrics["val/rewards/accuracies"] == pytest.approx((right.sum() + right[:2].sum()).item() / 6)
    diff = chosen - rejected
    assert metrics["val/rewards/margins"] == pytest.approx((diff.sum() + diff[:2].sum()).item() / 6, rel=1e-5)
    assert "val/ranking_accuracy" not in metrics


def test_ranking_step_and_group_accuracies(tiny_model_dir):
    # per prompt: group 0 orders (0,1) and (0,2) right, (1,2) wrong -> 2/3; group 1 gets its pair wrong -> 0
    scores = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0])
    group, ranks = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0])
    torch.testing.assert_close(group_accuracies(scores, group, ranks), torch.tensor([2 / 3, 0.0]))

    module = _module(tiny_model_dir)
    tok = module.tokenizer
    p = tok(PROMPT)["input_ids"]
    rows = [(p, tok(PROMPT + r)["input_ids"][len(p) :] + [tok.eos_token_id]) for r in [" c b a", " c b", " a b c"]]
    batch = collate_rankings([(rows, [0.0, 1.0, 2.0], 0.0), (rows[:2], [1.0, 0.0], 0.0)], tok.pad_token_id)
    out = _sgd_step(module, batch)
    assert torch.isfinite(out.loss) and out.num_pairs == 4
    with torch.no_grad():
        s = module(batch)
    metrics = _validate(module, [batch])
    right = [bool(s[0] > s[1]), bool(s[0] > s[2]), bool(s[1] > s[2]), bool(s[4] > s[3])]
    assert metrics["val/ranking_accuracy"] == pytest.approx(sum(right) / 4)  # over all 4 pairs
    assert metrics["val/rewards/accuracies"] == pytest.approx((sum(right[:3]) / 3 + right[3]) / 2)  # per prompt


# ---------------------------------------------------------------- RewardSpec


@pytest.fixture(scope="module")
def reward_dirs(tmp_path_factory):
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        module = RewardModule(ModelSpec(path=str(TINY_MODEL)))
        module.configure_model()
        torch.nn.init.normal_(module.backbone.score.weight)
        out.append(save_hf(module.backbone, module.tokenizer, tmp_path_factory.mktemp("rm") / f"rm{seed}"))
    return out


RESPONSES = [" c b a", " a b c", " c b"]


def _single(path):
    return RewardSpec(models=[ModelSpec(path=str(path))]).load("cpu").score([PROMPT] * 3, RESPONSES)


def test_reward_spec_scores_as_the_module_trained(reward_dirs):
    module = RewardModule(ModelSpec(path=str(reward_dirs[0])))
    module.configure_model()
    module.backbone.eval()
    tok = load_tokenizer(str(reward_dirs[0]))
    p = tok(PROMPT)["input_ids"]
    rows = [(p, tok(PROMPT + r)["input_ids"][len(p) :]) for r in RESPONSES]  # the text alone, as trained now
    batch = collate_rankings([(rows, [0.0, 1.0, 2.0], 0.0)], tok.pad_token_id)
    with torch.no_grad():
        expected = module(batch)
    spec = RewardSpec(models=[ModelSpec(path=str(reward_dirs[0]))], batch_size=2)  # two chunks
    got = spec.load("cpu").score([PROMPT] * 3, RESPONSES, device="cpu")
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for m, _ in spec._loaded for p in m.parameters())


def test_reward_spec_weighted_sum_and_llama2(reward_dirs):
    a, b = _single(reward_dirs[0]), _single(reward_dirs[1])
    models = [{"path": str(d)} for d in reward_dirs]
    spec = RewardSpec(models=models, weights=[0.5, 2.0]).load()
    torch.testing.assert_close(spec.score([PROMPT] * 3, RESPONSES), 0.5 * a + 2.0 * b)

    meta = [{"unsafe": True}, {"unsafe": False}, {}]
    # threshold 0: only the unsafe flag picks the safety score (models[1])
    spec = RewardSpec(models=models, combine="llama2", safety_threshold=0.0).load()
    torch.testing.assert_close(spec.score([PROMPT] * 3, RESPONSES, meta), torch.stack([b[0], a[1], a[2]]))
    # threshold 1: sigmoid(safety) < 1 always, so safety everywhere
    spec = RewardSpec(models=models, combine="llama2", safety_threshold=1.0).load()
    torch.testing.assert_close(spec.score([PROMPT] * 3, RESPONSES, meta), b)
    # whitened: (x - mean) / std of the batch
    spec = RewardSpec(models=models, weights=[0.5, 2.0], whiten=True).load()
    x = 0.5 * a + 2.0 * b
    torch.testing.assert_close(spec.score([PROMPT] * 3, RESPONSES), (x - x.mean()) / x.std(), rtol=1e-4, atol=1e-5)


def test_reward_spec_oracle_and_errors():
    spec = RewardSpec(oracle="synthetic").load()
    # target " c b a": all 3 right; " a b c": only the middle b; " c b": 2 right of max(3, 2)
    torch.testing.assert_close(spec.score([PROMPT] * 3, RESPONSES), torch.tensor([1.0, 1 / 3, 2 / 3]))
    whitened = RewardSpec(oracle="synthetic", whiten=True, whiten_mean=0.5, whiten_std=0.25).score([PROMPT], [" c b a"])
    assert whitened.item() == pytest.approx((1.0 - 0.5) / 0.25)
    assert as_reward_spec({"oracle": "synthetic"}).oracle == "synthetic"
    with pytest.raises(ValueError, match="reward models or oracle"):
        RewardSpec()
    with pytest.raises(ValueError, match="two models"):
        RewardSpec(models=[ModelSpec(path="x")], combine="llama2")
    with pytest.raises(ValueError, match="weights"):
        RewardSpec(models=[ModelSpec(path="x")], weights=[1.0, 2.0])
    with pytest.raises(RuntimeError, match="before load"):
        RewardSpec(models=[ModelSpec(path="x")]).score([PROMPT], [" a"])


def test_int8_base_with_lora_trains(tiny_model_dir):
    module = _module(tiny_model_dir, quantization="int8", lora=LoraSpec(r=4, dropout=0.0))
    trainable = {n for n, p in module.backbone.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    out = _sgd_step(module, _pairs(module.tokenizer))
    assert torch.isfinite(out.loss)
    changed = {n for n, p in module.backbone.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= trainable and any(".score." in n for n in changed)


def test_packed_pairs_score_like_padded_pairs(tiny_model_dir):
    from core.models import ModelSpec
    from datamodules.preference import collate_pairs, collate_pairs_packed
    from modules.reward import RewardModule

    module = RewardModule(ModelSpec(path=str(tiny_model_dir)))
    module.configure_model()
    rows = [(([5, 6, 7], [8, 9, 2]), ([5, 6, 7], [10, 2]), 0.0, 0), (([11], [12, 13, 14, 2]), ([11], [15, 2]), 0.0, 1)]
    with torch.no_grad():
        padded = module(collate_pairs(rows, pad_id=0))
        packed = module(collate_pairs_packed(rows, pad_id=0, max_length=9))
    assert packed.shape == (4,)
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-4)
