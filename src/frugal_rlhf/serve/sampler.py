"""Per-row sampling settings on top of `generation.sample`.

`sample()` applies one SampleConfig and one random generator to the whole batch. A
server batch mixes requests with different temperature / top_p / seed / penalties, so we
wrap the model: the wrapper runs the real forward pass, picks each row's next token with
that row's own settings and generator, and returns logits in which the picked token is
the only finite entry. `sample()` then runs greedy (argmax) over them and keeps doing
what it is good at: the KV cache, masks and positions of the left-padded batch.

Because every row draws from its own generator, a seeded request's random stream does
not depend on which other requests share its batch. A row whose scores are not finite
(NaN / inf from the model) is put in `failed` and gets a placeholder token; the engine
ends that row alone, the others keep going.
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
    """Wrap a causal LM so each row of a batch is sampled with its own settings.

    With `multi_adapter`, the wrapped model is a peft model holding several LoRA adapters
    and each forward pass tells it which adapter every row uses (peft's mixed-batch
    inference): one batch, one base, rows of different policies.
    """

    def __init__(self, model: nn.Module, rows: list[RowSettings], multi_adapter: bool = False):
        super().__init__()
        self.model, self.rows = model, rows
        self.config = model.config
        device = next(model.parameters()).device
        self.temperature = torch.tensor([r.temperature for r in rows], device=device)
        self.top_p = torch.tensor([r.top_p for r in rows], device=device)
        self.presence = torch.tensor([r.presence_penalty for r in rows], device=device)
        self.frequency = torch.tensor([r.frequency_penalty for r in rows], device=device)
        self.counts = None  # [B, V] times each token was generated; only when a row has a penalty
        self.adapter_names = [r.adapter or BASE for r in rows] if multi_adapter else None
        self.generators = []
        for r in rows:
            gen = torch.Generator(device=device)
            gen.manual_seed(r.seed) if r.seed is not None else gen.seed()
            self.generators.append(gen)
        self.failed: set[int] = set()  # rows whose scores stopped being finite
        self.logprobs: list[TokenLogprob | None] = [None] * len(rows)  # of the last pick, per row

    def _penalized(self, logits: torch.Tensor) -> torch.Tensor:
        if not (self.presence.any() or self.frequency.any()):
            return logits
        if self.counts is None:
            self.counts = torch.zeros_like(logits)
        return logits - self.presence[:, None] * (self.counts > 0) - self.frequency[:, None] * self.counts

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token per row from last-position logits [B, V] -> [B]."""
        logits = logits.float()
        greedy = self.temperature <= 0
        scaled = self._penalized(logits) / torch.where(greedy, 1.0, self.temperature)[:, None]
        scaled = scaled.masked_fill(_top_p_mask(scaled, self.top_p), float("-inf"))
        probs = scaled.softmax(dim=-1)
        picked = scaled.argmax(dim=-1)
        broken = logits.isnan().any(dim=-1) | ~probs.isfinite().all(dim=-1)
        for row, gen in enumerate(self.generators):
            if broken[row]:
                self.failed.add(row)
                picked[row] = 0
            elif not greedy[row]:
                picked[row] = torch.multinomial(probs[row], 1, generator=gen)[0]
        if self.counts is not None:
            self.counts.scatter_add_(1, picked[:, None], torch.ones_like(self.counts[:, :1]))
        self._note_logprobs(logits, picked)
        return picked

    def _note_logprobs(self, logits: torch.Tensor, picked: torch.Tensor) -> None:
        """The model's own log-probabilities (before penalties, temperature and top_p)."""
        for row, settings in enumerate(self.rows):
            if settings.top_logprobs is None or row in self.failed:
                continue
            logp = logits[row].log_softmax(dim=-1)
            top = logp.topk(settings.top_logprobs) if settings.top_logprobs else None
            self.logprobs[row] = TokenLogprob(int(picked[row]), float(logp[picked[row]]),
                                              list(zip(top.indices.tolist(), top.values.tolist())) if top else [])

    def forward(self, **kwargs):
        if self.adapter_names is not None:
            kwargs["adapter_names"] = self.adapter_names
        out = self.model(**kwargs)
        picked = self.pick(out.logits[:, -1])
        onehot = torch.full_like(out.logits[:, -1:], float("-inf"))
        onehot.scatter_(-1, picked[:, None, None], 0.0)
        return SimpleNamespace(logits=onehot, cache=getattr(out, "cache", None))
