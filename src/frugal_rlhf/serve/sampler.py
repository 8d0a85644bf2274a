"""Per-row sampling settings on top of `generation.sample`.

`sample()` applies one SampleConfig and one random generator to the whole batch. A
server batch mixes requests with different temperature / top_p / seed, so we wrap the
model: the wrapper runs the real forward pass, picks each row's next token with that
row's own settings and generator, and returns logits in which the picked token is the
only finite entry. `sample()` then runs greedy (argmax) over them and keeps doing what
it is good at: the KV cache, masks and positions of the left-padded batch.

Because every row draws from its own generator, a seeded request's random stream does
not depend on which other requests share its batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn


@dataclass(frozen=True)
class RowSettings:
    temperature: float = 1.0  # <= 0 means greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed


def _top_p_mask(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Boolean [B, V] of tokens outside each row's nucleus (top_p [B] in (0, 1])."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Same rule as generation.choose_next: drop a token once the tokens ranked above it
    # hold top_p of the mass; the top token always survives. top_p == 1 drops nothing
    # (a float cumsum can reach 1.0 early and would otherwise cut the tail).
    drop = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop[:, 0] = False
    return torch.zeros_like(drop).scatter(-1, order, drop)


class RowSampler(nn.Module):
    """Wrap a causal LM so each row of a batch is sampled with its own settings."""

    def __init__(self, model: nn.Module, rows: list[RowSettings]):
        super().__init__()
        self.model = model
        self.config = model.config
        device = next(model.parameters()).device
        self.temperature = torch.tensor([r.temperature for r in rows], device=device)
        self.top_p = torch.tensor([r.top_p for r in rows], device=device)
        self.generators = []
        for r in rows:
            gen = torch.Generator(device=device)
            gen.manual_seed(r.seed) if r.seed is not None else gen.seed()
            self.generators.append(gen)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token per row from last-position logits [B, V] -> [B]."""
        logits = logits.float()
        greedy = self.temperature <= 0
        scaled = logits / torch.where(greedy, 1.0, self.temperature)[:, None]
        scaled = scaled.masked_fill(_top_p_mask(scaled, self.top_p), float("-inf"))
        probs = scaled.softmax(dim=-1)
        picked = logits.argmax(dim=-1)
        for row, gen in enumerate(self.generators):
            if not greedy[row]:
                picked[row] = torch.multinomial(probs[row], 1, generator=gen)[0]
        return picked

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        picked = self.pick(out.logits[:, -1])
        onehot = torch.full_like(out.logits[:, -1:], float("-inf"))
        onehot.scatter_(-1, picked[:, None, None], 0.0)
        return SimpleNamespace(logits=onehot, cache=getattr(out, "cache", None))
