"""Placement strategies: Naive (one device); distributed ones extend it."""
from .base import NaiveStrategy, ResumableLoader


def make_strategy(name: str = "naive", seed: int = 42, dtype: str | None = None, zero_stage: int = 3,
                  offload: str = "none"):
    if name == "naive":
        return NaiveStrategy(seed=seed, dtype=dtype)
    raise ValueError(f"unknown strategy '{name}' (available: naive)")


__all__ = ["NaiveStrategy", "ResumableLoader", "make_strategy"]
