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
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from ..checkpoints import checkpoint_meta, latest_complete
from ..config import validate
from ..device import peak_memory_bytes
from ..errors import Interrupted, NonFiniteError, PeerLost, UserError
from ..models.card import write_model_card
from ..models.export import export_adapter, export_gguf, export_merged
from ..models.gguf_writer import QUANTS, gguf_problem
from ..rundir import (check_apart, check_free_space, clean_temporaries, clear_run, fsync_dir, fsync_tree, holds_a_run,
                      lock_run, prepare_output, reconcile, release_run, run_identity)
from ..runlog import RunDir, make_progress
from ..trackers import Trackers
from .stopping import StopRequest

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
    """AdamW over tensors, or over param groups (dicts, which may carry their own "lr")."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    if not any(g["params"] for g in groups):
        raise ValueError("nothing to train: the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))


def make_scheduler(optim, config):
    length = config.schedule_steps or config.max_steps  # a resumed run keeps the length it started with
    return torch.optim.lr_scheduler.LambdaLR(optim, warmup_cosine(length, config.warmup_ratio))


def _portable_rng() -> dict:
    # numpy's RNG state holds an ndarray, which weights_only loading refuses: store a list.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict):
    kind, keys, pos, has_gauss, cached = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



def batch_to(batch: dict, device) -> dict:
    """A collated batch on `device` (its non-tensor fields as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

class Trainer:
    stage = "train"
    evaluate_at_start = False  # log a step-0 evaluation (the baseline before any update)

    def __init__(self, strategy, config):
        self.strategy = strategy
        self.config = validate(config)  # the Python API's configs meet the rules flags and YAML do
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
        self.nonfinite_in_row, self.skipped_updates = 0, 0
        self.resume_from, self.history_entry = None, None
        try:
            self.open_run_dir()
        except BaseException:
            release_run(self.out)
            raise

    def open_run_dir(self):
        """Before anything loads or trains: the output is writable and holds this run or nothing;
        on resume, the checkpoint to continue from is complete and was made by this run."""
        cfg = self.config
        check_apart(cfg)
        if cfg.resume and not cfg.overwrite and not holds_a_run(self.out):
            raise UserError(f"--resume: {self.out} holds no run to resume" + (
                "" if self.out.exists() else " (no such directory)") + "; check --output, or drop --resume")
        if self.strategy.is_rank0:
            prepare_output(self.out, bool(cfg.save_every))
        self.strategy.barrier()
        found = latest_complete(self.checkpoints()) if cfg.resume else None
        if found:
            self.resume_from, meta = found
            changes = reconcile(cfg, meta, meta["step"])
            self.history_entry = {"resumed_at_step": meta["step"], **({"changed": changes} if changes else {})}
        leftovers = [] if found else holds_a_run(self.out)
        self.strategy.barrier()  # every rank has looked before rank 0 changes anything
        if leftovers:
            if not cfg.overwrite:
                raise UserError(f"{self.out} already holds a run ({', '.join(leftovers[:4])})" + (
                    ": it has no complete checkpoint to resume; add --overwrite to start it again from step 0"
                    if cfg.resume else ": add --resume to continue it, or --overwrite to replace it"))
            if self.strategy.is_rank0:
                log.warning("--overwrite: removing the previous run in %s", self.out)
                clear_run(self.out)
            self.strategy.barrier()
        # Defaults resolved, so that config.yaml records the values in effect (and a resumed run keeps them).
        if cfg.schedule_steps is None:
            cfg.schedule_steps = cfg.max_steps
        if cfg.lr is None:
            cfg.lr = cfg.learning_rate()
        self.identity = run_identity(cfg)
        if cfg.export_gguf not in (None, *QUANTS):
            raise UserError(f"--export-gguf {cfg.export_gguf!r}: choose one of {', '.join(QUANTS)}")
        self.trackers = self.open_trackers(meta["step"] if found else 0)

    def open_trackers(self, start_step: int) -> Trackers:
        """Before any step: a tracker that cannot start stops the run here (rank 0 reports)."""
        return Trackers(self.config.report_to if self.strategy.is_rank0 else None, self.out, self.config, start_step)

    def checkpoint_activations(self, *roles):
        """With config.gradient_checkpointing, each block's activations are recomputed in
        backward instead of kept (~30% more compute, activation memory of one block)."""
        if self.config.gradient_checkpointing:
            for role in roles:
                role.lm.hf_model().activation_checkpointing_enable({"use_reentrant": False})

    def policy(self):
        """The role whose language model final/ holds (None: this stage exports none)."""
        return None

    def check_exportable(self):
        """--export-gguf is refused before the first step, not after the last."""
        if not self.config.export_gguf:
            return
        policy = self.policy()
        problem = (f"a {self.stage} stage exports no language model" if policy is None
                   else gguf_problem(policy.lm.hf_model().config, self.tokenizer))
        if problem:
            raise UserError(f"--export-gguf: {problem}")

    def export_policy(self, method: str):
        """final/ (adapter merged), adapter/ (with LoRA), final/model-QUANT.gguf (--export-gguf)
        and final/README.md, the model card."""
        role, final = self.policy(), self.out / "final"
        export_merged(role, self.tokenizer, final)
        if role.adapter:
            export_adapter(role, self.tokenizer, self.out / "adapter", base=self.config.model)
        quant = self.config.export_gguf
        gguf = export_gguf(role, self.tokenizer, final / f"model-{quant}.gguf", quant) if quant else None
        write_model_card(final, method, self.stage, self.config, self.run.read_metrics(), gguf)
        log.info("%s: wrote %s", self.stage, final)

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
        if self.strategy.is_rank0:
            lock_run(self.out)  # held since open_run_dir, unless a first fit() of this trainer released it
        try:
            start = self.resume() if self.resume_from else 0
            self.check_disk_space()  # before the run writes anything: a rerun after freeing space is a fresh run
            self.check_exportable()
            if self.trackers is None:  # a second fit() of this trainer (the first closed them)
                self.trackers = self.open_trackers(start)
            try:
                return self._fit(start, stop_at)
            finally:
                self.trackers.close()
                self.trackers = None
        except RuntimeError as e:
            why = self.strategy.lost_peer(e)
            if why is None:
                raise
            raise PeerLost(self.peer_lost_message(why)) from None
        finally:
            release_run(self.out)

    def peer_lost_message(self, why: str) -> str:
        """What a process of a multi-node run says when another is gone: what failed, and how
        to go on (every node must start again; the checkpoints hold everything a step reads)."""
        ckpts = self.checkpoints()
        again = (f"its last complete checkpoint is {ckpts[-1]}: when every node is back, run the same command "
                 "with --resume on each" if ckpts else
                 "no checkpoint was complete yet: when every node is back, run the same command again on each")
        return f"{self.stage}: another process of the run stopped or cannot be reached ({why}); {again}"

    def _fit(self, start: int, stop_at: int | None):
        cfg = self.config
        self.run = RunDir(self.out, cfg, resume_step=start, enabled=self.strategy.is_rank0,
                          history_entry=self.history_entry, trackers=self.trackers)
        last = min(cfg.max_steps, stop_at or cfg.max_steps)
        if start == 0 and self.evaluate_at_start:
            baseline = self.evaluate()
            if baseline:
                self.run.log({"step": 0, **baseline})
        with make_progress(self.strategy.is_rank0) as progress, StopRequest() as stop:
            task = progress.add_task(self.stage, total=cfg.max_steps, completed=start, info="")
            for step in range(start + 1, last + 1):
                t0 = time.perf_counter()
                skipped = self.skipped_updates
                metrics = self.train_step(step)
                metrics["step_time"] = time.perf_counter() - t0
                if self.skipped_updates > skipped:
                    metrics["skipped_updates"] = self.skipped_updates - skipped
                else:
                    self.nonfinite_in_row = 0
                if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps:
                    metrics.update(self.evaluate())
                if step == cfg.max_steps:
                    metrics.update(self.evaluate())
                # the largest rank's peak (rank 0 alone would hide an uneven one)
                metrics["peak_mem_gb"] = self.strategy.max_over_ranks(peak_memory_bytes(self.strategy.device)) / 2**30
                self.run.log({"step": step, **metrics})
                progress.update(task, advance=1, info=self.progress_info(metrics))
                stopping = step < last and self.strategy.all_reduce_sum(float(stop.asked)) > 0  # all ranks agree
                if cfg.save_every and (step % cfg.save_every == 0 or step == last or stopping):
                    self.save_checkpoint(step)
                if stopping:
                    raise Interrupted(f"interrupted after step {step}" + (
                        f": its checkpoint is in {self.ckpt_root}; continue with --resume" if cfg.save_every
                        else " (no checkpoints: --save-every 0)"))
        if last == cfg.max_steps:
            self.refuse_nonfinite("the final model")
            with self.strategy.full_models(*self.models.values()):  # exports need whole models
                self.write_results()
        self.strategy.barrier()
        return self.run.read_metrics() if self.strategy.is_rank0 else []

    def write_results(self):
        """finish() (the exports), with a full disk or a path that cannot be written reported in
        one line naming it; what an export left half-written is removed, the last checkpoint kept."""
        try:
            self.finish()
        except (OSError, SafetensorError) as e:
            clean_temporaries(self.out)
            where = getattr(e, "filename", None) or self.out
            free = shutil.disk_usage(self.out).free / 2**20
            again = (f"the checkpoints in {self.ckpt_root} are kept: free some space and run again with --resume"
                     if self.checkpoints() else "free some space and run again with --overwrite")
            raise UserError(f"could not write the results into {where}: {getattr(e, 'strerror', None) or e} "
                            f"({free:.0f} MiB free); {again}") from None

    def progress_info(self, metrics: dict) -> str:
        keys = [k for k in ("loss", "reward", "kl", "accuracy", "eval_loss") if k in metrics]
        return " ".join(f"{k}={metrics[k]:.4g}" for k in keys)

    # ---- the non-finite guard: every stage's updates go through optimizer_step ------------------
    def optimizer_step(self, optim, model, loss: float | None = None) -> float:
        """One guarded update. A non-finite loss (the global one, the same on every rank) or
        gradient norm skips it: counted, and the run stops after max_nonfinite_steps skipped
        updates with no clean step between. Parameters that turn non-finite despite a finite
        gradient cannot be taken back: the run stops at once, before anything is saved."""
        if loss is not None and not math.isfinite(loss):
            self.skip_update(f"loss {loss}")
            return float("nan")
        norm = self.strategy.optimizer_step(optim, self.config.max_grad_norm, model)
        if not math.isfinite(norm):  # the strategy did not apply it
            self.skip_update(f"gradient norm {norm}")
        elif not self.params_finite(optim):
            raise NonFiniteError(f"{self.stage}: the parameters became non-finite in an update (lower --lr, or use "
                                 f"--dtype fp32); nothing after the last checkpoint in {self.ckpt_root} was saved")
        return norm

    def nonfinite_on_any_rank(self, loss) -> bool:
        # Decided by all ranks together: a rank that skipped its backward while the others ran
        # theirs would leave them waiting in the gradient all-reduce.
        return self.strategy.all_reduce_sum(float(not torch.isfinite(loss))) > 0

    def skip_update(self, what: str):
        for optim in self.optimizers.values():
            optim.zero_grad(set_to_none=True)
        self.nonfinite_in_row += 1
        self.skipped_updates += 1
        log.warning("%s: non-finite %s: update skipped (%d in a row)", self.stage, what, self.nonfinite_in_row)
        if self.nonfinite_in_row >= self.config.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.stage}: {self.nonfinite_in_row} updates in a row had a non-finite {what.split()[0]} "
                f"(--max-nonfinite-steps {self.config.max_nonfinite_steps}): lower --lr, or use --dtype fp32; "
                f"the checkpoints in {self.ckpt_root} hold the last finite state")

    def params_finite(self, optim) -> bool:
        local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p.data).all())
                    for group in optim.param_groups for p in group["params"])
        return self.strategy.all_reduce_sum(float(not local)) == 0

    def refuse_nonfinite(self, what: str):
        if not all(self.params_finite(o) for o in self.optimizers.values()):
            raise NonFiniteError(f"{self.stage}: the parameters are non-finite: {what} is not written")

    def check_disk_space(self):
        """Room for one checkpoint (trained tensors and two Adam moments each), before any step."""
        need = sum(p.numel() * p.element_size() for o in self.optimizers.values() for g in o.param_groups
                   for p in g["params"]) * 3
        if self.config.save_every:
            check_free_space(self.out, int(self.strategy.max_over_ranks(need)))

    # ---- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, step: int):
        """Everything needed to continue: trained tensors, optimizers, schedulers, data
        position, RNG. Written into a temporary directory, fsynced, renamed when complete;
        meta.json, written last, lists every file and its size."""
        self.refuse_nonfinite(f"checkpoint step {step}")
        tmp = self.ckpt_root / f".tmp-step-{step:07d}"
        try:
            self._write_checkpoint(step, tmp)
        except (OSError, RuntimeError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(self.out).free / 2**20
            raise UserError(f"could not write checkpoint {tmp}: {str(e).strip().splitlines()[0]} ({free:.0f} MiB "
                            "free on that disk); the previous checkpoints are kept") from None

    def _write_checkpoint(self, step: int, tmp: Path):
        final = self.ckpt_root / f"step-{step:07d}"
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
            (tmp / "meta.json").write_text(json.dumps({"step": step, "stage": self.stage, **checkpoint_meta(tmp),
                                                       **self.identity}))
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.ckpt_root)
            keep = self.config.keep_checkpoints  # 0 keeps all
            for old in (self.checkpoints()[:-keep] if keep else []):
                shutil.rmtree(old, ignore_errors=True)
        self.strategy.barrier()

    def checkpoints(self) -> list[Path]:
        if not self.ckpt_root.exists():
            return []
        return sorted(p for p in self.ckpt_root.glob("step-*") if (p / "meta.json").exists())

    def resume(self) -> int:
        ckpt = self.resume_from
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
