"""Recipe tier: `rlhf dpo fit` end to end on the tiny config (each reference mode), --help, every config parses."""

import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT

TINY = "configs/dpo/tiny.yaml"
CONFIGS = sorted((ROOT / "configs" / "dpo").glob("*.yaml"))


def _metrics(tmp_path: Path) -> str:
    return next((tmp_path / "runs").rglob("metrics.csv")).read_text()


def test_fit_tiny_writes_loadable_model(run_recipe, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    run_recipe("dpo", "fit", "--config", TINY, f"--model.save_dir={out}", "--trainer.max_steps=4",
               "--trainer.val_check_interval=4", "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=2")
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = AutoTokenizer.from_pretrained(out)("Reverse: a b c\nAnswer:", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()
    header = _metrics(tmp_path).splitlines()[0].split(",")
    for name in ["train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/accuracies",
                 "train/rewards/margins", "train/logps/chosen", "train/logps/rejected", "val/loss",
                 "val/rewards/chosen", "val/rewards/rejected", "val/rewards/accuracies", "val/rewards/margins",
                 "val/logps/chosen", "val/logps/rejected"]:
        assert name in header, name
    state = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=True)["state_dict"]
    assert not any(k.startswith("reference.") for k in state)  # the frozen copy comes back from its spec
    assert any(k.startswith("policy.") for k in state)


def test_fit_precomputed_reference_checkpoints_its_tables(run_recipe, tmp_path):
    run_recipe("dpo", "fit", "--config", TINY, "--model.reference=precomputed", "--trainer.max_steps=2",
               "--trainer.limit_val_batches=1", f"--model.save_dir={tmp_path / 'hf'}")
    state = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=True)["state_dict"]
    n_train = len((ROOT / "tests/fixtures/synthetic/pairs_train.jsonl").read_text().splitlines())
    assert state["ref_train"].shape == (n_train, 2) and not state["ref_train"].isnan().any()
    assert state["ref_val"].shape[0] > 0 and (tmp_path / "hf" / "model.safetensors").exists()


def test_fit_adapter_reference_saves_adapter(run_recipe, tmp_path):
    run_recipe("dpo", "fit", "--config", TINY, "--model.reference=adapter", "--model.policy.lora.r=4",
               "--trainer.max_steps=2", "--trainer.limit_val_batches=1", f"--model.save_dir={tmp_path / 'hf'}",
               "--model.merge_lora=false")
    assert (tmp_path / "hf" / "adapter_model.safetensors").exists()
    state = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=True)["state_dict"]
    assert state and all("lora_" in k or k.startswith("ref_") for k in state)


@pytest.mark.parametrize("loss", [["--model.loss_type=simpo", "--model.beta=2.0", "--model.simpo_gamma=0.5"],
                                  ["--model.loss_type=orpo", "--model.beta=0.1"]], ids=["simpo", "orpo"])
def test_fit_reference_free_loads_no_reference(run_recipe, tmp_path, monkeypatch, loss):
    import modules.dpo as dpo

    loads = []
    real_load = dpo.load_causal_lm
    monkeypatch.setattr(dpo, "load_causal_lm", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    run_recipe("dpo", "fit", "--config", TINY, *loss, "--model.reference=none", "--trainer.max_steps=2",
               "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
               f"--model.save_dir={tmp_path / 'hf'}")
    assert len(loads) == 1 and loads[0].get("trainable", True)  # the policy, nothing else
    rows = _metrics(tmp_path).splitlines()
    header = rows[0].split(",")
    for name in ["train/loss", "train/rewards/accuracies", "train/logps/chosen", "val/loss", "val/rewards/margins"]:
        assert name in header, name
    losses = [float(v) for r in rows[1:] for k, v in zip(header, r.split(",")) if k in ("train/loss", "val/loss") and v]
    assert len(losses) >= 3 and all(math.isfinite(x) for x in losses)
    assert (tmp_path / "hf" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="set reference='none'"):  # the default reference is refused by name
        run_recipe("dpo", "fit", "--config", TINY, *loss, "--model.policy.path=/no/such/model")


def test_fit_cpl_trains_on_sums_without_reference(run_recipe, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import modules.dpo as dpo

    loads = []
    real_load = dpo.load_causal_lm
    monkeypatch.setattr(dpo, "load_causal_lm", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    out = tmp_path / "hf"
    run_recipe("dpo", "fit", "--config", TINY, "--model.loss_type", "cpl", "--model.reference", "none",
               "--model.cpl_lambda", "0.5", "--model.nll_weight", "0.1", "--trainer.max_steps=4",
               "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
               f"--model.save_dir={out}")
    assert len(loads) == 1 and loads[0].get("trainable", True)  # the policy, nothing else
    rows = _metrics(tmp_path).splitlines()
    header = rows[0].split(",")
    column = {k: [float(v) for r in rows[1:] for key, v in zip(header, r.split(",")) if key == k and v]
              for k in ("train/loss", "val/loss", "train/logps/chosen")}
    assert len(column["train/loss"]) == 4 and len(column["val/loss"]) == 1
    assert all(math.isfinite(x) for xs in column.values() for x in xs)
    assert len(set(column["train/loss"])) > 1  # the loss moves
    assert min(column["train/logps/chosen"]) < -1.0  # sums over the completion's tokens, not per-token means
    trained = load_file(out / "model.safetensors")
    initial = load_file(ROOT / "tests/fixtures/tiny-llama/model.safetensors")
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_cpl_bad_config_fails_before_loading(run_recipe, tmp_path, monkeypatch):
    import modules.dpo as dpo

    monkeypatch.setattr(dpo, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    cpl = ("--config", TINY, "--model.loss_type=cpl", "--model.policy.path=/no/such/model")
    with pytest.raises(ValueError, match="loss_type='cpl' uses no reference model: set reference='none'"):
        run_recipe("dpo", "fit", *cpl)  # tiny.yaml's default reference (copy)
    with pytest.raises(ValueError, match=r"cpl_lambda must be in \(0, 1\], got 0.0"):
        run_recipe("dpo", "fit", *cpl, "--model.reference=none", "--model.cpl_lambda=0")
    with pytest.raises(ValueError, match="not 'cpl': set it to 0 \\(--model.label_smoothing 0"):
        run_recipe("dpo", "fit", *cpl, "--model.reference=none", "--model.label_smoothing=0.1")
    # synthetic.yaml's conservative-DPO label smoothing is refused by name, before its (absent) SFT policy loads
    with pytest.raises(ValueError, match="label_smoothing 0"):
        run_recipe("dpo", "fit", "--config", "configs/dpo/synthetic.yaml", "--model.loss_type=cpl",
                   "--model.reference=none")
    assert not (tmp_path / "runs").exists()


def test_bad_config_fails_before_loading(run_recipe, tmp_path):
    with pytest.raises(ValueError, match="set lora"):
        run_recipe("dpo", "fit", "--config", TINY, "--model.reference=adapter", "--model.policy.path=/no/such/model")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config, capsys, monkeypatch):
    from recipes.dpo import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["rlhf dpo"])
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_.value.code in (0, None)
    parsed = yaml.safe_load(capsys.readouterr().out)
    assert parsed["model"]["policy"]["path"] and parsed["data"]["train_file"]
    assert "tokenizer" not in parsed["data"]  # linked from model.policy.path
    assert config.read_text().startswith("#") and "rlhf dpo fit --config" in config.read_text()


def test_help_documents_arguments(capsys):
    from recipes.dpo import main

    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    for arg in ["--model.reference", "--model.reference_model", "--model.beta", "--model.loss_type",
                "--model.label_smoothing", "--model.nll_weight", "--model.simpo_gamma", "--model.cpl_lambda",
                "--model.desirable_weight",
                "--model.undesirable_weight", "--data.layout"]:
        assert arg in text, arg
    assert "adapter switched off" in text


def test_fit_kto_on_unpaired_rows(run_recipe, tmp_path, monkeypatch):
    import modules.dpo as dpo

    loads = []
    real_load = dpo.load_causal_lm
    monkeypatch.setattr(dpo, "load_causal_lm", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    run_recipe("dpo", "fit", "--config", "configs/dpo/tiny-kto.yaml", "--trainer.max_steps=2",
               "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1",
               "--model.desirable_weight=1.0", "--model.undesirable_weight=1.33", f"--model.save_dir={tmp_path / 'hf'}")
    assert [k.get("trainable", True) for k in loads] == [True, False]  # the policy and its frozen copy
    rows = _metrics(tmp_path).splitlines()
    header = rows[0].split(",")
    for name in ["train/loss", "train/kl", "train/rewards/chosen", "train/rewards/rejected", "train/logps/chosen",
                 "val/loss", "val/kl", "val/rewards/chosen", "val/rewards/rejected", "val/logps/rejected"]:
        assert name in header, name
    assert "val/rewards/accuracies" not in header  # unpaired rows have no pairs to be right about
    values = [float(v) for r in rows[1:] for k, v in zip(header, r.split(",")) if k.endswith(("/loss", "/kl")) and v]
    assert len(values) >= 4 and all(math.isfinite(x) and x >= 0 for x in values)
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_kto_on_pairs_and_pairs_losses_on_unpaired_fail_before_loading(run_recipe, tmp_path, monkeypatch):
    import modules.dpo as dpo

    monkeypatch.setattr(dpo, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match="set data.layout: unpaired, not 'pairs'"):
        run_recipe("dpo", "fit", "--config", TINY, "--model.loss_type=kto")
    with pytest.raises(ValueError, match=r"not 'unpaired' \(unpaired data: loss_type kto\)"):
        run_recipe("dpo", "fit", "--config", "configs/dpo/tiny-kto.yaml", "--model.loss_type=sigmoid")
    with pytest.raises(ValueError, match="cannot be precomputed"):
        run_recipe("dpo", "fit", "--config", "configs/dpo/tiny-kto.yaml", "--model.reference=precomputed")
