"""KL-coefficient controllers: the coefficient of the KL penalty, as state that a PPO run
updates after each step and saves in its checkpoints (the pure math is in losses.py)."""
from __future__ import annotations


class FixedKLController:
    """Constant KL coefficient."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences"):

        error = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + error * n_steps / horizon

    The coefficient grows when the policy drifts beyond ``target`` and shrinks below it.
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = float(init_coef), float(target), horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target = float(state["value"]), float(state["target"])
        self.horizon = state["horizon"]
