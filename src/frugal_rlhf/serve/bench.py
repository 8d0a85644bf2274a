"""Serving benchmark: the batching server under concurrent clients vs one-at-a-time generate.

`bench_serve` starts the server in-process on a free loopback port, runs `concurrency`
client threads that each send `requests_per_client` streaming chat requests, and measures
requests/s, completion tokens/s and the median time to first token (TTFT, from sending
the request to the first content chunk). The baseline answers the same number of
requests one after another with Hugging Face `model.generate` (TTFT measured with a
streamer, so it excludes queueing: it is the best case a lone client sees).
"""
from __future__ import annotations

import json
import statistics
import threading
import time

import torch

from frugal_rlhf.serve.command import load_for_inference, make_app, model_name_for, run_in_thread
from frugal_rlhf.serve.engine import default_threads

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion briefly.",
           "Name three colours.", "How do plants make food?", "Give me a tip for learning to code."]


def _stream_one(client, prompt: str, max_tokens: int, seed: int) -> tuple[float, float, int]:
    """One streaming chat request -> (ttft seconds, total seconds, completion tokens)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True,
            "temperature": 0.7, "seed": seed, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
    total = time.perf_counter() - start
    return (ttft if ttft is not None else total), total, tokens


def _served_row(url: str, concurrency: int, requests_per_client: int, max_tokens: int) -> dict:
    import httpx

    results, errors = [], []
    lock = threading.Lock()

    def client_thread(index: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            for k in range(requests_per_client):
                try:
                    r = _stream_one(client, PROMPTS[(index + k) % len(PROMPTS)], max_tokens, index * 1000 + k)
                except Exception as err:  # counted, not fatal: the table says how many failed
                    with lock:
                        errors.append(repr(err))
                    continue
                with lock:
                    results.append(r)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return _row(f"server x{concurrency}", concurrency, elapsed, [r[0] for r in results],
                sum(r[2] for r in results), len(results), len(errors))


def _row(mode, concurrency, elapsed, ttfts, tokens, done, failed=0) -> dict:
    return {"mode": mode, "concurrency": concurrency, "requests": done, "failed": failed,
            "seconds": round(elapsed, 3), "requests_per_s": round(done / elapsed, 3),
            "tokens_per_s": round(tokens / elapsed, 1),
            "ttft_median_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None}


class _FirstToken:
    """A generate() streamer that notes when the first new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.puts, self.at = 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2 and self.at is None:
            self.at = time.perf_counter()

    def end(self):
        pass


def _baseline_row(model, tokenizer, n_requests: int, max_tokens: int) -> dict:
    device = next(model.parameters()).device
    ttfts, tokens = [], 0
    start = time.perf_counter()
    for k in range(n_requests):
        text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(device)
        t0, streamer = time.perf_counter(), _FirstToken()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=True, temperature=0.7,
                                 pad_token_id=tokenizer.pad_token_id, streamer=streamer)
        ttfts.append((streamer.at or time.perf_counter()) - t0)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        tokens += len([t for t in new if t != tokenizer.pad_token_id and t != tokenizer.eos_token_id])
    return _row("generate, one at a time", 1, time.perf_counter() - start, ttfts, tokens, n_requests)


def bench_serve(spec: str = "tiny-llama", concurrencies=(1, 4, 16), requests_per_client: int = 4,
                max_tokens: int = 64, max_batch: int = 8, dtype: str = "auto", threads: int | None = None) -> dict:
    """Run the benchmark; returns {"model", "settings", "rows": [...]} (see format_table)."""
    threads = threads or default_threads()  # the server's default; the baseline gets the same
    model, tokenizer = load_for_inference(spec, dtype)
    live = run_in_thread(make_app(model, tokenizer, model_name_for(spec), max_batch=max_batch,
                                  max_queue=max(64, max(concurrencies)), threads=threads))
    try:
        _served_row(live.url, 1, 1, 4)  # warm-up: first-call allocations are not throughput
        rows = [_served_row(live.url, c, requests_per_client, max_tokens) for c in concurrencies]
    finally:
        live.stop()
    n_baseline = max(c * requests_per_client for c in concurrencies)
    torch.set_num_threads(threads)  # the baseline runs on this thread: same thread count
    rows.append(_baseline_row(model, tokenizer, n_baseline, max_tokens))
    return {"model": spec, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "settings": {"requests_per_client": requests_per_client, "max_tokens": max_tokens,
                         "max_batch": max_batch, "threads": threads},
            "rows": rows}


def format_table(result: dict) -> str:
    cols = ["mode", "requests", "failed", "seconds", "requests_per_s", "tokens_per_s", "ttft_median_ms"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(str(row[c]) for c in cols) for row in result["rows"]]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="benchmark frugal serve against one-at-a-time generate")
    parser.add_argument("model", nargs="?", default="tiny-llama")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    result = bench_serve(args.model, tuple(args.concurrency), args.requests_per_client, args.max_tokens,
                         dtype=args.dtype, threads=args.threads)
    print(f"model {result['model']} ({result['dtype']}), {result['settings']}")
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
