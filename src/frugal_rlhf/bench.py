"""`frugal bench`: throughput and peak memory of each stage, printed as a table and written as JSON.

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

import torch

from .device import compute_dtype, default_device, peak_memory_bytes


def _stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _prompts(n):
    try:
        from .data.formats import load_dataset_file

        rows = load_dataset_file("sharegpt", "prompt", limit=n * 3)
        return [r for r in rows if len(r["prompt"][-1]["content"]) < 300][:n]
    except FileNotFoundError:
        return [{"prompt": [{"role": "user", "content": f"Tell me about topic number {i}."}]} for i in range(n)]


def bench_generate(model="default", batch_size=8, new_tokens=64, repeats=3, dtype="auto", **_):
    """Our KV-cached sampler vs Hugging Face generate: same model, dtype, batch and settings."""
    from .data.tokenize import PromptCollator, encode_prompt
    from .generation import SampleConfig, sample
    from .models.loading import load_model

    device = default_device()
    dt = compute_dtype(device, dtype)
    hf, tok = load_model(model, dt)
    hf.to(device).eval()
    rows = [{"prompt_ids": encode_prompt(tok, r["prompt"], 128)} for r in _prompts(batch_size)]
    batch = PromptCollator(tok.pad_token_id)(rows)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    # No stop tokens on either side: both generate exactly new_tokens per row.
    cfg = SampleConfig(new_tokens, 1.0, 0, 1.0, (), tok.pad_token_id)
    results = {}
    for name in ("frugal", "hf_generate"):
        times = []
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            if name == "frugal":
                sample(hf, ids, mask, cfg, torch.Generator().manual_seed(r))
            else:
                with torch.inference_mode():
                    hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, top_k=0, pad_token_id=tok.pad_token_id)
            if r:  # the first run is warm-up
                times.append(batch_size * new_tokens / (time.perf_counter() - t0))
        results[name] = {"tokens_per_s": _stats(times)}
    results["ratio"] = results["frugal"]["tokens_per_s"]["median"] / results["hf_generate"]["tokens_per_s"]["median"]
    return {"workload": "generate", "model": model, "dtype": str(dt), "batch_size": batch_size,
            "new_tokens": new_tokens, **results, "peak_mem_gb": peak_memory_bytes(device) / 2**30}


def _train_bench(name, cfg, build, rate_key):
    from .strategies import NaiveStrategy

    strategy = NaiveStrategy(seed=cfg.seed, dtype=cfg.dtype)
    strategy.setup_distributed()
    metrics = [m for m in build(strategy, cfg).fit() if m.get("step", 0) > 1]  # step 1 is warm-up
    rates = [m[rate_key] for m in metrics if rate_key in m]
    out = {"workload": name, "model": cfg.model, "lora_rank": cfg.lora_rank, "batch_size": cfg.batch_size,
           rate_key: _stats(rates), "step_time_s": _stats([m["step_time"] for m in metrics]),
           "peak_mem_gb": peak_memory_bytes(strategy.device) / 2**30}
    return out, metrics


def bench_sft(model="default", steps=6, batch_size=8, max_length=256, lora_rank=8, dtype="auto", **_):
    from .config import SFTConfig
    from .trainers.supervised import SFTTrainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = SFTConfig(model=model, data="sharegpt", max_rows=400, output=tmp, max_steps=steps, batch_size=batch_size,
                        max_length=max_length, lora_rank=lora_rank, save_every=0, eval_every=0, eval_split=0,
                        dtype=dtype)
        out, _ = _train_bench("sft", cfg, SFTTrainer, "tokens_per_s")
    return out


def bench_rm(model="default", steps=6, batch_size=8, max_length=256, lora_rank=8, dtype="auto", **_):
    from .config import RewardConfig
    from .trainers.reward import RewardTrainer

    rows = [{"prompt": r["prompt"], "chosen": r.get("reference") or "Sure.", "rejected": "I don't know.",
             "margin": None} for r in _prompts(batch_size * (steps + 1))]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RewardConfig(model=model, output=tmp, max_steps=steps, batch_size=batch_size, max_length=max_length,
                           lora_rank=lora_rank, save_every=0, eval_every=0, eval_split=0, dtype=dtype)
        out, metrics = _train_bench("rm", cfg, lambda s, c: RewardTrainer(s, c, rows=rows), "tokens_per_s")
    out["pairs_per_s"] = _stats([batch_size / m["step_time"] for m in metrics])
    return out


def bench_ppo(model="default", steps=4, batch_size=8, new_tokens=64, lora_rank=8, dtype="auto", **_):
    """PPO steps with a fresh reward model; lora_rank 0 = the plain recipe (four full models)."""
    from .config import PPOConfig
    from .models.reward_io import save_reward_model
    from .models.roles import RewardModel
    from .trainers.ppo import PPOTrainer

    with tempfile.TemporaryDirectory() as tmp:
        rm = RewardModel(model, lora_rank=lora_rank or 8, dtype=dtype)
        save_reward_model(rm, rm.tokenizer, Path(tmp) / "rm", base=model)
        del rm
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"messages": r["prompt"]}) + "\n" for r in _prompts(64)))
        cfg = PPOConfig(model=model, reward_model=str(Path(tmp) / "rm"), prompts=str(prompts), output=f"{tmp}/ppo",
                        max_steps=steps, rollout_batch_size=batch_size, batch_size=batch_size,
                        max_new_tokens=new_tokens, lora_rank=lora_rank, save_every=0, eval_every=0, eval_prompts=0,
                        dtype=dtype, max_prompt_length=128)
        out, metrics = _train_bench("ppo", cfg, PPOTrainer.from_config, "samples_per_s")
    for key in ("time_gen", "time_score", "time_update"):
        out[key] = _stats([m[key] for m in metrics])
    out["new_tokens"] = new_tokens
    return out


WORKLOADS = {"generate": bench_generate, "sft": bench_sft, "rm": bench_rm, "ppo": bench_ppo}

ALL = [("generate", {}), ("sft", {}), ("rm", {}), ("ppo", {}), ("ppo", {"lora_rank": 0})]


def add_bench_args(p):
    p.add_argument("workload", choices=[*WORKLOADS, "all"])
    p.add_argument("--model", default="default")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", help="write the results here")


def _row(r) -> str:
    rate = next((f"{k} {r[k]['median']:.1f} [{r[k]['min']:.1f}-{r[k]['max']:.1f}]"
                 for k in ("tokens_per_s", "samples_per_s") if k in r), "")
    extra = ""
    if r["workload"] == "generate":
        rate = (f"frugal {r['frugal']['tokens_per_s']['median']:.1f} tok/s vs HF generate "
                f"{r['hf_generate']['tokens_per_s']['median']:.1f} (x{r['ratio']:.2f})")
    if r["workload"] == "ppo":
        extra = (f" | gen {r['time_gen']['median']:.1f}s score {r['time_score']['median']:.1f}s "
                 f"update {r['time_update']['median']:.1f}s")
    if "pairs_per_s" in r:
        extra = f" | pairs/s {r['pairs_per_s']['median']:.2f}"
    return f"| {r['workload']} | lora {r.get('lora_rank', '-')} | {rate}{extra} | {r['peak_mem_gb']:.2f} GB |"


def cmd_bench(args):
    kw = {k: getattr(args, k) for k in ("model", "steps", "batch_size", "new_tokens", "max_length", "lora_rank",
                                        "repeats", "dtype")}
    if args.workload == "all":
        results = []
        for name, over in ALL:
            cmd = [sys.executable, "-m", "frugal_rlhf.cli", "bench", name, "--json", "/dev/stdout"]
            for k, v in {**kw, **over}.items():
                cmd += [f"--{k.replace('_', '-')}", str(v)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out[out.index("{"):out.rindex("}") + 1]))
    else:
        results = [WORKLOADS[args.workload](**kw)]
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(default_device())}
    table = "\n".join(["| workload | config | throughput | peak memory |", "|---|---|---|---|",
                       *map(_row, results)])
    print(table, file=sys.stderr if args.json == "/dev/stdout" else sys.stdout)
    if args.json:
        payload = {"env": env, "results": results} if args.workload == "all" else results[0]
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
