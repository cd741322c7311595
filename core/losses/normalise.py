"""Running reward normalisation for PPO (plain Python numbers; state_dict so a resumed run continues exactly)."""

from __future__ import annotations

import math


class RunningMoments:
    """Mean and standard deviation of every score seen so far, merged batch by batch (Chan, Golub and LeVeque's
    parallel update, which stays exact where a running sum of squares would cancel).

    `update` takes a batch's count, sum and sum of squares, so DDP can all-reduce those three numbers first and
    every rank keeps the same moments. The std is the population one (divide by count); `normalise` divides by
    it only once it is above `eps` (a constant reward leaves the scale alone).
    """

    def __init__(self, eps: float = 1e-6):
        self.count, self.mean, self.m2, self.eps = 0.0, 0.0, 0.0, eps

    def update(self, count: float, total: float, total_sq: float) -> None:
        if count <= 0:
            return
        batch_mean = total / count
        batch_m2 = max(total_sq - count * batch_mean**2, 0.0)  # sum of squared deviations from the batch mean
        n = self.count + count
        delta = batch_mean - self.mean
        self.mean += delta * count / n
        self.m2 += batch_m2 + delta**2 * self.count * count / n
        self.count = n

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 0 else 1.0

    def normalise(self, x):
        """(x - mean) / std (std below eps: 1). Works on floats and tensors."""
        std = self.std
        return (x - self.mean) / (std if std > self.eps else 1.0)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])
