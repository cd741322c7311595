"""Configs tier: every YAML parses against its recipe, through the exact command its header documents."""

import re
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

STAGE_DIRS = {"sft": "sft", "reward": "reward", "dpo": "dpo", "ppo": "ppo", "rs": "rs"}
CONFIGS = sorted(p for d in STAGE_DIRS.values() for p in (ROOT / "configs" / d).glob("*.yaml"))


def documented_command(path: Path) -> tuple[str, list[str]]:
    """The `rlhf <stage> fit --config ...` line in the YAML's header comment: (stage, its --config files)."""
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    header = header.replace("\\\n#", " ")
    own = str(path.relative_to(ROOT))
    for match in re.finditer(r"rlhf (\w+) fit((?: +--config[ =]+\S+)+)", header):
        configs = re.findall(r"--config[ =]+(\S+)", match.group(2))
        if own in configs:
            return match.group(1), configs
    raise AssertionError(f"{path}'s header comment has no `rlhf <stage> fit --config {own}` command")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses_against_its_recipe(path, monkeypatch, capsys):
    from recipes.cli import STAGES

    stage, configs = documented_command(path)
    assert STAGE_DIRS[stage] == path.parent.name, "a config lives under its stage's folder"
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [f"rlhf {stage}"])
    args = ["fit", *[a for c in configs for a in ("--config", c)], "--print_config"]
    module = __import__(STAGES[stage], fromlist=["main"])
    with pytest.raises(SystemExit) as exit_:
        module.main(args)
    assert exit_.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"] and resolved["data"]["train_file"]


def test_every_stage_has_a_tiny_config():
    for stage in STAGE_DIRS.values():
        assert (ROOT / "configs" / stage / "tiny.yaml").exists(), stage


@pytest.mark.parametrize("stage", list(STAGE_DIRS))
def test_validate_and_test_subcommands_run_on_tiny(stage, run_recipe, capsys):
    for subcommand in ("validate", "test"):
        run_recipe(stage, subcommand, "--config", f"configs/{stage}/tiny.yaml")
    assert "val/" in capsys.readouterr().out  # the metrics tables are printed
