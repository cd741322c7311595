"""HFExport: the Hugging Face save at the end of fit, from a stage's `save_dir`, `merge_lora` and `overwrite`
arguments (EXPORT_ARGS)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch import Callback

from core.guard import nonfinite_names
from core.models import is_peft, save_hf
from core.outputs import check_writable, config_hash
from modules.overoptimisation import BestWeights
from modules.stage import output_path, stop_nonfinite

# the Args: lines of the three arguments, shared by every stage's docstring (modules/stage.py: shared_args)
EXPORT_ARGS = """
save_dir: where the Hugging Face model goes at the end of fit (default: <log dir>/hf_model).
merge_lora: save a LoRA model merged into its base (True) or as an adapter (False).
overwrite: replace save_dir even if lightning-rlhf did not write it (a folder it wrote, marked by
    lightning_rlhf.json, is always replaced; anything else stops fit before training).
"""


class HFExport(Callback):
    """A stage's Hugging Face export; the module builds it in __init__ and returns it from configure_callbacks().

    Setup of fit: a save_dir we must not replace stops fit before any weights load, and so does export_best
    without validation. End of fit (rank 0, not interrupted): the export_best weights are loaded into the saved
    model, non-finite weights stop the export, and the model with the module's `tokenizer` goes to save_dir,
    marked with the stage and the hash of the module's hparams.

    Args:
        stage: the stage's name, in messages and the export's marker.
        save_dir, merge_lora, overwrite: the module's arguments of those names (EXPORT_ARGS).
        model: the module attribute holding what fit saves.
        name: what that model is called in messages.
        best: the module's export_best weights (modules/overoptimisation.py), or None.
        info: more fields for the export's lightning_rlhf.json (a reward model: where it is scored).
    """

    def __init__(self, stage: str, save_dir: str | None = None, merge_lora: bool = True, overwrite: bool = False,
                 model: str = "policy", name: str = "policy", best: BestWeights | None = None,
                 info: dict | None = None):
        self.stage = stage
        self.save_dir = save_dir
        self.merge_lora = merge_lora
        self.overwrite = overwrite
        self.model = model
        self.name = name
        self.best = best
        self.info = dict(info or {})

    def path(self, trainer) -> Path:
        """Where fit saves the Hugging Face model."""
        return output_path(trainer, self.save_dir, "hf_model")

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if self.save_dir:  # before any weights load: an output we must not replace stops here
            check_writable(self.path(trainer), self.overwrite)
        if self.best is not None and trainer.limit_val_batches == 0:
            raise ValueError(f"{self.stage}: export_best={self.best.metric!r} needs validation during fit, "
                             "but trainer.limit_val_batches is 0 (drop export_best or let validation run)")

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.interrupted:
            return
        with whole_weights(trainer) as sharded:  # sharded weights (FSDP, ZeRO-3): every rank takes part
            if trainer.is_global_zero:
                self.export(trainer, pl_module, sharded)

    def export(self, trainer, pl_module, sharded: bool = False) -> None:
        model = getattr(pl_module, self.model)
        self.load_best(trainer, model)
        bad = nonfinite_names(model.named_parameters())
        if bad:
            stop_nonfinite(trainer, self.stage, f"weights ({', '.join(bad)})",
                           f"after optimizer step {trainer.global_step}")
        merge_lora, state = self.merge_lora, None
        if sharded and is_peft(model):
            # peft finds no adapter in a sharded module's state_dict: hand it the gathered weights by their names
            state = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}
            if merge_lora:
                merge_lora = False
                print(f"{self.stage}: the {self.name} was sharded: saving its LoRA adapter unmerged (merging copies "
                      "the model, which a sharded module cannot be)")
        info = {"stage": self.stage, "config_hash": config_hash(dict(pl_module.hparams)), **self.info}
        path = save_hf(model, pl_module.tokenizer, self.path(trainer), merge_lora, self.overwrite, info, state)
        print(f"saved {self.name} (Hugging Face format) to {path}")

    def load_best(self, trainer, model) -> None:
        """export_best: load the best validation's copy of the trainable weights into `model` (the saved model),
        which keeps them after fit, and say which step it was."""
        best = self.best
        if best is None:
            return
        if best.step is None:
            print(f"{self.stage}: export_best {best.metric}: no validation ran during fit, exporting the last weights "
                  f"(step {trainer.global_step})")
            return
        unexpected = model.load_state_dict(best.weights, strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"{self.stage}: export_best weights do not fit the {self.name}: {unexpected[:5]}")
        last = trainer.global_step
        print(f"{self.stage}: export_best: exporting the {self.name} of step {best.step}, where {best.metric} was "
              f"{best.mode}imal ({best.score:.6g}), " + ("the last weights" if best.step == last else
                                                        f"instead of the last weights (step {last})"))


@contextmanager
def whole_weights(trainer):
    """Inside, every parameter holds its whole tensor on rank 0 (the export reads them); yields whether the
    strategy shards weights (else this is a no-op). FSDP: summon_full_params (on a GPU gathered into CPU memory;
    on a CPU, where FSDP's CPU offload of gathered weights crashes, in place). DeepSpeed ZeRO-3:
    GatheredParameters, imported only when that strategy runs (deepspeed is an optional extra)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = trainer.strategy.model
    if model is not None and any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        gpu = trainer.strategy.root_device.type != "cpu"
        with FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=gpu, offload_to_cpu=gpu):
            yield True
        return
    config = getattr(trainer.strategy, "config", None)
    if isinstance(config, dict) and config.get("zero_optimization", {}).get("stage") == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield True
        return
    yield False
