"""`frugal pipeline` / `frugal demo`: SFT -> preference pairs -> reward model -> PPO -> report,
in one run directory. A stage whose complete output exists is skipped, and an interrupted
stage resumes from its last checkpoint, so rerunning an interrupted pipeline continues it.

    OUT/data/{sft,prefs_prompts,ppo_prompts,held_out}.jsonl   the split, kept apart
    OUT/sft/  OUT/prefs.jsonl  OUT/rm/  OUT/ppo/               the stages
    OUT/report.md  OUT/summary.json  OUT/eval.json             the evidence

This module keeps the stages in order and imports neither torch nor transformers: with isolated
stages (each in a process of its own, the default for a quantized base) this process stays
beside every stage, and with them imported it held 0.25 GiB of the nf4 demo's 1.6 GiB. The
stages themselves are app/pipeline_stages.py, imported where a stage runs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import yaml

from ..engine_choice import check_engine
from ..errors import FrugalError, StageFailed
from ..libc import die_with_parent
from ..rundir import lock_run
from ..runlog import setup_logging
from .pipeline_config import PipelineConfig, load_pipeline_config, packaged_config

log = logging.getLogger("frugal_rlhf")


class Pipeline:
    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.timings: dict = {}  # seconds per stage
        self.peaks: dict = {}  # GiB per stage: peak RSS on CPU, peak allocated on CUDA

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
        peak = (run_isolated(name, run_stage_here, self.cfg, method) if self.isolated
                else run_stage_here(self.cfg, method))
        self.timings[name] = round(time.perf_counter() - t0, 1)
        self.peaks[name] = round(peak / 2**30, 2)
        for file, values in (("timings.json", self.timings), ("memory.json", self.peaks)):
            path = self.out / file
            saved = json.loads(path.read_text()) if path.exists() else {}
            path.write_text(json.dumps({**saved, **values}, indent=2) + "\n")


def run_stage_here(cfg: PipelineConfig, method: str) -> int:
    """Run one stage (a method of app/pipeline_stages.py's Stages) in this process; its peak
    memory in bytes. Imported here, where a stage runs, not at the top: see the module's note."""
    from .pipeline_stages import run_here

    return run_here(cfg, method)


def run_isolated(name: str, fn, *args):
    """Run fn(*args) in a fresh process (spawned: no heap, no threads inherited) and return what
    it returned (JSON). A stage that stops on an error has said why on stderr; this process then
    stops with the same exit code."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        child = multiprocessing.get_context("spawn").Process(target=_stage_child, args=(result, fn, *args))
        child.start()
        try:
            child.join()
        finally:  # stopped by an exception here (Ctrl-C, a signal turned into one): the stage stops too
            if child.is_alive():
                child.terminate()
                child.join()
        if child.exitcode != 0:
            raise StageFailed(f"the {name} stage stopped (exit code {child.exitcode})", child.exitcode)
        return json.loads(result.read_text())


def _stage_child(result: Path, fn, *args):
    die_with_parent()
    setup_logging()
    try:
        value = fn(*args)
    except FrugalError as e:
        print(f"frugal: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (ValueError, KeyError, OSError) as e:
        print(f"frugal: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    result.write_text(json.dumps(value))


def cmd_pipeline(args, default_config=None):
    path = args.config or (packaged_config("quick" if args.quick else default_config) if default_config or
                           args.quick else None)
    if path is None:
        raise ValueError("frugal pipeline needs --config FILE (see configs/example.yaml)")
    cfg = load_pipeline_config(path, {"output": args.output, "method": args.method, "seed": args.seed,
                                      "dtype": args.dtype, "quantize_base": args.quantize_base,
                                      "gradient_checkpointing": args.gradient_checkpointing,
                                      "memory_budget": args.memory_budget, "isolate_stages": args.isolate_stages,
                                      "report_to": args.report_to, "rollout_engine": args.rollout_engine,
                                      "rollout_quant": args.rollout_quant})
    if args.advantage:
        cfg.ppo = {**cfg.ppo, "advantage": args.advantage}
    Pipeline(cfg).run()


def cmd_demo(args):
    if not args.output:
        args.output = "runs/demo-quick" if args.quick else "runs/demo"
    cmd_pipeline(args, default_config="demo")
