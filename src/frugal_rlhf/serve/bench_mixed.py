"""Serving benchmark, mixed lengths: short requests behind and among long ones.

Issue 22's head-of-line case and a mixed workload, each answered by the server with
continuous batching, by the same server with static batches (a batch starts when the last
one ended), and one request at a time by Hugging Face `generate`:

- alone: one short request on an idle server (its unloaded TTFT and latency);
- behind long: a long request starts; when its first token arrives a short one is sent;
- mixed: `requests` requests with Poisson arrivals (`rate` per second), each long with
  probability `long_fraction`, else short (seeded: every mode gets the same arrivals).

Greedy decoding, and the model never ends a turn (its stop tokens are masked out; `generate`
gets min_new_tokens), so every request runs to its max_tokens on every side. Reported:
time to first token (TTFT, from sending), per-token latency (the gaps between a request's
tokens), p50/p99, and completion tokens per second over the mixed run.
"""
from __future__ import annotations

import json
import random
import threading
import time

import torch
from torch import nn

from frugal_rlhf.data.tokenize import stop_tokens
from frugal_rlhf.serve.command import load_for_inference, make_app, model_name_for, run_in_thread
from frugal_rlhf.serve.engine import default_threads

from .bench import PROMPTS, _FirstToken


class NeverStops(nn.Module):
    """The model with its stop tokens masked out: answers run to max_tokens (exact lengths)."""

    def __init__(self, model, stops: tuple[int, ...]):
        super().__init__()
        self.model, self.config, self.stops = model, model.config, list(stops)

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits[..., self.stops] = float("-inf")
        return out


def _stream(url: str, prompt: str, max_tokens: int, sent: float) -> dict:
    """One streaming greedy chat request; times are seconds after `sent` (when it was sent)."""
    import httpx

    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True,
            "temperature": 0}
    stamps = []
    with httpx.Client(base_url=url, timeout=600) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        stamps.append(time.perf_counter() - sent)
    return {"ttft": stamps[0], "total": stamps[-1], "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": max_tokens}


def _arrivals(requests: int, rate: float, long_fraction: float, seed: int) -> list[tuple[float, bool]]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(requests):
        t += rng.expovariate(rate)
        out.append((t, rng.random() < long_fraction))
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)  # ms, nearest rank


def _summary(mode, alone, behind, mixed, elapsed) -> dict:
    short = [r for r in mixed if not r["long"]]
    gaps = [g for r in mixed for g in r["gaps"]]
    return {"mode": mode, "alone_ttft_ms": round(1000 * alone["ttft"], 1),
            "alone_total_ms": round(1000 * alone["total"], 1),
            "behind_long_ttft_ms": round(1000 * behind["ttft"], 1),
            "behind_long_total_ms": round(1000 * behind["total"], 1),
            "short_ttft_p50_ms": _pct([r["ttft"] for r in short], 0.5),
            "short_ttft_p99_ms": _pct([r["ttft"] for r in short], 0.99),
            "ttft_p50_ms": _pct([r["ttft"] for r in mixed], 0.5), "ttft_p99_ms": _pct([r["ttft"] for r in mixed], 0.99),
            "token_p50_ms": _pct(gaps, 0.5), "token_p99_ms": _pct(gaps, 0.99),
            "tokens_per_s": round(sum(r["tokens"] for r in mixed) / elapsed, 1)}


def _served(url: str, mode: str, short: int, long: int, arrivals) -> dict:
    alone = _stream(url, PROMPTS[1], short, time.perf_counter())
    first = threading.Event()
    long_thread = threading.Thread(target=lambda: _stream_until(url, long, first))
    long_thread.start()
    first.wait()
    behind = _stream(url, PROMPTS[1], short, time.perf_counter())
    long_thread.join()
    results, threads, start = [], [], time.perf_counter()

    def client(at: float, is_long: bool, k: int):
        time.sleep(max(0.0, start + at - time.perf_counter()))
        r = _stream(url, PROMPTS[k % len(PROMPTS)], long if is_long else short, time.perf_counter())
        results.append({**r, "long": is_long})

    for k, (at, is_long) in enumerate(arrivals):
        threads.append(threading.Thread(target=client, args=(at, is_long, k)))
        threads[-1].start()
    for t in threads:
        t.join()
    return _summary(mode, alone, behind, results, time.perf_counter() - start)


def _stream_until(url: str, max_tokens: int, first: threading.Event) -> None:
    """The long request: sets `first` when its first token arrives, then reads to the end."""
    import httpx

    body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": max_tokens, "stream": True,
            "temperature": 0}
    with httpx.Client(base_url=url, timeout=600) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if '"content"' in line:
                    first.set()
    first.set()


def _generate(model, tokenizer, prompt: str, max_tokens: int) -> tuple[float, float]:
    """One greedy `generate` -> (seconds to its first token, seconds to its end)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(next(model.parameters()).device)
    t0, streamer = time.perf_counter(), _FirstToken()
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id, streamer=streamer)
    return (streamer.at or time.perf_counter()) - t0, time.perf_counter() - t0


def _one_at_a_time(model, tokenizer, short: int, long: int, arrivals) -> dict:
    """`generate` serving the same arrivals in order, one request at a time (a FIFO queue)."""
    ttft, total = _generate(model, tokenizer, PROMPTS[1], short)
    alone = {"ttft": ttft, "total": total}
    long_ttft, long_total = _generate(model, tokenizer, PROMPTS[0], long)  # the short one arrives at its first token
    ttft, total = _generate(model, tokenizer, PROMPTS[1], short)
    behind = {"ttft": long_total - long_ttft + ttft, "total": long_total - long_ttft + total}
    results, start = [], time.perf_counter()
    for k, (at, is_long) in enumerate(arrivals):
        time.sleep(max(0.0, start + at - time.perf_counter()))
        n = long if is_long else short
        began = time.perf_counter()
        ttft, total = _generate(model, tokenizer, PROMPTS[k % len(PROMPTS)], n)
        waited = began - (start + at)
        # Per-token latency without a streamer per token: the mean gap after the first token.
        gap = (total - ttft) / max(1, n - 1)
        results.append({"ttft": waited + ttft, "gaps": [gap] * (n - 1), "tokens": n, "long": is_long})
    return _summary("generate, one at a time", alone, behind, results, time.perf_counter() - start)


def bench_serve_mixed(spec: str = "default", short: int = 5, long: int = 250, requests: int = 16,
                      rate: float = 1.0, long_fraction: float = 0.25, max_batch: int = 8, dtype: str = "auto",
                      threads: int | None = None, seed: int = 0) -> dict:
    threads = threads or default_threads()
    model, tokenizer = load_for_inference(spec, dtype)
    served = NeverStops(model, stop_tokens(tokenizer, model)).eval()
    arrivals = _arrivals(requests, rate, long_fraction, seed)
    rows = []
    for mode, continuous in (("continuous batching", True), ("static batches", False)):
        live = run_in_thread(make_app(served, tokenizer, model_name_for(spec), max_batch=max_batch,
                                      max_queue=max(64, requests), threads=threads, continuous=continuous))
        try:
            _stream(live.url, PROMPTS[2], 4, time.perf_counter())  # warm-up: first-call allocations
            rows.append(_served(live.url, mode, short, long, arrivals))
        finally:
            live.stop()
    torch.set_num_threads(threads)  # the baseline runs on this thread: same thread count
    rows.append(_one_at_a_time(model, tokenizer, short, long, arrivals))
    return {"model": spec, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "settings": {"short": short, "long": long, "requests": requests, "rate": rate,
                         "long_fraction": long_fraction, "max_batch": max_batch, "threads": threads, "seed": seed},
            "rows": rows}


COLUMNS = ["mode", "alone_ttft_ms", "behind_long_ttft_ms", "behind_long_total_ms", "short_ttft_p50_ms",
           "short_ttft_p99_ms", "ttft_p50_ms", "ttft_p99_ms", "token_p50_ms", "token_p99_ms", "tokens_per_s"]


def format_table(result: dict) -> str:
    lines = [" | ".join(COLUMNS), " | ".join("---" for _ in COLUMNS)]
    lines += [" | ".join(str(row[c]) for c in COLUMNS) for row in result["rows"]]
    return "\n".join(lines)
