"""Rollout engines: what samples the policy's answers, behind one interface.

Every caller that samples from a policy (PPO/GRPO rollouts, preference sampling, evaluation,
the demo's report) asks an engine, never a decode loop directly:

    engine = make_engine("torch", autocast=strategy.autocast, tokenizer=tok, quant="f16")
    engine.sync(actor)                   # after each update: the engine sees the new weights
    out = engine.generate(actor, input_ids, attention_mask, sample_config, generator, group=4)
    engine.close()

`generate` returns a `Rollout`: token ids (never re-tokenized text) and the engine's own
log-prob of each sampled token. The trainer recomputes its own log-probs of the same tokens;
an engine whose numbers can differ from the trainer's (another kernel, a quantized copy of the
weights) says so with `matches_trainer = False`, and the trainer then logs the mismatch and
corrects the gradient with truncated importance sampling (rl/losses.py).

`torch` is our own engine (generation/rollout.py): it samples with the trainer's weights in
place, so `sync` has nothing to do. `llamacpp` (generation/llamacpp.py) holds its own copy of the
policy in llama.cpp. Other engines are optional extras, imported only when chosen; a missing
one is a one-line error naming its extra. Every engine is made with the same options
(`make_engine`) and takes those it needs. An engine that holds its own copy of the policy syncs
itself on the first `generate` for a policy it has not seen, so callers that sample once (an
evaluation) need not call `sync`.

`auto` picks the fastest engine installed for the device, in the order measured (AUTO).
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable

import torch
from torch import Tensor

from ..engine_choice import ENGINES, ROLLOUT_QUANTS, check_engine, installed
from ..errors import UserError
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

    def __init__(self, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 tokenizer=None, quant: str = "f16"):
        self.autocast = autocast  # the trainer's compute dtype; it samples the trainer's weights, whatever `quant`

    def generate(self, policy, input_ids, attention_mask, config, generator=None, group=1) -> Rollout:
        with self.autocast(), policy.lm.role(policy.adapter) as model:
            return sample(model, input_ids, attention_mask, config, generator, group=group)


# --rollout-engine auto: the installed engines in the order of their decode speed per device type.
# CPU (docs/benchmarks.md, SmolLM2-135M, batch 8): where our torch engine computes in fp32,
# llama.cpp decoded ~2x faster (74.6 against 34.3 tok/s, AVX2); where it computes in bf16 on
# fast kernels (dtype auto measured them; AVX512-BF16/AMX with oneDNN), ours was faster (135
# against 95 tok/s), so torch comes first there (cpu_bf16). vLLM's CPU build runs in its own
# environment and is not chosen on CPU. CUDA: vLLM, as every peer recommends (not measured here).
AUTO = {"cpu": ("llamacpp", "torch"), "cpu_bf16": ("torch",), "cuda": ("vllm", "torch")}


def resolve_engine(name: str, device_type: str = "cpu", dtype: torch.dtype | None = None) -> str:
    """An engine name, with `auto` replaced by the first installed engine of AUTO for the device
    (on a CPU, for the dtype our torch engine computes in there)."""
    if name == "auto":
        key = "cpu_bf16" if device_type == "cpu" and dtype == torch.bfloat16 else device_type
        return next(e for e in AUTO.get(key, ("torch",)) if installed(e))
    return name


def check_rollout_engine(cfg) -> None:
    """--rollout-engine (known, its extra installed) and --rollout-quant of a stage config fit
    together: checked before models load (--tis-cap's range is config.validate's)."""
    check_engine(cfg.rollout_engine)
    if cfg.rollout_quant not in ROLLOUT_QUANTS:
        raise UserError(f"--rollout-quant: expected one of {', '.join(ROLLOUT_QUANTS)}, got {cfg.rollout_quant!r}")
    if cfg.rollout_engine not in ("torch", "auto") and cfg.strategy in ("fsdp", "deepspeed"):
        raise UserError(f"--rollout-engine {cfg.rollout_engine} copies the policy's weights from one process: "
                        f"it needs --strategy naive or ddp, not {cfg.strategy}")


def engine_class(name: str) -> type[RolloutEngine]:
    check_engine(name)
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def make_engine(name: str = "torch", *, autocast=contextlib.nullcontext, tokenizer=None, quant: str = "f16",
                device_type: str = "cpu", dtype: torch.dtype | None = None) -> RolloutEngine:
    """The engine `name` (or `auto`'s choice for `device_type`) with the options any engine may take:
    the trainer's autocast (the torch engine's compute dtype), the tokenizer and the weight format
    (--rollout-quant) of an engine that writes its own copy of the policy."""
    return engine_class(resolve_engine(name, device_type, dtype))(autocast=autocast, tokenizer=tokenizer, quant=quant)
