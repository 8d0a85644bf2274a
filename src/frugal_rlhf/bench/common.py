"""What every bench command shares: its prompts, the summary of repeated measurements, and an untrained
reward model for the workloads that need one (PPO, GRPO) to score with."""
from __future__ import annotations

import gc
import statistics

from ..data.formats import load_dataset_file
from ..models.reward_io import save_reward_model
from ..models.roles import RewardModel


def bench_prompts(n) -> list[dict]:
    """n short ShareGPT questions ({"prompt": messages}), or made-up ones without the dataset."""
    try:
        rows = load_dataset_file("sharegpt", "prompt", limit=n * 3)
        return [r for r in rows if len(r["prompt"][-1]["content"]) < 300][:n]
    except FileNotFoundError:
        return [{"prompt": [{"role": "user", "content": f"Tell me about topic number {i}."}]} for i in range(n)]


def stats(values) -> dict:
    """Median, min, max and count of measurements (JSON-ready: the bench results are files)."""
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fresh_reward_model(model, lora_rank, dtype, path, quantize="none"):
    """An untrained reward model on `model` (what PPO's cost depends on is its size, not its scores).
    Only the adapter and head are written: the standalone merged copy would double the peak
    memory of a capacity probe before PPO even starts."""
    rm = RewardModel(model, lora_rank=lora_rank, dtype=dtype, quantize=quantize)
    save_reward_model(rm, rm.tokenizer, path, base=model, standalone=False)
    del rm
    gc.collect()  # peft modules hold reference cycles: free this copy of the base before PPO loads its own
    return str(path)
