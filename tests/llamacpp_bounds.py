"""How far llama.cpp's numbers may be from ours on the same weights, from the formats' math.

llama.cpp (CPU) multiplies a weight stored in a format by the input activations converted to
that format's partner type first (ggml's `vec_dot_type`): f16 weights take f16 activations
(each rounded to nearest, |dx| <= 2^-11 |x|, plus 2^-25 below f16's normal range); q8_0 and
q4_0 weights take q8_0 activations (blocks of 32, q = round(x / d), d = amax / 127 stored in
f16: |dx| <= d (1/2 + 127 * 2^-11), as tests/test_gguf_export.py derives for q8_0 weights).
Everything else it computes in f32 (the engine keeps its KV cache in f32 for f16 weights; a
LoRA adapter is written in f32). To first order, an output y then moves by at most
sum over every such input x of |dy/dx| * bound(x): the worst case with every error aligned.
Tests allow twice that, room for the second-order terms (smaller by the relative error) and
for f32 sums taken in another order (relative 2^-24 per term, far below the bound).
"""
from __future__ import annotations

import torch
from torch import nn

BLOCK = 32


def input_bound(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """The largest rounding llama.cpp may apply to each element of a matmul input `x`."""
    x = x.detach().abs()
    if fmt == "f16" or x.shape[-1] % BLOCK:  # rows that do not split into blocks stay f16 (gguf_writer)
        return x * 2.0**-11 + 2.0**-25
    amax = x.reshape(*x.shape[:-1], -1, BLOCK).amax(-1, keepdim=True)
    d = amax / 127 * (0.5 + 127 * 2.0**-11)
    return d.expand(*d.shape[:-1], BLOCK).reshape(x.shape)


def rounded_matmuls(model) -> list[nn.Linear]:
    """The linear layers whose weights are written in the GGUF base (not a LoRA adapter's A, B)."""
    return [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".lora_" not in name]


class Inputs:
    """Records the input of every base matmul during a forward with gradients."""

    def __init__(self, model):
        self.seen: list[torch.Tensor] = []
        self.hooks = [m.register_forward_pre_hook(lambda _, args: self.seen.append(args[0]))
                      for m in rounded_matmuls(model)]

    def bound(self, y: torch.Tensor, fmt: str) -> float:
        """First-order worst case of the scalar `y` under the rounding of every recorded input."""
        grads = torch.autograd.grad(y, self.seen, retain_graph=True, allow_unused=True)
        return sum(float((g.abs() * input_bound(x, fmt)).sum()) for g, x in zip(grads, self.seen) if g is not None)

    def remove(self):
        for h in self.hooks:
            h.remove()


def greedy_bounds(model, prompt: list[int], answer: list[int], fmt: str):
    """For each answer token t (greedy under `model` in fp32): the model's log-prob of t, the
    margin of its top logit over the runner-up, and twice the first-order bounds of both."""
    ids = torch.tensor([prompt + answer])
    inputs = Inputs(model)
    try:
        with torch.enable_grad():
            # Embeddings that require grad make every matmul input part of the graph, frozen weights or not.
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
            logits = model(inputs_embeds=embeds).logits[0, len(prompt) - 1:-1].float()
            out = []
            for step, t in enumerate(answer):
                z = logits[step]
                top2 = z.topk(2).values
                logp = z[t] - torch.logsumexp(z, -1)
                out.append((logp.item(), (top2[0] - top2[1]).item(), 2 * inputs.bound(logp, fmt),
                            2 * inputs.bound(top2[0] - top2[1], fmt)))
    finally:
        inputs.remove()
    return out


def assert_greedy_agrees(model, prompt, ours: list[int], theirs: list[int], their_logprobs, fmt: str) -> int:
    """llama.cpp's greedy answer (`theirs`, with its log-probs) against ours on the same weights:
    equal tokens with log-probs within the rounding bound, up to a step where the tokens differ,
    which is allowed only where our top-2 margin is within the bound (either token may win
    there, and the answers part). Returns the number of equal steps compared."""
    steps = 0
    for step, (logp, margin, logp_bound, margin_bound) in enumerate(greedy_bounds(model, prompt, ours, fmt)):
        if step >= len(theirs):
            break
        if theirs[step] != ours[step]:
            assert margin <= margin_bound, (step, theirs, ours, margin, margin_bound)
            break
        assert abs(their_logprobs[step] - logp) <= logp_bound, (step, their_logprobs[step], logp, logp_bound)
        steps += 1
    return steps


def llama_greedy(path, prompt: list[int], n: int, eos: tuple[int, ...] = ()):
    """llama.cpp's greedy answer to `prompt` from the GGUF file at `path` (KV cache in f32: the
    only rounding is the matmul inputs'), with its log-probs: our engine's decode batch and loop."""
    from frugal_rlhf.generation import SampleConfig
    from frugal_rlhf.generation.llamacpp import LlamaBatch, LlamaModel
    from frugal_rlhf.generation.rollout import decode_loop

    llm = LlamaModel(path, "f32")
    try:
        ids = torch.tensor([prompt])
        ctx = llm.context(1, len(prompt) + n)
        batch = []
        ro = decode_loop(lambda slots: batch.append(LlamaBatch(llm, ctx, len(prompt))) or batch[-1], ids,
                         torch.ones_like(ids), SampleConfig(n, 0.0, 0, 1.0, eos, 0))
        for b in batch:
            b.free()
    finally:
        llm.free()
    keep = ro.action_mask[0].bool()
    return ro.sequences[0, len(prompt):][keep].tolist(), ro.logprobs[0][keep].tolist()
