"""Export a trained role as a plain Hugging Face checkpoint (merged) or a PEFT adapter.

Exports never touch the live model: a shared base must stay unmerged for the other roles.
The merged copy is made in fp32 so that small LoRA deltas are not rounded away by bf16.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch


def _replace_dir(tmp: Path, target: Path):
    """Swap a finished temporary directory into place (the old one is removed after)."""
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _tmpdir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))


def merged_copy(role, dtype=torch.float32):
    """A standalone HF model equal to the role's LM (adapter merged), in `dtype`."""
    lm = role.lm
    if not lm.is_peft:
        return copy.deepcopy(lm.model).to(dtype)
    model = copy.deepcopy(lm.model).to(dtype)
    if role.adapter is None:
        return model.unload()
    return model.merge_and_unload(adapter_names=[role.adapter])


def export_merged(role, tokenizer, path):
    path = Path(path)
    tmp = _tmpdir(path)
    model = merged_copy(role)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, path)
    return path


def export_adapter(role, tokenizer, path, base: str):
    """The role's LoRA adapter in PEFT layout; `base` is written as its base model."""
    path = Path(path)
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
    tokenizer.save_pretrained(src)
    _replace_dir(src, path)
    if src != tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
