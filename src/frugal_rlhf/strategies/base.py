"""Strategies own placement: which device tensors live on, how gradients meet, how state is saved.

Trainers only talk to a Strategy; swapping NaiveStrategy for a distributed one changes no
trainer code. NaiveStrategy is one process on one device and the base the others extend.
"""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.loader import ResumableLoader
from ..device import autocast, compute_dtype, default_device
from ..rundir import atomic_write


def module_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint of `model` holds: a role's own trained tensors, or the full state."""
    state = model.trainable_state_dict() if hasattr(model, "trainable_state_dict") else model.state_dict()
    # safetensors refuses tensors that share storage (tied embeddings): store copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


class NaiveStrategy:
    """One process, one device (CUDA when present, else CPU)."""

    rank, world_size = 0, 1

    def __init__(self, seed: int = 42, dtype: str | None = None):
        self.seed = seed
        self.device = default_device()
        self.dtype = compute_dtype(self.device, dtype)

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def setup_distributed(self):
        set_seed(self.seed)

    def model_init_context(self):
        return contextlib.nullcontext()

    def autocast(self):
        return autocast(self.device, self.dtype)

    def prepare(self, *items):
        """Place models (and their optimizers' state) on the device. Accepts models or
        (model, optimizer) pairs and returns them in the same shape."""
        out = []
        for it in items:
            model, optim = it if isinstance(it, tuple) else (it, None)
            model = self._prepare_model(model, optim)
            out.append((model, optim) if isinstance(it, tuple) else model)
        return out[0] if len(out) == 1 else out

    def _prepare_model(self, model, optim=None):
        return model.to(self.device) if model is not None else None

    def unwrap(self, model):
        return model

    def full_models(self, *models):
        """Context in which unwrap(model) on rank 0 is a complete, plain model (exports).
        Every rank enters it: a sharded strategy gathers here."""
        return contextlib.nullcontext()

    def unsharded(self, *models):
        """Context in which the models' parameters are whole on every rank, for many small
        forwards (generation). Collective; a sharded strategy gathers once here."""
        return contextlib.nullcontext()

    def backward(self, loss, model, optim, last: bool = True):
        """`last=False`: more micro-batches of this step follow before optimizer_step."""
        loss.backward()

    def optimizer_step(self, optim, max_grad_norm: float | None = None, model=None) -> float:
        params = [p for group in optim.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
        if torch.isfinite(norm):  # a non-finite gradient is never applied (the trainer counts the skip)
            optim.step()
        optim.zero_grad(set_to_none=True)
        return float(norm)

    def all_reduce_sum(self, value: float) -> float:
        return value

    def max_over_ranks(self, value: float) -> float:
        return value

    def mean_over_ranks(self, metrics: dict) -> dict:
        """Scalar metrics averaged over ranks (every rank holds an equal share of the batch)."""
        return metrics

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` (equal shapes) concatenated along dim 0, in rank order."""
        return x

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """`x` summed element-wise over every rank's (equal shapes); `x` itself is left as it was."""
        return x

    def barrier(self):
        pass

    def lost_peer(self, error: BaseException) -> str | None:
        """Why the process group failed, when `error` is that (another process gone or
        unreachable); None for any other error. One process has no peers."""
        return None

    def setup_dataloader(self, dataset, batch_size, collate_fn, shuffle=True, drop_last=True, accum=1):
        return ResumableLoader(dataset, batch_size, collate_fn, shuffle, self.seed, self.rank, self.world_size,
                               drop_last, accum)

    def save_model(self, model, path, only_rank0=True):
        if self.is_rank0 or not only_rank0:
            state = module_state(self.unwrap(model))
            atomic_write(path, lambda tmp: save_file(state, tmp))

    def load_model(self, model, path, strict=True):
        state = load_file(os.fspath(path))
        target = self.unwrap(model)
        expected = set(module_state_names(target))
        missing, unexpected = expected - state.keys(), state.keys() - expected
        if strict and (missing or unexpected):
            raise KeyError(f"{path}: checkpoint does not match the model (missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]})")
        target.load_state_dict(state, strict=False)

    def save_optimizer(self, optim, path, only_rank0=True):
        if self.is_rank0 or not only_rank0:
            atomic_write(path, lambda tmp: torch.save(optim.state_dict(), tmp))

    def load_optimizer(self, optim, path):
        optim.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))

    def cleanup(self):
        pass


def module_state_names(model):
    return model.trainable_state_names() if hasattr(model, "trainable_state_names") else set(model.state_dict())


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
