"""Held-out judging during RL (modules/overoptimisation.py, StageHooks.judged_metrics): the over-optimisation
monitor on hand-written sequences, val/judge_reward, val/reward_gap and val/overoptimising from scripted
rewards, export_best picking the weights of the judge's best validation (PPO and rejection sampling, and after a
resume), config errors raised at construction, and the judging keys in the resume contract."""

from __future__ import annotations

import csv
import importlib
import sys
import textwrap

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from core.generation import SamplingSpec
from core.models import LoraSpec, ModelSpec, load_causal_lm
from core.reward_spec import RewardSpec
from datamodules.prompts import PromptDataModule
from modules.overoptimisation import BestWeights, OveroptimisationMonitor
from modules.ppo import PPOModule
from modules.rejection_sampling import RejectionSamplingModule
from tests.conftest import ROOT

# ----- (a) the monitor on hand-written sequences -----


def test_monitor_fires_at_the_patience_th_rise_with_a_fall_not_before():
    monitor = OveroptimisationMonitor(patience=2)
    # validation 1 has nothing to compare with; 2: reward up, judge down (1 of 2); 3: again (2 of 2) -> fires
    assert ([monitor.update(r, j) for r, j in [(1.0, 5.0), (2.0, 4.0), (3.0, 3.0), (4.0, 2.0)]]
            == [False, False, True, True])
    assert monitor.streak == 3 and monitor.trajectory == [(2.0, 4.0), (3.0, 3.0), (4.0, 2.0)]  # last patience + 1


def test_monitor_resets_when_the_pattern_breaks():
    monitor = OveroptimisationMonitor(patience=2)
    seq = [(1.0, 5.0), (2.0, 4.0),  # 1
           (3.0, 4.5),  # judge rose: 0
           (4.0, 4.0), (4.0, 3.0),  # 1, then reward flat: 0
           (5.0, 2.0), (4.0, 1.0),  # 1, then reward fell: 0
           (5.0, 0.5), (6.0, 0.0)]  # 1, 2 -> fires
    fired = [monitor.update(r, j) for r, j in seq]
    assert fired == [False] * 8 + [True]
    monitor.update(7.0, 0.0)  # judge flat: no longer firing
    assert not monitor.firing and monitor.streak == 0


def test_monitor_patience_zero_never_fires_and_negative_is_refused():
    monitor = OveroptimisationMonitor(patience=0)
    assert not any(monitor.update(float(i), -float(i)) for i in range(10))
    with pytest.raises(ValueError, match="overopt_patience must be >= 0"):
        OveroptimisationMonitor(-1)


def test_monitor_state_round_trip_continues_the_count():
    monitor = OveroptimisationMonitor(patience=3)
    for r, j in [(1.0, 5.0), (2.0, 4.0), (3.0, 3.0)]:
        monitor.update(r, j)
    state = monitor.state_dict()
    resumed = OveroptimisationMonitor(patience=3)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state and not resumed.firing
    assert resumed.update(4.0, 2.0)  # the third rise-and-fall, counted across the resume
    shorter = OveroptimisationMonitor(patience=1)  # a resume may change the patience: trajectory trimmed
    shorter.load_state_dict(state)
    assert shorter.firing and shorter.trajectory == [(2.0, 4.0), (3.0, 3.0)]


def test_best_weights_keeps_the_first_best_and_copies_trainable_weights_only():
    w = torch.nn.Parameter(torch.zeros(2))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    best = BestWeights("val/judge_reward", "max")
    for step, score in [(1, 0.5), (2, 0.9), (3, 0.9), (4, float("nan")), (5, 0.1)]:
        with torch.no_grad():
            w.fill_(step)
        best.update(score, step, [("w", w), ("frozen", frozen)])
    assert best.step == 2 and best.score == 0.9 and set(best.weights) == {"w"}  # ties keep the earlier one
    torch.testing.assert_close(best.weights["w"], torch.full((2,), 2.0))
    low = BestWeights("val/kl", "min")
    assert low.update(3.0, 1, []) and low.update(2.0, 2, []) and not low.update(2.5, 3, [])
    assert not BestWeights("val/reward", "max").load_state_dict(low.state_dict())  # another metric: afresh


# ----- config errors at construction -----


def test_export_best_of_a_metric_never_logged_is_a_config_error(tiny_model_dir):
    policy, oracle = ModelSpec(path=str(tiny_model_dir)), RewardSpec(oracle="synthetic")
    for cls in (PPOModule, RejectionSamplingModule):
        with pytest.raises(ValueError, match="export_best='val/judge_reward'.*need val_reward"):
            cls(policy, oracle, export_best="val/judge_reward")
        with pytest.raises(ValueError, match="export_best='val/rewrad' is not a metric this module logs"):
            cls(policy, oracle, val_reward=oracle, export_best="val/rewrad")
        with pytest.raises(ValueError, match="export_best_mode"):
            cls(policy, oracle, export_best="val/reward", export_best_mode="best")
        cls(policy, oracle, val_reward={"oracle": "synthetic"}, export_best="val/reward_gap", export_best_mode="min")


def test_export_best_without_validation_stops_before_training(tiny_model_dir, synthetic_dir, tmp_path):
    module = PPOModule(ModelSpec(path=str(tiny_model_dir)), RewardSpec(oracle="synthetic"), export_best="val/reward")
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="export_best='val/reward' needs validation during fit"):
        trainer.fit(module, _dm(synthetic_dir, tiny_model_dir))
    assert module.policy is None  # before any weights load


# ----- scripted rewards: the optimised one and the judge return a value per validation step -----

SCRIPT = '''
STATE = {"step": None, "reward": {}, "judge": {}}

def _scripted(name, responses):
    step = STATE["step"]
    value = 0.0 if step is None else STATE[name][step]  # training rollouts score 0
    return [value] * len(responses)

def reward(prompts, responses, meta):
    return _scripted("reward", responses)

def judge(prompts, responses, meta):
    return _scripted("judge", responses)
'''


@pytest.fixture
def script(tmp_path, monkeypatch):
    """The module `heldout_script` (functions `reward`, `judge`); set STATE["reward"/"judge"] = {step: value}."""
    (tmp_path / "heldout_script.py").write_text(textwrap.dedent(SCRIPT))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "heldout_script", raising=False)
    module = importlib.import_module("heldout_script")
    yield module
    sys.modules.pop("heldout_script", None)


class Recorder(Callback):
    """Tells the scripted rewards the step of each validation, and records its metrics and the policy's weights."""

    def __init__(self, state: dict):
        self.state, self.metrics, self.weights = state, {}, {}

    def on_validation_start(self, trainer, module):
        self.state["step"] = trainer.global_step

    def on_validation_end(self, trainer, module):
        self.state["step"] = None
        step = trainer.global_step
        self.metrics[step] = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.weights[step] = {n: p.detach().clone() for n, p in module.policy.named_parameters()}


def _dm(synthetic_dir, tiny_model_dir) -> PromptDataModule:
    return PromptDataModule(
        train_file=str(synthetic_dir / "prompts_train.jsonl"), val_file=str(synthetic_dir / "prompts_val.jsonl"),
        tokenizer=str(tiny_model_dir), max_prompt_length=32, batch_size=2,
    )


def _trainer(root, steps: int, *callbacks) -> Trainer:
    return Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=0,
        default_root_dir=root, callbacks=list(callbacks),
    )


def _ppo(tiny_model_dir, tmp_path, **kw) -> PPOModule:
    module = PPOModule(
        ModelSpec(path=str(tiny_model_dir)), RewardSpec(functions=["heldout_script:reward"]),
        SamplingSpec(max_new_tokens=4), ppo_epochs=1, val_reward=RewardSpec(functions=["heldout_script:judge"]),
        save_dir=str(tmp_path / "hf"), **kw,
    )
    module.optim.optimizer = lambda params: torch.optim.AdamW(params, lr=1e-3)  # every step moves the policy
    return module


def _rs(tiny_model_dir, tmp_path, **kw) -> RejectionSamplingModule:
    module = RejectionSamplingModule(
        ModelSpec(path=str(tiny_model_dir)), RewardSpec(functions=["heldout_script:reward"]),
        SamplingSpec(max_new_tokens=4, num_samples=2), val_reward=RewardSpec(functions=["heldout_script:judge"]),
        save_dir=str(tmp_path / "hf"), **kw,
    )
    module.optim.optimizer = lambda params: torch.optim.AdamW(params, lr=1e-3)
    return module


def _exported(path) -> dict[str, torch.Tensor]:
    return dict(load_causal_lm(ModelSpec(path=str(path)), trainable=False).named_parameters())


def _assert_same(exported: dict, recorded: dict) -> None:
    assert set(exported) == set(recorded)
    for name, value in recorded.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0, msg=name)


# ----- (b) reward up, judge down -> the warning and val/overoptimising -----


def test_ppo_warns_when_reward_rises_and_judge_falls(script, synthetic_dir, tiny_model_dir, tmp_path):
    script.STATE["reward"] = {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
    script.STATE["judge"] = {1: 4.0, 2: 3.0, 3: 2.0, 4: 2.5}
    recorder = Recorder(script.STATE)
    with pytest.warns(UserWarning, match=r"over-optimisation at step 3: .*val/reward rose \(1 -> 2 -> 3\) while "
                                         r"the held-out val/judge_reward fell \(4 -> 3 -> 2\).*kl_coef.*export_best"):
        _trainer(tmp_path, 4, recorder).fit(_ppo(tiny_model_dir, tmp_path, overopt_patience=2),
                                            _dm(synthetic_dir, tiny_model_dir))
    m = recorder.metrics
    assert [m[s]["val/overoptimising"] for s in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 0.0]  # step 4: judge rose
    assert [m[s]["val/judge_reward"] for s in (1, 2, 3, 4)] == [4.0, 3.0, 2.0, 2.5]
    assert [m[s]["val/reward"] for s in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 4.0]  # val/reward keeps its meaning
    assert [m[s]["val/reward_gap"] for s in (1, 2, 3, 4)] == [-3.0, -1.0, 1.0, 1.5]


def test_rs_logs_judge_metrics_and_patience_zero_logs_no_warning(script, synthetic_dir, tiny_model_dir, tmp_path,
                                                                   recwarn):
    script.STATE["reward"] = {1: 1.0, 2: 2.0, 3: 3.0}
    script.STATE["judge"] = {1: 3.0, 2: 2.0, 3: 1.0}
    recorder = Recorder(script.STATE)
    _trainer(tmp_path, 3, recorder).fit(_rs(tiny_model_dir, tmp_path, overopt_patience=0),
                                        _dm(synthetic_dir, tiny_model_dir))
    assert recorder.metrics[3] == {"val/reward": 3.0, "val/judge_reward": 1.0, "val/reward_gap": 2.0}
    assert not [w for w in recwarn if "over-optimisation" in str(w.message)]


# ----- (c) export_best: the weights of the best validation, not the last -----


def test_ppo_exports_the_weights_of_the_judges_best_validation(script, synthetic_dir, tiny_model_dir, tmp_path, capsys):
    script.STATE["reward"] = {s: float(s) for s in range(1, 5)}
    script.STATE["judge"] = {1: 0.1, 2: 0.5, 3: 0.9, 4: 0.3}  # peaks at step 3
    recorder = Recorder(script.STATE)
    module = _ppo(tiny_model_dir, tmp_path, export_best="val/judge_reward")
    _trainer(tmp_path, 4, recorder).fit(module, _dm(synthetic_dir, tiny_model_dir))
    assert "exporting the policy of step 3, where val/judge_reward was maximal (0.9)" in capsys.readouterr().out
    exported = _exported(tmp_path / "hf")
    _assert_same(exported, recorder.weights[3])
    assert not torch.equal(recorder.weights[3]["model.norm.weight"], recorder.weights[4]["model.norm.weight"])


def test_rs_exports_the_best_by_min(script, synthetic_dir, tiny_model_dir, tmp_path, capsys):
    script.STATE["reward"] = {1: 3.0, 2: 1.0, 3: 2.0}  # val/reward lowest at step 2
    script.STATE["judge"] = {s: 0.0 for s in range(1, 4)}
    recorder = Recorder(script.STATE)
    module = _rs(tiny_model_dir, tmp_path, export_best="val/reward", export_best_mode="min")
    _trainer(tmp_path, 3, recorder).fit(module, _dm(synthetic_dir, tiny_model_dir))
    assert "exporting the policy of step 2, where val/reward was minimal (1)" in capsys.readouterr().out
    _assert_same(_exported(tmp_path / "hf"), recorder.weights[2])
    assert not torch.equal(recorder.weights[2]["model.norm.weight"], recorder.weights[3]["model.norm.weight"])


def test_rs_lora_policy_exports_the_best_adapter(script, synthetic_dir, tiny_model_dir, tmp_path):
    script.STATE["reward"] = {s: 0.0 for s in range(1, 4)}
    script.STATE["judge"] = {1: 0.0, 2: 1.0, 3: 0.5}
    recorder = Recorder(script.STATE)
    module = RejectionSamplingModule(
        ModelSpec(path=str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0)),
        RewardSpec(functions=["heldout_script:reward"]), SamplingSpec(max_new_tokens=4, num_samples=2),
        val_reward=RewardSpec(functions=["heldout_script:judge"]), export_best="val/judge_reward",
        save_dir=str(tmp_path / "hf"), merge_lora=False,
    )
    module.optim.optimizer = lambda params: torch.optim.AdamW(params, lr=1e-2)
    _trainer(tmp_path, 3, recorder).fit(module, _dm(synthetic_dir, tiny_model_dir))
    assert set(module.best_weights.weights) == {n for n, p in module.policy.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in module.best_weights.weights)  # the adapters only
    _assert_same(dict(module.policy.named_parameters()), recorder.weights[2])  # the policy fit left and exported
    assert (tmp_path / "hf" / "adapter_config.json").exists()
    lora_b = next(n for n in recorder.weights[2] if "lora_B" in n)
    assert not torch.equal(recorder.weights[2][lora_b], recorder.weights[3][lora_b])


# ----- (d) after a resume: the best so far and its weights come back from the checkpoint -----


class SaveAt(Callback):
    """trainer.save_checkpoint after the validation of `step` (a kill after it)."""

    def __init__(self, step: int, path):
        self.step, self.path = step, path

    def on_validation_end(self, trainer, module):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_ppo_export_best_survives_a_resume(script, synthetic_dir, tiny_model_dir, tmp_path, capsys):
    script.STATE["reward"] = {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
    script.STATE["judge"] = {1: 0.9, 2: 0.5, 3: 0.3, 4: 0.2}  # best at step 1, before the checkpoint at step 2
    ckpt = tmp_path / "step2.ckpt"
    killed = Recorder(script.STATE)
    module = _ppo(tiny_model_dir, tmp_path / "killed", export_best="val/judge_reward", overopt_patience=3)
    _trainer(tmp_path, 2, killed, SaveAt(2, ckpt)).fit(module, _dm(synthetic_dir, tiny_model_dir))
    state = torch.load(ckpt, weights_only=False)["judge_state"]  # hparams here hold ModelSpec objects (no CLI)
    assert state["best"]["step"] == 1 and state["monitor"]["streak"] == 1
    torch.save(state, tmp_path / "judge_state.pt")  # plain types and tensors: a weights_only load reads it
    reread = torch.load(tmp_path / "judge_state.pt", weights_only=True)
    assert reread["best"]["weights"].keys() == state["best"]["weights"].keys() and reread["best"]["weights"]

    resumed = Recorder(script.STATE)
    module = _ppo(tiny_model_dir, tmp_path, export_best="val/judge_reward", overopt_patience=3)
    with pytest.warns(UserWarning, match=r"over-optimisation at step 4: .*\(0\.9 -> 0\.5 -> 0\.3 -> 0\.2\)"):
        _trainer(tmp_path, 4, resumed).fit(module, _dm(synthetic_dir, tiny_model_dir), ckpt_path=str(ckpt),
                                           weights_only=False)  # direct construction: hparams hold ModelSpec objects
    assert sorted(resumed.metrics) == [3, 4]  # the resumed run validated steps 3 and 4 only
    assert resumed.metrics[4]["val/overoptimising"] == 1.0  # the streak counted across the resume
    assert "exporting the policy of step 1" in capsys.readouterr().out
    _assert_same(_exported(tmp_path / "hf"), killed.weights[1])


def test_a_resume_with_another_judge_restarts_the_judge_state(tiny_model_dir):
    policy = ModelSpec(path=str(tiny_model_dir))
    old = RejectionSamplingModule(policy, RewardSpec(oracle="synthetic"), val_reward=RewardSpec(oracle="synthetic"),
                                  export_best="val/judge_reward")
    old.judge_monitor.update(1.0, 2.0)
    old.best_weights.update(2.0, 1, [])
    checkpoint = {"state_dict": {}}
    old.on_save_checkpoint(checkpoint)
    same = RejectionSamplingModule(policy, RewardSpec(oracle="synthetic"), val_reward={"oracle": "synthetic"},
                                   export_best="val/judge_reward")
    same.on_load_checkpoint(checkpoint)
    assert same.judge_monitor.trajectory == [(1.0, 2.0)] and same.best_weights.step == 1
    other = RejectionSamplingModule(policy, RewardSpec(oracle="synthetic"),
                                    val_reward=RewardSpec(functions=["core.tasks:oracle_reward"]),
                                    export_best="val/judge_reward")
    with pytest.warns(UserWarning,
                      match="judged with another val_reward: the best val/judge_reward .max. starts afresh"):
        other.on_load_checkpoint(checkpoint)
    assert other.judge_monitor.trajectory == [] and other.best_weights.step is None
    by_reward = RejectionSamplingModule(policy, RewardSpec(oracle="synthetic"), export_best="val/reward")
    with pytest.warns(UserWarning, match=r"judged with export_best val/judge_reward \(max\): the best val/reward"):
        by_reward.on_load_checkpoint(checkpoint)  # judge dropped: nothing to compare; another metric: afresh
    assert by_reward.best_weights.step is None


# ----- the resume contract: judging settings may change on resume -----


class _Stop(Exception):
    """Raised from a patched CLI hook: the run got that far."""


def test_judging_keys_may_change_on_resume(monkeypatch, tmp_path):
    from recipes.common import SAFE_ON_RESUME, SAFE_TO_EVALUATE, StageCLI
    from recipes.ppo import main

    assert {"val_reward", "overopt_patience", "export_best", "export_best_mode"} <= set(SAFE_ON_RESUME)
    assert set(SAFE_ON_RESUME) <= set(SAFE_TO_EVALUATE)
    ckpt = tmp_path / "hparams.ckpt"

    def save_hparams(cli):
        torch.save({"hyper_parameters": dict(cli.model.hparams)}, ckpt)
        raise _Stop

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["rlhf ppo"])
    args = ["fit", "--config", "configs/ppo/tiny.yaml", f"--trainer.default_root_dir={tmp_path}"]
    monkeypatch.setattr(StageCLI, "after_instantiate_classes", save_hparams)
    with pytest.raises(_Stop):
        main(args)
    monkeypatch.setattr(StageCLI, "before_instantiate_classes", lambda cli: (_ for _ in ()).throw(_Stop()))
    with pytest.raises(_Stop):  # passes the check: a judge, a patience and an export rule added on resume
        main([*args, f"--ckpt_path={ckpt}", "--model.val_reward.oracle=synthetic", "--model.overopt_patience=5",
              "--model.export_best=val/judge_reward", "--model.export_best_mode=max"])
    with pytest.raises(SystemExit, match="model.kl_coef"):  # still refused: it changes training
        main([*args, f"--ckpt_path={ckpt}", "--model.val_reward.oracle=synthetic", "--model.kl_coef=0.2"])


def test_ppo_recipe_logs_judge_and_exports_best(run_recipe, tmp_path, capsys):
    run_recipe("ppo", "fit", "--config", "configs/ppo/tiny.yaml", "--trainer.max_steps=4",
               "--model.val_reward.oracle=synthetic", "--model.export_best=val/judge_reward",
               f"--model.save_dir={tmp_path / 'hf'}")
    out = capsys.readouterr().out
    assert "export_best: exporting the policy of step" in out and (tmp_path / "hf" / "model.safetensors").exists()
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"val/reward", "val/judge_reward", "val/reward_gap", "val/overoptimising"} <= logged


def test_rs_test_subcommand_reports_the_judge_under_test(run_recipe):
    cli = run_recipe("rs", "test", "--config", "configs/rs/tiny.yaml", "--trainer.limit_test_batches=1",
                     "--model.val_reward.oracle=synthetic", "--model.export_best=val/reward_gap")
    assert set(cli.trainer.callback_metrics) == {"test/reward", "test/judge_reward", "test/reward_gap"}  # no monitor
