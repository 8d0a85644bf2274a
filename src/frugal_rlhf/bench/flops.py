"""Model FLOPs of each stage, and the device's measured peak, for TFLOPS and MFU in `frugal bench`.

Counting rules (model FLOPs: the work the algorithm needs, not what a kernel happened to do):

- a matmul of n input rows with a [k, m] weight costs 2*n*k*m;
- attention costs, per layer, 2*2*width per (query, key) pair (scores, then the weighted sum of
  values), width = heads * head_dim; a causal sequence of s tokens has s(s+1)/2 pairs, so
  kernels that also compute the masked half do work that is not counted;
- backward: gradients w.r.t. activations cost what the forward did, gradients w.r.t. weights
  the same again but only for trainable weights (a LoRA-frozen base gets none); attention's
  backward is twice its forward;
- activation recomputation (gradient checkpointing) is not counted: MFU measures useful work;
- the embedding lookup is free; the LM head is counted only at positions where it is applied
  (our log-prob and sampling code applies it only to response positions).

Known small overcount under LoRA: the first block's projections of the (frozen) embeddings need
no input gradient; the formula charges one anyway (< 1/layers of those projections).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Shape:
    body: int        # matmul weights applied to every token in the transformer blocks
    head: int        # LM-head weights (hidden x vocab)
    layers: int
    attn_width: int  # heads * head_dim


def _is_matmul(module) -> bool:
    # transformers' Conv1D (GPT-2) is a Linear with a transposed weight.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _numel(t) -> int:
    # DeepSpeed ZeRO-3 leaves each rank an empty placeholder and records the full size.
    return getattr(t, "ds_numel", None) or t.numel()


def shape_of(model) -> Shape:
    """Shape of a Hugging Face causal LM, LoRA adapters excluded (see `lora_params`)."""
    head = model.get_output_embeddings()
    # a quantized base layer (models/quantize.py) has no dense weight: its shape counts
    body = sum(_numel(m.weight) if m.weight is not None else m.in_features * m.out_features
               for name, m in model.named_modules() if _is_matmul(m) and m is not head and "lora_" not in name)
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Shape(body, _numel(head.weight), cfg.num_hidden_layers, cfg.num_attention_heads * head_dim)


def lora_params(model, adapter: str) -> int:
    """Per-token matmul weights of one LoRA adapter (its A and B matrices)."""
    return sum(_numel(p) for name, p in model.named_parameters(remove_duplicate=False)
               if (f"lora_A.{adapter}." in name or f"lora_B.{adapter}." in name))


def attention_flops(shape: Shape, seqs: float, seq_len: float, causal: bool = True) -> float:
    pairs = seq_len * (seq_len + 1) / 2 if causal else seq_len * seq_len
    return 4 * shape.layers * shape.attn_width * seqs * pairs


def forward_flops(shape: Shape, seqs: float, seq_len: float, head_tokens: float, lora: int = 0,
                  causal: bool = True) -> float:
    """One forward of `seqs` sequences of `seq_len` tokens, LM head on `head_tokens` of them."""
    return (2 * (shape.body + lora) * seqs * seq_len + 2 * shape.head * seqs * head_tokens
            + attention_flops(shape, seqs, seq_len, causal))


def train_flops(shape: Shape, seqs: float, seq_len: float, head_tokens: float, lora: int = 0,
                full: bool = False, causal: bool = True) -> float:
    """Forward + backward. full: every base weight trains; else only the `lora` weights do."""
    base = forward_flops(shape, seqs, seq_len, head_tokens, 0, causal) - attention_flops(shape, seqs, seq_len, causal)
    return ((3 if full else 2) * base + 3 * attention_flops(shape, seqs, seq_len, causal)
            + 3 * 2 * lora * seqs * seq_len)


def ppo_step_flops(shape: Shape, samples: int, prompt_len: float, response_len: float, ppo_epochs: int,
                   actor_lora: int = 0, critic_lora: int = 0, reward_lora: int = 0, full: bool = False,
                   critic: bool = True) -> float:
    """One PPO step on `samples` rollouts: generation, the four experience forwards (actor
    log-probs, reference, critic values, reward) and `ppo_epochs` of actor + critic training.
    critic=False: GRPO, whose step has no critic forward or training."""
    seq = prompt_len + response_len
    # Prefill feeds the prompt, each decode step one token; the last sampled token is never fed.
    gen = forward_flops(shape, samples, seq - 1, response_len, actor_lora)
    experience = (forward_flops(shape, samples, seq, response_len, actor_lora)       # old log-probs
                  + forward_flops(shape, samples, seq, response_len)                # reference
                  + critic * forward_flops(shape, samples, seq, 0, critic_lora)     # values
                  + forward_flops(shape, samples, seq, 0, reward_lora))             # reward
    update = ppo_epochs * (train_flops(shape, samples, seq, response_len, actor_lora, full)
                           + critic * train_flops(shape, samples, seq, 0, critic_lora, full))
    return gen + experience + update


def _best_seconds(device, fn, repeats: int) -> float:
    """The shortest of `repeats` timed calls of fn after one untimed one (warm-up, first touch
    of the pages): a device's peak is what it can do, the best reading, not the median."""
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return min(times)


def measure_peak_tflops(device, dtype, n: int = 2048, repeats: int = 10) -> float:
    """The device's matmul throughput measured now, in the given dtype: MFU's denominator.
    The best of the repeats, not their median: a peak is what the device can do, and on a
    small shared machine a median reading sank to 0.08 from 0.13 TFLOPS, inflating MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / _best_seconds(device, lambda: a @ b, repeats) / 1e12


def measure_copy_rate(device, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes the device's memory moves per second (read + written) copying a buffer far larger
    than any cache, the best of the repeats: the bound of a step that reads every weight once."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_seconds(device, lambda: dst.copy_(src), repeats)


def decode_bytes(model) -> int:
    """Bytes one decode step must read: every weight once (a tied LM head counted once), but of
    an untied input embedding only the batch's rows, which are negligible."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or emb.weight.data_ptr() != head.weight.data_ptr():
        seen.pop(emb.weight.data_ptr(), None)
    return sum(seen.values())
