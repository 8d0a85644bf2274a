"""Export a trained role as a plain Hugging Face checkpoint (merged), a PEFT adapter or a GGUF
file (gguf_writer.py).

Exports never touch the live model: a shared base must stay unmerged for the other roles.
Merged tensors are made in fp32 so that small LoRA deltas are not rounded away by bf16; a
quantized base is written de-quantized (QLoRA users expect a plain model back).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from ..rundir import fsync_dir, fsync_tree
from .gguf_writer import write_gguf, write_gguf_lora
from .quantize import QuantizedLinear


def _replace_dir(tmp: Path, target: Path):
    """Swap a finished temporary directory into place (the old one is removed after)."""
    fsync_tree(tmp)  # on disk before it takes the final name: a power loss leaves old or new, whole
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _naming(path):
    """An OSError while writing `path` names it (write() on a full disk names no file)."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def _tmpdir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))


MAX_SHARD_BYTES = 1 << 30  # files of at most 1 GiB, as save_pretrained shards a large model
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _merged_tensors(lm, adapter: str | None, dtype):
    """(name, shape, make) for each tensor of a SharedLM with `adapter` merged (None: the base
    alone), in the Hugging Face names; `make()` builds that one tensor in `dtype`, so an export
    never holds a merged copy of the whole model (which would double the peak of a run on its
    last step). A quantized base layer is written dequantized: its `weight` is made from its codes."""
    model = lm.hf_model()
    modules = dict(model.named_modules())
    entries, seen = [], set()
    for key, t in model.state_dict().items():
        if ".lora_" in key or (t.data_ptr(), t.shape) in seen:  # adapters, and tied copies of a weight
            continue
        seen.add((t.data_ptr(), t.shape))
        owner, _, leaf = key.rpartition(".")
        dense, shape = t.to, t.shape  # dense(dtype): the tensor in that dtype
        if isinstance(modules[owner], QuantizedLinear):
            if leaf == "scales":  # folded into the dequantized weight
                continue
            if leaf == "qweight":
                layer = modules[owner]
                leaf, shape, dense = "weight", (layer.out_features, layer.in_features), layer.dequantize
        key = f"{owner}.{leaf}" if owner else leaf
        make = functools.partial(dense, dtype)
        if owner.endswith(".base_layer"):  # a LoRA-wrapped layer: its base weight under the plain name
            owner = owner[: -len(".base_layer")]
            key = f"{owner}.{leaf}"
            layer = modules[owner]
            if leaf == "weight" and adapter in layer.lora_A:
                _check_plain(layer, adapter, key)
                make = functools.partial(_merge, dense, layer, adapter, dtype)
        entries.append((key, shape, make))
    return model, entries


def _check_plain(layer, adapter, key):
    if layer.lora_variant.get(adapter) or layer.lora_bias.get(adapter):
        raise ValueError(f"{key}: only plain LoRA adapters can be merged or exported (no DoRA, no LoRA bias)")


def _merge(dense, layer, adapter, dtype):
    """W + scale * B A summed in fp32 and rounded once to `dtype`."""
    return (dense(torch.float32) + layer.get_delta_weight(adapter).float()).to(dtype)


def _shards(entries, itemsize):
    """Group entries into files of at most MAX_SHARD_BYTES (a bigger tensor gets its own)."""
    shards, size = [[]], 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * itemsize
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _write_safetensors(path: Path, entries, dtype):
    """A safetensors file written one tensor at a time. Its header needs only names, shapes and
    the dtype, so at most one merged tensor exists at once (safetensors' save_file takes them
    all: on an nf4 base that was the de-quantized model, the run's peak at its end)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, _ in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, shape, make in entries:
            t = make().to("cpu").contiguous()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise RuntimeError(f"{key}: made {tuple(t.shape)} {t.dtype}, the header says {tuple(shape)} {dtype}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # safetensors is little-endian, as torch here
            del t  # freed before the next tensor is made, not after


@torch.no_grad()
def export_merged(role, tokenizer, path, dtype=torch.float32):
    """Write the role's LM, adapter merged, as a Hugging Face checkpoint (sharded like
    save_pretrained when large), one tensor at a time; then the tokenizer (if given). A role
    with `adapter` None on a peft model writes the base alone (adapters off)."""
    path = Path(path)
    with _naming(path):
        return _export_merged(role, tokenizer, path, dtype)


def _export_merged(role, tokenizer, path: Path, dtype):
    tmp = _tmpdir(path)
    model, entries = _merged_tensors(role.lm, role.adapter, dtype)
    shards = _shards(entries, dtype.itemsize)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for name, shard in zip(names, shards):
        _write_safetensors(tmp / name, shard, dtype)
        weight_map.update({key: name for key, _, _ in shard})
    if len(shards) > 1:
        total = sum(math.prod(shape) for _, shape, _ in entries) * dtype.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    config.save_pretrained(tmp)
    if model.can_generate():
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:  # None: weights for a program that takes token ids (generation/vllm_engine.py)
        tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, path)
    return path


def export_adapter(role, tokenizer, path, base: str):
    """The role's LoRA adapter in PEFT layout; `base` is written as its base model."""
    path = Path(path)
    with _naming(path):
        return _export_adapter(role, tokenizer, path, base)


def _export_adapter(role, tokenizer, path: Path, base: str):
    tmp = _tmpdir(path)
    peft_model = role.lm.model
    config = peft_model.peft_config[role.adapter]
    saved_base = config.base_model_name_or_path
    config.base_model_name_or_path = base
    try:
        peft_model.save_pretrained(tmp, selected_adapters=[role.adapter], save_embedding_layers=False)
    finally:
        config.base_model_name_or_path = saved_base
    # peft writes adapters other than "default" into a subfolder named after them.
    src = tmp / role.adapter if (tmp / role.adapter).is_dir() else tmp
    if tokenizer is not None:
        tokenizer.save_pretrained(src)
    _replace_dir(src, path)
    if src != tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


@torch.no_grad()
def export_gguf(role, tokenizer, path, quant: str = "f16"):
    """The role's LM, adapter merged in fp32, as a GGUF file: one tensor at a time, as export_merged."""
    model, entries = _merged_tensors(role.lm, role.adapter, torch.float32)
    with _naming(path):
        return write_gguf(model.config, ((key, make) for key, _, make in entries), tokenizer, path, quant,
                          name=Path(path).parent.parent.name)


@torch.no_grad()
def export_gguf_base(lm, tokenizer, path, quant: str = "f16"):
    """A SharedLM's base with every adapter off (a plain model: the model itself) as a GGUF file."""
    model, entries = _merged_tensors(lm, None, torch.float32)
    return write_gguf(model.config, ((key, make) for key, _, make in entries), tokenizer, path, quant)


@torch.no_grad()
def export_gguf_lora(role, path):
    """The role's LoRA adapter as a llama.cpp LoRA adapter file (gguf_writer.write_gguf_lora),
    to be applied over export_gguf_base's file of the same base."""
    model = role.lm.hf_model()
    factors, scales = [], set()
    for name, layer in model.named_modules():
        if role.adapter not in getattr(layer, "lora_A", {}):
            continue
        _check_plain(layer, role.adapter, name)
        a, b = layer.lora_A[role.adapter].weight, layer.lora_B[role.adapter].weight
        factors.append((f"{name}.weight", a, b))
        scales.add(layer.scaling[role.adapter] * a.shape[0])  # alpha with llama.cpp's scale = alpha / rank
    if len(scales) != 1:
        raise ValueError(f"adapter {role.adapter!r}: expected one LoRA scale alpha/rank over its layers, found "
                         f"{sorted(scales) or 'no adapted layer'}")
    return write_gguf_lora(model.config, factors, path, scales.pop())
