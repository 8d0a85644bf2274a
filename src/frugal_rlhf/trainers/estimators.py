"""Which advantage estimator options fit together: checked from the config alone, so a bad
combination fails before any model is loaded."""
from __future__ import annotations

import math

import torch

from ..generation.engines import check_engine
from ..rl import losses as L


def check_estimator(cfg, has_critic: bool, world_size: int = 1):
    """The advantage estimator and its options fit together (checked before models load)."""
    estimators = ("gae", "group", "rloo", "reinforce++")
    if cfg.advantage not in estimators:
        raise ValueError(f"advantage: expected one of {', '.join(estimators)}, got {cfg.advantage!r}")
    if cfg.advantage in ("group", "rloo") and (cfg.group_size < 2 or has_critic):
        raise ValueError(f"advantage {cfg.advantage!r} needs group_size >= 2 and no critic")
    if cfg.advantage == "gae" and not has_critic:
        raise ValueError("advantage 'gae' needs a critic")
    if cfg.advantage == "reinforce++" and has_critic:
        raise ValueError("advantage 'reinforce++' has no critic")
    if cfg.dynamic_sampling and (cfg.advantage not in ("group", "rloo") or world_size > 1):
        raise ValueError("--dynamic-sampling needs --advantage group|rloo and one process (ranks would drop "
                         "different numbers of groups and take different numbers of steps)")
    L.aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), cfg.loss_agg, cfg.max_new_tokens)  # a bad name fails now
    if cfg.scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards: expected group, batch or none, got {cfg.scale_rewards!r}")


def check_rollout_engine(cfg):
    """--rollout-engine (known, its extra installed), --rollout-quant and --tis-cap fit together:
    checked before models load."""
    from ..generation.llamacpp import QUANTS

    check_engine(cfg.rollout_engine)
    if cfg.rollout_quant not in QUANTS:
        raise ValueError(f"--rollout-quant: expected one of {', '.join(QUANTS)}, got {cfg.rollout_quant!r}")
    if not (math.isfinite(cfg.tis_cap) and cfg.tis_cap > 0):
        raise ValueError(f"--tis-cap: expected a finite number > 0, got {cfg.tis_cap}")
    if cfg.rollout_engine not in ("torch", "auto") and cfg.strategy in ("fsdp", "deepspeed"):
        raise ValueError(f"--rollout-engine {cfg.rollout_engine} copies the policy's weights from one process: "
                         f"it needs --strategy naive or ddp, not {cfg.strategy}")
