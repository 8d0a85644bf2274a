"""`frugal pipeline` / `frugal demo`: SFT -> preference pairs -> reward model -> PPO -> report,
in one run directory. A stage whose complete output exists is skipped, and an interrupted
stage resumes from its last checkpoint, so rerunning an interrupted pipeline continues it.

    OUT/data/{sft,prefs_prompts,ppo_prompts,held_out}.jsonl   the split, kept apart
    OUT/sft/  OUT/prefs.jsonl  OUT/rm/  OUT/ppo/               the stages
    OUT/report.md  OUT/summary.json  OUT/eval.json             the evidence
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import multiprocessing
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..config import PPOConfig, PreferenceConfig, RewardConfig, SFTConfig, from_dict
from ..data.formats import load_dataset_file
from ..data.loader import split_rows
from ..device import (compute_dtype, default_device, die_with_parent, peak_memory_bytes, release_free_memory,
                      reset_run_peak)
from ..errors import FrugalError, StageFailed
from ..generation.engines import check_engine
from ..models.loading import load_model
from ..models.memory import hold_budget
from ..rundir import atomic_write, lock_run
from ..runlog import setup_logging
from ..trainers.preference import PreferenceTrainer
from ..trainers.reward import RewardTrainer
from ..trainers.supervised import SFTTrainer
from .evaluation import sampling_engine
from .prefs import build_pairs
from .report import write_report
from .report_dpo import write_dpo_report
from .stages import build_ppo, run_stage

log = logging.getLogger("frugal_rlhf")


@dataclass
class SplitConfig:
    held_out: int = 32          # prompts kept apart for the before/after comparison
    prefs: int = 256            # prompts turned into preference pairs
    ppo: int = 512              # prompts for PPO rollouts
    sft: int = 2000             # demonstrations for SFT
    max_prompt_chars: int = 400  # prompt files keep short first questions (fast, on topic)


@dataclass
class PipelineConfig:
    model: str = "default"
    data: str = "sharegpt"
    output: str = "runs/pipeline"
    seed: int = 42
    dtype: str = "auto"
    quantize_base: str = "none"  # none | int8 | nf4 | int4: every stage's frozen base (QLoRA; stages need lora_rank)
    gradient_checkpointing: bool = False  # every trained stage recomputes activations in backward (a section may say otherwise)
    memory_budget: str = "auto"  # every stage's memory plan: auto, a size (4GiB) or off (a section may say otherwise)
    isolate_stages: bool | None = None  # each stage in its own process; unset: when quantize_base is set
    strategy: str = "naive"
    zero_stage: int = 3         # fsdp | deepspeed (as the stages' own field)
    offload: str = "none"       # none | cpu
    report_to: str = "none"     # experiment trackers of every stage: tensorboard,wandb,mlflow | none
    rollout_engine: str = "torch"  # what samples in prefs, ppo (unless its section says) and the report: torch |
    #                                llamacpp | vllm | auto (generation/engines.py)
    rollout_quant: str = "f16"  # llamacpp's copy of the weights: f16 | q8_0 | q4_0 | base
    split: SplitConfig = field(default_factory=SplitConfig)
    sft: dict = field(default_factory=dict)     # SFTConfig fields
    prefs: dict = field(default_factory=dict)   # prefs.build_pairs arguments: labeler, temperatures, ...
    rm: dict = field(default_factory=dict)      # RewardConfig fields
    ppo: dict = field(default_factory=dict)     # PPOConfig fields
    eval: dict = field(default_factory=dict)    # max_new_tokens, temperature, batch_size
    method: str = "ppo"                         # ppo (RM -> PPO) | dpo (DPO on the pairs: no RM, no PPO)
    dpo: dict = field(default_factory=dict)     # PreferenceConfig fields (method dpo)


def load_pipeline_config(path=None, overrides: dict | None = None) -> PipelineConfig:
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    split = from_dict(SplitConfig, data.pop("split", {}) or {}, source=f"{path}: split")
    return from_dict(PipelineConfig, {**data, "split": split}, source=str(path))


def packaged_config(name: str) -> Path:
    return Path(str(resources.files("frugal_rlhf") / "configs" / f"{name}.yaml"))


def _first_exchange(row):
    msgs = row["messages"]
    k = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return {"messages": msgs[:k + 1]}


def write_split(cfg: PipelineConfig, data_dir: Path):
    """Shuffle once with the seed and cut disjoint parts: held-out prompts never train anything."""
    if (data_dir / "sft.jsonl").exists():
        return
    s = cfg.split
    rows, _ = split_rows(load_dataset_file(cfg.data, "sft"), 0.0, 0, cfg.seed)
    short = [_first_exchange(r) for r in rows if len(_first_exchange(r)["messages"][-2]["content"]) <= s.max_prompt_chars]
    need = s.held_out + s.prefs + s.ppo
    if len(short) < need:
        raise ValueError(f"{cfg.data}: {len(short)} short prompts, the split needs {need}")
    parts = {"held_out": short[:s.held_out], "prefs_prompts": short[s.held_out:s.held_out + s.prefs],
             "ppo_prompts": short[s.held_out + s.prefs:need]}
    used = {json.dumps(r["messages"][-2]) for r in short[:need]}
    parts["sft"] = [r for r in rows if json.dumps(_first_exchange(r)["messages"][-2]) not in used][:s.sft]
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        atomic_write(data_dir / f"{name}.jsonl",
                     lambda tmp, part=part: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in part)))
    log.info("split: %s", {k: len(v) for k, v in parts.items()})


def _stage_config(cls, base: dict, section: dict, source: str):
    return from_dict(cls, {**base, **section}, source=source)


class Pipeline:
    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.timings: dict = {}  # seconds per stage
        self.peaks: dict = {}  # GiB per stage: peak RSS on CPU, peak allocated on CUDA

    def common(self) -> dict:
        c = self.cfg
        # resume a stage from its checkpoint; one killed before its first checkpoint starts again
        return {"seed": c.seed, "dtype": c.dtype, "quantize_base": c.quantize_base,
                "gradient_checkpointing": c.gradient_checkpointing, "memory_budget": c.memory_budget,
                "strategy": c.strategy, "zero_stage": c.zero_stage, "offload": c.offload, "report_to": c.report_to,
                "resume": True, "overwrite": True}

    def run(self):
        setup_logging()
        if self.cfg.method not in ("ppo", "dpo"):
            raise ValueError(f"method: expected 'ppo' or 'dpo', got {self.cfg.method!r}")
        check_engine(self.cfg.rollout_engine)
        self.out.mkdir(parents=True, exist_ok=True)
        lock_run(self.out)  # its own files (pairs, timings, the report): two pipelines here would mix them
        (self.out / "pipeline.yaml").write_text(yaml.safe_dump(dataclasses.asdict(self.cfg), sort_keys=False))
        self._stage("split", "run_split", self.out / "data" / "sft.jsonl")
        self._stage("sft", "run_sft", self.out / "sft" / "final" / "config.json")
        self._stage("prefs", "run_prefs", self.out / "prefs.jsonl")
        if self.cfg.method == "dpo":
            self._stage("dpo", "run_dpo", self.out / "dpo" / "final" / "config.json")
            self._stage("dpo report", "run_dpo_report", self.out / "dpo_report.md")
            return json.loads((self.out / "dpo_summary.json").read_text())
        self._stage("rm", "run_rm", self.out / "rm" / "reward_model.json")
        self._stage("ppo", "run_ppo", self.out / "ppo" / "final" / "config.json")
        self._stage("report", "run_report", self.out / "report.md")
        return json.loads((self.out / "summary.json").read_text())

    @property
    def isolated(self) -> bool:
        """Each stage in a process of its own: unset, when the base is quantized (the
        lowest-memory demo), where one process's heap would carry one stage's pages into the next."""
        c = self.cfg
        return c.isolate_stages if c.isolate_stages is not None else c.quantize_base != "none"

    def _stage(self, name, method: str, done_marker: Path):
        if done_marker.exists():
            log.info("== %s: already complete (%s), skipped", name, done_marker)
            return
        log.info("== %s%s", name, " (its own process)" if self.isolated else "")
        t0 = time.perf_counter()
        if self.isolated:
            peak = run_isolated(self, method)
        else:
            # The stages share one process: the last stage's objects are freed (peft's modules hold
            # reference cycles, hence the collection), but the C heap keeps their pages unless asked,
            # and they would count in this stage's peak (measured on the demo with an nf4 base:
            # PPO's update at 3.6 GB in the pipeline, 2.0 GB on its own).
            gc.collect()
            release_free_memory()
            reset_run_peak()
            getattr(self, method)()
            peak = peak_memory_bytes()
        self.timings[name] = round(time.perf_counter() - t0, 1)
        self.peaks[name] = round(peak / 2**30, 2)
        for file, values in (("timings.json", self.timings), ("memory.json", self.peaks)):
            path = self.out / file
            saved = json.loads(path.read_text()) if path.exists() else {}
            path.write_text(json.dumps({**saved, **values}, indent=2) + "\n")

    def run_split(self):
        write_split(self.cfg, self.out / "data")

    def run_dpo_report(self):
        write_dpo_report(self.out, self.cfg)

    def run_sft(self):
        cfg = _stage_config(SFTConfig, {**self.common(), "model": self.cfg.model, "output": str(self.out / "sft"),
                                        "data": str(self.out / "data" / "sft.jsonl")}, self.cfg.sft, "sft")
        run_stage(cfg, SFTTrainer)

    def run_prefs(self):
        hold_budget(self.cfg.memory_budget)  # sampling is not planned, but a given ceiling holds here too
        device = default_device()
        dtype = compute_dtype(device, self.cfg.dtype)
        model, tok = load_model(str(self.out / "sft" / "final"), dtype, quantize=self.cfg.quantize_base)
        rows = load_dataset_file(str(self.out / "data" / "prefs_prompts.jsonl"), "prompt")
        engine = sampling_engine(self.cfg.rollout_engine, self.cfg.rollout_quant, tok, device, dtype)
        try:
            summary = build_pairs(model.to(device), tok, rows, self.out / "prefs.jsonl", seed=self.cfg.seed,
                                  device=device, engine=engine, **self.cfg.prefs)
        finally:
            engine.close()
        (self.out / "prefs.json").write_text(json.dumps(summary, indent=2) + "\n")

    def _requantize_note(self):
        if self.cfg.quantize_base != "none":  # sft/final is the merged model, written de-quantized
            log.info("the SFT-merged base (%s) is quantized again to %s for this stage", self.out / "sft" / "final",
                     self.cfg.quantize_base)

    def run_rm(self):
        self._requantize_note()
        cfg = _stage_config(RewardConfig, {**self.common(), "model": str(self.out / "sft" / "final"),
                                           "output": str(self.out / "rm"), "data": str(self.out / "prefs.jsonl")},
                            self.cfg.rm, "rm")
        run_stage(cfg, RewardTrainer)

    def run_ppo(self):
        self._requantize_note()
        cfg = _stage_config(PPOConfig, {**self.common(), "model": str(self.out / "sft" / "final"),
                                        "output": str(self.out / "ppo"), "reward_model": str(self.out / "rm"),
                                        "prompts": str(self.out / "data" / "ppo_prompts.jsonl"),
                                        "eval_data": str(self.out / "data" / "held_out.jsonl"),
                                        "rollout_engine": self.cfg.rollout_engine,
                                        "rollout_quant": self.cfg.rollout_quant}, self.cfg.ppo, "ppo")
        run_stage(cfg, build_ppo)

    def run_dpo(self):
        self._requantize_note()
        cfg = _stage_config(PreferenceConfig, {**self.common(), "model": str(self.out / "sft" / "final"),
                                               "output": str(self.out / "dpo"), "data": str(self.out / "prefs.jsonl")},
                            self.cfg.dpo, "dpo")
        run_stage(cfg, PreferenceTrainer)

    def run_report(self):
        hold_budget(self.cfg.memory_budget)
        write_report(self.out, self.cfg)


def run_isolated(pipeline: Pipeline, method: str) -> int:
    """Run `pipeline.<method>()` in a fresh process (spawned: no heap, no threads inherited) and
    return its peak memory in bytes. A stage that stops on an error has said why on stderr; this
    process then stops with the same exit code."""
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        child = multiprocessing.get_context("spawn").Process(target=_stage_child, args=(pipeline, method, peak_file))
        child.start()
        try:
            child.join()
        finally:  # stopped by an exception here (Ctrl-C, a signal turned into one): the stage stops too
            if child.is_alive():
                child.terminate()
                child.join()
        if child.exitcode != 0:
            raise StageFailed(f"the {method.removeprefix('run_')} stage stopped (exit code {child.exitcode})",
                              child.exitcode)
        return int(peak_file.read_text())


def _stage_child(pipeline: Pipeline, method: str, peak_file: Path):
    die_with_parent()
    setup_logging()
    try:
        getattr(pipeline, method)()
    except FrugalError as e:
        print(f"frugal: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (ValueError, KeyError, OSError) as e:
        print(f"frugal: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    peak_file.write_text(str(peak_memory_bytes()))
