"""`frugal bench generate`: decode throughput of every rollout engine on one batch, and the
fraction of the memory-bandwidth bound each reaches.

Rows (`--engine`): `torch` = our engine (`frugal`) and Hugging Face `generate` beside it;
`llamacpp` = our llama.cpp engine (its sampling loop is ours) and `llamacpp_standalone`, llama.cpp
decoding the same batch with nothing sampled (every row fed a fixed token): the anchor, what
llama.cpp itself does; `vllm` = the vLLM server in its own environment, timed from the trainer's
side (HTTP and JSON included, its start not); `all` = every installed engine. An engine is timed on its own copy of the
weights (llama.cpp: the GGUF file in --rollout-quant), its bound computed from those bytes.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from ..data.tokenize import PromptCollator, encode_prompt
from ..device import compute_dtype, default_device, peak_memory_bytes
from ..engine_choice import installed
from ..generation import SampleConfig, sample
from ..generation.engines import make_engine
from ..generation.vllm_engine import VLLMEngine
from ..models.loading import load_model
from ..models.roles import Actor, SharedLM
from . import flops
from .common import bench_prompts, stats

ENGINES = ("torch", "llamacpp", "vllm")  # --engine choices beside `all`


def _timed(run, repeats: int, tokens: int) -> dict:
    """Tokens/s of `run(seed)` over `repeats` runs after one warm-up run."""
    rates = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        run(r)
        if r:
            rates.append(tokens / (time.perf_counter() - t0))
    return {"tokens_per_s": stats(rates)}


def _torch_rows(hf, tok, ids, mask, cfg, repeats):
    def frugal(seed):
        sample(hf, ids, mask, cfg, torch.Generator().manual_seed(seed))

    def hf_generate(seed):
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=cfg.max_new_tokens,
                        min_new_tokens=cfg.max_new_tokens, top_k=0, pad_token_id=tok.pad_token_id)

    tokens = ids.shape[0] * cfg.max_new_tokens
    weights = flops.decode_bytes(hf)
    return {name: {**_timed(run, repeats, tokens), "weight_bytes": weights}
            for name, run in (("frugal", frugal), ("hf_generate", hf_generate))}


def _gguf_decode_bytes(path: Path) -> int:
    """Bytes of the file's tensors one decode step reads: all, but of an input embedding that is
    not also the output head only the batch's rows (negligible)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def _llamacpp_rows(hf, tok, ids, mask, cfg, repeats, quant):
    engine = make_engine("llamacpp", tokenizer=tok, quant=quant)
    policy = Actor(SharedLM(hf), None)
    try:
        engine.sync(policy)  # writes and loads the GGUF copy: setup, not timed
        weights = _gguf_decode_bytes(next(engine.dir.glob("base-*.gguf")))
        tokens = ids.shape[0] * cfg.max_new_tokens
        rows = {"llamacpp": lambda seed: engine.generate(policy, ids, mask, cfg, torch.Generator().manual_seed(seed)),
                "llamacpp_standalone": lambda seed: engine.decode_only(policy, ids, mask, cfg.max_new_tokens)}
        return {name: {**_timed(run, repeats, tokens), "weight_bytes": weights, "quant": quant}
                for name, run in rows.items()}
    finally:
        engine.close()


def _vllm_rows(hf, ids, mask, cfg, repeats):
    engine = VLLMEngine(sleep=False)  # awake between the timed runs, as between rollouts on a CPU
    policy = Actor(SharedLM(hf), None)
    try:
        # Starts the server on these weights (written in their dtype, de-quantized): setup, not timed.
        engine.generate(policy, ids[:1], mask[:1], dataclasses.replace(cfg, max_new_tokens=1))
        weights = sum(f.stat().st_size for f in (engine.workdir / "base").glob("*.safetensors"))
        tokens = ids.shape[0] * cfg.max_new_tokens
        run = lambda seed: engine.generate(policy, ids, mask, cfg, torch.Generator().manual_seed(seed))  # noqa: E731
        return {"vllm": {**_timed(run, repeats, tokens), "weight_bytes": weights}}
    finally:
        engine.close()


def bench_generate(model="default", batch_size=8, new_tokens=64, repeats=3, dtype="auto", quantize_base="none",
                   engine="torch", rollout_quant="f16", **_):
    """Tokens/s and bandwidth-bound fraction of each engine: same model, batch and settings."""
    device = default_device()
    dt = compute_dtype(device, dtype)
    hf, tok = load_model(model, dt, quantize=quantize_base)
    hf.to(device).eval()
    rows = [{"prompt_ids": encode_prompt(tok, r["prompt"], 128)} for r in bench_prompts(batch_size)]
    batch = PromptCollator(tok.pad_token_id)(rows)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    # No stop tokens anywhere: every engine generates exactly new_tokens per row.
    cfg = SampleConfig(new_tokens, 1.0, 0, 1.0, (), tok.pad_token_id)
    chosen = [e for e in ENGINES if installed(e)] if engine == "all" else [engine]
    results = {}
    if "torch" in chosen:
        results.update(_torch_rows(hf, tok, ids, mask, cfg, repeats))
    if "llamacpp" in chosen:
        results.update(_llamacpp_rows(hf, tok, ids, mask, cfg, repeats, rollout_quant))
    if "vllm" in chosen:
        results.update(_vllm_rows(hf, ids, mask, cfg, repeats))
    # Decode reads every weight once per step, so steps/s x weight bytes cannot pass the rate
    # the memory moves bytes at, measured now in the same process. Prefill is in the timed run,
    # so the fraction is a lower bound on the decode steps' own.
    copy_rate = flops.measure_copy_rate(device)
    for r in results.values():
        r["weight_gb"] = r.pop("weight_bytes") / 1e9
        r["bandwidth_fraction"] = r["tokens_per_s"]["median"] / batch_size * r["weight_gb"] * 1e9 / copy_rate
    out = {"workload": "generate", "model": model, "dtype": str(dt), "quantize_base": quantize_base,
           "batch_size": batch_size, "new_tokens": new_tokens, "engines": list(results), **results,
           "weight_gb": flops.decode_bytes(hf) / 1e9, "copy_gb_per_s": copy_rate / 1e9,
           "peak_mem_gb": peak_memory_bytes(device) / 2**30}
    if "frugal" in results:
        out["ratio"] = results["frugal"]["tokens_per_s"]["median"] / results["hf_generate"]["tokens_per_s"]["median"]
    return out
