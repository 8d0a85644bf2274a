"""Data parallelism with torch.distributed, launched by torchrun (gloo on CPU, NCCL on CUDA).

`DistributedStrategy` is what every multi-process strategy shares: the process group, the
rank's slice of each global batch, sums over ranks, rank-0-only writes. `DDPStrategy` adds
gradient averaging: DistributedDataParallel for a role that owns its trainable parameters,
and one all-reduce of the optimizer's gradients for roles that share trainable parameters
with another prepared role (actor and critic on one base: wrapping both in DDP would hook the
same parameters twice).
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..device import default_device
from .base import NaiveStrategy, set_seed

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# How gloo says a peer is gone: it raises a plain RuntimeError (NCCL raises dist.DistError),
# e.g. "[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:15271. This is ..."
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting")


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class DistributedStrategy(NaiveStrategy):
    """One process per device; every global batch is split between the ranks."""

    def __init__(self, seed: int = 42, dtype: str | None = None):
        super().__init__(seed=seed, dtype=dtype)
        self.rank, self.world_size, self.local_rank = 0, 1, 0

    # ---- process group --------------------------------------------------------------------
    def setup_distributed(self, timeout_minutes: float = 30):
        if not dist.is_initialized():
            missing = [v for v in TORCHRUN_VARS if v not in os.environ]
            if missing:
                raise ValueError(f"strategy {type(self).__name__} needs torchrun's environment (missing "
                                 f"{', '.join(missing)}): launch with `torchrun --nproc_per_node N -m "
                                 f"frugal_rlhf.cli ...` (see docs/strategies.md)")
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            dist.init_process_group(backend="nccl" if cuda else "gloo",
                                    timeout=datetime.timedelta(minutes=timeout_minutes))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = default_device()  # cuda:LOCAL_RANK or cpu
        set_seed(self.seed)  # the same seed on every rank: identical model and adapter init
        if self.rank != 0:  # one voice: other ranks only report warnings and errors
            logging.getLogger("frugal_rlhf").setLevel(logging.WARNING)

    def cleanup(self):
        if not dist.is_initialized():
            return
        # gloo aborts at exit now and then unless every rank meets once more before teardown.
        # But while an error unwinds on this rank only, the others may never arrive: skip the
        # barrier (torchrun then stops the other ranks) instead of hanging until the timeout.
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()

    def setup_dataloader(self, dataset, batch_size, collate_fn, shuffle=True, drop_last=True, accum=1):
        left = len(dataset) % (batch_size * self.world_size)
        if not drop_last and 0 < left < self.world_size:
            # ResumableLoader deals every global batch out row by row: ranks past the last row
            # of a short final batch would get an empty batch (and the others wait for them).
            raise ValueError(f"{len(dataset)} rows leave {left} row(s) in the last batch for {self.world_size} "
                             f"processes: use at least {self.world_size} held-out rows more or less (or none)")
        return super().setup_dataloader(dataset, batch_size, collate_fn, shuffle, drop_last, accum)

    def barrier(self):
        if dist.is_initialized():
            dist.barrier()

    def lost_peer(self, error: BaseException) -> str | None:
        text = str(error)
        if not isinstance(error, dist.DistError) and not any(s in text for s in PEER_GONE):
            return None
        # Its first sentence, without gloo's source location.
        first = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0] if text.strip() else "")
        return first.split(". ")[0] or type(error).__name__

    def _comm_device(self):
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _all_reduce(self, values, op=dist.ReduceOp.SUM) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=op)
        return t.tolist()

    def all_reduce_sum(self, value: float) -> float:
        return self._all_reduce([value])[0] if dist.is_initialized() else float(value)

    def max_over_ranks(self, value: float) -> float:
        return self._all_reduce([value], dist.ReduceOp.MAX)[0]

    def mean_over_ranks(self, metrics: dict) -> dict:
        keys = sorted(metrics)
        return {k: v / self.world_size for k, v in zip(keys, self._all_reduce(metrics[k] for k in keys))}

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x, device=self._comm_device()) for _ in range(self.world_size)]
        dist.all_gather(parts, x.to(self._comm_device()).contiguous())
        return torch.cat(parts).to(x.device)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        t = x.to(self._comm_device(), copy=True)
        dist.all_reduce(t)
        return t.to(x.device)

    def sync_from_rank0(self, model: nn.Module):
        """Copy rank 0's parameters and buffers to every rank (one broadcast per tensor)."""
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                buf = t.detach().to(self._comm_device())
                dist.broadcast(buf, src=0)
                if buf.data_ptr() != t.data_ptr():
                    t.copy_(buf)


class ZeroStrategy(DistributedStrategy):
    """What the ZeRO-style strategies (FSDP, DeepSpeed) share: a stage and optional CPU offload."""

    def __init__(self, seed: int = 42, dtype: str | None = None, stage: int = 3, offload: str = "none"):
        super().__init__(seed=seed, dtype=dtype)
        if stage not in (2, 3):
            raise ValueError(f"{type(self).__name__} supports ZeRO stage 2 or 3, not {stage}")
        if offload not in ("none", "cpu"):
            raise ValueError(f"offload must be 'none' or 'cpu', not '{offload}'")
        self.stage, self.offload = stage, offload


class DDPStrategy(DistributedStrategy):
    """DistributedDataParallel: a full replica per rank, gradients averaged over ranks.

    The loss a trainer passes to backward() is its rank's share scaled by world_size (see
    trainers/supervised.py), so the averaged gradient is exactly the global batch's gradient.
    """

    def __init__(self, seed: int = 42, dtype: str | None = None, find_unused_parameters: bool = True):
        super().__init__(seed=seed, dtype=dtype)
        # True by default: a role may hold trainable parameters its loss never touches (an
        # untied lm_head under a reward head); DDP then errors instead of averaging, otherwise.
        self.find_unused_parameters = find_unused_parameters
        self._owners: dict[int, int] = {}  # id(trainable param) -> how many trained models hold it
        self._manual: set[int] = set()  # ids of optimizers whose gradients we all-reduce ourselves

    def prepare(self, *items):
        for it in items:  # count first: a parameter may be shared with a model later in the list
            if isinstance(it, tuple) and it[0] is not None:
                for p in trainable_params(it[0]):
                    self._owners[id(p)] = self._owners.get(id(p), 0) + 1
        return super().prepare(*items)

    def _prepare_model(self, model, optim=None):
        model = super()._prepare_model(model, optim)
        if model is None or optim is None:  # not trained by the caller (reference, reward model): only placed
            return model
        params = trainable_params(model)
        optimized = {id(p) for group in optim.param_groups for p in group["params"]}
        if {id(p) for p in params} == optimized and all(self._owners.get(id(p), 0) == 1 for p in params):
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False,
                                           find_unused_parameters=self.find_unused_parameters)
        # Roles on one base: the module holds trainable parameters of other roles too (their
        # adapters), which DDP would register in two reducers. Start the replicas equal, then
        # average this optimizer's gradients with one all-reduce in optimizer_step.
        self.sync_from_rank0(model)
        self._manual.add(id(optim))
        return model

    def unwrap(self, model):
        return model.module if isinstance(model, DistributedDataParallel) else model

    def optimizer_step(self, optim, max_grad_norm: float | None = None, model=None) -> float:
        if id(optim) in self._manual:
            self._average_grads(optim)
        return super().optimizer_step(optim, max_grad_norm, model)

    def _average_grads(self, optim):
        """All-reduce (mean) the gradients of an optimizer's parameters in one flat buffer.
        A parameter without a gradient on this rank contributes zeros, so ranks stay in step."""
        params = [p for g in optim.param_groups for p in g["params"]]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads]).to(self._comm_device())
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(device=p.device, dtype=p.dtype)
            offset += n
