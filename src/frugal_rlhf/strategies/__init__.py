"""Placement strategies: Naive (one device); distributed ones extend it."""
from .base import NaiveStrategy, ResumableLoader

STRATEGIES = ("naive", "ddp", "fsdp", "deepspeed")


def make_strategy(name: str = "naive", seed: int = 42, dtype: str | None = None, zero_stage: int = 3,
                  offload: str = "none"):
    if name == "naive":
        return NaiveStrategy(seed=seed, dtype=dtype)
    if name == "ddp":
        from .ddp import DDPStrategy

        return DDPStrategy(seed=seed, dtype=dtype)
    if name == "fsdp":
        from .fsdp import FSDPStrategy

        return FSDPStrategy(seed=seed, dtype=dtype, stage=zero_stage, offload=offload)
    if name == "deepspeed":
        from .deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(seed=seed, dtype=dtype, stage=zero_stage, offload=offload)
    raise ValueError(f"unknown strategy '{name}' (available: {', '.join(STRATEGIES)})")


__all__ = ["NaiveStrategy", "ResumableLoader", "make_strategy"]
