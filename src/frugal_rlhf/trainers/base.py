"""The loop every trainer shares: steps, metrics, progress, evaluation, checkpoints, resume.

A subclass provides `train_step(step) -> metrics`, optionally `evaluate() -> metrics` and
`finish()`, and registers what a checkpoint holds in `self.models`, `self.optimizers` and
`self.stateful` (objects with state_dict/load_state_dict: schedulers, loaders, controllers).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..device import peak_memory_bytes
from ..runlog import RunDir, make_progress, rng_state, set_rng_state

log = logging.getLogger("frugal_rlhf")


def warmup_cosine(total_steps: int, warmup_ratio: float, min_ratio: float = 0.1):
    """LR multiplier: linear warmup, then cosine decay to min_ratio of the peak."""
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(params, lr: float, weight_decay: float = 0.0):
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))


def make_scheduler(optim, config):
    return torch.optim.lr_scheduler.LambdaLR(optim, warmup_cosine(config.max_steps, config.warmup_ratio))


def _portable_rng() -> dict:
    # numpy's RNG state holds an ndarray, which weights_only loading refuses: store a list.
    state = rng_state()
    kind, keys, pos, has_gauss, cached = state["numpy"]
    state["numpy"] = [kind, keys.tolist(), pos, has_gauss, cached]
    return state


def _restore_rng(state: dict):
    kind, keys, pos, has_gauss, cached = state["numpy"]
    state["numpy"] = (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)
    set_rng_state(state)



def batch_to(batch: dict, device) -> dict:
    """A collated batch on `device` (its non-tensor fields as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

class Trainer:
    stage = "train"
    evaluate_at_start = False  # log a step-0 evaluation (the baseline before any update)

    def __init__(self, strategy, config):
        self.strategy = strategy
        self.config = config
        self.models: dict = {}
        self.optimizers: dict = {}
        self.stateful: dict = {}
        self.out = Path(config.output)
        self.ckpt_root = self.out / "checkpoints"
        self.run: RunDir | None = None
        if config.checkpoint_format not in ("full", "sharded"):
            raise ValueError(f"checkpoint_format must be 'full' or 'sharded', not '{config.checkpoint_format}'")
        self.sharded = config.checkpoint_format == "sharded"
        if self.sharded and not hasattr(strategy, "save_shard"):
            raise ValueError("--checkpoint-format sharded needs --strategy fsdp (other strategies write full checkpoints)")

    def checkpoint_activations(self, *roles):
        """With config.gradient_checkpointing, each block's activations are recomputed in
        backward instead of kept (~30% more compute, activation memory of one block)."""
        if self.config.gradient_checkpointing:
            for role in roles:
                role.lm.hf_model().gradient_checkpointing_enable({"use_reentrant": False})

    def to_device(self, batch: dict) -> dict:
        return batch_to(batch, self.strategy.device)

    # ---- to implement -------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        raise NotImplementedError

    def evaluate(self) -> dict:
        return {}

    def finish(self):
        pass

    # ---- the loop --------------------------------------------------------------------------
    def fit(self, stop_at: int | None = None):
        """Train to config.max_steps (or stop after step `stop_at`, e.g. to continue later)."""
        cfg = self.config
        start = self.resume() if cfg.resume else 0
        self.run = RunDir(self.out, cfg, resume_step=start, enabled=self.strategy.is_rank0)
        last = min(cfg.max_steps, stop_at or cfg.max_steps)
        if start == 0 and self.evaluate_at_start:
            baseline = self.evaluate()
            if baseline:
                self.run.log({"step": 0, **baseline})
        with make_progress(self.strategy.is_rank0) as progress:
            task = progress.add_task(self.stage, total=cfg.max_steps, completed=start, info="")
            for step in range(start + 1, last + 1):
                t0 = time.perf_counter()
                metrics = self.train_step(step)
                metrics["step_time"] = time.perf_counter() - t0
                if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps:
                    metrics.update(self.evaluate())
                if step == cfg.max_steps:
                    metrics.update(self.evaluate())
                # the largest rank's peak (rank 0 alone would hide an uneven one)
                metrics["peak_mem_gb"] = self.strategy.max_over_ranks(peak_memory_bytes(self.strategy.device)) / 2**30
                self.run.log({"step": step, **metrics})
                progress.update(task, advance=1, info=self.progress_info(metrics))
                if cfg.save_every and (step % cfg.save_every == 0 or step == last):
                    self.save_checkpoint(step)
        if last == cfg.max_steps:
            with self.strategy.full_models(*self.models.values()):  # exports need whole models
                self.finish()
        self.strategy.barrier()
        return self.run.read_metrics() if self.strategy.is_rank0 else []

    def progress_info(self, metrics: dict) -> str:
        keys = [k for k in ("loss", "reward", "kl", "accuracy", "eval_loss") if k in metrics]
        return " ".join(f"{k}={metrics[k]:.4g}" for k in keys)

    # ---- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, step: int):
        """Everything needed to continue: trained tensors, optimizers, schedulers, data
        position, RNG. Written into a temporary directory and renamed when complete."""
        final = self.ckpt_root / f"step-{step:07d}"
        tmp = self.ckpt_root / f".tmp-step-{step:07d}"
        if self.strategy.is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.strategy.barrier()
        for name, model in self.models.items():
            if self.sharded:  # each rank its own shard of model and optimizer: no gather
                self.strategy.save_shard(model, self.optimizers[name], tmp, name)
                continue
            self.strategy.save_model(model, tmp / f"{name}.safetensors")
            self.strategy.save_optimizer(self.optimizers[name], tmp / f"{name}.optim.pt")
        self.strategy.barrier()  # every rank's files are in place before rank 0 renames the directory
        if self.strategy.is_rank0:
            state = {"step": step, "rng": _portable_rng(),
                     "stateful": {k: v.state_dict() for k, v in self.stateful.items()}}
            torch.save(state, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps({"step": step, "stage": self.stage}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.checkpoints()[: -self.config.keep_checkpoints or None]:
                shutil.rmtree(old, ignore_errors=True)
        self.strategy.barrier()

    def checkpoints(self) -> list[Path]:
        if not self.ckpt_root.exists():
            return []
        return sorted(p for p in self.ckpt_root.glob("step-*") if (p / "meta.json").exists())

    def resume(self) -> int:
        ckpts = self.checkpoints()
        if not ckpts:
            log.info("no checkpoint in %s: starting from scratch", self.ckpt_root)
            return 0
        ckpt = ckpts[-1]
        for name, model in self.models.items():
            if not (ckpt / f"{name}.safetensors").exists() and hasattr(self.strategy, "load_shard"):
                self.strategy.load_shard(model, self.optimizers[name], ckpt, name)
                continue
            self.strategy.load_model(model, ckpt / f"{name}.safetensors")
            self.strategy.load_optimizer(self.optimizers[name], ckpt / f"{name}.optim.pt")
        state = torch.load(ckpt / "state.pt", weights_only=True)
        for k, v in self.stateful.items():
            v.load_state_dict(state["stateful"][k])
        _restore_rng(state["rng"])
        log.info("resumed from %s (step %d)", ckpt, state["step"])
        return state["step"]
