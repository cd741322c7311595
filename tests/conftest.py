"""Shared fixtures: the committed tiny model and task data, and a runner for recipes."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models gain nothing from more threads, and the box has 2 cores

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TINY_MODEL = FIXTURES / "tiny-llama"
SYNTHETIC = FIXTURES / "synthetic"


@pytest.fixture
def tiny_model_dir() -> Path:
    return TINY_MODEL


@pytest.fixture
def synthetic_dir() -> Path:
    return SYNTHETIC


@pytest.fixture
def run_recipe(monkeypatch, tmp_path):
    """run_recipe("sft", "fit", "--config", ...) runs a stage's LightningCLI in-process with outputs under tmp_path."""

    def run(stage: str, *args: str, outputs: bool = True):
        from recipes.cli import STAGES

        monkeypatch.chdir(ROOT)
        monkeypatch.setattr(sys, "argv", [f"rlhf {stage}"])  # LightningCLI warns if argv and args both carry args
        extra = [f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--trainer.default_root_dir={tmp_path}"]
        return importlib.import_module(STAGES[stage]).main([*args, *(extra if outputs else [])])

    return run
