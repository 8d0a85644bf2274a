"""Per-request sampling on top of the generation engine's decode batch.

A server batch mixes requests with different temperature / top_p / seed / penalties, and
requests join and leave it between steps, so each request carries its own RowSampler (its
settings, its own random generator, the counts of what it generated) and `pick` chooses
the next token of every active row from that step's logits, each with its own settings.

Because every row draws from its own generator, a seeded request's random stream does not
depend on which other requests share its steps. A row whose scores are not finite (NaN /
inf from the model) is reported as failed and gets a placeholder token; the engine ends
that row alone, the others keep going.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..generation.sampling import outside_top_p


@dataclass(frozen=True)
class RowSettings:
    temperature: float = 1.0  # <= 0 means greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # ... and this times the number of times it was generated
    top_logprobs: int | None = None  # report logprobs with this many alternatives; None: no logprobs
    adapter: str | None = None  # the LoRA adapter of this row; None: the base model


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens and their logprobs, best first


BASE = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


class RowSampler:
    """One request's sampling state."""

    def __init__(self, settings: RowSettings, device):
        self.settings = settings
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(settings.seed) if settings.seed is not None else self.generator.seed()
        self.penalized = bool(settings.presence_penalty or settings.frequency_penalty)
        self.counts: torch.Tensor | None = None  # [V] times each token was generated (penalized rows only)


@dataclass
class Pick:
    tokens: list[int]
    failed: list[bool]  # the row's scores were not finite: its token is a placeholder
    logprobs: list[TokenLogprob | None]  # for rows that asked for them


def _penalized(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    if not any(r.penalized for r in rows):
        return logits
    for r in rows:
        if r.penalized and r.counts is None:
            r.counts = torch.zeros(logits.shape[-1], device=logits.device)
    counts = torch.stack([r.counts if r.penalized else torch.zeros_like(logits[0]) for r in rows])
    presence = logits.new_tensor([r.settings.presence_penalty for r in rows])[:, None]
    frequency = logits.new_tensor([r.settings.frequency_penalty for r in rows])[:, None]
    return logits - presence * (counts > 0) - frequency * counts


def pick(logits: torch.Tensor, rows: list[RowSampler]) -> Pick:
    """Next token of each row from last-position logits [B, V], row i with rows[i]'s settings."""
    logits = logits.float()
    temperature = logits.new_tensor([r.settings.temperature for r in rows])
    greedy = temperature <= 0
    scaled = _penalized(logits, rows) / torch.where(greedy, 1.0, temperature)[:, None]
    scaled = scaled.masked_fill(outside_top_p(scaled, logits.new_tensor([r.settings.top_p for r in rows])),
                                float("-inf"))
    probs = scaled.softmax(dim=-1)
    picked = scaled.argmax(dim=-1)
    broken = (logits.isnan().any(dim=-1) | ~probs.isfinite().all(dim=-1)).tolist()
    for i, row in enumerate(rows):
        if broken[i]:
            picked[i] = 0
        elif not greedy[i]:
            picked[i] = torch.multinomial(probs[i], 1, generator=row.generator)[0]
    tokens = picked.tolist()
    for i, row in enumerate(rows):
        if row.penalized and not broken[i]:
            row.counts[tokens[i]] += 1
    return Pick(tokens, broken, [None if broken[i] else _logprob(logits[i], tokens[i], row.settings.top_logprobs)
                                 for i, row in enumerate(rows)])


def _logprob(logits: torch.Tensor, token: int, top_n: int | None) -> TokenLogprob | None:
    """The model's own log-probabilities (before penalties, temperature and top_p)."""
    if top_n is None:
        return None
    logp = logits.log_softmax(dim=-1)
    top = logp.topk(top_n) if top_n else None
    return TokenLogprob(token, float(logp[token]), list(zip(top.indices.tolist(), top.values.tolist())) if top else [])
