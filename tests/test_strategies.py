"""Strategy overlays (configs/strategies/*.yaml): each parses on top of every stage's config; the combinations that
cannot run are refused before any class is built (recipes/strategies.py); FSDP trains SFT on 2 CPU processes.

FSDP on CPU: Lightning refuses FSDPStrategy without a GPU and torch's FSDP needs `device_id=cpu` there;
tests/cpu_fsdp.py's subclass lifts both, the rest is Lightning's. Checkpoints are `state_dict_type: sharded`
(the overlay's default): with `full`, FSDP's gather clones the weights it offloads to CPU, and on CPU processes that
clone segfaults (torch 2.13, fsdp/_state_dict_utils.py param_hook); `full` is a GPU check (benchmarks/gpu_check.sh).
"""

import sys

import pytest
import torch
from jsonargparse import Namespace
from safetensors.torch import load_file

from recipes.strategies import quantised_specs, strategy_kind, strategy_refusals
from tests.conftest import ROOT, TINY_MODEL
from tests.test_ddp import _close, _finish, _start

OVERLAYS = sorted((ROOT / "configs" / "strategies").glob("*.yaml"))
STAGES = ("sft", "reward", "dpo", "ppo", "rs")


def _main(stage: str, args: list[str], monkeypatch):
    from recipes.cli import STAGES as MODULES

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [f"rlhf {stage}"])
    return __import__(MODULES[stage], fromlist=["main"]).main(args)


def test_there_are_four_overlays():
    assert [p.stem for p in OVERLAYS] == ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
@pytest.mark.parametrize("stage", STAGES)
def test_overlay_parses_on_every_stage(stage, overlay, monkeypatch, capsys):
    # deepspeed is an optional extra, not installed here: parsing names its strategy class, never builds it
    import yaml

    with pytest.raises(SystemExit) as exit_:
        _main(stage, ["fit", "--config", f"configs/{stage}/tiny.yaml", "--config", str(overlay), "--print_config"],
              monkeypatch)
    assert exit_.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    wanted = yaml.safe_load(overlay.read_text())["trainer"]["strategy"]
    assert resolved["trainer"]["strategy"]["class_path"] == wanted["class_path"]
    for key, value in wanted["init_args"].items():
        assert resolved["trainer"]["strategy"]["init_args"][key] == value, key
    assert resolved["model"] and resolved["data"]["train_file"]  # the stage's own config is still all there


def test_overlay_headers_name_a_composing_command():
    for overlay in OVERLAYS:
        header = "".join(line for line in overlay.read_text().splitlines() if line.startswith("#"))
        assert f"--config configs/strategies/{overlay.name}" in header, overlay.name


@pytest.mark.parametrize(("strategy", "kind"), [
    ("ddp", ("ddp", 0)), ("auto", ("other", 0)), ("fsdp", ("fsdp", 0)), ("fsdp_cpu_offload", ("fsdp", 0)),
    ("deepspeed", ("deepspeed", 2)), ("deepspeed_stage_3_offload", ("deepspeed", 3)),
    ("deepspeed_stage_1", ("deepspeed", 1)),
    ({"class_path": "lightning.pytorch.strategies.FSDPStrategy"}, ("fsdp", 0)),
    ({"class_path": "tests.cpu_fsdp.CPUFSDPStrategy"}, ("fsdp", 0)),  # a subclass counts as its base
    ({"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy", "init_args": {"stage": 3}}, ("deepspeed", 3)),
    ({"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy"}, ("deepspeed", 2)),
    ({"class_path": "lightning.pytorch.strategies.DDPStrategy"}, ("ddp", 0)),
])
def test_strategy_kind(strategy, kind):
    assert strategy_kind(strategy) == kind


def _config(strategy: str, **model) -> Namespace:
    return Namespace(trainer=Namespace(strategy=strategy), model=Namespace(**model))


LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


def test_lora_and_whole_weight_strategies_are_not_refused():
    lora = {"path": "m", "quantization": "none", "lora": LORA}
    for stage in STAGES:
        for strategy in ("ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3"):
            if strategy in ("fsdp", "deepspeed_stage_3") and stage in ("ppo", "rs"):
                continue
            assert strategy_refusals(stage, _config(strategy, policy=lora)) == [], (stage, strategy)
    int8 = {"path": "m", "quantization": "int8", "lora": LORA}
    assert strategy_refusals("sft", _config("ddp", policy=int8)) == []  # DDP holds the whole quantised base
    for layout in ("separate", "shared"):  # weights whole on every rank: ppo samples as one process does
        assert strategy_refusals("ppo", _config("deepspeed_stage_2", policy=lora, layout=layout)) == []
    assert strategy_refusals("dpo", _config("fsdp", policy=lora, reference="adapter")) == []


def test_quantised_specs_are_found_anywhere_in_the_model_config():
    model = {"policy": {"path": "a", "quantization": "nf4"}, "value": {"path": "b", "quantization": "none"},
             "reward": {"models": [{"path": "c", "quantization": "int8"}]}}
    assert quantised_specs(model) == [("model.policy", "nf4"), ("model.reward.models[0]", "int8")]


@pytest.mark.parametrize(("stage", "args", "says"), [
    ("sft", ["--config", "configs/strategies/fsdp.yaml", "--model.policy.quantization=int8",
             '--model.policy.lora={"r": 4}'], ["model.policy.quantization=int8: FSDP cannot hold"]),
    ("sft", ["--config", "configs/strategies/deepspeed_zero2.yaml", "--model.policy.quantization=nf4",
             '--model.policy.lora={"r": 4}'], ["model.policy.quantization=nf4: DeepSpeed ZeRO-2 cannot hold"]),
    ("reward", ["--config", "configs/strategies/deepspeed_zero3.yaml", "--model.backbone.quantization=int8",
                '--model.backbone.lora={"r": 4}'], ["model.backbone.quantization=int8: DeepSpeed ZeRO-3"]),
    ("ppo", ["--config", "configs/strategies/fsdp.yaml"], ["rlhf ppo samples under FSDP"]),
    ("ppo", ["--config", "configs/strategies/deepspeed_zero3.yaml", "--model.layout=shared",
             '--model.policy.lora={"r": 4}'], ["rlhf ppo samples under DeepSpeed ZeRO-3"]),
    ("ppo", ["--config", "configs/strategies/fsdp.yaml", "--model.layout=shared", "--model.policy.quantization=int8",
             '--model.policy.lora={"r": 4}'], ["quantization=int8: FSDP cannot hold", "rlhf ppo samples under FSDP"]),
    ("rs", ["--trainer.strategy=fsdp"], ["rlhf rs samples under FSDP"]),
    ("dpo", ["--config", "configs/strategies/fsdp.yaml", "--model.reference=precomputed"],
     ["model.reference=precomputed under FSDP"]),
])
def test_refused_before_any_class_is_built(stage, args, says, monkeypatch, capsys):
    from recipes.common import StageCLI

    def built(self):
        raise AssertionError("classes were instantiated")

    monkeypatch.setattr(StageCLI, "instantiate_classes", built)
    with pytest.raises(SystemExit) as exit_:
        _main(stage, ["fit", "--config", f"configs/{stage}/tiny.yaml", *args], monkeypatch)
    message = str(exit_.value.code)
    assert message.startswith(f"rlhf {stage}: this strategy cannot run this config (nothing was loaded)")
    for text in says:
        assert text in message
    assert message.count("\n  ") == len(says)  # one line per reason, no more


def test_decoder_layer_policy_wraps_the_blocks_only(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from core.sharding import decoder_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    wrapped = [name for name, m in model.named_modules() if decoder_layers(m, recurse=False, nonwrapped_numel=0)]
    assert wrapped == ["model.layers.0", "model.layers.1"]
    assert all(decoder_layers(m, recurse=True, nonwrapped_numel=0) for m in model.modules())  # descend everywhere


def test_checkpoint_names_leave_wrappers_out():
    from core.optim import unwrapped_name

    name = "policy.model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.up_proj.weight"
    assert unwrapped_name(name) == "policy.model.layers.0.mlp.up_proj.weight"
    assert unwrapped_name("policy._orig_mod.lm_head.weight") == "policy.lm_head.weight"


def test_a_checkpoint_folder_without_metadata_is_named(tmp_path, monkeypatch):
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    with pytest.raises(SystemExit, match="a folder, but no sharded checkpoint"):
        _main("sft", ["fit", "--config", "configs/sft/tiny.yaml", f"--ckpt_path={folder}"], monkeypatch)


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_fsdp_sft_on_two_cpu_processes_matches_one_and_resumes(tmp_path):
    """2 FSDP processes x batch 16 against 1 process x batch 32 (the same global batch: tests/test_ddp.py says why
    they agree), sharded checkpoints every 2 steps, and a run resumed from the step-2 checkpoint folder."""
    fsdp = ["--config", "configs/strategies/fsdp.yaml", "--trainer.strategy.class_path=tests.cpu_fsdp.CPUFSDPStrategy",
            "--checkpoint.every_n_train_steps=2", "--checkpoint.save_top_k=-1"]
    steps = ["--trainer.max_steps=4", "--trainer.val_check_interval=4"]
    two = _start("sft", tmp_path / "two", 2, *fsdp, *steps)
    one = _start("sft", tmp_path / "one", 1, *steps, "--data.batch_size=32")
    ranks, (single,) = _finish(*two, ranks=2), _finish(*one, ranks=1)
    assert all(r["world_size"] == 2 for r in ranks)
    for s, row in enumerate(single["steps"]):
        _close(sum(r["steps"][s]["train/loss"] for r in ranks) / 2, row["train/loss"])
    for one_val, two_val in zip(single["val"], ranks[0]["val"]):
        _close(two_val["logged"]["val/loss"], one_val["logged"]["val/loss"])

    start, w1, w2 = _weights(TINY_MODEL), _weights(tmp_path / "one" / "hf"), _weights(tmp_path / "two" / "hf")
    assert w1.keys() == w2.keys()  # the export gathered whole weights (a shard would not load or would differ)
    gap = sum((w2[k] - w1[k]).double().square().sum() for k in w1)
    update = sum((w1[k] - start[k]).double().square().sum() for k in w1)
    assert float((gap / update).sqrt()) <= 1e-3

    step2 = next((tmp_path / "two").rglob("epoch=0-step=2.ckpt"))
    assert step2.is_dir()  # sharded: a folder, one file per rank and meta.pt
    # resumed with activation checkpointing per block too: recomputation changes no number, nor a checkpoint key
    checkpointing = "--trainer.strategy.init_args.activation_checkpointing_policy=core.sharding.decoder_layers"
    resumed = _finish(*_start("sft", tmp_path / "resumed", 2, *fsdp, *steps, checkpointing, f"--ckpt_path={step2}"),
                      ranks=2)
    assert len(resumed[0]["steps"]) == 2  # steps 3 and 4
    for s in (0, 1):
        for r in (0, 1):
            _close(resumed[r]["steps"][s]["train/loss"], ranks[r]["steps"][s + 2]["train/loss"])
    w3 = _weights(tmp_path / "resumed" / "hf")
    for k in w2:
        torch.testing.assert_close(w3[k], w2[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_fsdp_lora_adapter_matches_one_process(tmp_path):
    """LoRA under FSDP (frozen base and trainable adapter in the same units): the adapter exported from 2 processes
    x batch 16 is the one of 1 process x batch 32; a sharded model is saved unmerged, as an adapter that loads."""
    from core.models import load_saved_causal_lm

    lora, steps = '--model.policy.lora={r: 4, alpha: 8, dropout: 0.0}', ["--trainer.max_steps=4"]
    two = _start("sft", tmp_path / "two", 2, "--config", "configs/strategies/fsdp.yaml",
                 "--trainer.strategy.class_path=tests.cpu_fsdp.CPUFSDPStrategy", lora, *steps)
    one = _start("sft", tmp_path / "one", 1, lora, *steps, "--data.batch_size=32", "--model.merge_lora=false")
    for proc, log in (two, one):
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert "saving its LoRA adapter unmerged" in two[1].read_text()
    a1 = load_file(str(tmp_path / "one" / "hf" / "adapter_model.safetensors"))
    a2 = load_file(str(tmp_path / "two" / "hf" / "adapter_model.safetensors"))
    assert a1.keys() == a2.keys() and len(a1) == 28  # 7 projections x 2 blocks x (A, B)
    gap = sum((a2[k] - a1[k]).double().square().sum() for k in a1)
    size = sum(a1[k].double().square().sum() for k in a1 if "lora_B" in k)  # B starts at 0: its value is its update
    assert float((gap / size).sqrt()) <= 1e-3
    assert type(load_saved_causal_lm(tmp_path / "two" / "hf")).__name__ == "PeftModelForCausalLM"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_fsdp_pairs_stages_match_one_process(stage, tmp_path):
    """Reward (prompt-shared rows, score head) and DPO (a frozen reference copy, sharded with the policy) under FSDP:
    2 processes x batch B log the losses of 1 process x batch 2B, and export the same weights."""
    from tests.test_ddp import BATCH, TRAIN_KEYS

    steps = ["--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--data.share_prompt=true"]
    two = _start(stage, tmp_path / "two", 2, "--config", "configs/strategies/fsdp.yaml",
                 "--trainer.strategy.class_path=tests.cpu_fsdp.CPUFSDPStrategy", *steps)
    one = _start(stage, tmp_path / "one", 1, *steps, f"--data.batch_size={2 * BATCH[stage]}")
    ranks, (single,) = _finish(*two, ranks=2), _finish(*one, ranks=1)
    assert len(single["steps"]) == len(ranks[0]["steps"]) == 3
    for s, row in enumerate(single["steps"]):
        for key in TRAIN_KEYS[stage]:
            _close(sum(r["steps"][s][key] for r in ranks) / 2, row[key])
    w1, w2 = _weights(tmp_path / "one" / "hf"), _weights(tmp_path / "two" / "hf")
    assert w1.keys() == w2.keys()
    start = _weights(TINY_MODEL)
    moved = [k for k in w1 if k in start]  # the reward model's new score head has no start: left out
    gap = sum((w2[k] - w1[k]).double().square().sum() for k in moved)
    update = sum((w1[k] - start[k]).double().square().sum() for k in moved)
    assert float((gap / update).sqrt()) <= 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Lightning's FSDPStrategy refuses a CPU)")
def test_fsdp_full_checkpoint_resumes_on_gpu(tmp_path):
    """Lightning's own FSDPStrategy on up to 2 GPUs with `state_dict_type: full` (one checkpoint file gathered on rank
    0: the path that segfaults on CPU processes): a run resumed from its step-2 file logs the uninterrupted losses."""
    n = min(torch.cuda.device_count(), 2)
    fsdp = ["--config", "configs/strategies/fsdp.yaml", "--trainer.accelerator=gpu", f"--trainer.devices={n}",
            "--trainer.strategy.init_args.state_dict_type=full", "--checkpoint.every_n_train_steps=2",
            "--checkpoint.save_top_k=-1", "--trainer.max_steps=4", "--trainer.limit_val_batches=0"]
    full = _finish(*_start("sft", tmp_path / "full", 1, *fsdp), ranks=n)
    step2 = next((tmp_path / "full").rglob("epoch=0-step=2.ckpt"))
    assert step2.is_file()
    resumed = _finish(*_start("sft", tmp_path / "resumed", 1, *fsdp, f"--ckpt_path={step2}"), ranks=n)
    for s in (0, 1):
        _close(resumed[0]["steps"][s]["train/loss"], full[0]["steps"][s + 2]["train/loss"], rtol=1e-4, atol=1e-5)
