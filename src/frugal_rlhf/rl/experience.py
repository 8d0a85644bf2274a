"""The experience maker: generate -> score -> advantages, as one clear pipeline.

Everything here runs without gradients. Old log-probs are recomputed with a forward pass
in the same mode the update uses (not taken from sampling), so the first PPO epoch starts
at ratio == 1 exactly; sampling-time numbers differ by cache/precision noise.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields

import torch

from ..generation import SampleConfig
from ..generation.engines import RolloutEngine, TorchEngine
from . import losses as L


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

    @property
    def num_actions(self) -> int:
        return self.action_mask.shape[1]

    def select(self, index) -> "Experience":
        return Experience(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
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

    def normalize(self, x):
        return (x - self.mean) / max(self.var, 1e-8) ** 0.5

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
    advantage: str = "gae"             # gae: critic + GAE; group: GRPO, KL in the loss instead of the reward
    group_size: int = 1
    scale_rewards: str = "group"       # group | batch | none: what divides GRPO's centered scores


@torch.no_grad()
def make_experience(actor, critic, reward_fn, reference, input_ids, attention_mask, settings: RolloutSettings,
                    kl_coef: float, generator, strategy, moments: RunningMoments | None = None,
                    policy_logprobs: bool = True, engine: RolloutEngine | None = None):
    """One rollout batch (this rank's share) -> Experience, plus timings {gen, score} in seconds.

    reward_fn(sequences, attention_mask, prompt_length) -> [B] scores. The strategy gives the
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
        score = reward_fn(seq, attn, out.prompt_length).float()
    raw_score = score
    if settings.normalize_reward and moments is not None:
        moments.update(strategy.all_gather(score))
        score = moments.normalize(score)
    ref_logprobs, values = ref_logprobs.float(), values * mask
    if settings.advantage in ("group", "rloo"):  # the clipped score against its group's, at every token
        rewards = L.score_rewards(score, mask, settings.reward_clip)
        outcome = (L.scaled_group_advantages(rewards.sum(1), settings.group_size, settings.scale_rewards)
                   if settings.advantage == "group" else L.rloo_advantages(rewards.sum(1), settings.group_size))
        advantages = returns = outcome[:, None] * mask
        kl = None if logprobs is None else L.token_kl(logprobs, ref_logprobs, mask, settings.kl_estimator)
    elif settings.advantage == "reinforce++":  # KL in the per-token reward, returns whitened over the batch
        rewards, kl = L.shape_rewards(score, logprobs, ref_logprobs, mask, kl_coef, settings.kl_estimator,
                                      settings.reward_clip)
        returns = L.discounted_returns(rewards, mask, settings.gamma)
        advantages = L.masked_whiten(returns, mask, all_reduce=strategy.all_reduce)
    else:
        rewards, kl = L.shape_rewards(score, logprobs, ref_logprobs, mask, kl_coef, settings.kl_estimator,
                                      settings.reward_clip)
        advantages, returns = L.gae(rewards, values, mask, settings.gamma, settings.lam)
        if settings.whiten_advantages:
            advantages = L.masked_whiten(advantages, mask, all_reduce=strategy.all_reduce)
    exp = Experience(seq, attn, mask, logprobs, ref_logprobs, values, rewards, advantages, returns, raw_score, kl,
                     out.logprobs)
    return exp, {"time_gen": t1 - t0, "time_score": time.perf_counter() - t1}
