"""Module tier for DPO: one step per reference mode on the tiny model, config errors, checkpoints, resume."""

import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

import modules.dpo as dpo
from core.batches import PairBatch
from core.models import LoraSpec, ModelSpec, load_causal_lm, load_tokenizer
from core.ops import IGNORE_INDEX
from core.packing import pad_completions
from core.tokenize import encode_completions
from modules.dpo import DPOModule

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny-llama"


def _rows(synthetic_dir, n, split="train"):
    with open(synthetic_dir / f"pairs_{split}.jsonl") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def _encode(tokenizer, rows):
    """Pair rows -> [(prompt_ids, chosen_ids, rejected_ids)], from one tokenization per completion."""
    prompts, wheres = [r["prompt"] for r in rows], [f"row {i}" for i in range(len(rows))]
    chosen = encode_completions(tokenizer, prompts, [r["chosen"] for r in rows], wheres, 64, 32)
    rejected = encode_completions(tokenizer, prompts, [r["rejected"] for r in rows], wheres, 64, 32)
    return [(p, c, r) for (p, c), (_, r) in zip(chosen, rejected)]


def _collate(pairs, indexes, pad_id=0, extra_pad=0):
    """The contract's "pairs" batch: chosen rows [0, b), rejected rows [b, 2b), right-padded."""
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    width = max(len(p) + len(c) for p, c in seqs) + extra_pad
    rows = pad_completions(seqs, pad_id, width)
    return PairBatch(rows, margin=torch.zeros(len(pairs)), index=torch.tensor(indexes))


@pytest.fixture(scope="module")
def pairs():
    return _encode(load_tokenizer(str(TINY)), _rows(FIXTURES / "synthetic", 8))


def _module(path=TINY, **kw):
    module = DPOModule(ModelSpec(path=str(path), **kw.pop("spec", {})), **kw)
    module.configure_model()
    return module


def _n_models(module):
    return sum(isinstance(m, PreTrainedModel) and hasattr(m, "lm_head") for m in module.modules())


def _sgd_step(module, batch, lr=0.1):
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    out, _ = module(batch)
    out.loss.backward()
    opt.step()
    return out


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reference="adapter"), "set lora"),
        (dict(reference="adapter", spec={"lora": LoraSpec()}, reference_model=ModelSpec(path="x")), "drop reference"),
        (dict(reference="frozen"), "reference must be one of"),
        (dict(loss_type="cpo"), "unknown loss_type"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing applies"),
        (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing must be in"),
        (dict(nll_weight=-1.0), "nll_weight must be >= 0"),
        (dict(spec={"quantization": "nf4"}), "set lora"),
        (dict(loss_type="simpo"), "uses no reference model: set reference='none'"),
        (dict(loss_type="orpo", reference="precomputed"), "uses no reference model: set reference='none'"),
        (dict(reference="none"), "loads no reference, but loss_type='sigmoid' needs one"),
        (dict(loss_type="simpo", reference="none", reference_model=ModelSpec(path="x")), "drop reference_model"),
        (dict(loss_type="orpo", reference="none", nll_weight=0.5), "own NLL term"),
        (dict(loss_type="simpo", reference="none", label_smoothing=0.1), "label_smoothing applies"),
        (dict(loss_type="simpo", reference="none", simpo_gamma=-1.0), "simpo_gamma must be >= 0"),
        (dict(loss_type="cpl"), "loss_type='cpl' uses no reference model: set reference='none'"),
        (dict(loss_type="cpl", reference="precomputed"), "uses no reference model: set reference='none'"),
        (dict(loss_type="cpl", reference="adapter", spec={"lora": LoraSpec()}), "set reference='none'"),
        (dict(loss_type="cpl", reference="none", reference_model=ModelSpec(path="x")), "drop reference_model"),
        (dict(loss_type="cpl", reference="none", label_smoothing=0.1), "label_smoothing applies"),
        (dict(loss_type="cpl", reference="none", cpl_lambda=0.0), r"cpl_lambda must be in \(0, 1\], got 0.0"),
        (dict(loss_type="cpl", reference="none", cpl_lambda=1.5), r"cpl_lambda must be in \(0, 1\], got 1.5"),
        (dict(loss_type="cpl", reference="none", beta=-0.1), "beta must be > 0"),
        (dict(loss_type="cpl", reference="none", nll_weight=-1.0), "nll_weight must be >= 0"),
        (dict(loss_type="kto", reference="precomputed"), "cannot be precomputed"),
        (dict(loss_type="kto", reference="none"), "loss_type='kto' needs one"),
        (dict(loss_type="kto", nll_weight=0.5), "not kto"),
        (dict(loss_type="kto", label_smoothing=0.1), "label_smoothing applies"),
        (dict(loss_type="kto", undesirable_weight=0.0), "undesirable_weight must be > 0"),
    ],
)
def test_bad_config_fails_before_any_model_loads(monkeypatch, kwargs, match):
    monkeypatch.setattr(dpo, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    spec = kwargs.pop("spec", {})
    with pytest.raises(ValueError, match=match):
        DPOModule(ModelSpec(path="/no/such/model", **spec), **kwargs)


def test_good_config_loads_nothing_at_init(monkeypatch):
    monkeypatch.setattr(dpo, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    module = DPOModule(ModelSpec(path="/no/such/model", lora=LoraSpec()), reference="adapter", loss_type="ipo")
    assert module.policy is None and module.reference is None and module.average


def test_cpl_config_with_bc_term_loads_nothing_at_init(monkeypatch):
    monkeypatch.setattr(dpo, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    module = DPOModule(ModelSpec(path="/no/such/model"), reference="none", loss_type="cpl", cpl_lambda=0.5,
                       nll_weight=0.1)
    assert module.policy is None and not module.average and module.cpl_lambda == 0.5


def test_copy_reference_step(pairs):
    module = _module(TINY)
    assert _n_models(module) == 2 and module.reference.training is False
    assert not any(p.requires_grad for p in module.reference.parameters())
    batch = _collate(pairs[:4], [0, 1, 2, 3])
    policy_before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    ref_before = {n: p.detach().clone() for n, p in module.reference.named_parameters()}

    out = _sgd_step(module, batch)
    # policy == reference at step 0: h = 0, loss = -log sigmoid(0) = log 2, rewards 0, accuracy 0 (no ties win)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.equal(out.chosen_rewards, torch.zeros(4)) and out.accuracy.item() == 0.0

    with_grad = [n for n, p in module.policy.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    changed = {n for n, p in module.policy.named_parameters() if not torch.equal(policy_before[n], p)}
    assert len(with_grad) == len(policy_before) and set(with_grad) == changed
    assert all(torch.equal(ref_before[n], p) for n, p in module.reference.named_parameters())
    after, _ = module(batch)
    assert after.loss < out.loss and after.accuracy.item() > 0  # the step moved towards chosen


def test_module_train_keeps_reference_in_eval():
    module = _module(TINY)
    module.train()
    assert module.policy.training and not module.reference.training


def test_padding_changes_nothing(pairs):
    module = _module(reference="precomputed")
    with torch.no_grad():
        tight, _ = module.sequence_logps(module.policy, _collate(pairs[:3], [0, 1, 2]))
        padded, _ = module.sequence_logps(module.policy, _collate(pairs[:3], [0, 1, 2], extra_pad=5))
    torch.testing.assert_close(tight, padded, rtol=1e-5, atol=1e-5)


def test_ipo_averages_and_nll_term(pairs):
    batch = _collate(pairs[:2], [0, 1])
    ipo = _module(loss_type="ipo", beta=0.1)
    out, _ = ipo(batch)
    # h = 0 at step 0: (0 - 1 / (2 * 0.1))**2 = 25
    assert out.loss.item() == pytest.approx((0 - 1 / (2 * 0.1)) ** 2, rel=1e-6)
    avg, mean = ipo.sequence_logps(ipo.policy, batch)
    torch.testing.assert_close(avg, mean)

    rpo = _module(nll_weight=0.5)
    out, logps = rpo(batch)
    with torch.no_grad():  # chosen NLL by hand: -mean over completion tokens of log softmax at the label
        logits = rpo.policy(input_ids=batch.tokens.input_ids, attention_mask=batch.tokens.attention_mask).logits
        nll = []
        for row in range(2):  # chosen rows are 0 and 1
            lp = torch.log_softmax(logits[row, :-1], -1)
            targets = batch.tokens.labels[row, 1:]
            keep = targets != IGNORE_INDEX
            nll.append(-lp[keep].gather(-1, targets[keep, None]).mean())
            assert logps[row].item() == pytest.approx(lp[keep].gather(-1, targets[keep, None]).sum().item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(math.log(2) + 0.5 * (nll[0] + nll[1]).item() / 2, rel=1e-5)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_hold_one_model_and_use_token_averages(monkeypatch, pairs, loss_type):
    from core.losses.reference_free import orpo_loss, simpo_loss

    loads = []
    real_load = dpo.load_causal_lm
    monkeypatch.setattr(dpo, "load_causal_lm", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    module = _module(reference="none", loss_type=loss_type, beta=2.0 if loss_type == "simpo" else 0.1)
    assert len(loads) == 1 and module.reference is None and _n_models(module) == 1
    batch, padded = _collate(pairs[:3], [0, 1, 2]), _collate(pairs[:3], [0, 1, 2], extra_pad=5)
    with torch.no_grad():
        logps, means = module.sequence_logps(module.policy, batch)
        # per-token averages by hand: sum of the completion tokens' log-probs / their number, padding excluded
        logits = module.policy(input_ids=batch.tokens.input_ids, attention_mask=batch.tokens.attention_mask).logits
        targets = batch.tokens.labels[:, 1:]
        keep = targets != IGNORE_INDEX
        token = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        by_hand = (token * keep).sum(-1) / keep.sum(-1)
    torch.testing.assert_close(logps, by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logps, means)
    with torch.no_grad():
        tight_out, _ = module(batch)
        padded_out, _ = module(padded)
    torch.testing.assert_close(tight_out.loss, padded_out.loss, rtol=1e-5, atol=1e-5)
    expected = simpo_loss(*by_hand.chunk(2), 2.0, 0.5) if loss_type == "simpo" else orpo_loss(*by_hand.chunk(2), 0.1)
    assert tight_out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)

    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    out = _sgd_step(module, batch, lr=0.05)
    assert torch.isfinite(out.loss)
    assert all(not torch.equal(before[n], p) for n, p in module.policy.named_parameters())
    after, _ = module(batch)
    assert after.loss < out.loss


def test_adapter_reference_trains_only_lora_and_adapter_off_is_base(pairs):
    module = _module(reference="adapter", spec={"lora": LoraSpec(r=4, dropout=0.0)})
    assert module.reference is None and _n_models(module) == 1
    base = load_causal_lm(str(TINY), trainable=False)
    batch = _collate(pairs[:4], [0, 1, 2, 3])
    with torch.no_grad():
        base_logps = module.sequence_logps(base, batch)[0]
    torch.testing.assert_close(module.reference_logps(batch), base_logps)

    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    out = _sgd_step(module, batch)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)  # LoRA B starts at 0: policy == base
    changed = [n for n, p in module.policy.named_parameters() if not torch.equal(before[n], p)]
    assert changed and all("lora_" in n for n in changed)
    torch.testing.assert_close(module.reference_logps(batch), base_logps)  # still the base after the step
    assert not torch.allclose(module.sequence_logps(module.policy, batch)[0], base_logps)


@pytest.mark.parametrize("explicit", [False, True])
def test_precomputed_matches_copy_and_holds_one_model(monkeypatch, pairs, explicit):
    loads = []
    real_load = dpo.load_causal_lm
    monkeypatch.setattr(dpo, "load_causal_lm", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    ref_spec = ModelSpec(path=str(TINY)) if explicit else None
    module = _module(reference="precomputed", reference_model=ref_spec)
    # train pairs stored out of order: rows are keyed by batch.index, not by position
    train = [_collate(pairs[:4], [5, 0, 7, 2]), _collate(pairs[4:8], [1, 3, 4, 6])]
    val = [_collate(pairs[:2], [0, 1])]
    module.precompute_reference({"train": train, "val": val})
    # explicit reference: loaded once for the pass, then dropped; default: the untrained policy is the reference
    assert len(loads) == 1 + explicit and module.reference is None and _n_models(module) == 1
    assert module.ref_train.shape == (8, 2) and module.ref_val.shape == (2, 2)
    assert module.policy.training  # mode restored after the pass

    copy = _module(TINY)
    later = _collate([pairs[2], pairs[5], pairs[0]], [7, 3, 5])  # another grouping of the same pairs
    torch.testing.assert_close(module.reference_logps(later), copy.reference_logps(later), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(module.reference_logps(val[0], "val"), copy.reference_logps(val[0]))
    out = _sgd_step(module, later)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(RuntimeError, match="did not see"):
        module.reference_logps(_collate(pairs[:1], [8]))


def test_checkpoint_keeps_trainable_weights_and_reference_tables():
    module = _module(TINY)
    module.ref_train = torch.zeros(3, 2)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    keys = set(checkpoint["state_dict"])
    assert not any(k.startswith("reference.") for k in keys) and "ref_train" in keys and "ref_val" in keys
    assert {f"policy.{n}" for n, _ in module.policy.named_parameters()} <= keys


class _PairsData(LightningDataModule):
    def __init__(self, pairs):
        super().__init__()
        self.train, self.val = list(enumerate(pairs)), list(enumerate(pairs[:2]))

    @staticmethod
    def collate(rows):
        return _collate([p for _, p in rows], [i for i, _ in rows])

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=2, shuffle=True, collate_fn=self.collate)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=2, collate_fn=self.collate)


def _fit(module, pairs, tmp_path, steps, ckpt_path=None):
    trainer = Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)], val_check_interval=2,
        num_sanity_val_steps=0, default_root_dir=tmp_path,
    )
    trainer.fit(module, _PairsData(pairs), ckpt_path=ckpt_path)
    return trainer


def test_precomputed_fit_checkpoints_tables_and_resume_skips_the_pass(monkeypatch, pairs, tmp_path):
    passes = []
    real = DPOModule.precompute_reference

    def spy(self, loaders):
        rng = torch.get_rng_state()
        passes.append(set(loaders))
        real(self, loaders)
        # the pass leaves the global RNG alone, so the data order (and run) equals the copy reference's
        assert torch.equal(rng, torch.get_rng_state())

    monkeypatch.setattr(DPOModule, "precompute_reference", spy)
    module = DPOModule(ModelSpec(path=str(TINY)), reference="precomputed", save_dir=str(tmp_path / "hf"))
    trainer = _fit(module, pairs, tmp_path, steps=2)
    assert passes == [{"train", "val"}]
    assert {"train/loss", "train/rewards/accuracies", "train/rewards/margins", "train/logps/chosen", "val/loss",
            "val/rewards/accuracies", "val/logps/rejected"} <= set(trainer.callback_metrics)
    assert (tmp_path / "hf" / "model.safetensors").exists()
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert state["ref_train"].shape == (8, 2) and not state["ref_train"].isnan().any()
    torch.testing.assert_close(state["ref_train"], module.ref_train)

    resumed = DPOModule(ModelSpec(path=str(TINY)), reference="precomputed", save_dir=str(tmp_path / "hf"))
    _fit(resumed, pairs, tmp_path, steps=3, ckpt_path=str(tmp_path / "last.ckpt"))
    assert passes == [{"train", "val"}]  # the tables came back from the checkpoint
    torch.testing.assert_close(resumed.ref_train, state["ref_train"])



def test_each_validation_reports_its_own_pairs_only(pairs, tmp_path):
    # the metric objects are logged, so Lightning resets them after each validation: nothing carries over
    module, data = _module(TINY), _PairsData(pairs)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)
    logps = []
    for rows in (pairs[:4], pairs[2:4], pairs[:2]):  # both batches, the second alone, the first alone
        data.val = list(enumerate(rows))
        logps.append(trainer.validate(module, data, verbose=False)[0]["val/logps/chosen"])
    both, second, first = logps
    assert both == pytest.approx((first + second) / 2, rel=1e-5)  # two pairs per batch: the plain mean
    assert first != pytest.approx(second)  # so the check above can tell a carried-over sum

def test_packed_pairs_give_the_same_sequence_logps_as_padded(tiny_model_dir):
    from core.models import ModelSpec
    from datamodules.preference import collate_pairs, collate_pairs_packed
    from modules.dpo import DPOModule

    module = DPOModule(ModelSpec(path=str(tiny_model_dir)))
    module.configure_model()
    rows = [(([5, 6, 7], [8, 9, 2]), ([5, 6, 7], [10, 2]), 0.0, 0), (([11], [12, 13, 14, 2]), ([11], [15, 2]), 0.0, 1)]
    padded = collate_pairs(rows, pad_id=0)
    packed = collate_pairs_packed(rows, pad_id=0, max_length=9)
    # literal packing: first-fit of lengths [6, 5, 5, 3] into rows of 9 -> [seq 0, seq 3], [seq 1], [seq 2]
    assert packed.tokens.sequence_ids.tolist() == [
        [0, 0, 0, 0, 0, 0, 3, 3, 3], [1, 1, 1, 1, 1, -1, -1, -1, -1], [2, 2, 2, 2, 2, -1, -1, -1, -1]]
    assert packed.tokens.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    with torch.no_grad():
        total_p, mean_p = module.sequence_logps(module.policy, padded)
        total_k, mean_k = module.sequence_logps(module.policy, packed)
    torch.testing.assert_close(total_k, total_p, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean_k, mean_p, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_rpo_loss_on_packed_and_shared_rows_equals_padded(tiny_model_dir, layout):
    # the NLL term reads the chosen half of the (2b,) sequence log-probs: b is the pairs, not the rows // 2
    from core.packing import collate_pairs_packed, collate_pairs_shared
    from datamodules.preference import collate_pairs

    module = DPOModule(ModelSpec(path=str(tiny_model_dir)), nll_weight=0.5)
    module.configure_model()
    rows = [(([5, 6, 7], [8, 9, 2]), ([5, 6, 7], [10, 2]), 0.0, 0), (([11], [12, 13, 14, 2]), ([11], [15, 2]), 0.0, 1)]
    collate = collate_pairs_packed if layout == "packed" else collate_pairs_shared
    batch = collate(rows, pad_id=0, max_length=9)
    assert batch.tokens.input_ids.shape[0] != 2 * batch.num_pairs  # rows are not sequences here
    with torch.no_grad():
        padded, _ = module(collate_pairs(rows, pad_id=0))
        other, _ = module(batch)
    torch.testing.assert_close(other.loss, padded.loss, rtol=1e-4, atol=1e-4)


def _unpaired(pairs, labels):
    """Unpaired rows from pairs: row i is pair i's chosen (label True) or rejected (False) completion."""
    from datamodules.unpaired import collate_unpaired

    rows = [((p, c if label else r), label, i) for i, ((p, c, r), label) in enumerate(zip(pairs, labels))]
    return collate_unpaired(rows, pad_id=0, max_length=64)


@pytest.mark.parametrize("reference", ["copy", "adapter"])
def test_kto_step(pairs, reference):
    spec = {"lora": LoraSpec(r=4, dropout=0.0)} if reference == "adapter" else {}
    module = _module(reference=reference, loss_type="kto", undesirable_weight=2.0, spec=spec)
    assert _n_models(module) == (2 if reference == "copy" else 1) and module.average is False
    batch = _unpaired(pairs[:4], [True, False, True, False])
    # mismatched rows: prompt i with completion i + 1 (the four prompts differ)
    assert batch.kl_tokens.input_ids[0, : len(pairs[0][0])].tolist() == pairs[0][0]
    assert batch.kl_tokens.input_ids[0, len(pairs[0][0]) : len(pairs[0][0]) + len(pairs[1][2])].tolist() == pairs[1][2]
    out = _sgd_step(module, batch)
    # policy == reference at step 0: r = 0, z0 = 0, each row costs weight * (1 - sigmoid(0)) = weight / 2
    assert out.loss.item() == pytest.approx((0.5 + 1.0 + 0.5 + 1.0) / 4, abs=1e-6)
    assert out.kl.item() == 0.0 and torch.equal(out.rewards, torch.zeros(4))

    after, logps = module(batch)
    with torch.no_grad():  # z0 by hand: the mismatched rows' mean log-ratio, clamped at 0
        ratio = module.sequence_logps(module.policy, batch.kl_tokens)[0] - module.reference_logps(batch.kl_tokens)
    assert after.kl.item() == pytest.approx(max(0.0, ratio.mean().item()), abs=1e-6)
    assert after.loss < out.loss
    desirable = after.rewards[batch.desirable]
    undesirable = after.rewards[~batch.desirable]
    assert desirable.min() > undesirable.max()  # the step raised the desirable rows against the undesirable ones
    torch.testing.assert_close(logps, module.sequence_logps(module.policy, batch)[0])


def test_cpl_holds_one_model_and_uses_sums(monkeypatch, pairs):
    from core.losses.reference_free import cpl_loss

    loads = []
    real_load = dpo.load_causal_lm
    monkeypatch.setattr(dpo, "load_causal_lm", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    module = _module(reference="none", loss_type="cpl", beta=0.1, cpl_lambda=0.5, nll_weight=0.2)
    assert len(loads) == 1 and module.reference is None and _n_models(module) == 1
    batch, padded = _collate(pairs[:3], [0, 1, 2]), _collate(pairs[:3], [0, 1, 2], extra_pad=5)
    with torch.no_grad():
        logps, means = module.sequence_logps(module.policy, batch)
        # sums by hand: the completion tokens' log-probs added up, padding excluded; means divide by their number
        logits = module.policy(input_ids=batch.tokens.input_ids, attention_mask=batch.tokens.attention_mask).logits
        targets = batch.tokens.labels[:, 1:]
        keep = targets != IGNORE_INDEX
        token = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        sums, n = (token * keep).sum(-1), keep.sum(-1)
    torch.testing.assert_close(logps, sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(means, sums / n, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        tight_out, _ = module(batch)
        padded_out, _ = module(padded)
    torch.testing.assert_close(tight_out.loss, padded_out.loss, rtol=1e-5, atol=1e-5)
    # the loss on the sums plus 0.2 * the chosen rows' mean token NLL (the BC term)
    expected = cpl_loss(*sums.chunk(2), 0.1, 0.5, chosen_nll=-(sums / n)[:3], nll_weight=0.2)
    assert tight_out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    torch.testing.assert_close(tight_out.chosen_rewards, 0.1 * sums[:3], rtol=1e-5, atol=1e-5)

    out = _sgd_step(module, batch, lr=0.05)
    assert torch.isfinite(out.loss)
    after, logps_after = module(batch)
    assert after.loss < out.loss
    assert logps_after[:3].sum() > logps[:3].sum()  # lambda < 1 and the BC term: the chosen completions gain
