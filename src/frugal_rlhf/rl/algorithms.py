"""Every algorithm in one registry: what each needs and how it computes.

Trainers, the model builder and the memory planner ask here (`estimator(name)`,
`preference_loss(name)`); no estimator or loss name is compared anywhere else. Adding an
algorithm is one registered object here plus its test (tests/test_algorithms.py):

    @register_estimator("my-baseline", method="MyPG", groups=True, kl_in_loss=True)
    def _my_baseline(x: AdvantageInputs) -> Advantages:
        adv = x.outcome - x.outcome.view(-1, x.group_size).median(1).values.repeat_interleave(x.group_size)
        return outcome_advantages(x, adv)

The math itself stays in rl/losses.py as pure functions; an entry only wires them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..config import PPOConfig, PreferenceConfig
from ..models.memory import Held
from . import losses as L


# ------------------------------------------------------------------ advantage estimators
@dataclass
class AdvantageInputs:
    """One rollout batch, as the estimators see it (per-token tensors are [B, N])."""

    outcome: Tensor               # [B] the score the advantages use: normalized, then clipped
    tied: Tensor | None           # [B] bool: rows of groups whose outcomes are all equal (L.zero_spread)
    mask: Tensor
    logprobs: Tensor | None       # the actor's at rollout time (None: the update computes them)
    ref_logprobs: Tensor
    values: Tensor                # the critic's (0 without one)
    kl_coef: float
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True
    group_size: int = 1
    scale_rewards: str = "group"
    all_reduce: Callable | None = None  # the strategy's sum over ranks, for batch statistics


@dataclass
class Advantages:
    rewards: Tensor     # [B, N] per-token rewards (the KL penalty in them where it goes there)
    advantages: Tensor  # [B, N]
    returns: Tensor     # [B, N] the value target (advantages + values)
    kl: Tensor | None   # [B, N] per-token KL to the reference (None: not known before the update)


@dataclass(frozen=True)
class Estimator:
    name: str
    method: str         # what a model card calls a run of it
    critic: bool        # learns a value function
    groups: bool        # compares group_size >= 2 completions of each prompt
    kl_in_loss: bool    # the KL to the reference is a loss term (else a per-token reward penalty)
    compute: Callable[[AdvantageInputs], Advantages]

    @property
    def needs_rollout_logprobs(self) -> bool:
        """A KL in the rewards needs the actor's log-probs before the update starts."""
        return not self.kl_in_loss


ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str, method: str, *, critic: bool = False, groups: bool = False,
                       kl_in_loss: bool = False):
    def register(fn):
        ESTIMATORS[name] = Estimator(name, method, critic, groups, kl_in_loss, fn)
        return fn
    return register


def estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"advantage: expected one of {', '.join(ESTIMATORS)}, got {name!r}")
    return ESTIMATORS[name]


def outcome_advantages(x: AdvantageInputs, per_row: Tensor) -> Advantages:
    """A per-completion advantage [B] at every token of its answer; the outcome (clipped) at
    its last token is the reward; the KL is known only if the rollout computed log-probs."""
    advantages = per_row[:, None] * x.mask
    kl = None if x.logprobs is None else L.token_kl(x.logprobs, x.ref_logprobs, x.mask, x.kl_estimator)
    return Advantages(L.score_rewards(x.outcome, x.mask), advantages, advantages, kl)


@register_estimator("gae", "PPO", critic=True)
def _gae(x: AdvantageInputs) -> Advantages:
    rewards, kl = L.shape_rewards(x.outcome, x.logprobs, x.ref_logprobs, x.mask, x.kl_coef, x.kl_estimator)
    advantages, returns = L.gae(rewards, x.values, x.mask, x.gamma, x.lam)
    if x.whiten:
        advantages = L.masked_whiten(advantages, x.mask, all_reduce=x.all_reduce)
    return Advantages(rewards, advantages, returns, kl)


@register_estimator("group", "GRPO", groups=True, kl_in_loss=True)
def _group(x: AdvantageInputs) -> Advantages:
    return outcome_advantages(x, L.scaled_group_advantages(x.outcome, x.group_size, x.scale_rewards, tied=x.tied))


@register_estimator("rloo", "RLOO", groups=True, kl_in_loss=True)
def _rloo(x: AdvantageInputs) -> Advantages:
    return outcome_advantages(x, L.rloo_advantages(x.outcome, x.group_size, tied=x.tied))


@register_estimator("reinforce++", "REINFORCE++")
def _reinforce_pp(x: AdvantageInputs) -> Advantages:
    rewards, kl = L.shape_rewards(x.outcome, x.logprobs, x.ref_logprobs, x.mask, x.kl_coef, x.kl_estimator)
    returns = L.discounted_returns(rewards, x.mask, x.gamma)
    return Advantages(rewards, L.masked_whiten(returns, x.mask, all_reduce=x.all_reduce), returns, kl)


def check_estimator(cfg, has_critic: bool, world_size: int = 1):
    """The advantage estimator and its options fit together (checked before models load)."""
    est = estimator(cfg.advantage)
    if est.groups and cfg.group_size < 2:
        raise ValueError(f"advantage {est.name!r} compares completions of a prompt: it needs group_size >= 2")
    if est.critic != has_critic:
        raise ValueError(f"advantage {est.name!r} {'needs' if est.critic else 'has no'} critic")
    if cfg.dynamic_sampling and (not est.groups or world_size > 1):
        raise ValueError("--dynamic-sampling needs an estimator that compares a prompt's completions (" +
                         "|".join(n for n, e in ESTIMATORS.items() if e.groups) + ") and one process (ranks "
                         "would drop different numbers of groups and take different numbers of steps)")
    L.aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), cfg.loss_agg, cfg.max_new_tokens)  # a bad name fails now
    if cfg.scale_rewards not in L.REWARD_SCALES:
        raise ValueError(f"scale_rewards: expected {', '.join(L.REWARD_SCALES)}, got {cfg.scale_rewards!r}")


# ------------------------------------------------------------------ preference losses
@dataclass
class PreferenceInputs:
    """Per-sequence log-probs of one batch's answers, chosen and rejected of pair i at rows
    2i and 2i+1 (summed over the answer: `logp`; per token: `avg`)."""

    logp: Tensor
    avg: Tensor
    ref: Tensor | None
    beta: float
    smoothing: float
    simpo_gamma: float
    orpo_lambda: float


@dataclass(frozen=True)
class PreferenceLoss:
    name: str
    reference: bool          # needs the reference's log-probs (the base, adapters off)
    beta: float              # default beta (its meaning is the loss's own)
    length_normalized: bool  # reads the per-token mean log-prob instead of the sum
    paired: bool             # False: unpaired rows with a desirable/undesirable label (KTO)
    smoothing: float         # default label smoothing
    compute: Callable[[PreferenceInputs], tuple[Tensor, Tensor, Tensor]] | None  # None: unpaired (KTO)


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {}


def register_preference_loss(name: str, *, reference: bool = True, beta: float = 0.1,
                             length_normalized: bool = False, paired: bool = True, smoothing: float = 0.0):
    def register(fn):
        PREFERENCE_LOSSES[name] = PreferenceLoss(name, reference, beta, length_normalized, paired, smoothing, fn)
        return fn
    return register


def preference_loss(name: str) -> PreferenceLoss:
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"--loss: expected one of {', '.join(PREFERENCE_LOSSES)}, got {name!r}")
    return PREFERENCE_LOSSES[name]


_C, _R = slice(0, None, 2), slice(1, None, 2)


@register_preference_loss("dpo")
def _dpo(x: PreferenceInputs):
    return L.dpo_loss(x.logp[_C], x.logp[_R], x.ref[_C], x.ref[_R], x.beta, x.smoothing)


@register_preference_loss("cdpo", smoothing=0.1)
def _cdpo(x: PreferenceInputs):
    return _dpo(x)


@register_preference_loss("ipo")
def _ipo(x: PreferenceInputs):
    return L.ipo_loss(x.logp[_C], x.logp[_R], x.ref[_C], x.ref[_R], x.beta)


@register_preference_loss("simpo", reference=False, beta=2.0, length_normalized=True)
def _simpo(x: PreferenceInputs):
    return L.simpo_loss(x.avg[_C], x.avg[_R], x.beta, x.simpo_gamma, x.smoothing)


@register_preference_loss("orpo", reference=False, length_normalized=True)
def _orpo(x: PreferenceInputs):
    return L.orpo_loss(x.avg[_C], x.avg[_R], x.orpo_lambda)


# KTO's loss needs the batch's reference point (a collective over ranks): the trainer computes it
PREFERENCE_LOSSES["kto"] = PreferenceLoss("kto", True, 0.1, False, False, 0.0, None)


def held_roles(cfg) -> Held:
    """What a stage config's algorithm holds beside the policy, for the memory planner."""
    if isinstance(cfg, PPOConfig):
        return Held(critic=estimator(cfg.advantage).critic)
    if isinstance(cfg, PreferenceConfig):
        return Held(reference=preference_loss(cfg.loss).reference and not cfg.precompute_ref)
    return Held()
