"""StageHooks.global_mean: a loss whose DDP-averaged gradient is the mean over every rank's items; root_device;
every stage runs the base checkpoint hooks and holds its explicit pieces (OptimSpec, HFExport)."""

import types

import pytest
import torch

from core.models import ModelSpec
from core.optim import OptimSpec
from core.reward_spec import RewardSpec
from modules.dpo import DPOModule
from modules.ppo import PPOModule
from modules.rejection_sampling import RejectionSamplingModule
from modules.reward import RewardModule
from modules.sft import SFTModule
from modules.stage import StageHooks, root_device


class Hooks(StageHooks):
    def __init__(self, trainer=None):
        self._trainer = trainer

    @property
    def trainer(self):
        return self._trainer


def two_ranks(other_sum: float, other_count: float):
    """A trainer on 2 ranks whose reduce adds the other rank's (sum, count)."""
    reduce = lambda t, reduce_op: t + torch.tensor([other_sum, other_count])  # noqa: E731
    return types.SimpleNamespace(world_size=2, strategy=types.SimpleNamespace(reduce=reduce))


def test_one_process_is_the_plain_mean_and_nothing_is_zero():
    total = torch.tensor(6.0, requires_grad=True)
    loss, mean = Hooks().global_mean(total, torch.tensor(3))
    assert loss.item() == 2.0 and mean.item() == 2.0  # 6 / 3
    loss.backward()
    assert total.grad.item() == torch.tensor(1 / 3).item()  # d(6 * 1 / 3)/d total, in float32
    loss, mean = Hooks().global_mean(torch.tensor(0.0), torch.tensor(0))
    assert loss.item() == 0.0 and mean.item() == 0.0  # 0 / max(0, 1), never NaN


def test_two_ranks_weight_items_not_ranks():
    # rank 0: one item summing to 4; rank 1: three items summing to 6 -> global mean (4 + 6) / 4 = 2.5
    loss0, mean0 = Hooks(two_ranks(6.0, 3.0)).global_mean(torch.tensor(4.0), torch.tensor(1))
    loss1, mean1 = Hooks(two_ranks(4.0, 1.0)).global_mean(torch.tensor(6.0), torch.tensor(3))
    assert loss0.item() == 4 * 2 / 4 and loss1.item() == 6 * 2 / 4  # sum * world_size / all items
    assert (loss0.item() + loss1.item()) / 2 == 2.5  # DDP's average of the two equals the global mean
    assert mean0.item() == mean1.item() == 2.5  # a per-rank mean would have averaged 4 and 2 to 3


def test_root_device_is_the_strategys_else_the_default():
    trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device("cuda", 1)))
    assert root_device(Hooks(trainer)) == torch.device("cuda", 1)  # the default is not read under a trainer
    assert root_device(Hooks(trainer), torch.device("cpu")) == torch.device("cuda", 1)
    assert root_device(Hooks()) is None  # SFT, reward, rejection sampling: the loaders' default
    assert root_device(Hooks(), torch.device("cpu")) == torch.device("cpu")  # PPO, DPO pass module.device


def _stages(tiny_model_dir, **kw) -> list:
    """The five stage modules, built without loading weights; kw goes to every constructor."""
    spec, oracle = ModelSpec(path=str(tiny_model_dir)), RewardSpec(oracle="synthetic")
    return [SFTModule(spec, **kw), RewardModule(spec, **kw), DPOModule(spec, **kw), PPOModule(spec, oracle, **kw),
            RejectionSamplingModule(spec, oracle, **kw)]


def test_every_stage_runs_the_base_checkpoint_hooks(tiny_model_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(StageHooks, "on_save_checkpoint", lambda self, ckpt: calls.append(("save", self.stage)))
    monkeypatch.setattr(StageHooks, "on_load_checkpoint", lambda self, ckpt: calls.append(("load", self.stage)))
    for module in _stages(tiny_model_dir):
        module.generator = torch.Generator()  # PPO saves its rollout generator's state
        module.on_save_checkpoint({"state_dict": {}})
        module.on_load_checkpoint({"state_dict": {}})
    stages = ["sft", "reward", "dpo", "ppo", "rs"]
    assert calls == [(hook, stage) for stage in stages for hook in ("save", "load")]


@pytest.mark.parametrize("decay", ["constant", "cosine"])
def test_every_stage_holds_its_optimisation_and_export_from_the_same_arguments(tiny_model_dir, decay):
    adam = lambda params: torch.optim.Adam(params)  # noqa: E731
    kw = dict(optimizer=adam, warmup_steps=3, decay=decay, save_dir="out", merge_lora=False, overwrite=True)
    for module in _stages(tiny_model_dir, **kw):
        assert module.optim == OptimSpec(adam, None, 3, decay), module.stage
        export = module.export
        assert ((export.stage, export.save_dir, export.merge_lora, export.overwrite)
                == (module.stage, "out", False, True))
        assert module.configure_callbacks() == [export]  # no trainer: the export alone
        assert {"warmup_steps", "decay", "save_dir", "merge_lora", "overwrite"} <= set(module.hparams)
    assert [m.export.model for m in _stages(tiny_model_dir)] == ["policy", "backbone", "policy", "policy", "policy"]


def test_shared_arguments_are_documented_in_every_stage():
    for cls in (SFTModule, RewardModule, DPOModule, PPOModule, RejectionSamplingModule):
        args = cls.__doc__.split("Args:")[1]
        for name in ("optimizer", "scheduler", "warmup_steps", "decay", "save_dir", "merge_lora", "overwrite"):
            assert f"\n        {name}: " in args, (cls.__name__, name)
