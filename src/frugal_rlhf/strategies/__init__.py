"""Placement strategies: Naive (one device); distributed ones extend it.

FSDPStrategy and DeepSpeedStrategy are imported on first use (`from frugal_rlhf.strategies
import FSDPStrategy` works): FSDP pulls in torch's distributed checkpointing and transformers'
model classes, DeepSpeed is an optional extra (its package is imported only when a
DeepSpeedStrategy starts).
"""
import importlib

from .base import NaiveStrategy
from .ddp import DDPStrategy

STRATEGIES = ("naive", "ddp", "fsdp", "deepspeed")
_ON_FIRST_USE = {"FSDPStrategy": "fsdp", "DeepSpeedStrategy": "deepspeed"}  # class -> module


def __getattr__(name: str):
    if name in _ON_FIRST_USE:
        return getattr(importlib.import_module(f"{__name__}.{_ON_FIRST_USE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_strategy(name: str = "naive", seed: int = 42, dtype: str | None = None, zero_stage: int = 3,
                  offload: str = "none"):
    if name == "naive":
        return NaiveStrategy(seed=seed, dtype=dtype)
    if name == "ddp":
        return DDPStrategy(seed=seed, dtype=dtype)
    if name == "fsdp":
        return __getattr__("FSDPStrategy")(seed=seed, dtype=dtype, stage=zero_stage, offload=offload)
    if name == "deepspeed":
        return __getattr__("DeepSpeedStrategy")(seed=seed, dtype=dtype, stage=zero_stage, offload=offload)
    raise ValueError(f"unknown strategy '{name}' (available: {', '.join(STRATEGIES)})")


__all__ = ["NaiveStrategy", "DDPStrategy", "FSDPStrategy", "DeepSpeedStrategy", "make_strategy"]
