"""Which checkpoint is complete: meta.json, written last, lists each file with its size and
checksum; a run resumes from the newest checkpoint that matches it (and whose state.pt loads)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import xxhash

from .errors import UserError

log = logging.getLogger("frugal_rlhf")


def file_checksum(path: Path) -> str:
    """xxh3-128 of the whole file (several GB/s: a checkpoint is read back once when written,
    once when resumed)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_meta(ckpt: Path) -> dict:
    """What meta.json records of the files in `ckpt`: each one's size and checksum."""
    files = sorted(p for p in ckpt.iterdir() if p.name != "meta.json")
    return {"files": {p.name: p.stat().st_size for p in files}, "xxh3_128": {p.name: file_checksum(p) for p in files}}


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (None when it is complete): meta.json, written last,
    lists every file with its size and checksum (a checkpoint written before checksums: its
    safetensors must hold finite numbers); state.pt must load."""
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return f"meta.json is unreadable ({e})"
    sums = meta.get("xxh3_128")
    for name, size in meta.get("files", {}).items():
        f = ckpt / name
        if not f.exists():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
        if sums is not None and file_checksum(f) != sums.get(name):
            return f"{name} does not match its checksum (changed on disk since it was written)"
        if sums is None and name.endswith(".safetensors") and not _finite_safetensors(f):
            return f"{name} holds non-finite or unreadable numbers"
    try:
        torch.load(ckpt / "state.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read it means the same: not resumable
        return f"state.pt is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def _finite_safetensors(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return all(bool(torch.isfinite(f.get_tensor(k)).all()) for k in f.keys())
    except Exception:  # noqa: BLE001 - a file safetensors cannot read is as unusable
        return False


def latest_complete(checkpoints: list[Path]) -> tuple[Path, dict] | None:
    """The newest checkpoint that is complete, with its meta; the ones skipped are named."""
    for ckpt in reversed(checkpoints):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt, json.loads((ckpt / "meta.json").read_text())
        log.warning("checkpoint %s is incomplete or corrupt (%s): falling back to the previous one", ckpt, problem)
    if checkpoints:
        raise UserError(f"--resume: none of the {len(checkpoints)} checkpoints in {checkpoints[0].parent} is "
                        "complete (see the warnings above); start the run again with --overwrite")
    return None
