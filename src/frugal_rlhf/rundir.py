"""Run-directory safety: where a run may write, what identifies a run across resumes, and
writes that survive a crash or a power loss (which checkpoint is complete: checkpoints.py).
Without torch: the pipeline's own process, which stays light beside its stages, holds its lock here.

A run directory belongs to one run. One process at a time writes it (an exclusive lock on
OUT/.lock). A fresh run refuses a directory that holds anything (unless `overwrite`, which
removes the previous run's files); `resume` continues the run only with the settings that
define it (RESUME_MAY_CHANGE lists the others). No run reads an input inside its output.
"""
from __future__ import annotations

import atexit
import dataclasses
import fcntl
import hashlib
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

from .errors import UserError

log = logging.getLogger("frugal_rlhf")

# What a run writes into its directory (--overwrite removes exactly these, nothing of the user's);
# tensorboard/ and wandb/ are the trackers' (MLflow keeps its runs in its own store).
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml", "final", "adapter", "eval.json", "reward_model.json",
             "score_head.safetensors", "ref_logprobs.safetensors", "tensorboard", "wandb")
LOCK_FILE = ".lock"  # never removed: see lock_run
# Settings that do not change what is computed, or only how long and how often: a resumed run
# applies the new value and records the change in config.yaml's history.
RESUME_MAY_CHANGE = frozenset({
    "max_steps", "save_every", "eval_every", "keep_checkpoints", "max_nonfinite_steps", "resume", "overwrite",
    "output", "strategy", "zero_stage", "offload", "checkpoint_format", "gradient_checkpointing",
    "trust_remote_code", "eval_only", "report_to", "export_gguf", "reward_timeout"})
# Settings naming files whose contents define the run: their fingerprints must match too.
FINGERPRINTED = ("model", "data", "prompts", "eval_data", "ptx_data", "reward_model", "critic_model")
_EDGE = 1 << 20  # bytes hashed at each end of a file


# ---- durable writes -------------------------------------------------------------------------------
def fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path):
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Call write(tmp_path), then rename onto path: a crash never leaves a half-written file.
    The data reaches the disk before the rename, and the rename before we go on: a power loss
    leaves the old file or the new one, never an empty one."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def fsync_tree(path: Path):
    for root, _, files in os.walk(path):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


# ---- one run at a time ------------------------------------------------------------------------------
_held: dict[str, int] = {}  # run directory (resolved) -> the descriptor through which this process locks it


def lock_run(out: Path):
    """An exclusive flock on OUT/.lock for this process, until release_run or its end. The kernel
    drops the lock of a process that dies (kill -9 included), so the lock a dead run left is
    taken over; the file only names the holder for the message. Taken again by its holder (one
    process running several trainers in turn), it is a no-op."""
    key = str(out.resolve())
    if key in _held:
        return
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{out} is in use by another run ({holder}); wait for it to end, or choose another "
                        "--output") from None
    previous = os.read(fd, 200).decode(errors="replace").strip()
    if previous:
        log.warning("%s: the run of %s ended without releasing its lock (killed?): taken over", out, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held[key] = fd


def release_run(out: Path):
    """Empty the lock file (a clean end) and drop the lock, if this process holds it."""
    fd = _held.pop(str(out.resolve()), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        os.close(fd)


@atexit.register
def _release_all():
    """A process that ends on an error raised after its trainer locked (bad data found while it
    loads) ends cleanly too: only a killed run leaves its name in the lock file."""
    for key in list(_held):
        release_run(Path(key))


def check_apart(cfg):
    """A run never writes where it reads: an input inside the output (--model OUT/final) would
    be replaced by the run's own export, or deleted by --overwrite; an output inside an input
    directory would change that input (and its fingerprint) as the run writes."""
    out = Path(cfg.output).resolve()
    for name in FINGERPRINTED:
        spec = getattr(cfg, name, None)
        if not spec or not Path(str(spec)).exists():
            continue
        path, flag = Path(str(spec)).resolve(), "--" + name.replace("_", "-")
        if path == out or out in path.parents:
            raise UserError(f"{flag} {spec} is inside --output {cfg.output}: the run would replace or (with "
                            "--overwrite) delete what it reads; copy it elsewhere or choose another --output")
        if path.is_dir() and path in out.parents:
            raise UserError(f"--output {cfg.output} is inside {flag} {spec}: the run's files would change what it "
                            "reads; choose another --output")


# ---- the output directory -----------------------------------------------------------------------
def clean_temporaries(out: Path) -> int:
    """Remove what an interrupted run left half-written: `.tmp-*` exports and checkpoints,
    `NAME.tmp-PID` files of atomic writes, `.old-*` directories of an export swap."""
    stale = []
    for root in (out, out / "checkpoints"):
        if root.is_dir():
            stale += [p for p in root.iterdir() if p.name.startswith((".tmp-", ".old-")) or ".tmp-" in p.name]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    if stale:
        log.warning("%s: removed %d temporary file(s) an interrupted run left (%s)", out, len(stale),
                    ", ".join(p.name for p in stale[:3]) + (" ..." if len(stale) > 3 else ""))
    return len(stale)


def _probe(directory: Path):
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=directory, prefix=".tmp-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"cannot write to {directory}: {e.strerror or e}") from None


def prepare_output(out: Path, checkpoints: bool):
    """The output directory exists, is writable (and its checkpoints/ too, when the run saves
    any: found before training starts, not at the first save) and is this process's alone;
    then what an interrupted run left half-written is removed."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a directory")
    _probe(out)
    lock_run(out)
    if checkpoints:
        _probe(out / "checkpoints")
    clean_temporaries(out)


def holds_a_run(out: Path) -> list[str]:
    """What a fresh run would mix with (an empty checkpoints/ left by the write probe aside)."""
    if not out.is_dir():
        return []
    names = [p.name for p in out.iterdir() if p.name != LOCK_FILE]
    if (out / "checkpoints").is_dir() and not any((out / "checkpoints").iterdir()):
        names.remove("checkpoints")
    return sorted(names)


def clear_run(out: Path):
    """--overwrite: remove the previous run's files (only those a run writes)."""
    for name in RUN_FILES:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    for png in out.glob("*.png"):
        png.unlink()


def check_free_space(path: Path, need: int, what: str = "one checkpoint"):
    free = shutil.disk_usage(path).free
    if free < need:
        raise UserError(f"{path}: {free / 2**20:.0f} MiB free, {what} needs about {need / 2**20:.0f} MiB; "
                        "free some space or choose another --output")


# ---- the run's identity ---------------------------------------------------------------------------
def fingerprint(spec) -> str | None:
    """Size and SHA-256 of the first and last MiB of each file (a whole small file): changed
    data is caught without reading a large data set or model on every resume."""
    path = Path(str(spec))
    if not spec or not path.exists():
        return None
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if path.is_dir() else ''}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_EDGE))
            if size > _EDGE:
                fh.seek(max(_EDGE, size - _EDGE))
                h.update(fh.read())
    return h.hexdigest()[:16]


def run_identity(cfg) -> dict:
    return {"config": dataclasses.asdict(cfg),
            "fingerprints": {k: fingerprint(getattr(cfg, k)) for k in FINGERPRINTED if getattr(cfg, k, None)}}


def reconcile(cfg, recorded: dict, step: int) -> dict:
    """Check that `cfg` continues the run recorded in a checkpoint and settle the schedule.

    Refuses (listing every difference) when a setting that defines the run differs; a file
    setting is compared by its contents' fingerprint, not by how its path is spelled (a run
    resumed from another directory names its data otherwise). The LR schedule keeps the length
    the run started with, whatever --max-steps now says (a longer run continues at the
    schedule's final LR). Returns {field: [old, new]} of what changed."""
    old = recorded.get("config", {})
    then_prints, now_prints = recorded.get("fingerprints", {}), run_identity(cfg)["fingerprints"]
    differ, moved = [], {}
    for f in dataclasses.fields(cfg):
        name = f.name
        if name not in old or name in RESUME_MAY_CHANGE or name == "schedule_steps":
            continue
        then, now = old[name], getattr(cfg, name)
        if name == "lr":  # the default depends on LoRA: compare the rates in effect
            then = dataclasses.replace(cfg, lr=then, lora_rank=old.get("lora_rank", cfg.lora_rank)).learning_rate()
            now = cfg.learning_rate()
        if then_prints.get(name) is not None and then_prints[name] == now_prints.get(name):
            if then != now:  # the same contents under another path
                moved[name] = [then, now]
        elif then_prints.get(name) is not None and then == now:
            differ.append(f"the contents of {name} {now} changed since the checkpoint")
        elif then != now:
            differ.append(f"{name} {then!r} -> {now!r}")
    schedule = old.get("schedule_steps") or old.get("max_steps", cfg.max_steps)
    if cfg.schedule_steps not in (None, schedule):
        differ.append(f"schedule_steps {schedule!r} -> {cfg.schedule_steps!r}")
    if differ:
        raise UserError(f"--resume: {cfg.output} is a run with other settings ({'; '.join(differ)}); resume with "
                        "the run's own values, or start a new run (another --output, or --overwrite)")
    if cfg.max_steps < step:
        raise UserError(f"--resume: --max-steps {cfg.max_steps} is below the checkpoint's step {step}")
    cfg.schedule_steps = schedule
    return {**{n: [old[n], getattr(cfg, n)] for n in sorted(RESUME_MAY_CHANGE - {"resume", "overwrite"})
               if n in old and old[n] != getattr(cfg, n)}, **moved}
