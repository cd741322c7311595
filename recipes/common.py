"""What every stage's LightningCLI shares: quiet libraries, run folders under the run root, last-checkpoint
saving and `--ckpt_path last`, the resume contract, links."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from copy import deepcopy
from pathlib import Path

import torch
from jsonargparse import Namespace, lazy_instance
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.callbacks import ModelSummary as ModelSummaryCallback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from recipes.strategies import strategy_refusals

RUNS = "runs"  # the default logger's save_dir, relative to trainer.default_root_dir (the run root)
# model keys a resume may change: where the output goes and how (rs `rounds` only sets trainer.max_epochs,
# the run's length, which every resume may change; ppo/rs held-out judging only reads validation samples and
# picks the exported weights, never changes training: a new judge restarts what compares its scores);
# any other differing model key is refused
SAFE_ON_RESUME = ("save_dir", "merge_lora", "predict_file", "overwrite", "rounds",
                  "val_reward", "overopt_patience", "export_best", "export_best_mode")
# validate / test / predict from a checkpoint continue no training: how to sample may change too
SAFE_TO_EVALUATE = (*SAFE_ON_RESUME, "sampling", "sampling_seed", "seed")


def safe_keys(subcommand: str) -> tuple[str, ...]:
    return SAFE_ON_RESUME if subcommand == "fit" else SAFE_TO_EVALUATE
LIGHTNING_CKPT_PATHS = ("best", "hpc", "registry")  # special values Lightning resolves itself


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
    # frozen models are in eval mode on purpose
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(drop_lightning_notes)


def drop_lightning_notes(record: logging.LogRecord) -> bool:
    """Drops Lightning's "💡 Tip: ... try installing litlogger" adverts and its note that our ModelSummary replaced
    the default one."""
    message = record.getMessage()
    return "💡 Tip:" not in message and "configured with model summary callbacks" not in message


class ModelSummary(ModelSummaryCallback):
    """Lightning's model summary less its FLOPs column and total: FLOPs are counted only for a module with an
    `example_input_array`, which ours lack, so they read 0."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes, total_flops,
                  **summarize_kwargs) -> None:
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        print(table.rsplit("\n", 1)[0])  # the last line is "Total Flops"; called on rank 0 only


def trainer_defaults(stage: str) -> dict:
    from lightning.pytorch.loggers import CSVLogger

    callbacks = [RestoreLoaderState(), ModelSummary()]
    return {"logger": lazy_instance(CSVLogger, save_dir=RUNS, name=stage), "callbacks": callbacks}


class RestoreLoaderState(Callback):
    """Hands the checkpoint's train-loader state (ResumableLoader: epoch, batches seen) to the loader.

    Lightning applies it only when the fit loop builds the loader after the restore. Under max_epochs (and
    rs, whose rounds are max_epochs) `configure_optimizers` asks `trainer.estimated_stepping_batches`, which
    builds the loader first, before the checkpoint is read; the fit loop then keeps that loader and the state
    is dropped, so the resumed epoch restarts at batch 0. on_train_start runs after the restore and before the
    first batch is drawn; Lightning clears the pending state once applied, so this is a no-op otherwise."""

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.fit_loop._load_combined_loader_states()


def root_logger_dirs(config: Namespace) -> None:
    """A relative logger save_dir (default `runs`) is taken under trainer.default_root_dir, so logs,
    checkpoints (ModelCheckpoint follows the logger's log_dir) and config.yaml land in
    <root>/runs/<stage>/version_N/. No root given: the current folder, as Lightning."""
    root = config.trainer.get("default_root_dir")
    if not root:
        return
    for logger in _loggers(config):
        args = logger.get("init_args") if isinstance(logger, Namespace) else None
        save_dir = args.get("save_dir") if args is not None else None
        if isinstance(save_dir, str) and "://" not in save_dir and not os.path.isabs(os.path.expanduser(save_dir)):
            args.save_dir = os.path.join(root, save_dir)


def _loggers(config: Namespace) -> list:
    logger = config.trainer.get("logger")
    return logger if isinstance(logger, list) else [logger]


def last_checkpoint(config: Namespace, prog: str) -> str:
    """`--ckpt_path last`: last.ckpt of the highest-numbered <logger save_dir>/<name>/version_N/checkpoints/
    holding one (`--checkpoint.dirpath D`: D/last.ckpt); none: SystemExit naming where it looked."""
    root = config.trainer.get("default_root_dir") or os.getcwd()
    logger, dirpath = _loggers(config)[0], config.checkpoint.get("dirpath")
    found, where = [], ""
    if dirpath:
        where = os.path.join(dirpath, "last.ckpt")
        found = [where] if os.path.exists(where) else []
    elif logger is None or logger is False:  # no logger: Lightning checkpoints to <root>/checkpoints
        where = os.path.join(root, "checkpoints", "last.ckpt")
        found = [where] if os.path.exists(where) else []
    else:
        if isinstance(logger, Namespace) and logger.get("init_args") and "save_dir" in logger.init_args:
            base = os.path.join(logger.init_args.save_dir or root, logger.init_args.get("name") or "")
        else:  # logger: true, Lightning's default logger
            base = os.path.join(root, "lightning_logs")
        where = os.path.join(base, "version_*", "checkpoints", "last.ckpt")
        versions = [(int(m.group(1)), p) for p in Path(base).glob("version_*/checkpoints/last.ckpt")
                    if (m := re.fullmatch(r"version_(\d+)", p.parent.parent.name))]
        found = [str(p) for _, p in sorted(versions)]
    if not found:
        raise SystemExit(f"{prog}: --ckpt_path last: no checkpoint found at {where}; give the checkpoint file "
                         "(--ckpt_path PATH) or drop --ckpt_path to start a new run")
    return found[-1]


def load_checkpoint_meta(ckpt_path: str, prog: str) -> dict:
    """A checkpoint file, or what a sharded checkpoint folder (FSDP `state_dict_type: sharded`, DeepSpeed) holds
    besides the weights: its hyperparameters and our `stage` mark, for the resume contract."""
    path = Path(ckpt_path)
    if path.is_dir():
        meta = next((m for m in (path / "meta.pt", path / "checkpoint" / "mp_rank_00_model_states.pt")
                     if m.is_file()), None)
        if meta is None:
            raise SystemExit(f"{prog}: --ckpt_path {ckpt_path}: a folder, but no sharded checkpoint (no meta.pt)")
        return torch.load(meta, weights_only=False, map_location="cpu")
    if not path.is_file():
        raise SystemExit(f"{prog}: --ckpt_path {ckpt_path}: no such file")
    return torch.load(path, weights_only=True, map_location="cpu")


def _diff(saved, given, key: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, saved, given) where two parsed config trees differ; descends only where both sides are
    mappings, so `lora: null` against a LoRA spec is one key."""
    saved, given = (v.as_dict() if isinstance(v, Namespace) else v for v in (saved, given))
    if isinstance(saved, dict) and isinstance(given, dict):
        keys = sorted(saved.keys() | given.keys())
        return [d for k in keys for d in _diff(saved.get(k), given.get(k), f"{key}.{k}" if key else k)]
    return [] if saved == given else [(key, saved, given)]


def resume_conflicts(parser, config: Namespace, subcommand: str, ckpt: dict,
                     ckpt_path: str) -> list[tuple[str, object, object]]:
    """(model key, checkpoint's value, given value) for every model hyperparameter the loaded checkpoint
    holds otherwise than the current config, SAFE_ON_RESUME keys left out. Both sides go through the same parse
    (the checkpoint's hparams over a copy of the config, as LightningCLI does), so dataclass specs stored as
    dicts, Namespaces and defaults compare alike. optimizer/scheduler are not in hparams: never compared."""
    hparams = dict(ckpt.get("hyper_parameters", {}))
    hparams.pop("_instantiator", None)
    if not hparams:
        return []
    try:
        stored = parser.parse_object({subcommand: {"model": hparams}}, deepcopy(config))
    except SystemExit:
        sys.stderr.write(f"the hyperparameters of {ckpt_path} do not parse against this recipe\n")
        raise
    diffs = _diff(stored[subcommand].model, config[subcommand].model)
    return [(key, saved, given) for key, saved, given in diffs if key.split(".")[0] not in safe_keys(subcommand)]


class StageCLI(LightningCLI):
    """LightningCLI of one stage.

    Run paths: the run root is trainer.default_root_dir (default: the current folder). The logger's save_dir
    (default `runs`) is relative to it, so logs, checkpoints and the resolved config.yaml go to
    <root>/runs/<stage>/version_N/; an absolute save_dir is kept as given. The module resolves a relative
    model.save_dir (the Hugging Face export) against the same root. `--print_config` shows the values as given.

    Resume contract (`--ckpt_path FILE`, or `last`: the highest-numbered version_N of this stage under the
    run root that holds checkpoints/last.ckpt): the run continues with the checkpoint's model. Model keys in
    SAFE_ON_RESUME (where the export goes and how: save_dir, merge_lora, predict_file, overwrite; rs rounds;
    ppo/rs held-out judging: val_reward, overopt_patience, export_best, export_best_mode) take the value given
    now; any other model key that differs from the checkpoint's is refused before a model loads, naming each
    key, the checkpoint's value and the given one. Trainer, data and optimizer
    settings are not checked (they are not stored in the checkpoint's hyperparameters). validate, test and
    predict continue no training: they also take new sampling settings (SAFE_TO_EVALUATE).
    """

    stage = "stage"
    links: tuple[tuple[str, str], ...] = ()  # parser.link_arguments(source, target) pairs

    def add_arguments_to_parser(self, parser) -> None:
        # always keep last.ckpt so `--ckpt_path last` resumes a crashed run
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        for source, target in self.links:
            parser.link_arguments(source, target)

    def instantiate_trainer(self, **kwargs):
        if self._get(self.config_init, "trainer", default={}).get("enable_model_summary") is False:  # honour it
            callbacks = self.trainer_defaults["callbacks"]
            self.trainer_defaults["callbacks"] = [c for c in callbacks if not isinstance(c, ModelSummary)]
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)  # --print_config prints and exits in here, before the rooting
        if self.config.get("subcommand"):
            root_logger_dirs(self.config[self.config.subcommand])

    def before_instantiate_classes(self) -> None:
        """Strategy combinations that cannot run (recipes/strategies.py) stop here, before any class is built."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        refusals = strategy_refusals(self.stage, self.config[subcommand])
        if refusals:
            lines = "\n".join(f"  {r}" for r in refusals)
            raise SystemExit(f"rlhf {self.stage}: this strategy cannot run this config (nothing was loaded):\n{lines}")

    def _parse_ckpt_path(self) -> None:
        """Lightning's version re-parses the checkpoint's hparams over the config, silently replacing
        `--model.*` given now; this one resolves `last` and applies the contract above instead."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config, prog = self.config[subcommand], f"rlhf {self.stage}"
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            config.ckpt_path = ckpt_path = last_checkpoint(config, prog)
            if rank_zero_only.rank == 0:
                print(f"{prog}: --ckpt_path last: resuming {ckpt_path}")
        if (not ckpt_path or ckpt_path in LIGHTNING_CKPT_PATHS or ckpt_path.startswith("registry:")
                or "://" in ckpt_path):
            return  # Lightning's own values and remote files: as Lightning
        ckpt = load_checkpoint_meta(ckpt_path, prog)
        saved_stage = ckpt.get("stage")  # written by StageHooks.on_save_checkpoint
        if saved_stage is not None and saved_stage != self.stage:
            raise SystemExit(f"{prog}: --ckpt_path {ckpt_path} is a checkpoint of `rlhf {saved_stage}`, not of "
                             f"`{prog}`: resume it with `rlhf {saved_stage} fit`, or start this stage from that "
                             "run's exported model (without --ckpt_path)")
        conflicts = resume_conflicts(self.parser, self.config, subcommand, ckpt, ckpt_path)
        if conflicts:
            lines = "\n".join(f"  model.{key}: checkpoint {saved!r}, given {given!r}"
                              for key, saved, given in conflicts)
            safe = ", ".join(f"model.{key}" for key in safe_keys(subcommand))
            model = config.model.as_dict()
            spec = next((k for k, v in model.items() if isinstance(v, dict) and "path" in v), "policy")
            raise SystemExit(
                f"{prog}: --ckpt_path {ckpt_path} holds a run trained with other model settings:\n{lines}\n"
                f"Resuming continues the checkpoint's run, so these cannot change (only {safe} may). Drop these "
                "overrides (the run's own config.yaml is next to its checkpoints/ folder), or start a new run "
                f"from the exported model: --model.{spec}.path <its save_dir>, without --ckpt_path."
            )


def run_cli(model_class, datamodule_class, stage: str, links: list[tuple[str, str]], args=None) -> LightningCLI:
    """One concrete LightningCLI for a stage; `links` are parser.link_arguments(source, target) pairs."""
    quiet()
    cli = type(f"{stage.upper()}CLI", (StageCLI,), {"stage": stage, "links": tuple(links)})
    return cli(
        model_class,
        datamodule_class,
        trainer_defaults=trainer_defaults(stage),
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": f"rlhf {stage}"},
        args=args,
    )
