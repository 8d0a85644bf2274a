"""Rollout engines: what samples the policy's answers, behind one interface.

Every caller that samples from a policy (PPO/GRPO rollouts, preference sampling, evaluation,
the demo's report) asks an engine, never a decode loop directly:

    engine = make_engine("torch", autocast=strategy.autocast)
    engine.sync(actor)                   # after each update: the engine sees the new weights
    out = engine.generate(actor, input_ids, attention_mask, sample_config, generator, group=4)

`generate` returns a `Rollout`: token ids (never re-tokenized text) and the engine's own
log-prob of each sampled token. The trainer recomputes its own log-probs of the same tokens;
an engine whose numbers can differ from the trainer's (another kernel, a quantized copy of the
weights) says so with `matches_trainer = False`, and the trainer then logs the mismatch and
corrects the gradient with truncated importance sampling (rl/losses.py).

`torch` is our own engine (generation/rollout.py): it samples with the trainer's weights in
place, so `sync` has nothing to do. Other engines are optional extras, imported only when
chosen, each a one-line error naming its extra when missing.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable

from torch import Tensor

from .rollout import Rollout, sample
from .sampling import SampleConfig


class RolloutEngine:
    """The interface. `policy` is an Actor (models.roles): a LoRA adapter on a shared base, or
    a fully trained model."""

    name = "engine"
    matches_trainer = False  # True only when sampling runs the trainer's own weights and kernels

    def sync(self, policy) -> None:
        """Make the engine sample from `policy`'s current weights (called after every update)."""

    def generate(self, policy, input_ids: Tensor, attention_mask: Tensor, config: SampleConfig,
                 generator=None, group: int = 1) -> Rollout:
        """Sample `config.max_new_tokens` at most per row of left-padded prompts; `group` > 1:
        the rows are groups of that many adjacent copies of one prompt."""
        raise NotImplementedError

    def close(self) -> None:
        """Free what the engine holds (processes, files, device memory)."""


class TorchEngine(RolloutEngine):
    """Our decode loop on the trainer's own model: the reference every other engine is tested against."""

    name = "torch"
    matches_trainer = True

    def __init__(self, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.autocast = autocast

    def generate(self, policy, input_ids, attention_mask, config, generator=None, group=1) -> Rollout:
        with self.autocast(), policy.lm.role(policy.adapter) as model:
            return sample(model, input_ids, attention_mask, config, generator, group=group)


# name -> "module:class" under this package (imported when chosen: the extras are optional)
ENGINES = {"torch": "engines:TorchEngine", "vllm": "vllm_engine:VLLMEngine"}


def engine_class(name: str) -> type[RolloutEngine]:
    if name not in ENGINES:
        raise ValueError(f"rollout engine: expected one of {', '.join(ENGINES)}, got {name!r}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def make_engine(name: str = "torch", **kwargs) -> RolloutEngine:
    return engine_class(name)(**kwargs)
