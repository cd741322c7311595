"""Every `rlhf ...` (or `python -m MODULE ...`) command in the README's bash blocks is one a user can paste: a stage's
config files and flags parse (LightningCLI --print_config, which exits before anything is built), a tool's or
module's flags parse with its own parser, and a pipeline file loads with its tool stages checked (--dry-run). Models
and data the commands name are not read."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex

import pytest

from recipes.cli import STAGES, TOOLS
from tests.conftest import ROOT, printed_config


def readme_commands() -> list[tuple[int, list[str]]]:
    """(README line, argv after `rlhf`) of each rlhf command in a ```bash block: continuation lines joined,
    trailing `# comments` dropped, `a && b` split."""
    text = (ROOT / "README.md").read_text()
    found = []
    for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
        first = text.count("\n", 0, block.start(1)) + 1
        lines = block.group(1).split("\n")
        i = 0
        while i < len(lines):
            start, command = i, lines[i]
            while command.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command.rstrip()[:-1] + " " + lines[i]
            i += 1
            words = shlex.split(command, comments=True)
            segments, current = [], []
            for word in words:
                if word == "&&":
                    segments.append(current)
                    current = []
                else:
                    current.append(word)
            segments.append(current)
            for segment in segments:
                if segment and segment[0] == "srun":  # a cluster launcher in front
                    segment = segment[1:]
                if segment and (segment[0] == "rlhf" or segment[0].endswith("/rlhf")):
                    found.append((first + start, segment[1:]))
                elif (len(segment) > 2 and segment[0].split("/")[-1] in ("python", "python3") and segment[1] == "-m"
                      and segment[2] not in ("pytest", "venv", "pip")):
                    found.append((first + start, ["-m", *segment[2:]]))  # our modules run with python -m
    return found


COMMANDS = readme_commands()


class Parsed(Exception):
    """Raised by the patched parse_args once a tool's flags have parsed, so its main goes no further."""


def test_the_readme_has_commands_for_every_stage_and_tool():
    named = {argv[0] for _, argv in COMMANDS}
    assert set(STAGES) <= named, set(STAGES) - named
    assert {"quickstart", "pipeline", "generate", "eval", "report", "label", "critique-revise", "relabel"} <= named


@pytest.mark.parametrize("line,argv", COMMANDS, ids=[f"README:{line}" for line, _ in COMMANDS])
def test_readme_command_parses(line, argv, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    if argv[0] == "-m" and argv[1] == "recipes.cli":  # python -m recipes.cli is the rlhf command
        argv = argv[2:]
    command, args = argv[0], argv[1:]
    if command == "-m":  # python -m MODULE ARGS: its main's parser
        parses(args[0], args[1:], monkeypatch)
        return
    assert command in STAGES or command in TOOLS, f"README.md:{line}: rlhf {command} is no command"
    if command in STAGES:
        assert "trainer:" in printed_config(command, args, monkeypatch, capsys), f"README.md:{line}"
    elif command == "pipeline":
        from recipes import pipeline

        pipeline.main([*args, "--dry-run"])  # loads the file and checks its tool stages' flags; runs nothing
        assert "# " in capsys.readouterr().out
    else:
        parses(TOOLS[command][0], args, monkeypatch)


def parses(module: str, args: list[str], monkeypatch) -> None:
    """MODULE's main(args) gets as far as its argparse parser accepting args (then Parsed stops it)."""
    real = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    with pytest.raises(Parsed):
        importlib.import_module(module).main(args)
