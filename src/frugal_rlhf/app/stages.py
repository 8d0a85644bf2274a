"""One way to run a training stage, shared by the command line, the pipeline and the benchmarks:
the config's strategy (every strategy field: name, seed, dtype, ZeRO stage, offload) is built
here and nowhere else, so no caller can drop a field."""
from __future__ import annotations

from .. import strategies
from ..models.memory import apply_plan
from ..rl.algorithms import held_roles
from ..rl.gold import gold_scores
from ..trainers.ppo import PPOTrainer


def make_strategy(cfg):
    """The strategy a stage config asks for."""
    return strategies.make_strategy(cfg.strategy, seed=cfg.seed, dtype=cfg.dtype, zero_stage=cfg.zero_stage,
                                    offload=cfg.offload)


def run_stage(cfg, build, report=None):
    """Train `build(strategy, cfg)` under the config's strategy and return its metrics, or
    `report(strategy, trainer, metrics)` when given (called while the process group is still
    up, e.g. to reduce numbers over the ranks). The strategy is torn down in every case.
    With cfg.memory_budget the planner decides micro-batch, accumulation and checkpointing
    first (or refuses), before any weight loads or anything is written."""
    cfg = apply_plan(cfg, held_roles(cfg))
    strategy = make_strategy(cfg)
    strategy.setup_distributed()
    try:
        trainer = build(strategy, cfg)
        metrics = trainer.fit()
        return report(strategy, trainer, metrics) if report else metrics
    finally:
        strategy.cleanup()


def build_ppo(strategy, cfg) -> PPOTrainer:
    """PPO from its config, with what only the application knows: the demo's hidden gold judge
    scores held-out answers (eval_gold) when the config asks, never as a reward."""
    trainer = PPOTrainer.from_config(strategy, cfg)
    if cfg.gold_eval:
        trainer.held_out_scorers["gold"] = gold_scores
    return trainer
