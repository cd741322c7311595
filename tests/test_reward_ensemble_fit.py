"""`rlhf reward fit --members N`: N members in one command, each with its own seed, save_dir, bootstrap resample
and log folder; a rerun skips finished members; the parent folder is the ensemble in a RewardSpec (and in
`rlhf ppo`); bad uses fail in one line before anything loads."""

import logging
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from core.outputs import MARKER
from core.reward_spec import RewardSpec, as_reward_spec
from tests.conftest import ROOT

TINY = "configs/reward/tiny.yaml"
PROMPTS = ["Reverse: a b c\nAnswer:"] * 3
RESPONSES = [" c b a", " a b c", " c b"]


def _head(member):
    return next(v for k, v in load_file(member / "model.safetensors").items() if k.startswith("score."))


def test_members_fit_resume_and_load_as_one_ensemble(run_recipe, tmp_path, capsys, caplog):
    parent = tmp_path / "rm_ensemble"
    fit = ["fit", "--config", TINY, "--members", "3", "--data.bootstrap", "true", "--seed_everything", "7",
           f"--model.save_dir={parent}", "--trainer.max_steps=2", "--trainer.num_sanity_val_steps=0"]
    caplog.set_level(logging.INFO, logger="datamodules.preference")
    run_recipe("reward", *fit)
    members = [parent / f"member_{i}" for i in range(3)]
    assert all((m / MARKER).is_file() for m in members)
    for i in range(3):  # each member logs and checkpoints in its own folder, with its own seed
        config = (tmp_path / "runs" / "reward" / f"member_{i}" / "version_0" / "config.yaml").read_text()
        assert f"seed_everything: {7 + i}\n" in config and f"save_dir: {members[i]}\n" in config
        assert (tmp_path / "runs" / "reward" / f"member_{i}" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    heads = [_head(m) for m in members]  # seeds differ: so do the (randomly initialised, trained) score heads
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])
    # bootstrap_seed follows each member's run seed, and those seeds draw different resamples
    seeds = [int(s) for s in re.findall(r"bootstrap resample \(seed (\d+)\)", caplog.text)]
    assert seeds == [7, 8, 9]
    assert _resample(7) != _resample(8)
    out = capsys.readouterr().out
    assert [f"member_{i} trained: {members[i]}" in out for i in range(3)] == [True] * 3

    # the same command again: all finished, nothing trains; without member_1's export (a run killed before its
    # end saves none), only member_1 trains
    stamps = [(m / MARKER).stat().st_mtime_ns for m in members]
    run_recipe("reward", *fit)
    assert [(m / MARKER).stat().st_mtime_ns for m in members] == stamps
    assert capsys.readouterr().out.count("skipped (a finished export is there)") == 3
    shutil.rmtree(members[1])
    run_recipe("reward", *fit)
    out = capsys.readouterr().out
    assert f"member_0 skipped (a finished export is there): {members[0]}" in out
    assert f"member_1 trained: {members[1]}" in out and "member_2 skipped" in out
    assert [(m / MARKER).stat().st_mtime_ns == s for m, s in zip(members, stamps)] == [True, False, True]
    assert (tmp_path / "runs" / "reward" / "member_1" / "version_1").is_dir()  # a new version: the first kept

    # --model.reward.models=[{path: parent}] --model.reward.ensemble mean: the three members, their mean
    spec = as_reward_spec({"models": [{"path": str(parent)}], "ensemble": "mean"})
    assert [m.path for m in spec.models] == [str(m) for m in members]
    a, b, c = (RewardSpec(models=[{"path": str(m)}]).load("cpu").score(PROMPTS, RESPONSES) for m in members)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(spec.load("cpu").score(PROMPTS, RESPONSES), (a + b + c) / 3)
    # ... and so in a later stage's command line
    cli = run_recipe("ppo", "fit", "--config", "configs/ppo/tiny.yaml", "--model.reward.oracle=null",
                     f"--model.reward.models=[{{path: {parent}}}]", "--model.reward.ensemble", "mean",
                     "--trainer.max_steps=2", f"--model.save_dir={tmp_path / 'ppo'}")
    assert [m.path for m in cli.model.reward.models] == [str(m) for m in members] and len(cli.model.reward._loaded) == 3


def test_members_continue_an_ensemble_member_by_member(run_recipe, tmp_path):
    """A backbone that is an ensemble folder: member i starts from member_i (its score head too), so with lr 0
    each continued member keeps exactly its own parent's head; too few parent members: one line, nothing trained."""
    first, second = tmp_path / "round0", tmp_path / "round1"
    common = ["fit", "--config", TINY, "--members", "2", "--seed_everything", "3", "--trainer.max_steps=1",
              "--trainer.num_sanity_val_steps=0", "--trainer.val_check_interval=null"]
    run_recipe("reward", *common, f"--model.save_dir={first}")
    parents = [_head(first / f"member_{i}") for i in range(2)]
    assert not torch.equal(parents[0], parents[1])
    run_recipe("reward", *common, f"--model.save_dir={second}", f"--model.backbone.path={first}",
               "--model.optimizer.init_args.lr=0.0")
    assert [torch.equal(_head(second / f"member_{i}"), parents[i]) for i in range(2)] == [True, True]
    with pytest.raises(SystemExit, match=re.escape(f"{first} is an ensemble without member_2")):
        run_recipe("reward", *common[:4], "3", *common[5:], f"--model.save_dir={tmp_path / 'round2'}",
                   f"--model.backbone.path={first}")
    assert not (tmp_path / "round2").exists()


def _resample(seed: int) -> list[str]:
    from datamodules.preference import PreferenceDataModule

    dm = PreferenceDataModule(str(ROOT / "tests/fixtures/synthetic/pairs_train.jsonl"),
                              tokenizer=str(ROOT / "tests/fixtures/tiny-llama"), bootstrap=True, bootstrap_seed=seed)
    dm.setup("fit")
    return [repr(row[:3]) for row in dm.train_rows]  # (chosen, rejected, margin) per pair


@pytest.mark.parametrize("args,message", [
    (["fit", "--members", "1"], "a whole number >= 2; got '1'"),
    (["fit", "--members=0"], "a whole number >= 2; got '0'"),
    (["fit", "--members", "two"], "a whole number >= 2; got 'two'"),
    (["fit", "--members", "2.5"], "a whole number >= 2; got '2.5'"),
    (["fit", "--members"], "a whole number >= 2; got nothing"),
    (["validate", "--members", "3"], "goes with `rlhf reward fit`, not `rlhf reward validate`"),
    (["--members", "3"], "not no subcommand"),
])
def test_bad_members_fail_in_one_line_before_anything_loads(args, message, monkeypatch):
    import recipes.reward

    monkeypatch.setattr(recipes.reward, "run_cli", lambda *a, **k: pytest.fail("reached LightningCLI"))
    with pytest.raises(SystemExit) as exit_:
        recipes.reward.main([*args, "--config", TINY])
    assert message in str(exit_.value.code) and "\n" not in str(exit_.value.code)


@pytest.mark.parametrize("extra,message", [
    (["--model.save_dir=null"], "--members needs --model.save_dir DIR"),
    (["--ckpt_path=last"], "cannot take --ckpt_path"),
    (["--seed_everything=true"], "set --seed_everything to a whole number"),
])
def test_members_refuse_what_has_no_member_meaning(extra, message, monkeypatch):
    from recipes.reward import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["rlhf reward"])
    monkeypatch.setattr("modules.reward.RewardModule.configure_model", lambda self: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(["fit", "--config", TINY, "--members", "2", *extra])
