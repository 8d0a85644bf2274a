"""The workloads of `frugal bench`: throughput, FLOPs and peak memory of each stage, and the
capacity probe (the largest model each recipe fits in a memory budget).

Each workload runs in its own process (`frugal bench all` spawns them) so peak RSS belongs to
that workload alone. Times exclude a warm-up step; medians with min/max over the measured
steps are reported. Never run a benchmark beside another busy process: numbers are
meaningless under contention (on 2 cores, two torch processes slow each other ~20x).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..app.stages import run_stage
from ..config import PPOConfig, PreferenceConfig, RewardConfig, SFTConfig
from ..device import peak_memory_bytes
from ..models.loading import DUMMY_SIZES, dummy_config
from ..models.memory import parse_size, predicted_peak
from ..rl.algorithms import held_roles
from ..trainers.ppo import PPOTrainer
from ..trainers.preference import PreferenceTrainer
from ..trainers.reward import RewardTrainer
from ..trainers.supervised import SFTTrainer
from . import flops
from .common import bench_prompts, fresh_reward_model, stats
from .generate import bench_generate


def _lora(role) -> int:
    return flops.lora_params(role.lm.hf_model(), role.adapter) if role.adapter else 0


def _supervised_flops(trainer, m, head: bool) -> float:
    """FLOPs of one SFT (head=True) or reward-model (head=False: scalar head) step: of the
    tokens the forward ran (a prompt shared by a pair counts once)."""
    role = trainer.strategy.unwrap(trainer.model)  # DDP wraps the role
    seq_len = m["encoded_tokens"] / m["sequences"]
    return flops.train_flops(flops.shape_of(role.lm.hf_model()), m["sequences"], seq_len, seq_len if head else 0,
                         _lora(role), full=not role.adapter)


def _ppo_flops(trainer, m) -> float:
    shape, cfg, critic = flops.shape_of(trainer.actor.lm.hf_model()), trainer.config, trainer.critic
    samples = cfg.rollout_batch_size * cfg.group_size * trainer.strategy.world_size  # the batch is per process
    return flops.ppo_step_flops(shape, samples, m["prompt_length"],
                            m["response_length"], cfg.ppo_epochs, _lora(trainer.actor), _lora(critic) if critic else 0,
                            _lora(trainer.reward_model), full=not trainer.actor.adapter, critic=critic is not None)


def train_bench(name, cfg, build, rate_key, step_flops=None):
    """Run `build(strategy, cfg)`'s trainer; report throughput and, given `step_flops(trainer,
    metrics)`, model TFLOPS over the whole step time and MFU against the peak matmul rate
    measured on the spot in the compute dtype. The strategy is the config's: a distributed one
    runs under torchrun, its rates and FLOPs are the whole job's, and MFU is against the peak
    of all its processes."""
    def report(strategy, trainer, metrics):
        metrics = [m for m in metrics if m.get("step", 0) > 1]  # step 1 is warm-up
        peak_mem = strategy.max_over_ranks(peak_memory_bytes(strategy.device))
        if not strategy.is_rank0:  # the metrics are rank 0's (already reduced over the ranks)
            return {}, []

        planned = trainer.config  # with --memory-budget: the planner's choices
        rates = [m[rate_key] for m in metrics if rate_key in m]
        out = {"workload": name, "model": cfg.model, "quantize_base": cfg.quantize_base, "strategy": cfg.strategy,
               "processes": strategy.world_size,
               "lora_rank": cfg.lora_rank, "batch_size": cfg.batch_size, "micro_batch": planned.batch_size,
               "grad_accum": planned.grad_accum, "memory_budget": cfg.memory_budget,
               "gradient_checkpointing": planned.gradient_checkpointing,
               rate_key: stats(rates), "step_time_s": stats([m["step_time"] for m in metrics]),
               "peak_mem_gb": peak_mem / 2**30}
        predicted = predicted_peak(planned, held_roles(planned))  # after the peak: the planner's one-layer probe must not move it
        if predicted is not None:
            out["predicted_peak_gb"] = predicted / 2**30
        if step_flops:
            tflops = [step_flops(trainer, m) / m["step_time"] / 1e12 for m in metrics]
            peak = flops.measure_peak_tflops(strategy.device, strategy.dtype) * strategy.world_size
            out.update(tflops=stats(tflops), peak_tflops=peak, mfu=statistics.median(tflops) / peak)
        return out, metrics

    return run_stage(cfg, build, report)


def bench_sft(model="default", steps=6, batch_size=8, max_length=256, lora_rank=8, dtype="auto",
              gradient_checkpointing=False, strategy="naive", memory_budget=None, quantize_base="none", **_):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SFTConfig(model=model, data="sharegpt", max_rows=400, output=tmp, max_steps=steps, batch_size=batch_size,
                        max_length=max_length, lora_rank=lora_rank, save_every=0, eval_every=0, eval_split=0,
                        dtype=dtype, gradient_checkpointing=gradient_checkpointing, strategy=strategy,
                        memory_budget=memory_budget, quantize_base=quantize_base)
        out, _ = train_bench("sft", cfg, SFTTrainer, "tokens_per_s", lambda t, m: _supervised_flops(t, m, True))
    return out


def bench_rm(model="default", steps=6, batch_size=8, max_length=256, lora_rank=8, dtype="auto", strategy="naive",
             gradient_checkpointing=False, memory_budget=None, quantize_base="none", **_):
    rows = _bench_pairs(batch_size * (steps + 1))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RewardConfig(model=model, output=tmp, max_steps=steps, batch_size=batch_size, max_length=max_length,
                           lora_rank=lora_rank, save_every=0, eval_every=0, eval_split=0, dtype=dtype,
                           strategy=strategy, gradient_checkpointing=gradient_checkpointing,
                           memory_budget=memory_budget, quantize_base=quantize_base)
        out, metrics = train_bench("rm", cfg, lambda s, c: RewardTrainer(s, c, rows=rows), "tokens_per_s",
                                   lambda t, m: _supervised_flops(t, m, False))
    if out:  # rank 0 (all ranks' pairs: a pair is two sequences)
        out["pairs_per_s"] = stats([m["sequences"] / 2 / m["step_time"] for m in metrics])
    return out


def _bench_pairs(n):
    return [{"prompt": r["prompt"], "chosen": r.get("reference") or "Sure.", "rejected": "I don't know.",
             "margin": None} for r in bench_prompts(n)]


def bench_dpo(model="default", steps=6, batch_size=8, max_length=256, lora_rank=8, dtype="auto", strategy="naive",
              quantize_base="none", **_):
    """DPO steps: the policy's forward and backward on both answers of each pair, the reference's
    forward (the base with the adapter off; lora_rank 0: a frozen copy). No FLOP count: the
    reference forward and the answer-only head make the SFT formula wrong here."""
    rows = _bench_pairs(batch_size * (steps + 1))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PreferenceConfig(model=model, output=tmp, max_steps=steps, batch_size=batch_size, max_length=max_length,
                               lora_rank=lora_rank, save_every=0, eval_every=0, eval_split=0, dtype=dtype,
                               strategy=strategy, loss="dpo", quantize_base=quantize_base)
        out, metrics = train_bench("dpo", cfg, lambda s, c: PreferenceTrainer(s, c, rows=rows), "tokens_per_s")
    if out:  # rank 0 (all ranks' pairs)
        out["pairs_per_s"] = stats([m["sequences"] / 2 / m["step_time"] for m in metrics])
    return out


def bench_ppo(model="default", steps=4, batch_size=8, new_tokens=64, lora_rank=8, dtype="auto",
              gradient_checkpointing=False, strategy="naive", memory_budget=None, quantize_base="none", **_):
    """PPO steps with a fresh reward model; lora_rank 0 = the plain recipe (four full models)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_reward_model(model, lora_rank or 8, dtype, Path(tmp) / "rm", quantize_base if lora_rank else "none")
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"messages": r["prompt"]}) + "\n" for r in bench_prompts(64)))
        cfg = PPOConfig(model=model, reward_model=str(Path(tmp) / "rm"), prompts=str(prompts), output=f"{tmp}/ppo",
                        max_steps=steps, rollout_batch_size=batch_size, batch_size=batch_size,
                        max_new_tokens=new_tokens, lora_rank=lora_rank, save_every=0, eval_every=0, eval_prompts=0,
                        dtype=dtype, max_prompt_length=128, gradient_checkpointing=gradient_checkpointing,
                        strategy=strategy, memory_budget=memory_budget, quantize_base=quantize_base)
        out, metrics = train_bench("ppo", cfg, PPOTrainer.from_config, "samples_per_s", _ppo_flops)
    if not out:  # not rank 0
        return out
    for key in ("time_gen", "time_score", "time_update"):
        out[key] = stats([m[key] for m in metrics])
    for key in ("mem_rollout_gb", "mem_update_gb"):  # each phase's own peak (resettable peak RSS)
        out[key] = max(m[key] for m in metrics)
    out["new_tokens"] = new_tokens
    return out


WORKLOADS = {"generate": bench_generate, "sft": bench_sft, "rm": bench_rm, "ppo": bench_ppo, "dpo": bench_dpo}


def dummy_sizes() -> dict[str, int]:
    """Parameter counts of the dummy models, ascending, counted on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    counts = {}
    for name in DUMMY_SIZES:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(dummy_config(name))
        model.tie_weights()
        counts[name] = sum(p.numel() for p in model.parameters())
    return dict(sorted(counts.items(), key=lambda kv: kv[1]))


# The recipes compared by `frugal bench capacity`: the textbook one (four full fp32 models, fp32
# Adam for actor and critic) and ours (one bf16 base shared by four roles, LoRA adapters); with
# --quantize-base also ours on a base stored quantized (QLoRA), in a row named after the format.
RECIPES = {"plain": {"lora_rank": 0, "dtype": "fp32"}, "frugal": {"lora_rank": 8, "dtype": "auto"}}


def _fits(stage: str, model: str, budget: int, over: dict) -> tuple[bool, float]:
    """Run 2 steps of `stage` on `model` in a child process, killed as soon as its RSS passes
    `budget`. Returns (completed within budget, peak RSS in GiB)."""
    cmd = [sys.executable, "-m", "frugal_rlhf.cli", "bench", stage, "--model", model, "--steps", "2",
           "--batch-size", "2", "--new-tokens", "16", "--max-length", "64", "--lora-rank", str(over["lora_rank"]),
           "--dtype", over["dtype"], "--quantize-base", over.get("quantize_base", "none")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(status.split("VmHWM:")[1].split()[0]) * 1024)
        except (FileNotFoundError, IndexError):
            pass
        if peak > budget:
            proc.kill()
            proc.wait()
            return False, peak / 2**30
        time.sleep(0.2)
    return proc.returncode == 0 and peak <= budget, peak / 2**30


def bench_capacity(stage="ppo", memory="24GiB", quantize_base="none", recipes=None, **_):
    """The largest dummy model each recipe trains within a memory budget (binary search over
    the sizes, which assumes that if a size fails every larger one fails too). `recipes`
    (names) searches only those: a probe of a large model takes many minutes on a small
    machine, and rows already measured need not be measured again."""
    budget, sizes = parse_size(memory), dummy_sizes()
    names = [n for n in sizes if not n.startswith("gpt2")]
    available = dict(RECIPES)
    if quantize_base != "none":
        available[f"frugal-{quantize_base}"] = {**RECIPES["frugal"], "quantize_base": quantize_base}
    unknown = set(recipes or ()) - set(available)
    if unknown:
        raise ValueError(f"--recipes: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(available)}")
    recipes = {k: v for k, v in available.items() if not recipes or k in recipes}
    results = {}
    for recipe, over in recipes.items():
        lo, hi, best = 0, len(names) - 1, None  # invariant: everything below lo fits
        while lo <= hi:
            mid = (lo + hi) // 2
            ok, peak = _fits(stage, names[mid], budget, over)
            print(f"capacity {recipe}: {names[mid]} ({sizes[names[mid]] / 1e6:.0f}M) "
                  f"{'fits' if ok else 'does not fit'} (peak {peak:.2f} GiB)", file=sys.stderr)
            if ok:
                best, lo = {"model": names[mid], "params": sizes[names[mid]], "peak_mem_gb": peak}, mid + 1
            else:
                hi = mid - 1
        results[recipe] = best
    plain = results.get("plain")
    ratios = {k: v["params"] / plain["params"] if plain and v else None for k, v in results.items() if k != "plain"}
    return {"workload": "capacity", "stage": stage, "memory": memory, **results, "recipes": list(recipes),
            "ratio": ratios.get("frugal"), "ratios": ratios}
