"""`frugal bench`: its arguments, the table each workload prints, and the JSON it writes."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from ..device import default_device
from ..serve.bench import bench_serve
from ..serve.bench import format_table as serve_table
from ..serve.bench_mixed import bench_serve_mixed
from ..serve.bench_mixed import format_table as mixed_table
from .compare import ENGINE_ROWS, compare
from .compare import format_table as compare_table
from .quantize import bench_quantize, format_table
from .strategies import bench_strategies
from .strategies import format_table as strategies_table
from .generate import ENGINES
from .workloads import WORKLOADS, bench_capacity, bench_generate, dummy_sizes

ALL = [("generate", {}), ("sft", {}), ("rm", {}), ("ppo", {}), ("ppo", {"lora_rank": 0})]


def add_bench_args(p):
    p.add_argument("workload", choices=[*WORKLOADS, *OWN_TABLE, "all"],
                   help="generate, sft, rm, ppo, dpo: one stage's rate and peak; all: each in its own process; "
                        "compare: against a peer; serve, sizes, capacity, strategies, quantize: their own tables")
    p.add_argument("--stage", default="ppo", choices=["sft", "rm", "ppo", "grpo", "generate", "dpo"],
                   help="capacity: the stage to fit (sft, ppo); compare: the stage to run in both tools "
                        "(sft, rm, grpo, dpo; generate: our sampler vs HF generate); strategies: sft or ppo")
    p.add_argument("--peer", default="trl", choices=["trl"], help="compare: the other framework")
    p.add_argument("--memory", default="24GiB", help="capacity: the memory budget (e.g. 24GiB, 8GB)")
    p.add_argument("--recipes", default=None, type=lambda v: v.split(","),
                   help="capacity: search only these rows, comma-separated (plain, frugal, frugal-<format>)")
    p.add_argument("--model", default="default", help="model spec, or a dummy size (s m l 1b xl 3b 7b 13b: "
                   "`frugal bench sizes`)")
    p.add_argument("--steps", type=int, default=6, help="training steps per run; the first is warm-up, not timed")
    p.add_argument("--batch-size", type=int, default=8, help="rows a step (ppo, generate: prompts sampled together)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per answer (generate, ppo, serve)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per training sequence (sft, rm, dpo); "
                   "quantize: the tokens scored")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank of the trained stages; 0 = full fine-tuning")
    p.add_argument("--prompt-tokens", type=int, default=0,
                   help="compare sft|rm: prompts of about this many tokens (a multi-turn conversation) "
                        "instead of 32-token questions; the answers fill the rest of --max-length")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of generate, compare and quantize (median, "
                   "min, max)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (bf16 where fast, else fp32), bf16 or fp32")
    p.add_argument("--quantize-base", default="none", choices=["none", "int8", "nf4", "int4"],
                   help="generate, sft, rm, ppo, dpo: the frozen base stored quantized (QLoRA); capacity: adds a "
                        "row for the recipe on a base quantized so")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="sft, ppo; compare: both tools recompute activations in backward")
    p.add_argument("--strategy", default="naive", choices=["naive", "ddp", "fsdp", "deepspeed"],
                   help="sft, rm, ppo: the training strategy (a distributed one under torchrun: `torchrun "
                        "--nproc_per_node 2 -m frugal_rlhf.cli bench ppo --strategy fsdp`; `bench strategies` "
                        "runs them all)")
    p.add_argument("--memory-budget", default=None,
                   help="sft, rm, ppo: plan micro-batch, accumulation and checkpointing for this budget (4GiB, auto)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--mixed", action="store_true",
                   help="serve: mixed lengths (a 5-token request behind a 250-token one, Poisson arrivals of "
                        "short and long requests): continuous vs static batching vs one-at-a-time generate")
    p.add_argument("--nproc-per-node", type=int, default=2, help="strategies: processes per distributed run")
    p.add_argument("--data", default=None, help="strategies: SFT data or PPO prompts (default: sharegpt)")
    p.add_argument("--reward-model", default=None, help="strategies --stage ppo: a `frugal rm` output")
    p.add_argument("--engine", default="torch", choices=[*ENGINES, "all"],
                   help="generate: the rollout engine(s) to time (torch: ours and HF generate; llamacpp: our llama.cpp "
                        "engine and llama.cpp alone; vllm: the vLLM server; all: every installed one)")
    p.add_argument("--rollout-quant", default="f16", choices=["f16", "q8_0", "q4_0", "base"],
                   help="generate --engine llamacpp|all, compare grpo: the weight format of llama.cpp's copy")
    p.add_argument("--rollout-engine", default="all", type=_engine_list, metavar="ENGINES",
                   help="compare --stage grpo: our side's rollout engines, comma-separated (torch, llamacpp, vllm) or "
                        "all: a row for each (one not installed says how to install it), beside TRL's rows with and "
                        "without vLLM")
    p.add_argument("--reward", default="rm", choices=["rm", "math"],
                   help="compare grpo: rm = a reward model on both sides; math = the verifiable math reward "
                        "(two-digit addition problems, `frugal recipe math`'s) as a plain function on both sides")


def _engine_list(value: str) -> list[str]:
    names = list(ENGINE_ROWS) if value == "all" else list(dict.fromkeys(value.split(",")))  # in order, once each
    unknown = [n for n in names if n not in ENGINE_ROWS]
    if unknown:
        raise argparse.ArgumentTypeError(f"expected all or a comma-separated list of {', '.join(ENGINE_ROWS)}; "
                                         f"got {', '.join(unknown)}")
    return names


def _row(r) -> str:
    rate = next((f"{k} {r[k]['median']:.1f} [{r[k]['min']:.1f}-{r[k]['max']:.1f}]"
                 for k in ("tokens_per_s", "samples_per_s") if k in r), "")
    extra = ""
    if r["workload"] == "generate":
        rate, extra = _generate_cells(r)
    if r.get("quantize_base", "none") != "none":
        extra += f" | base {r['quantize_base']}"
    if r["workload"] == "ppo":
        extra += (f" | gen {r['time_gen']['median']:.1f}s score {r['time_score']['median']:.1f}s "
                 f"update {r['time_update']['median']:.1f}s; peak rollout {r['mem_rollout_gb']:.2f} GB, "
                 f"update {r['mem_update_gb']:.2f} GB")
    if "pairs_per_s" in r:
        extra += f" | pairs/s {r['pairs_per_s']['median']:.2f}"
    compute = f"{r['tflops']['median']:.3f} ({100 * r['mfu']:.1f}% of {r['peak_tflops']:.2f})" if "mfu" in r else "-"
    where = f", {r['strategy']} x{r['processes']}" if r.get("strategy", "naive") != "naive" else ""
    predicted = f" (predicted {r['predicted_peak_gb']:.2f})" if "predicted_peak_gb" in r else ""
    return (f"| {r['workload']} | {r['model']} lora {r.get('lora_rank', '-')}{where} | {rate}{extra} | {compute} | "
            f"{r['peak_mem_gb']:.2f} GiB{predicted} |")


def _generate_cells(r) -> tuple[str, str]:
    """Every engine's tok/s, and its fraction of the bandwidth bound over its own weight bytes."""
    rate = ", ".join(f"{e} {r[e]['tokens_per_s']['median']:.1f}" for e in r["engines"]) + " tok/s"
    if "ratio" in r:
        rate += f" (frugal/HF generate x{r['ratio']:.2f})"
    bound = ", ".join(f"{e} {r[e]['bandwidth_fraction']:.0%} of {r[e]['weight_gb']:.3g} GB" for e in r["engines"])
    return rate, f" | bound at {r['copy_gb_per_s']:.1f} GB/s copy rate: {bound}"


def _capacity_table(r) -> str:
    rows = [f"| {name} | {v['model']} | {v['params'] / 1e6:.0f}M | {v['peak_mem_gb']:.2f} GiB |" if v else
            f"| {name} | none fits | - | - |" for name, v in ((k, r[k]) for k in r["recipes"])]
    ratios = ", ".join(f"{k}/plain x{v:.1f}" if v else f"{k}/plain n/a" for k, v in r["ratios"].items())
    return "\n".join([f"{r['stage']} within {r['memory']}: capacity ratio {ratios}",
                      "| recipe | largest model | parameters | peak RSS |", "|---|---|---|---|", *rows])


def _compare(args, kw):
    if args.stage == "generate":  # our sampler vs HF generate, same run: the generate workload itself
        r = bench_generate(**kw)
        return r, _table([r])
    r = compare(args.peer, args.stage, prompt_tokens=args.prompt_tokens, reward=args.reward,
                rollout_engines=args.rollout_engine, rollout_quant=args.rollout_quant, **kw)
    shape = (f"{r['batch_size']} completions of {r['new_tokens']} tokens, reward {r['reward']}"
             if r["stage"] == "grpo" else
             f"batch {r['batch_size']} x {r['length']} tokens"
             + (f", prompts of ~{r['prompt_tokens']}" if r["prompt_tokens"] else "")) + (
                 ", gradient checkpointing in both" if r["gradient_checkpointing"] else "")
    return r, f"{r['stage']}: {r['model']} lora {r['lora_rank']}, {shape}\n" + compare_table(r)


def _serve(args, kw):
    if args.mixed:
        r, table = bench_serve_mixed(args.model, dtype=args.dtype), mixed_table
    else:
        r, table = bench_serve(args.model, max_tokens=args.new_tokens, dtype=args.dtype), serve_table
    return r, f"model {r['model']} ({r['dtype']}), {r['settings']}\n" + table(r)


def _sizes(args, kw):
    r = dummy_sizes()
    return r, "\n".join(f"{k}: {v / 1e6:.0f}M parameters" for k, v in r.items())


def _capacity(args, kw):
    r = bench_capacity(args.stage, args.memory, args.quantize_base, args.recipes)
    return r, _capacity_table(r)


def _quantize(args, kw):
    r = bench_quantize(args.model, args.repeats, args.max_length)
    return r, format_table(r)


def _strategies(args, kw):
    r = bench_strategies(args.stage, args.model, args.data, args.reward_model, args.nproc_per_node, args.steps,
                         args.batch_size, args.max_length, args.new_tokens, args.lora_rank)
    return r, strategies_table(r)


# Workloads that print their own table (the others share `_table`).
OWN_TABLE = {"compare": _compare, "serve": _serve, "sizes": _sizes, "capacity": _capacity,
             "strategies": _strategies, "quantize": _quantize}


def _table(results) -> str:
    return "\n".join(["| workload | config | throughput | TFLOPS (MFU of measured peak) | peak memory |",
                      "|---|---|---|---|---|", *map(_row, results)])


def cmd_bench(args):
    kw = {k: getattr(args, k) for k in ("model", "steps", "batch_size", "new_tokens", "max_length", "lora_rank",
                                        "repeats", "dtype", "gradient_checkpointing", "strategy", "memory_budget",
                                        "quantize_base")}
    if args.workload == "generate":
        kw.update(engine=args.engine, rollout_quant=args.rollout_quant)
    if args.workload in OWN_TABLE:
        result, table = OWN_TABLE[args.workload](args, kw)
        print(table)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return
    if args.workload == "all":
        results = []
        for name, over in ALL:
            cmd = [sys.executable, "-m", "frugal_rlhf.cli", "bench", name, "--json", "/dev/stdout"]
            for k, v in {**kw, **over}.items():
                flag = f"--{k.replace('_', '-')}"
                if v is not None:
                    cmd += ([flag] if v is True else []) if isinstance(v, bool) else [flag, str(v)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out[out.index("{"):out.rindex("}") + 1]))
    else:
        results = [WORKLOADS[args.workload](**kw)]
    if not all(results):  # a rank other than 0 under torchrun: rank 0 writes the one table and JSON
        return
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(default_device())}
    table = _table(results)
    print(table, file=sys.stderr if args.json == "/dev/stdout" else sys.stdout)
    if args.json:
        payload = {"env": env, "results": results} if args.workload == "all" else results[0]
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
