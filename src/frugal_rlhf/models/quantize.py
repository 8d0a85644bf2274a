"""A quantized frozen base (QLoRA): the base's linear layers stored as int8, NF4 or int4 codes,
dequantized one layer at a time into the compute dtype when they run; LoRA adapters and heads
stay as they are (fp32 master weights). Every role shares the base, so the saving counts four
times in PPO.

Formats (bytes per weight element, the scales included):
  int8  per output row: scale = max|w_row| / 127, code = round(w / scale); 1 + 4/in_features B.
        Rounding error <= scale / 2.
  nf4   blocks of 64 consecutive elements: absmax per block, each element the nearest of the
        16 NormalFloat levels (QLoRA, Dettmers et al. 2023: quantiles of a normal distribution,
        exact 0 and +-1) times the absmax; two codes per byte; 0.5 + 4/64 = 0.5625 B.
  int4  blocks of 64: the levels k/7 for k = -7..7 times the absmax (symmetric, exact 0);
        0.5625 B. Rounding error <= absmax / 14.

Plain PyTorch, so it runs wherever torch runs (CPU, CUDA) and needs no kernel package; the
choice against bitsandbytes and torchao is measured in docs/quantization.md. The output layer
(LM head) and the embeddings stay in the compute dtype: the chunked log-prob computation
reads the head's weight directly (roles.token_logprobs), and QLoRA keeps them unquantized too.

Memory: the forward never keeps a dequantized weight for backward. `_DequantLinear` saves only
the layer and dequantizes again in backward, so at most one layer's dense weight exists at a
time (plus the one autograd is using).
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

from ..device import fused_int8_matmul, release_free_memory

log = logging.getLogger("frugal_rlhf")

FORMATS = ("none", "int8", "nf4", "int4")
BLOCK = 64  # elements per absmax block (nf4, int4): QLoRA's choice

NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
# Code 0 (-8/7) lies outside [-1, 1] and is never the nearest level: 15 levels in use, 0 exact.
INT4_LEVELS = tuple((k - 8) / 7 for k in range(16))
LEVELS = {"nf4": NF4_LEVELS, "int4": INT4_LEVELS}


def bytes_per_weight(fmt: str, in_features: int) -> float:
    """Stored bytes per element of a quantized linear weight, its scales included (the table
    in this module's docstring)."""
    return 1 + 4 / in_features if fmt == "int8" else 0.5 + 4 / BLOCK


def check_format(fmt: str, lora_rank: int | None = None) -> str:
    """The format, checked; with `lora_rank` (a trained base's config) also that there is an
    adapter to train: a quantized base is frozen."""
    if fmt not in FORMATS:
        raise ValueError(f"quantize_base: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt != "none" and lora_rank == 0:
        raise ValueError(f"quantize_base {fmt} needs LoRA (--lora-rank > 0): a quantized base is frozen, "
                         "full fine-tuning cannot train it")
    return fmt


def _pair_table(levels: torch.Tensor) -> torch.Tensor:
    """[256] int64: the two fp32 levels a packed byte holds (high nibble first), bit-cast to one
    int64, so dequantizing is one 1-D index_select per byte (measured ~2x faster on CPU than
    selecting [256, 2] rows)."""
    codes = torch.arange(256)
    return torch.stack([levels[codes >> 4], levels[codes & 15]], dim=-1).float().contiguous().view(torch.int64).view(-1)


def quantize_weight(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of a 2-D weight. The work is done in fp32 on w's device."""
    w = w.detach().float()
    if fmt == "int8":
        scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale
    flat = w.reshape(-1)
    pad = -flat.numel() % BLOCK
    blocks = F.pad(flat, (0, pad)).view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    levels = torch.tensor(LEVELS[fmt], device=w.device)
    midpoints = (levels[1:] + levels[:-1]) / 2  # nearest level = the number of midpoints below the value
    codes = torch.bucketize(blocks / absmax[:, None], midpoints, out_int32=True).to(torch.uint8).view(-1, 2)
    return (codes[:, 0] << 4) | codes[:, 1], absmax


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, fmt: str, shape, dtype) -> torch.Tensor:
    """The dense [out, in] weight in `dtype` (the scale multiplied in fp32, then rounded once)."""
    if fmt == "int8":
        return (codes.float() * scales[:, None]).to(dtype)
    table = _pair_table(torch.tensor(LEVELS[fmt])).to(codes.device)
    values = table.index_select(0, codes.int()).view(torch.float32).view(-1, BLOCK).mul_(scales[:, None])
    return values.view(-1)[: shape[0] * shape[1]].view(shape).to(dtype)


class _DequantLinear(torch.autograd.Function):
    """x @ W^T with W made dense in forward and again in backward: nothing dense is saved."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        if layer.fmt == "int8" and fused_int8_matmul(x.device, x.dtype):
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            y = torch._weight_int8pack_mm(flat, layer.qweight, layer.scales.to(x.dtype))
            return y.view(*x.shape[:-1], layer.out_features)
        w, scale = layer.dense(x.dtype)
        y = F.linear(x, w)
        return y if scale is None else y * scale

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None
        w, scale = ctx.layer.dense(grad.dtype)
        return (grad if scale is None else grad * scale) @ w, None


class QuantizedLinear(nn.Linear):
    """A frozen nn.Linear whose weight is stored quantized (buffers: no parameter to train).
    A subclass of nn.Linear so that peft's LoRA (target "all-linear") wraps it like any linear."""

    def __init__(self, in_features: int, out_features: int, fmt: str, codes, scales, bias=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        # No dense weight. peft reads `weight` (None: not a sharded DTensor) and then `qweight`,
        # whose integer dtype tells it to leave the adapters' fp32 alone.
        self.register_parameter("weight", None)
        self.register_buffer("qweight", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_weight(cls, weight: torch.Tensor, fmt: str, bias=None):
        codes, scales = quantize_weight(weight, fmt)
        return cls(weight.shape[1], weight.shape[0], fmt, codes, scales, bias)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_weight(self.qweight, self.scales, self.fmt, (self.out_features, self.in_features), dtype)

    def dense(self, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, None), or for int8 (codes, per-row scale) with W = codes * scale: the scale is
        applied to the output instead (exact integers |q| <= 127 in any float dtype, and one
        multiplication per output element instead of one per weight element)."""
        if self.fmt == "int8":
            return self.qweight.to(dtype), self.scales.to(dtype)
        return self.dequantize(dtype), None

    def _apply(self, fn, recurse=True):
        # model.to(bf16) must not round the scales: keep them fp32 whatever the module is cast to.
        scales = self.scales
        super()._apply(fn, recurse)
        self.scales = scales.to(self.qweight.device)
        return self

    def forward(self, x):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            y = _DequantLinear.apply(x.to(dtype), self)
            return y if self.bias is None else y + self.bias.to(dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}"


def layers_to_quantize(model: nn.Module):
    """(parent, name, linear) for every nn.Linear of the model except its output layer."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child is not head:
                yield parent, name, child


@torch.no_grad()
def quantize_model(model: nn.Module, fmt: str) -> nn.Module:
    """Replace the model's linear layers (not its output layer) by QuantizedLinear, in place,
    one at a time: each dense weight is freed as soon as its codes exist. Returns the model."""
    if check_format(fmt) == "none":
        return model
    before = after = 0
    for parent, name, linear in layers_to_quantize(model):
        q = QuantizedLinear.from_weight(linear.weight, fmt, linear.bias)
        before += linear.weight.numel() * linear.weight.element_size()
        after += q.qweight.numel() + q.scales.numel() * 4
        setattr(parent, name, q)
    if not before:
        raise ValueError(f"quantize_base {fmt}: {type(model).__name__} has no nn.Linear layer to quantize "
                         "(GPT-2's Conv1D layers are not supported)")
    model.requires_grad_(False)
    # The dense weights are freed, but the C heap keeps their pages: on the embedded default the
    # process held 1147 MB after quantizing and 533 MB after this (measured, nf4).
    release_free_memory()
    log.info("base quantized to %s: linear weights %.1f MiB -> %.1f MiB", fmt, before / 2**20, after / 2**20)
    return model


def random_quantized_linear(linear: nn.Linear, fmt: str, std: float, generator, dtype) -> QuantizedLinear:
    """A QuantizedLinear of `linear`'s shape (a meta-device module is fine) holding random
    normal(0, std) weights: built and quantized row blocks at a time into preallocated codes,
    so a dummy model of any size never exists densely (benchmarks: what the cost depends on is
    shapes, not values)."""
    out_f, in_f = linear.out_features, linear.in_features
    rows = max(1, min(out_f, (1 << 22) // in_f))  # ~16 MiB of fp32 at a time
    if fmt == "int8":
        codes, scales = torch.empty(out_f, in_f, dtype=torch.int8), torch.empty(out_f)
    else:
        while rows * in_f % BLOCK and rows < out_f:  # blocks must not straddle two pieces
            rows += 1
        blocks = -(-out_f * in_f // BLOCK)
        codes, scales = torch.empty(blocks * BLOCK // 2, dtype=torch.uint8), torch.empty(blocks)
    for start in range(0, out_f, rows):
        piece = torch.empty(min(rows, out_f - start), in_f).normal_(0.0, std, generator=generator)
        c, s = quantize_weight(piece, fmt)
        if fmt == "int8":
            codes[start:start + len(piece)], scales[start:start + len(piece)] = c, s
        else:
            first = start * in_f // BLOCK
            codes[first * BLOCK // 2:first * BLOCK // 2 + c.numel()], scales[first:first + s.numel()] = c, s
        del piece, c, s
        release_free_memory()  # the pieces' temporaries, or the heap grows 2.5x the model (measured)
    bias = None if linear.bias is None else torch.zeros(out_f, dtype=dtype)
    return QuantizedLinear(in_f, out_f, fmt, codes, scales, bias)


def quantize_base(model: nn.Module) -> str:
    """The format a model's linear layers are stored in ("none": dense)."""
    return next((m.fmt for m in model.modules() if isinstance(m, QuantizedLinear)), "none")
