"""What the five stages share besides their explicit pieces (core/optim.py OptimSpec, modules/export.py
HFExport): `root_device`, `output_path`, the `shared_args` docstring helper, and `StageHooks`, the non-finite
guard, the DDP-correct mean, trainable-only checkpoints and the held-out judge."""

from __future__ import annotations

import math
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import Metric

from core.guard import NonFiniteError, grad_norm
from core.optim import keep_trainable


def root_device(module, default: torch.device | None = None) -> torch.device | None:
    """The device the trainer's strategy gives this process (where configure_model loads the models); `default`
    for a module used without a trainer (a test calling configure_model itself). PPO and DPO pass module.device
    (they seed a torch.Generator on it), the others None (the loaders' own default, the CPU)."""
    return module.trainer.strategy.root_device if module._trainer is not None else default


def output_path(trainer, path: str | None, default_name: str) -> Path:
    """An output the user named (a relative one under trainer.default_root_dir, the run's root), else
    <log dir>/default_name."""
    if not path:
        return Path(trainer.log_dir or trainer.default_root_dir) / default_name
    path = Path(path).expanduser()
    return path if path.is_absolute() else Path(trainer.default_root_dir) / path


def shared_args(*blocks: str):
    """Class decorator: append `Args:` lines that several stages share (core/optim.py OPTIM_ARGS, modules/export.py
    EXPORT_ARGS) to the class docstring, whose last section is its `Args:` block; LightningCLI's --help and
    jsonargparse read the argument docs from there, so each shared argument is documented once."""

    def add(cls):
        lines = "".join(textwrap.indent(textwrap.dedent(block).strip("\n"), " " * 8) + "\n" for block in blocks)
        cls.__doc__ = cls.__doc__.rstrip() + "\n" + lines
        return cls

    return add


def stop_nonfinite(trainer, stage: str, quantity: str, where: str) -> NoReturn:
    """Raise NonFiniteError naming the stage, the quantity, the step and the last (finite) checkpoint."""
    callback = trainer.checkpoint_callback
    last = (callback.last_model_path or callback.best_model_path) if callback is not None else ""
    raise NonFiniteError(
        f"{stage}: non-finite {quantity} {where}: no weights, checkpoint or Hugging Face export was "
        f"written from it; last checkpoint (finite weights): {last or 'none yet'} (lower the learning rate "
        "or check the data)"
    )


class StageHooks:
    """Mix in before LightningModule: the non-finite guard (a bad loss or gradient stops fit before the optimizer
    step), `global_mean`, `sampling_guard`, trainable-only checkpoints marked with `stage`, and the held-out judge
    of PPO and rejection sampling (`judged_metrics` and its checkpoint state). The module sets the class attribute
    `stage`; a judging module also sets judge (the val_reward RewardSpec or None), judge_monitor and best_weights
    (modules/overoptimisation.py) and has a `policy`. A module that extends a checkpoint hook calls super().

    Kept as one small class, not split into callbacks: its hooks run on every run of every stage, a module that
    was used without a trainer (tests) still guards and checkpoints, and a callback's on_save_checkpoint runs
    before the module's while DPO reads the full state_dict first. The optimizer and the Hugging Face export are
    the explicit pieces each module holds (OptimSpec, HFExport)."""

    stage = "stage"
    _nonfinite_loss: float | None = None  # a non-finite loss seen since the last optimizer step
    judge = judge_monitor = best_weights = None  # held-out judging (PPO, rejection sampling)

    def global_mean(self, total: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's sum over items and their count -> (loss, mean): DDP averages gradients over ranks, so the
        loss is total * world_size / (items on all ranks), whose averaged gradient is that of the mean over all
        ranks' items (a per-rank mean would weight ranks, not items); mean is that global mean, detached."""
        world = self.trainer.world_size if self._trainer is not None else 1
        pooled = torch.stack([total.detach().float(), count.detach().float().to(total.device)])  # (2,): sum, items
        if world > 1:
            pooled = self.trainer.strategy.reduce(pooled, reduce_op="sum")
        n = pooled[1].clamp(min=1)  # nothing anywhere: 0, never NaN
        return total * (world / n), pooled[0] / n

    # ----- non-finite guard: checked before every optimizer step, so the weights never take a bad one -----

    def on_before_backward(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            self._nonfinite_loss = loss.detach().float().sum().item()

    def on_before_optimizer_step(self, optimizer) -> None:
        bad, self._nonfinite_loss = self._nonfinite_loss, None
        if bad is not None:
            self._stop_nonfinite(f"loss ({bad})", self._at_next_step())
        norm = grad_norm(p for group in optimizer.param_groups for p in group["params"]).item()
        if not math.isfinite(norm):  # DDP: gradients are all-reduced, so every rank stops here together
            self._stop_nonfinite(f"gradient norm ({norm})", self._at_next_step())

    @contextmanager
    def sampling_guard(self):
        """Sampling from a policy whose weights overflowed: name the stage and step."""
        try:
            yield
        except NonFiniteError as err:
            self._stop_nonfinite(str(err), f"after optimizer step {self.trainer.global_step}")

    def _at_next_step(self) -> str:
        return (f"at optimizer step {self.trainer.global_step + 1} (epoch {self.trainer.current_epoch}); "
                "stopped before it")

    def _stop_nonfinite(self, quantity: str, where: str) -> NoReturn:
        stop_nonfinite(self.trainer, self.stage, quantity, where)

    # ----- held-out judge: reward_gap, the over-optimisation warning, the export_best weights -----

    def judged_metrics(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One validation's computed metrics, named without the split -> with reward_gap (reward - judge_reward)
        where a judge scored; during fit (not its sanity check) also overoptimising when the monitor is on, and
        the export_best copy taken if this validation is the best so far."""
        values = dict(values)
        if "judge_reward" in values:
            values["reward_gap"] = values["reward"] - values["judge_reward"]
        if self._trainer is None or self.trainer.state.fn != "fit" or self.trainer.sanity_checking:
            return values  # validate / test from a checkpoint judge only
        step = self.trainer.global_step
        if "judge_reward" in values and self.judge_monitor is not None and self.judge_monitor.patience > 0:
            firing = self.judge_monitor.update(values["reward"].item(), values["judge_reward"].item())
            values["overoptimising"] = torch.tensor(float(firing))
            if firing:
                rewards, judges = (" -> ".join(f"{pair[i]:.4g}" for pair in self.judge_monitor.trajectory)
                                   for i in (0, 1))
                rank_zero_warn(
                    f"{self.stage}: over-optimisation at step {step}: for {self.judge_monitor.patience} validations "
                    f"in a row val/reward rose ({rewards}) while the held-out val/judge_reward fell ({judges}). Try a "
                    "lower learning rate, a stronger KL penalty (a higher kl_coef), or export_best: val/judge_reward "
                    "to export the weights of the judge's best validation."
                )
        if self.best_weights is not None:
            score = values[self.best_weights.metric.removeprefix("val/")].item()
            params = self.policy.named_parameters() if self.trainer.is_global_zero else ()  # rank 0 exports
            self.best_weights.update(score, step, params)
        return values

    def log_judged(self, split: str, metrics: dict[str, Metric]) -> None:
        """Log one validation's metric objects under split/ (Lightning computes them, synced across processes, and
        resets them) and what judged_metrics adds to their values (reward_gap, overoptimising). The judge needs the
        values in this validation, so they are computed here too: torchmetrics caches them, Lightning logs the same."""
        for key, metric in metrics.items():
            self.log(f"{split}/{key}", metric, prog_bar=key == "reward")
        values = {key: metric.compute() for key, metric in metrics.items()}
        judged = self.judged_metrics(values)  # + reward_gap, overoptimising; the export_best copy
        for key in [k for k in judged if k not in values]:
            self.log(f"{split}/{key}", judged[key], sync_dist=False)  # from synced values

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep_trainable(self, checkpoint)  # frozen weights (references, quantised bases) stay out
        checkpoint["stage"] = self.stage  # a resume under another stage's recipe is refused (recipes/common.py)
        if self.judge_monitor is not None:
            checkpoint["judge_state"] = {
                "judge": repr(self.judge),  # a resume with another judge restarts what compares judge scores
                "monitor": self.judge_monitor.state_dict(),
                "best": self.best_weights.state_dict() if self.best_weights is not None else None,
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("judge_state")
        if state is None or self.judge_monitor is None:
            return
        same_judge = state["judge"] == repr(self.judge)
        if same_judge:
            self.judge_monitor.load_state_dict(state["monitor"])
        best = self.best_weights
        if best is None or state["best"] is None:
            return
        judged = best.metric in ("val/judge_reward", "val/reward_gap")
        if (judged and not same_judge) or not best.load_state_dict(state["best"]):
            why = "another val_reward" if judged and not same_judge else (
                f"export_best {state['best']['metric']} ({state['best']['mode']})")
            rank_zero_warn(f"{self.stage}: the checkpoint was judged with {why}: the best {best.metric} "
                           f"({best.mode}) starts afresh from this resume")
            best.score, best.step, best.weights = None, None, {}
        elif self._trainer is not None and not self.trainer.is_global_zero:
            best.weights = {}  # only rank 0 exports
