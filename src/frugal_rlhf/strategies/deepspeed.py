"""DeepSpeed ZeRO (optional extra `deepspeed`): stage 2 or 3, optimizer CPU offload, bf16.

One engine per trained model, built on the optimizer the trainer made (AdamW, our scheduler
keeps driving its learning rate); frozen models are only placed. Gradient accumulation is
ours: each backward tells the engine whether more micro-batches follow (ZeRO-2 reduces its
partitions at the accumulation boundary and would otherwise keep only the last micro-batch).
Clipping is ours too: DeepSpeed's own `gradient_clipping` is set per step from the trainer's
max_grad_norm, so the numbers match the other strategies.

On a machine without a GPU it runs with DS_ACCELERATOR=cpu and gloo; the first run compiles
DeepSpeed's CPU communication op (~30 s, cached in TORCH_EXTENSIONS_DIR).

PPO's actor and critic on one base are two engines whose optimizers hold disjoint adapters:
fine under ZeRO-2, where parameters stay whole. ZeRO-3 partitions every parameter of an
engine's module, so two engines would partition the shared base twice: use FSDP for that.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch

from .ddp import ZeroStrategy

log = logging.getLogger("frugal_rlhf")


def _warnings_and_above(record) -> bool:
    return record.levelno >= logging.WARNING


def import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read at import: set it before
    # DeepSpeed logs INFO lines to stdout from its import on ("Setting ds_accelerator to cpu"):
    # only with -v. A filter, because DeepSpeed sets its logger's level itself when it creates it.
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("DeepSpeed").addFilter(_warnings_and_above)  # once: addFilter skips a filter it has
    try:
        import deepspeed
    except ImportError as e:
        raise ValueError("--strategy deepspeed needs DeepSpeed: pip install 'frugal-rlhf[deepspeed]'") from e
    return deepspeed


class DeepSpeedStrategy(ZeroStrategy):
    def __init__(self, seed: int = 42, dtype: str | None = None, stage: int = 2, offload: str = "none"):
        super().__init__(seed=seed, dtype=dtype, stage=stage, offload=offload)
        self._engines: dict[int, object] = {}  # id(optimizer) -> engine
        self._trained: set[int] = set()  # ids of parameters that belong to some engine's module

    def setup_distributed(self, timeout_minutes: float = 30):
        self.ds = import_deepspeed()
        super().setup_distributed(timeout_minutes)

    def ds_config(self) -> dict:
        zero = {"stage": self.stage}
        if self.offload == "cpu":
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        return {
            # We feed the batches and accumulate ourselves: one micro-batch per engine step.
            "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0, "zero_optimization": zero,
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            # our AdamW (any torch optimizer) under ZeRO, also when offloaded to the CPU
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9, "wall_clock_breakdown": False,
        }

    def _prepare_model(self, model, optim=None):
        model = super()._prepare_model(model, optim)
        if model is None or optim is None:  # not trained by the caller (reference, reward model): only placed
            return model
        shared = [p for p in model.parameters() if id(p) in self._trained]
        if shared and self.stage == 3:
            raise NotImplementedError(
                "DeepSpeed ZeRO-3 cannot train two models that share a base (each engine would partition it): "
                "use --zero-stage 2, or --strategy fsdp --zero-stage 3")
        self._trained.update(id(p) for p in model.parameters())
        engine, *_ = self.ds.initialize(model=model, optimizer=optim, config=self.ds_config())
        self._engines[id(optim)] = engine
        return engine

    def unwrap(self, model):
        return getattr(model, "module", model)

    def unsharded(self, *models):
        if self.stage == 3:
            # ZeRO-3 gathers parameters per module per token, and a rank whose answers ended
            # early would leave the others waiting in a gather: no PPO under ZeRO-3.
            raise NotImplementedError("PPO rollouts under DeepSpeed ZeRO-3 are not supported: use --zero-stage 2, "
                                      "or --strategy fsdp --zero-stage 3 (gathers the actor once per rollout)")
        return super().unsharded(*models)

    def backward(self, loss, model, optim, last: bool = True):
        engine = self._engines[id(optim)]
        engine.set_gradient_accumulation_boundary(last)
        engine.backward(loss)

    def optimizer_step(self, optim, max_grad_norm: float | None = None, model=None) -> float:
        engine = self._engines[id(optim)]
        engine.optimizer.clip_grad = float(max_grad_norm or 0.0)
        engine.step()
        return float(engine.get_global_grad_norm())

    # ---- checkpoints: the one safetensors format; under ZeRO-3 gathered first ----------------
    def _gathered(self, model, modifier_rank=None):
        params = list(self.unwrap(model).parameters())
        if self.stage == 3 and any(hasattr(p, "ds_id") for p in params):
            return self.ds.zero.GatheredParameters(params, modifier_rank=modifier_rank)
        return contextlib.nullcontext()

    def save_model(self, model, path, only_rank0=True):
        with self._gathered(model):  # every rank takes part; rank 0 writes
            super().save_model(model, path, only_rank0)

    def load_model(self, model, path, strict=True):
        with self._gathered(model, modifier_rank=0):
            super().load_model(model, path, strict)
        for engine in self._engines.values():
            if engine is model and hasattr(engine.optimizer, "refresh_fp32_params"):
                engine.optimizer.refresh_fp32_params()  # the fp32 master partitions follow the load

    @contextlib.contextmanager
    def full_models(self, *models):
        with contextlib.ExitStack() as stack:
            for model in models:
                stack.enter_context(self._gathered(model))
            yield

    def save_optimizer(self, optim, path, only_rank0=True):
        # ZeRO's optimizer state holds Python objects (its loss scaler) that only pickle loads,
        # and we never unpickle checkpoints: checkpoints under DeepSpeed carry the model only.
        log.debug("deepspeed: optimizer state not saved (resume with --strategy fsdp or ddp)")

    def load_optimizer(self, optim, path):
        raise ValueError("resuming under --strategy deepspeed is not supported (its optimizer state needs "
                         "pickle); --strategy fsdp has the same ZeRO stages and resumes exactly")

