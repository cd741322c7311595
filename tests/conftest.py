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
def bos_model_dir(tmp_path) -> Path:
    """The tiny model with a tokenizer that adds BOS (as Llama 2/3, Mistral and Gemma do; the committed one does
    not) and a chat template that writes BOS itself."""
    import shutil

    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    path = tmp_path / "bos-llama"
    shutil.copytree(TINY_MODEL, path)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    bos = [("<s>", raw.token_to_id("<s>"))]
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=bos)
    raw.save(str(path / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save_pretrained(path)
    return path


def printed_config(stage: str, args: list[str], monkeypatch, capsys) -> str:
    """`rlhf <stage> <args> --print_config` in-process (LightningCLI exits before anything is built): what it
    printed; a config or flag it refuses fails the test with the stage's error."""
    from recipes.cli import STAGES

    monkeypatch.setattr(sys, "argv", [f"rlhf {stage}"])
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(STAGES[stage]).main([*args, "--print_config"])
    assert exit_.value.code in (0, None), f"rlhf {stage} {' '.join(args)}: {capsys.readouterr().err[-2000:]}"
    return capsys.readouterr().out


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


@pytest.fixture
def resume_runs(run_recipe, tmp_path):
    """resume_runs(stage, config, stop, end, *extra) -> train/loss by step of an uninterrupted run to max_steps
    `end`, and of a run resumed from the checkpoint of one stopped at step `stop` (a kill after it)."""
    import csv

    def fit(name: str, stage: str, config: str, *extra: str) -> dict[int, float]:
        out = tmp_path / name
        run_recipe(stage, "fit", "--config", config, "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0",
                   f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
                   f"--model.save_dir={out / 'hf'}", *extra, outputs=False)
        rows = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
        return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}

    def runs(stage: str, config: str, stop: int, end: int, *extra: str):
        every = f"--checkpoint.every_n_train_steps={stop}"
        full = fit("full", stage, config, every, f"--trainer.max_steps={end}", *extra)
        fit("killed", stage, config, every, f"--trainer.max_steps={stop}", *extra)
        ckpt = next((tmp_path / "killed").rglob("last.ckpt"))
        return full, fit("resumed", stage, config, every, f"--trainer.max_steps={end}", f"--ckpt_path={ckpt}", *extra)

    return runs
