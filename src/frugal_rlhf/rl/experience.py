"""The experience maker: generate -> score -> advantages, as one clear pipeline.

Everything here runs without gradients. Old log-probs are recomputed with a forward pass
in the same mode the update uses (not taken from sampling), so the first PPO epoch starts
at ratio == 1 exactly; sampling-time numbers differ by cache/precision noise.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import torch

from ..generation import SampleConfig
from ..generation.engines import RolloutEngine, TorchEngine
from . import losses as L
from .algorithms import AdvantageInputs, estimator


@dataclass
class Experience:
    sequences: torch.Tensor        # [B, P+N]
    attention_mask: torch.Tensor   # [B, P+N]
    action_mask: torch.Tensor      # [B, N]
    logprobs: torch.Tensor | None  # [B, N] actor at rollout time (None: the update's forward gives them)
    ref_logprobs: torch.Tensor     # [B, N]
    values: torch.Tensor           # [B, N]
    rewards: torch.Tensor          # [B, N] shaped: -kl_coef*kl, + score at the last token
    advantages: torch.Tensor       # [B, N]
    returns: torch.Tensor          # [B, N] = advantages + values (the value target)
    score: torch.Tensor            # [B] raw reward-model score
    kl: torch.Tensor | None        # [B, N] per-token KL estimate to the reference (None with logprobs)
    sample_logprobs: torch.Tensor  # [B, N] the generation engine's log-probs of the sampled tokens
    tied: torch.Tensor | None = None  # [B] bool: rows of groups whose scores tie (no signal; group_size > 1)
    reward_parts: dict = field(default_factory=dict)  # name -> [B] each reward component, raw

    @property
    def num_actions(self) -> int:
        return self.action_mask.shape[1]

    def select(self, index) -> "Experience":
        def pick(value):
            return {k: v[index] for k, v in value.items()} if isinstance(value, dict) else value[index]
        return Experience(**{f.name: None if getattr(self, f.name) is None else pick(getattr(self, f.name))
                             for f in fields(self)})

    def minibatches(self, size: int, generator: torch.Generator, group: int = 1):
        """The replay buffer of one rollout: shuffled mini-batches of `size` sequences. With
        `group` > 1 whole groups are shuffled, their rows kept adjacent and in order."""
        n = self.sequences.shape[0] // group
        order = (torch.randperm(n, generator=generator)[:, None] * group + torch.arange(group)).view(-1)
        for start in range(0, len(order), size):
            yield self.select(order[start:start + size])


class RunningMoments:
    """Running mean/std of reward scores (Chan et al. parallel update), for normalization."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor):
        n = x.numel()
        batch_mean, batch_var = float(x.mean()), float(x.var(unbiased=False)) if n > 1 else 0.0
        total = self.count + n
        delta = batch_mean - self.mean
        self.var = (self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return max(self.var, 1e-8) ** 0.5

    def normalize(self, x):
        return (x - self.mean) / self.std

    def state_dict(self):
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state):
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


@dataclass
class RolloutSettings:
    sample: SampleConfig
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    reward_clip: float | None = None
    normalize_reward: bool = False
    whiten_advantages: bool = True
    advantage: str = "gae"             # the estimator's name in rl/algorithms.py
    group_size: int = 1
    scale_rewards: str = "group"       # group | batch | none: what divides GRPO's centered scores


@torch.no_grad()
def make_experience(actor, critic, reward_fn, reference, input_ids, attention_mask, settings: RolloutSettings,
                    kl_coef: float, generator, strategy, moments: RunningMoments | None = None,
                    policy_logprobs: bool = True, engine: RolloutEngine | None = None):
    """One rollout batch (this rank's share) -> Experience, plus timings {gen, score} in seconds.

    reward_fn(sequences, attention_mask, prompt_length) -> ([B] scores, {name: [B] component}). The strategy gives the
    autocast, and the statistics of all ranks' batches for advantage whitening and reward
    normalization (one process: this batch's). Each prompt is sampled `group_size` times, the
    copies adjacent. With no critic (GRPO) the values are 0 and advantages are group-relative.
    `policy_logprobs=False` (GRPO updating once on this batch) skips the actor's forward: the
    policy that sampled is the one the update starts from, whose forward gives the same numbers.
    `engine` samples (generation/engines.py; default: our torch engine on the actor's weights).
    """
    if settings.group_size > 1:
        input_ids = input_ids.repeat_interleave(settings.group_size, 0)
        attention_mask = attention_mask.repeat_interleave(settings.group_size, 0)
    autocast_factory = strategy.autocast
    t0 = time.perf_counter()
    engine = engine or TorchEngine(autocast_factory)
    out = engine.generate(actor, input_ids, attention_mask, settings.sample, generator, group=settings.group_size)
    t1 = time.perf_counter()
    seq, attn, mask = out.sequences, out.attention_mask, out.action_mask.float()
    n, temp = mask.shape[1], settings.sample.temperature if settings.sample.temperature > 0 else 1.0
    # A group's copies of a prompt are encoded once (all but the prompt's last token, whose
    # output predicts the first response token).
    shared = (settings.group_size, out.prompt_length - 1)
    with autocast_factory():
        logprobs = actor(seq, attn, n, temperature=temp, shared_prefix=shared)[0].float() if policy_logprobs else None
        ref_logprobs, _ = reference(seq, attn, n, temperature=temp, shared_prefix=shared)
        values = critic(seq, attn, n, shared).float() if critic is not None else torch.zeros_like(mask)
        score, parts = reward_fn(seq, attn, out.prompt_length)
        score = score.float()
    raw, scale = score, 1.0
    if settings.normalize_reward and moments is not None:
        moments.update(strategy.all_gather(score))
        score, scale = moments.normalize(score), moments.std
    # The score the advantages use, and the one decision of which groups tie on it.
    outcome = L.clip_score(score, settings.reward_clip)
    g = settings.group_size
    tied = L.zero_spread(outcome, g, raw, scale).repeat_interleave(g) if g > 1 else None
    values = values * mask
    est = estimator(settings.advantage).compute(AdvantageInputs(
        outcome, tied, mask, logprobs, ref_logprobs.float(), values, kl_coef, settings.kl_estimator, settings.gamma,
        settings.lam, settings.whiten_advantages, g, settings.scale_rewards, strategy.all_reduce))
    exp = Experience(seq, attn, mask, logprobs, ref_logprobs.float(), values, est.rewards, est.advantages,
                     est.returns, raw, est.kl, out.logprobs, tied, parts)
    return exp, {"time_gen": t1 - t0, "time_score": time.perf_counter() - t1}
