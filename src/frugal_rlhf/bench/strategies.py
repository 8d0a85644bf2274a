"""`frugal bench strategies`: one stage under every strategy, N processes, same global batch.

Each configuration is the real command (`frugal sft|ppo ... --strategy X --nproc-per-node N`)
in its own processes; its metrics.jsonl gives the step times (the first step, warm-up, is left
out) and the peak memory per rank (the largest rank's peak RSS on CPU, max allocated on CUDA).
The one-process baseline gets the same global batch (batch size x N) and all the threads.
"""
from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import fresh_reward_model, stats

CONFIGS = [  # (name, strategy flags); naive is one process
    ("naive", ["--strategy", "naive"]),
    ("ddp", ["--strategy", "ddp"]),
    ("fsdp zero-2", ["--strategy", "fsdp", "--zero-stage", "2"]),
    ("fsdp zero-3", ["--strategy", "fsdp", "--zero-stage", "3"]),
    ("fsdp zero-3 + cpu offload", ["--strategy", "fsdp", "--zero-stage", "3", "--offload", "cpu"]),
    ("deepspeed zero-2", ["--strategy", "deepspeed", "--zero-stage", "2"]),
    ("deepspeed zero-2 + cpu offload", ["--strategy", "deepspeed", "--zero-stage", "2", "--offload", "cpu"]),
    ("deepspeed zero-3", ["--strategy", "deepspeed", "--zero-stage", "3"]),
]


def _skip_reason(stage: str, name: str) -> str | None:
    if name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed not installed"
    if stage == "ppo" and name == "deepspeed zero-3":
        return "refused: no PPO rollouts under DeepSpeed ZeRO-3 (use fsdp zero-3)"
    return None


def stage_flags(stage, model, data, reward_model, max_length, new_tokens, lora_rank, steps):
    """The stage's own flags with a per-process batch of `batch_size` rows."""
    common = ["--model", model, "--lora-rank", str(lora_rank), "--max-steps", str(steps), "--save-every", "0",
              "--eval-every", "0", "--dtype", "auto"]
    if stage == "sft":
        return common + ["--data", data, "--max-length", str(max_length), "--eval-split", "0"], ["--batch-size"]
    if stage == "ppo":
        return common + ["--prompts", data, "--reward-model", reward_model, "--max-new-tokens", str(new_tokens),
                         "--eval-prompts", "0", "--max-length", str(max_length)], ["--rollout-batch-size",
                                                                                   "--batch-size"]
    raise ValueError(f"bench strategies runs sft or ppo, not {stage}")


def run_config(stage, flags, batch_flags, batch_size, nproc, name, strategy_flags, workdir) -> dict:
    out = Path(workdir) / name.replace(" ", "_").replace("+", "")
    procs = 1 if name == "naive" else nproc
    cmd = [sys.executable, "-m", "frugal_rlhf.cli", stage, *flags, *strategy_flags, "--output", str(out)]
    for flag in batch_flags:
        cmd += [flag, str(batch_size * nproc // procs)]
    if procs > 1:
        cmd += ["--nproc-per-node", str(procs)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # torchrun ends its report with banners: show the error's own line
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        return {"error": (errors or proc.stderr.splitlines() or [f"exit {proc.returncode}"])[-1].strip()}
    steps = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "step_time" in m]
    measured = steps[1:] or steps
    out = {"processes": procs, "step_time": stats(m["step_time"] for m in measured),
           "peak_mem_gb_per_rank": max(m["peak_mem_gb"] for m in steps), "global_batch": batch_size * nproc}
    for key in ("time_gen", "time_score", "time_update"):  # PPO's phases
        if key in measured[0]:
            out[key] = statistics.median(m[key] for m in measured)
    for key in ("mem_rollout_gb", "mem_update_gb"):
        if key in measured[0]:
            out[key] = max(m[key] for m in steps)
    return out


def bench_strategies(stage="sft", model="default", data=None, reward_model=None, nproc=2, steps=4, batch_size=2,
                     max_length=256, new_tokens=32, lora_rank=8, only=None):
    data = data or "sharegpt"
    results = {}
    with tempfile.TemporaryDirectory() as work:
        if stage == "ppo" and not reward_model:
            reward_model = fresh_reward_model(model, lora_rank, "auto", Path(work) / "rm")
        flags, batch_flags = stage_flags(stage, model, data, reward_model, max_length, new_tokens, lora_rank, steps)
        for name, strategy_flags in CONFIGS:
            if only and name not in only:
                continue
            reason = _skip_reason(stage, name)
            results[name] = ({"skipped": reason} if reason else
                             run_config(stage, flags, batch_flags, batch_size, nproc, name, strategy_flags, work))
            print(f"{stage} {name}: {results[name]}", file=sys.stderr)
    return {"stage": stage, "model": model, "nproc": nproc, "steps": steps, "batch_size_per_process": batch_size,
            "max_length": max_length, "new_tokens": new_tokens, "lora_rank": lora_rank, "results": results}


def format_table(r) -> str:
    lines = [f"{r['stage']} on {r['model']} (LoRA {r['lora_rank']}), global batch {r['batch_size_per_process']} x "
             f"{r['nproc']}, {r['steps']} steps (first left out)",
             "| strategy | processes | step time, median [min-max] | peak memory per rank |", "|---|---|---|---|"]
    for name, v in r["results"].items():
        if "step_time" in v:
            t = v["step_time"]
            phases = (f" (generation {v['time_gen']:.1f}, scoring {v['time_score']:.1f}, update {v['time_update']:.1f})"
                      if "time_gen" in v else "")
            memory = (f" (rollout {v['mem_rollout_gb']:.2f}, update {v['mem_update_gb']:.2f})"
                      if "mem_rollout_gb" in v else "")
            lines.append(f"| {name} | {v['processes']} | {t['median']:.2f} s [{t['min']:.2f}-{t['max']:.2f}]{phases} | "
                         f"{v['peak_mem_gb_per_rank']:.2f} GB{memory} |")
        else:
            lines.append(f"| {name} | - | {v.get('skipped') or v.get('error')} | - |")
    return "\n".join(lines)
