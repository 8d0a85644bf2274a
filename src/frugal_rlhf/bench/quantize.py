"""`frugal bench quantize`: what a quantized base (models/quantize.py) costs in accuracy and in
speed on this machine. Per format: the quantized model's agreement with the fp32 model (mean
KL(fp32 || quantized) per token and top-1 agreement, both computed in fp32 so only the weights'
rounding differs) on held-out text, the bytes of its linear weights, and the throughput of one
linear layer of the model's MLP shape against the dense layer in fp32 and bf16, at a decoding
batch (8 tokens) and a training batch (512 tokens)."""
from __future__ import annotations

import time

import torch
from torch.nn import functional as F

from ..data.formats import load_dataset_file
from ..data.tokenize import encode_conversation
from ..models.loading import load_config, load_model
from ..models.quantize import FORMATS, QuantizedLinear
from .common import stats

TOKENS = (8, 512)


def _texts(tok, n: int, max_length: int):
    try:
        rows = load_dataset_file("sharegpt", "sft", limit=n)
    except FileNotFoundError:  # the demo data is not installed: plain sentences
        rows = [{"messages": [{"role": "user", "content": f"Tell me about topic number {i}."},
                              {"role": "assistant", "content": "It is a topic. " * 20}]} for i in range(n)]
    return [torch.tensor(encode_conversation(tok, r["messages"], max_length)["input_ids"]) for r in rows]


@torch.no_grad()
def agreement(model: str, texts: int = 16, max_length: int = 256) -> dict:
    dense, tok = load_model(model, torch.float32)
    seqs = _texts(tok, texts, max_length)
    ref = [F.log_softmax(dense.eval()(s[None]).logits[0].float(), -1) for s in seqs]
    del dense
    out = {}
    for fmt in FORMATS[1:]:
        q, _ = load_model(model, torch.float32, quantize=fmt)
        kl, top1, n = 0.0, 0, 0
        for s, p in zip(seqs, ref):
            lq = F.log_softmax(q.eval()(s[None]).logits[0].float(), -1)
            kl += float((p.exp() * (p - lq)).sum())
            top1 += int((p.argmax(-1) == lq.argmax(-1)).sum())
            n += len(s)
        linear = [m for m in q.modules() if isinstance(m, QuantizedLinear)]
        stored = sum(m.qweight.numel() * m.qweight.element_size() + m.scales.numel() * 4 for m in linear)
        out[fmt] = {"mean_kl": kl / n, "top1_agreement": top1 / n, "tokens": n,
                    "linear_bytes": stored, "linear_bytes_fp32": sum(m.in_features * m.out_features * 4 for m in linear)}
        del q
    return out


def _time(fn, repeats: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return stats(times)


@torch.no_grad()
def throughput(in_features: int, out_features: int, repeats: int = 3) -> list[dict]:
    """GFLOP/s of one linear layer's forward: dense fp32 and bf16, and each quantized format
    computing in fp32 and in bf16."""
    w = torch.randn(out_features, in_features) * 0.02
    layers = {"dense": None, **{fmt: QuantizedLinear.from_weight(w, fmt) for fmt in FORMATS[1:]}}
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        wd = w.to(dtype)
        for tokens in TOKENS:
            x = torch.randn(tokens, in_features, dtype=dtype)
            for name, layer in layers.items():
                fn = (lambda: F.linear(x, wd)) if layer is None else (lambda layer=layer: layer(x))
                t = _time(fn, repeats)
                rows.append({"weights": name, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
                             "gflops": 2 * tokens * in_features * out_features / t["median"] / 1e9, "seconds": t})
    return rows


def bench_quantize(model="default", repeats=3, max_length=256, **_):
    text = load_config(model).get_text_config()
    return {"workload": "quantize", "model": model, "threads": torch.get_num_threads(),
            "agreement": agreement(model, max_length=max_length),
            "layer": [text.hidden_size, text.intermediate_size],
            "throughput": throughput(text.hidden_size, text.intermediate_size, repeats)}


def format_table(r) -> str:
    lines = [f"model {r['model']}: quantized base against fp32 ({next(iter(r['agreement'].values()))['tokens']} "
             "tokens of held-out text)", "| format | mean KL per token | top-1 agreement | linear weights |",
             "|---|---|---|---|"]
    for fmt, a in r["agreement"].items():
        lines.append(f"| {fmt} | {a['mean_kl']:.5f} | {a['top1_agreement']:.4f} | "
                     f"{a['linear_bytes'] / 2**20:.1f} MiB ({a['linear_bytes'] / a['linear_bytes_fp32']:.3f} of fp32) |")
    h, i = r["layer"]
    lines += ["", f"one linear layer {h} -> {i}, forward, {r['threads']} threads: GFLOP/s (median of the repeats)",
              "| weights | compute | " + " | ".join(f"{t} tokens" for t in TOKENS) + " |",
              "|---|---|" + "---|" * len(TOKENS)]
    keys = dict.fromkeys((row["weights"], row["dtype"]) for row in r["throughput"])
    for w, d in keys:
        cells = [f"{row['gflops']:.1f}" for row in r["throughput"] if (row["weights"], row["dtype"]) == (w, d)]
        lines.append(f"| {w} | {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
