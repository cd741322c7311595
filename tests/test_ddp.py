"""Every stage keeps working under DDP: its tiny config on 2 CPU processes (gloo)."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
@pytest.mark.parametrize("stage,extra", [("sft", []), ("reward", []), ("dpo", []), ("rs", []), ("ppo", []),
                                         ("reward", ["--data.share_prompt=true"]), ("dpo", ["--data.share_prompt=true"])],
                         ids=["sft", "reward", "dpo", "rs", "ppo", "reward-shared-prompt", "dpo-shared-prompt"])
def test_tiny_config_under_ddp_on_two_cpu_processes(stage, extra, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.cli", stage, "fit", "--config", f"configs/{stage}/tiny.yaml",
         "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_steps=4",
         f"--model.save_dir={tmp_path / 'hf'}", f"--trainer.default_root_dir={tmp_path}",
         f"--trainer.logger.init_args.save_dir={tmp_path}", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "hf" / "config.json").exists()
