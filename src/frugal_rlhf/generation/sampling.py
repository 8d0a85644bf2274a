"""Picking the next token from next-token logits: one rule for every caller of the engine."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SampleConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 or less means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    eos_token_ids: tuple[int, ...] = ()  # stop tokens (several allowed)
    pad_token_id: int = 0


def draw_uniforms(rows: int, generator: torch.Generator | None, device) -> Tensor:
    """The one uniform per row that `choose_next` consumes per step ([rows, 1], float64)."""
    return torch.rand(rows, 1, generator=generator, device=device, dtype=torch.float64)


def choose_next(logits_last: Tensor, config: SampleConfig, generator: torch.Generator | None = None,
                uniforms: Tensor | None = None) -> Tensor:
    """Pick one token per row from next-token logits [B, V] -> [B] (long).

    Sampling takes one uniform per row: drawn here from `generator`, or given as `uniforms`
    ([B, 1] from `draw_uniforms`) by a caller that drew them for a larger batch. The engine
    draws for every row of a rollout, finished or not, so that rows leaving the batch do not
    shift the random stream of the others (the cache-free reference draws the same way).
    """
    logits = logits_last.float()  # bf16/fp16 logits make softmax/top-p cumsums noisy
    if config.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / config.temperature
    if 0 < config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        logits = logits.masked_fill(outside_top_p(logits, logits.new_full(logits.shape[:1], config.top_p)),
                                    float("-inf"))
    # Inverse-CDF sampling, one uniform per row: torch.multinomial draws an exponential for
    # every vocabulary entry (9 ms a step for 8 x 49k on 2 CPU cores, 7% of a decode step).
    # The float64 CDF keeps rare tokens' intervals exact; `right=True` never lands on a
    # zero-probability token (its interval is empty), and u < 1 scaled by the total stays inside.
    cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)
    if uniforms is None:
        uniforms = draw_uniforms(cdf.shape[0], generator, cdf.device)
    u = uniforms * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def outside_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    """Boolean [B, V]: the tokens outside each row's nucleus (top_p [B] in (0, 1]): the one
    top-p rule of every sampler (rollouts here, the server's per-request rows)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens ranked above it already hold top_p of the mass; the top
    # token always survives (its exclusive cumsum is 0). top_p == 1 drops nothing (a float
    # cumsum can reach 1.0 early and would otherwise cut the tail).
    drop = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop[:, 0] = False
    return torch.zeros_like(drop).scatter(-1, order, drop)


def picked_logprobs(logits_last: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    """Log-probs [B] of `tokens` under softmax(logits / temperature) (1 when greedy), before
    top-k/top-p: the numbers the trainer's forward computes for the same tokens (models.roles)."""
    logits = logits_last.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
