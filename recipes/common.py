"""What every stage's LightningCLI shares: quiet libraries, run folders, last-checkpoint saving, links."""

from __future__ import annotations

import os
import warnings

from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI


def quiet() -> None:
    """Keep the console for our logs: no per-file progress bars or expected warnings from the libraries."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")


def trainer_defaults(stage: str) -> dict:
    from lightning.pytorch.loggers import CSVLogger

    return {"logger": lazy_instance(CSVLogger, save_dir="runs", name=stage)}


def run_cli(model_class, datamodule_class, stage: str, links: list[tuple[str, str]], args=None) -> LightningCLI:
    """One concrete LightningCLI for a stage; `links` are parser.link_arguments(source, target) pairs."""
    quiet()

    class StageCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # always keep last.ckpt so `--ckpt_path last` resumes a crashed run
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({"checkpoint.save_last": True})
            for source, target in links:
                parser.link_arguments(source, target)

    StageCLI.__name__ = f"{stage.upper()}CLI"
    return StageCLI(
        model_class,
        datamodule_class,
        trainer_defaults=trainer_defaults(stage),
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": f"rlhf {stage}"},
        args=args,
    )
