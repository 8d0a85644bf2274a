"""The pipeline's stages (app/pipeline.py keeps them in order): each reads the run directory,
writes its part, and runs where app/pipeline.py puts it (in the pipeline's process, or in one
of its own)."""
from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

from ..config import PPOConfig, PreferenceConfig, RewardConfig, SFTConfig, from_dict
from ..data.formats import load_dataset_file
from ..data.loader import split_rows
from ..device import compute_dtype, default_device, peak_memory_bytes, release_free_memory, reset_run_peak
from ..models.loading import load_model
from ..models.memory import hold_budget
from ..rundir import atomic_write
from ..trainers.preference import PreferenceTrainer
from ..trainers.reward import RewardTrainer
from ..trainers.supervised import SFTTrainer
from .evaluation import sampling_engine
from .pipeline_config import PipelineConfig
from .prefs import build_pairs
from .report import write_report
from .report_dpo import write_dpo_report
from .stages import build_ppo, run_stage

log = logging.getLogger("frugal_rlhf")


def run_here(cfg: PipelineConfig, method: str) -> int:
    """Run stage `method` of `cfg` in this process and return its peak memory in bytes. Stages
    that share a process free the last one's objects first (peft's modules hold reference
    cycles, hence the collection), and the C heap's pages too, which would count in this stage's
    peak otherwise (measured on the demo with an nf4 base: PPO's update at 3.6 GB in the
    pipeline, 2.0 GB on its own)."""
    gc.collect()
    release_free_memory()
    reset_run_peak()
    getattr(Stages(cfg), method)()
    return peak_memory_bytes()


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


def stage_config(cls, base: dict, section: dict, source: str):
    return from_dict(cls, {**base, **section}, source=source)


class Stages:
    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.out = Path(cfg.output)

    def common(self) -> dict:
        c = self.cfg
        # resume a stage from its checkpoint; one killed before its first checkpoint starts again
        return {"seed": c.seed, "dtype": c.dtype, "quantize_base": c.quantize_base,
                "gradient_checkpointing": c.gradient_checkpointing, "memory_budget": c.memory_budget,
                "strategy": c.strategy, "zero_stage": c.zero_stage, "offload": c.offload, "report_to": c.report_to,
                "resume": True, "overwrite": True}

    def run_split(self):
        write_split(self.cfg, self.out / "data")

    def run_dpo_report(self):
        write_dpo_report(self.out, self.cfg)

    def run_sft(self):
        cfg = stage_config(SFTConfig, {**self.common(), "model": self.cfg.model, "output": str(self.out / "sft"),
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
        cfg = stage_config(RewardConfig, {**self.common(), "model": str(self.out / "sft" / "final"),
                                           "output": str(self.out / "rm"), "data": str(self.out / "prefs.jsonl")},
                            self.cfg.rm, "rm")
        run_stage(cfg, RewardTrainer)

    def run_ppo(self):
        self._requantize_note()
        cfg = stage_config(PPOConfig, {**self.common(), "model": str(self.out / "sft" / "final"),
                                        "output": str(self.out / "ppo"), "reward_model": str(self.out / "rm"),
                                        "prompts": str(self.out / "data" / "ppo_prompts.jsonl"),
                                        "eval_data": str(self.out / "data" / "held_out.jsonl"),
                                        "rollout_engine": self.cfg.rollout_engine,
                                        "rollout_quant": self.cfg.rollout_quant}, self.cfg.ppo, "ppo")
        run_stage(cfg, build_ppo)

    def run_dpo(self):
        self._requantize_note()
        cfg = stage_config(PreferenceConfig, {**self.common(), "model": str(self.out / "sft" / "final"),
                                               "output": str(self.out / "dpo"), "data": str(self.out / "prefs.jsonl")},
                            self.cfg.dpo, "dpo")
        run_stage(cfg, PreferenceTrainer)

    def run_report(self):
        hold_budget(self.cfg.memory_budget)
        write_report(self.out, self.cfg)
