"""Held-out judging during RL (PPO, rejection sampling): the over-optimisation warning and the best weights for
`export_best`. Pure bookkeeping over floats and tensors; imports torch and the standard library only.

Over-optimisation (Gao et al. 2022, arXiv 2210.10760): the policy keeps raising the reward it optimises while
a held-out judge of the same samples (a reward model trained on another split, or an oracle) stops agreeing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# The `Args:` lines of the held-out judge, shared by PPO and rejection sampling (modules/stage.py shared_args).
JUDGE_ARGS = """
val_reward: a held-out judge (e.g. a reward model trained on another split, or an oracle) that scores the
    same validation samples as `reward`; validation then also logs val/judge_reward (its mean) and
    val/reward_gap (val/reward - val/judge_reward: the two scales differ, so watch the gap's trend).
    Never optimised against; None: no judge.
overopt_patience: with val_reward, warn (and log val/overoptimising 1.0) when for this many validations in
    a row val/reward rose while val/judge_reward fell (each against the validation before); 0: off.
export_best: a validation metric (e.g. val/judge_reward); fit then exports the policy weights of the
    validation where it was best instead of the last ones, and prints that step (a CPU copy of the
    trainable policy weights is kept, in checkpoints too, so a resume keeps it).
export_best_mode: "max" or "min": which export_best value is best.
"""


class OveroptimisationMonitor:
    """Fires when, for `patience` consecutive validations, the optimised reward rose and the held-out judge fell,
    each compared with the validation before (so the first firing needs patience + 1 validations). The pattern
    broken once starts the count again; patience 0 never fires.

    `update(reward, judge)` after each validation -> True while firing; `trajectory` holds the last patience + 1
    (reward, judge) pairs for the message. state_dict/load_state_dict carry it across a resume; a resume may
    change the patience (the count and trajectory are kept, the trajectory trimmed to the new length).
    """

    def __init__(self, patience: int = 3):
        if patience < 0:
            raise ValueError(f"overopt_patience must be >= 0 (0 disables the warning), got {patience}")
        self.patience = patience
        self.streak = 0  # consecutive validations with reward up and judge down
        self.trajectory: list[tuple[float, float]] = []  # (reward, judge), oldest first

    def update(self, reward: float, judge: float) -> bool:
        reward, judge = float(reward), float(judge)
        if self.trajectory:
            last_reward, last_judge = self.trajectory[-1]
            self.streak = self.streak + 1 if reward > last_reward and judge < last_judge else 0
        self.trajectory = [*self.trajectory, (reward, judge)][-(self.patience + 1):]
        return self.firing

    @property
    def firing(self) -> bool:
        return self.patience > 0 and self.streak >= self.patience

    def state_dict(self) -> dict:
        return {"streak": self.streak, "trajectory": [list(pair) for pair in self.trajectory]}

    def load_state_dict(self, state: dict) -> None:
        self.streak = int(state["streak"])
        self.trajectory = [(float(r), float(j)) for r, j in state["trajectory"]][-(self.patience + 1):]

    def reset(self) -> None:
        self.streak, self.trajectory = 0, []


class BestWeights:
    """The trainable weights of the validation where `metric` was best (`export_best`), kept as a CPU copy.

    Why a copy in memory (and in the module's checkpoint) rather than a second ModelCheckpoint(monitor=...): a
    ModelCheckpoint returned from configure_callbacks replaces the trainer's own (Lightning drops trainer
    callbacks of the same type), which is the recipes' last.ckpt for `--ckpt_path last`; and a best file on disk
    that a later checkpoint no longer names can be deleted by the run that wrote it after that checkpoint, so a
    resume would point at a missing file. The copy travels inside every checkpoint, so a resumed run knows the
    best so far and its weights whatever checkpoint it resumes from. Cost: one copy of the trainable weights of
    the saved model (LoRA: the adapters) in host memory and in each checkpoint, only when export_best is set.
    Ties keep the earlier validation; NaN never counts as best.
    """

    def __init__(self, metric: str, mode: str = "max", logged: Iterable[str] | None = None):
        if mode not in ("max", "min"):
            raise ValueError(f"export_best_mode must be 'max' or 'min', got {mode!r}")
        logged = list(logged) if logged is not None else None
        if logged is not None and metric not in logged:
            judged = "judge_reward" in metric or "reward_gap" in metric
            hint = " (val/judge_reward and val/reward_gap need val_reward, the held-out judge)" if judged else ""
            raise ValueError(f"export_best={metric!r} is not a metric this module logs at validation; it logs "
                             f"{', '.join(logged)}{hint}")
        self.metric, self.mode = metric, mode
        self.score: float | None = None
        self.step: int | None = None
        self.weights: dict[str, torch.Tensor] = {}

    def is_better(self, score: float) -> bool:
        if math.isnan(score):
            return False
        return self.score is None or (score > self.score if self.mode == "max" else score < self.score)

    def update(self, score: float, step: int, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> bool:
        """A validation's score at optimizer step `step`; if it is the best so far, copy the trainable ones of
        named_parameters to CPU (pass none on ranks that never export). -> whether it was the best."""
        score = float(score)
        if not self.is_better(score):
            return False
        self.score, self.step = score, int(step)
        self.weights = {n: p.detach().to("cpu", copy=True) for n, p in named_parameters if p.requires_grad}
        return True

    def state_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "score": self.score, "step": self.step,
                "weights": self.weights}

    def load_state_dict(self, state: dict) -> bool:
        """-> False (and nothing loaded) when the state tracked another metric or mode: the best starts afresh."""
        if (state["metric"], state["mode"]) != (self.metric, self.mode):
            return False
        self.score, self.step, self.weights = state["score"], state["step"], dict(state["weights"])
        return True
