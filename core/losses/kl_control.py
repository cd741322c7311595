"""KL-penalty coefficient controllers for PPO (plain Python; state_dict so a resumed run continues exactly)."""

from __future__ import annotations


class FixedKLController:
    """Constant KL coefficient `value`; update is a no-op."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Steer the measured KL towards `target` (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593 sec 2.2).

    error = clip(current_kl / target - 1, -0.2, 0.2); value *= 1 + error * n_steps / horizon.

    Args:
        init_kl_coef: starting coefficient.
        target: KL (nats per sequence, as measured by the caller) to aim for.
        horizon: number of samples over which a full-size error changes the coefficient by ~20%.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)  # proportional, clipped
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
