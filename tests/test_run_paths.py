"""Run paths: trainer.default_root_dir is the run root (logs, checkpoints, config.yaml, a relative model export all
land under it), and `--ckpt_path last` resumes the newest run's last.ckpt of the stage or stops naming where it
looked. End to end through the real `rlhf` command."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
import yaml
from jsonargparse import Namespace

from recipes.common import last_checkpoint, root_logger_dirs
from tests.conftest import ROOT

CSV = "lightning.pytorch.loggers.CSVLogger"


def _config(root=None, save_dir="runs", dirpath=None, logger=True) -> Namespace:
    csv_logger = Namespace(class_path=CSV, init_args=Namespace(save_dir=save_dir, name="sft", version=None))
    return Namespace(trainer=Namespace(default_root_dir=root, logger=csv_logger if logger else False),
                     checkpoint=Namespace(dirpath=dirpath))


@pytest.mark.parametrize("root,save_dir,expected", [
    ("/r", "runs", "/r/runs"),  # the default logger: under the root
    ("/r", "logs/x", "/r/logs/x"),  # a relative save_dir given now: under the root too
    ("/r", "/abs/logs", "/abs/logs"),  # absolute: as given
    (None, "runs", "runs"),  # no root: the current folder, as Lightning
])
def test_relative_logger_dir_goes_under_the_root(root, save_dir, expected):
    config = _config(root, save_dir)
    root_logger_dirs(config)
    assert config.trainer.logger.init_args.save_dir == expected
    root_logger_dirs(_config(root, logger=False))  # no logger: nothing to move


def test_last_takes_the_highest_version_holding_last_ckpt(tmp_path):
    for version in ["version_2", "version_9", "version_10", "version_11", "other"]:
        (tmp_path / "runs" / "sft" / version / "checkpoints").mkdir(parents=True)
        if version != "version_11":  # a run that died before its first checkpoint
            (tmp_path / "runs" / "sft" / version / "checkpoints" / "last.ckpt").touch()
    os.utime(tmp_path / "runs/sft/version_2/checkpoints/last.ckpt", (4e9, 4e9))  # newest file: by number, not mtime
    config = _config(str(tmp_path))
    root_logger_dirs(config)
    assert last_checkpoint(config, "rlhf sft") == str(tmp_path / "runs/sft/version_10/checkpoints/last.ckpt")
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "last.ckpt").touch()
    assert (last_checkpoint(_config(str(tmp_path), dirpath=str(tmp_path / "ckpts")), "rlhf sft")
            == str(tmp_path / "ckpts/last.ckpt"))


def test_last_without_a_checkpoint_names_where_it_looked(tmp_path):
    config = _config(str(tmp_path))
    root_logger_dirs(config)
    with pytest.raises(SystemExit, match="no checkpoint found at .*runs/sft/version_\\*/checkpoints/last.ckpt"):
        last_checkpoint(config, "rlhf sft")


def test_print_config_shows_the_logger_dir_as_given(tmp_path, capsys, monkeypatch):
    from recipes.sft import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["rlhf sft"])
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/sft/tiny.yaml", f"--trainer.default_root_dir={tmp_path}", "--print_config"])
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["default_root_dir"] == str(tmp_path) and trainer["logger"]["init_args"]["save_dir"] == "runs"


def _files(folder) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def _rlhf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recipes.cli", "sft", "fit", "--config", "configs/sft/tiny.yaml",
                           "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_default_root_dir_holds_the_whole_run_and_last_resumes_it(tmp_path):
    before = _files(ROOT / "runs")
    proc = _rlhf(f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=3")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "sft" / "version_0"
    assert (run / "metrics.csv").exists() and (run / "config.yaml").exists()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    # the config's relative model.save_dir (runs/sft/tiny/hf_model) is taken under the root as well
    assert (tmp_path / "runs" / "sft" / "tiny" / "hf_model" / "model.safetensors").exists()
    assert (yaml.safe_load((run / "config.yaml").read_text())["trainer"]["logger"]["init_args"]["save_dir"]
            == str(tmp_path / "runs"))

    proc = _rlhf(f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=5", "--ckpt_path=last")
    assert proc.returncode == 0, proc.stderr
    assert f"--ckpt_path last: resuming {run / 'checkpoints' / 'last.ckpt'}" in proc.stdout
    resumed = tmp_path / "runs" / "sft" / "version_1"
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    steps = sorted(int(r["step"]) for r in csv.DictReader((resumed / "metrics.csv").open()) if r.get("train/loss"))
    assert steps == [3, 4]  # it went on from global_step 3, not from 0

    empty = tmp_path / "empty"
    proc = _rlhf(f"--trainer.default_root_dir={empty}", "--ckpt_path=last")
    assert proc.returncode != 0
    assert f"no checkpoint found at {empty / 'runs' / 'sft' / 'version_*' / 'checkpoints' / 'last.ckpt'}" in proc.stderr
    assert "Traceback" not in proc.stderr and not empty.exists()  # stopped at parse: nothing loaded or written
    assert _files(ROOT / "runs") == before
