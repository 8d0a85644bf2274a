"""Sharded data parallelism with FSDP2 (`torch.distributed.fsdp.fully_shard`): ZeRO-2/3 styles.

- stage 3: parameters are resharded after the forward pass (all-gathered again in backward);
  stage 2: they stay gathered from forward to backward (more memory, one all-gather less).
  Between steps, parameters, gradients and optimizer state are sharded in both.
- offload="cpu": sharded parameters, gradients and optimizer state live in CPU memory.
- bf16 compute: MixedPrecisionPolicy(param_dtype=bf16) gathers parameters in bf16 and reduces
  gradients in fp32; the sharded fp32 parameters are the master weights.

Each transformer block is its own FSDP unit. The root is a SharedRoot holding the models
prepared together that share parameters (PPO's actor and critic on one base) or one model;
every model's forward is routed through the root, so a role's forward (which calls the
transformer body and a chunked LM head directly) runs the root's hooks, and one sharded base
serves every role. Generation gathers the actor once per rollout (`unsharded`). Checkpoints are gathered into the single-file safetensors format NaiveStrategy writes:
a model saved under FSDP loads under naive or DDP, and the reverse.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from ..rundir import atomic_write
from .base import module_state_names
from .ddp import ZeroStrategy

# Roles return views (log-probs reshaped, scores squeezed) and every caller uses them out of
# place, which is what this FSDP2 warning asks for; it would otherwise print at every forward.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: modules whose class the HF model lists in
    `_no_split_modules` (LlamaDecoderLayer, GPT2Block, ...), else the largest ModuleList's items."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))) if lists else []


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters are on the meta device (no memory): the shape
    a full, unsharded copy is rebuilt into for export. Tied parameters stay tied; buffers
    (rotary tables, ...) are copied for real (they are small and not all are saved)."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def materialize(skeleton: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Give a meta skeleton real CPU parameters from a full state dict."""
    made: dict[int, nn.Parameter] = {}
    for mod in skeleton.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
                mod._parameters[name] = made[id(p)]
    result = skeleton.load_state_dict(state, strict=False)
    loaded = {id(p) for n, p in skeleton.named_parameters(remove_duplicate=False) if n in state}
    unset = [n for n, p in skeleton.named_parameters() if id(p) not in loaded]
    if unset:
        raise RuntimeError(f"export: no gathered value for {unset[:5]} (missing {result.missing_keys[:5]})")
    return skeleton


def _units(root: nn.Module) -> list[nn.Module]:
    """The FSDP units under a root (its blocks and the root itself)."""
    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor, as a CPU copy safetensors can store."""
    return (t.to_local() if isinstance(t, DTensor) else t).detach().to("cpu").contiguous().clone()


def _copy_local(target: torch.Tensor, value: torch.Tensor, path, name) -> torch.Tensor:
    local = target.to_local() if isinstance(target, DTensor) else target
    if local.shape != value.shape:
        raise ValueError(f"{path}: shard of {name} is {tuple(value.shape)}, this rank holds {tuple(local.shape)}: "
                         f"the checkpoint was written by another number of processes or strategy")
    local.copy_(value)
    return target


class SharedRoot(nn.Module):
    """The FSDP root of models that share parameters (PPO's roles on one base) or of one model.

    Each model's forward is routed through `run`, so every role's call runs FSDP's root hooks:
    one sharding of the base serves actor, critic, reference and reward alike.
    """

    def __init__(self, models):
        super().__init__()
        self.models = nn.ModuleList(models)

    def run(self, model, *args, **kwargs):
        return type(model).forward(model, *args, **kwargs)

    def touch(self):
        """A forward that does nothing: FSDP's lazy initialization, before a gather."""


class FSDPStrategy(ZeroStrategy):
    def __init__(self, seed: int = 42, dtype: str | None = None, stage: int = 3, offload: str = "none"):
        super().__init__(seed=seed, dtype=dtype, stage=stage, offload=offload)
        self._root_of_param: dict[int, nn.Module] = {}  # id(sharded param) -> its FSDP root
        self._roots: dict[int, nn.Module] = {}  # id(model) -> the FSDP root its forward runs through
        self._owner: dict[int, nn.Module] = {}  # id(optimizer) -> its sharded model
        self._skeletons: dict[int, nn.Module] = {}  # id(sharded model) -> meta skeleton for export
        self._full: dict[int, nn.Module] = {}  # id(sharded model) -> full copy, while exporting

    # ---- placement ------------------------------------------------------------------------
    def _policies(self):
        kw = {"reshard_after_forward": self.stage == 3}
        if self.dtype != torch.float32:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        kw["offload_policy"] = (CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if self.offload == "cpu"
                                else OffloadPolicy())
        return kw

    def prepare(self, *items):
        """Shard each group of models that share parameters under one FSDP root; a model whose
        parameters are already sharded (a frozen role on a base prepared before) joins its root."""
        pairs = [it if isinstance(it, tuple) else (it, None) for it in items]
        groups: list[list[tuple]] = []
        for model, optim in pairs:
            if model is None:
                continue
            if any(id(p) in self._root_of_param for p in model.parameters()):
                self._attach(model, optim)
                continue
            ids = {id(p) for p in model.parameters()}
            joined = [g for g in groups if any(ids & {id(p) for p in m.parameters()} for m, _ in g)]
            merged = [pair for g in joined for pair in g] + [(model, optim)]
            groups = [g for g in groups if g not in joined] + [merged]
        for group in groups:
            self._shard(group)
        out = [(m, o) if isinstance(it, tuple) else m for it, (m, o) in zip(items, pairs)]
        return out[0] if len(out) == 1 else out

    def _shard(self, group):
        for _, optim in group:
            if optim is not None and optim.state:
                raise ValueError("prepare() the model before loading optimizer state into its optimizer")
        models = [m for m, _ in group]
        root = SharedRoot(models)
        names = {id(p): n for n, p in root.named_parameters()}
        for m in models:
            self._skeletons[id(m)] = meta_skeleton(m)
        root.to(self.device)
        self.sync_from_rank0(root)  # guard: every rank must shard the same values
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        kw = self._policies()
        for block in transformer_blocks(root):
            fully_shard(block, mesh=mesh, **kw)
        fully_shard(root, mesh=mesh, **kw)
        for module in root.modules():  # the roles' shared-prefix forward must not split a sharded body
            if isinstance(module, PreTrainedModel):
                module.fsdp_sharded = True
        register_fsdp_forward_method(root, "run")
        register_fsdp_forward_method(root, "touch")
        for p in root.parameters():
            self._root_of_param[id(p)] = root
        new = dict(root.named_parameters())
        for model, optim in group:
            self._route(model, root)
            if optim is not None:
                # fully_shard replaced the parameters with sharded ones: point the optimizer at them.
                for g in optim.param_groups:
                    g["params"] = [new[names[id(p)]] for p in g["params"]]
                self._owner[id(optim)] = model

    def _attach(self, model, optim):
        """A model on an already sharded base (PPO's reference or reward model): its forward
        runs through that base's root; its own extra tensors (a frozen head) are replicated."""
        roots = {self._root_of_param[id(p)] for p in model.parameters() if id(p) in self._root_of_param}
        root = next(iter(roots))
        extra = [p for p in model.parameters() if id(p) not in self._root_of_param]
        if optim is not None or len(roots) > 1 or any(p.requires_grad for p in extra):
            raise NotImplementedError(
                "FSDP: models trained on one shared base must be prepared together, in one prepare() call")
        for p in extra:
            p.data = p.data.to(self.device)
        self._route(model, root)

    def _route(self, model, root):
        # Calls of model(...) go through the root's registered method, so FSDP's root hooks
        # gather the root-level parameters (embeddings, norm, heads) for every role.
        model.forward = functools.partial(root.run, model)
        self._roots[id(model)] = root

    @contextlib.contextmanager
    def unsharded(self, *models):
        """Collective: every FSDP unit of the models' roots all-gathered once and kept whole until
        exit. Generation runs one forward per token: resharding after each would all-gather the
        whole model per token (and tie every rank to the same number of tokens)."""
        roots = list({id(r): r for r in (self._roots.get(id(m)) for m in models) if r is not None}.values())
        units = [u for r in roots for u in _units(r)]
        for root in roots:
            root.touch()  # FSDP picks its root at the first call through it
        for unit in units:
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:  # back to how _shard made them (the root included: its flag was explicit)
                unit.set_reshard_after_forward(self.stage == 3, recurse=False)
                unit.reshard()

    def unwrap(self, model):
        """The role itself (FSDP keeps its class); inside full_models(), a full CPU copy."""
        return self._full.get(id(model), model)

    @contextlib.contextmanager
    def full_models(self, *models):
        """Collective: gather full copies of `models` on rank 0 (unwrap() returns them inside)."""
        for model in models:
            if id(model) not in self._roots:  # not sharded by this strategy: already whole
                continue
            if id(model) not in self._skeletons:
                raise NotImplementedError("FSDP exports only models prepared with their base, not ones attached to it")
            state = self._gather(model, trainable_only=False)
            if self.is_rank0:
                self._full[id(model)] = materialize(copy.deepcopy(self._skeletons[id(model)]), state)
            del state
        try:
            yield
        finally:
            self._full.clear()

    # ---- steps ----------------------------------------------------------------------------
    def optimizer_step(self, optim, max_grad_norm: float | None = None, model=None) -> float:
        params = [p for group in optim.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if torch.isfinite(norm):  # a non-finite gradient is never applied (the trainer counts the skip)
            optim.step()
        optim.zero_grad(set_to_none=True)
        return float(norm)

    # ---- checkpoints ----------------------------------------------------------------------
    def _gather(self, model, trainable_only: bool):
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        return get_model_state_dict(model, options=opts)

    def save_model(self, model, path, only_rank0=True):
        # Every rank takes part in the gather; rank 0 writes.
        state = self._gather(model, trainable_only=True)
        names = module_state_names(model)
        if self.is_rank0 or not only_rank0:
            state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items() if k in names}
            missing = names - state.keys()
            if missing:
                raise RuntimeError(f"FSDP gathered no value for {sorted(missing)[:5]}")
            atomic_write(path, lambda tmp: save_file(state, tmp))

    def load_model(self, model, path, strict=True):
        path = os.fspath(path)
        with safe_open(path, framework="pt") as f:  # the names only: every rank checks them
            keys = set(f.keys())
        expected = set(module_state_names(model))
        missing, unexpected = expected - keys, keys - expected
        if strict and (missing or unexpected):
            raise KeyError(f"{path}: checkpoint does not match the model (missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]})")
        state = {k: v for k, v in load_file(path).items() if k in expected} if self.is_rank0 else {}
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                    strict=False))

    def save_optimizer(self, optim, path, only_rank0=True):
        state = get_optimizer_state_dict(self._owner[id(optim)], optim,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_rank0 or not only_rank0:
            atomic_write(path, lambda tmp: torch.save(state, tmp))

    def load_optimizer(self, optim, path):
        state = torch.load(path, map_location="cpu", weights_only=True) if self.is_rank0 else {}
        set_optimizer_state_dict(self._owner[id(optim)], optim, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    # ---- sharded checkpoints: each rank writes and reads only its own shard ----------------------
    def shard_path(self, ckpt_dir, name):
        return Path(ckpt_dir) / f"{name}.rank{self.rank:05d}-of-{self.world_size:05d}.safetensors"

    def save_shard(self, model, optim, ckpt_dir, name):
        """This rank's shards of the model's trained parameters and of their optimizer state,
        in safetensors (no gather, no pickle; the optimizer's hyperparameters as JSON metadata).
        It resumes under FSDP with the same number of processes; `full` checkpoints go anywhere."""
        self._reshard(model)
        names = module_state_names(model)
        params = {n: p for n, p in model.named_parameters() if n in names}
        tensors = {f"param/{n}": _local(p) for n, p in params.items()}
        for n, p in params.items():
            for key, value in optim.state.get(p, {}).items():
                tensors[f"optim/{n}/{key}"] = _local(value)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optim.param_groups]
        meta = {"param_groups": json.dumps(groups)}  # the world size is in the file name
        atomic_write(self.shard_path(ckpt_dir, name), lambda tmp: save_file(tensors, tmp, metadata=meta))

    def _reshard(self, model):
        """Put the shards back on the modules. A no-grad forward under ZeRO-2 (an evaluation)
        leaves blocks gathered until the next backward, with the full tensors registered in
        place of the shards; no communication is needed to drop them."""
        for unit in _units(self._roots[id(model)]):
            unit.reshard()

    def load_shard(self, model, optim, ckpt_dir, name):
        path = self.shard_path(ckpt_dir, name)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no shard for rank {self.rank} of {self.world_size}; a sharded "
                                    f"checkpoint resumes under --strategy fsdp with the processes that wrote it")
        with safe_open(path, framework="pt") as f:
            meta, saved = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        self._reshard(model)
        params = {n: p for n, p in model.named_parameters() if n in module_state_names(model)}
        missing = {f"param/{n}" for n in params} - saved.keys()
        if missing:
            raise KeyError(f"{path}: checkpoint does not match the model (missing {sorted(missing)[:5]})")
        with torch.no_grad():
            for n, p in params.items():
                _copy_local(p, saved[f"param/{n}"], path, n)
                state = {key.split("/")[-1]: v for key, v in saved.items() if key.startswith(f"optim/{n}/")}
                if state:
                    optim.state[p] = {k: (v if v.dim() == 0 else _copy_local(torch.zeros_like(p), v, path, n))
                                      for k, v in state.items()}
        for group, hyper in zip(optim.param_groups, json.loads(meta["param_groups"])):
            group.update(hyper)

    def cleanup(self):
        self._skeletons.clear()
        self._full.clear()
        super().cleanup()

    def local_numel(self, model) -> tuple[int, int]:
        """(elements of the parameters this rank holds, elements of the full parameters)."""
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
        return local, sum(p.numel() for p in model.parameters())
