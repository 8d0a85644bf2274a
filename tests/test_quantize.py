"""The quantized frozen base (models/quantize.py): rounding within each format's bound, the
quantized model equal to a dense model holding the de-quantized weights, gradients through a
quantized layer, nothing dense kept for backward, a dummy model built without its dense form."""
import pytest
import torch
from torch.nn import functional as F

from frugal_rlhf.models.loading import load_model
from frugal_rlhf.models.quantize import (BLOCK, NF4_LEVELS, QuantizedLinear, check_format, dequantize_weight,
                                         quantize_weight)

EPS = torch.finfo(torch.float32).eps


def rounding_bound(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Per-element bound on |dequantized - w|: half the widest gap between neighbouring levels,
    times the scale of the element's row (int8) or block (nf4, int4), plus fp32 rounding."""
    if fmt == "int8":  # levels k * max|row| / 127: half a step
        return (w.abs().amax(1, keepdim=True) / 127 / 2 * (1 + 4 * EPS)).expand_as(w)
    levels = torch.tensor(NF4_LEVELS) if fmt == "nf4" else torch.arange(-7, 8) / 7
    half_gap = float((levels[1:] - levels[:-1]).max()) / 2
    absmax = w.reshape(-1, BLOCK).abs().amax(1, keepdim=True)
    return (absmax * (half_gap * (1 + 4 * EPS) + 2 * EPS)).expand(-1, BLOCK).reshape(w.shape)


@pytest.mark.parametrize("fmt", ["int8", "nf4", "int4"])
def test_rounding_stays_within_the_formats_step(fmt):
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.05
    w[3, 5] = 1.0  # an outlier: only its own row (int8) or block (nf4, int4) gets a coarser step
    codes, scales = quantize_weight(w, fmt)
    back = dequantize_weight(codes, scales, fmt, w.shape, torch.float32)
    assert ((back - w).abs() <= rounding_bound(w, fmt)).all()
    # the storage: int8 one byte and a row scale; nf4/int4 two codes a byte and a block absmax
    assert codes.numel() * codes.element_size() == (w.numel() if fmt == "int8" else w.numel() // 2)
    assert scales.numel() == (w.shape[0] if fmt == "int8" else w.numel() // BLOCK)
    # values already on the grid come back exactly (0 and the scale's own element included)
    again = dequantize_weight(*quantize_weight(back, fmt), fmt, w.shape, torch.float32)
    torch.testing.assert_close(again, back, atol=0, rtol=4 * EPS)


def test_weights_not_a_multiple_of_the_block_round_trip():
    w = torch.randn(7, 9)  # 63 elements: one padded block
    codes, scales = quantize_weight(w, "nf4")
    back = dequantize_weight(codes, scales, "nf4", w.shape, torch.float32)
    assert back.shape == w.shape
    assert ((back - w).abs() <= w.abs().max() * (0.1520 + 4 * EPS)).all()  # NF4's widest half-gap: 0.152


@pytest.mark.parametrize("fmt", ["int8", "nf4", "int4"])
def test_quantized_layer_equals_the_dense_layer_of_its_dequantized_weight(fmt):
    """Forward and backward of QuantizedLinear against plain autograd through F.linear on the
    de-quantized weight (an independent path): equal to fp32 reordering (K=128 terms a dot)."""
    torch.manual_seed(1)
    w, b = torch.randn(64, 128) * 0.1, torch.randn(64)
    layer = QuantizedLinear.from_weight(w, fmt, b)
    dense = layer.dequantize(torch.float32)
    x = torch.randn(3, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), F.linear(x_ref, dense, b)
    tol = 128 * EPS * float(y_ref.detach().abs().max())
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=128 * EPS)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=64 * EPS * float(x_ref.grad.abs().max()), rtol=64 * EPS)
    assert not any(p.requires_grad for p in layer.parameters())


def test_backward_keeps_no_dense_weight():
    """What autograd saves for a quantized layer: the input, never a weight-sized tensor."""
    layer = QuantizedLinear.from_weight(torch.randn(256, 512), "nf4")
    saved = []
    x = torch.randn(2, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        layer(x).sum().backward()
    assert all(n < 256 * 512 for n in saved)


@pytest.mark.parametrize("fmt", ["int8", "nf4", "int4"])
def test_quantized_model_equals_a_dense_model_holding_its_dequantized_weights(fmt):
    """The whole tiny model: the quantized base's logits are those of the fp32 model whose
    linear weights were replaced by their de-quantized values (up to fp32 reordering over
    8 matmul layers of up to 384 terms), and the agreement with the unquantized model is
    reported by `frugal bench quantize` (docs/quantization.md), not asserted here."""
    q, _ = load_model("tiny-llama", torch.float32, quantize=fmt)
    dense, _ = load_model("tiny-llama", torch.float32)
    modules = dict(q.named_modules())
    with torch.no_grad():
        for name, m in dense.named_modules():
            if isinstance(modules.get(name), QuantizedLinear):
                m.weight.copy_(modules[name].dequantize(torch.float32))
    ids = torch.randint(0, 250, (2, 24))
    with torch.no_grad():
        got, want = q(ids).logits, dense(ids).logits
    rtol = 384 * 8 * EPS
    torch.testing.assert_close(got, want, atol=rtol * float(want.abs().max()), rtol=rtol)
    assert not any(p.requires_grad for p in q.parameters())


def test_full_finetuning_of_a_quantized_base_is_refused():
    from frugal_rlhf.models.roles import Actor

    with pytest.raises(ValueError, match="needs LoRA"):
        Actor("tiny-llama", lora_rank=0, quantize="nf4")
    with pytest.raises(ValueError, match="quantize_base: expected one of"):
        check_format("fp8")


def _peak_rss_after_reset():
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return lambda: int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024


def test_dummy_model_is_built_quantized_without_its_dense_form():
    """Dummy 'm' (Llama shape, 308M of its parameters in linear layers: 1.2 GB in fp32) built
    as nf4: the process's peak grows by less than half the dense fp32 linear weights; the bound
    is the nf4 linears (0.5625 B an element), the dense embeddings counted twice (the tied
    head), and 256 MiB for the pieces being quantized and the allocator."""
    import transformers.models.llama.modeling_llama  # noqa: F401  (its import is not the model's memory)

    peak = _peak_rss_after_reset()
    start = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
    model, _ = load_model("m", torch.float32, quantize="nf4")
    grown = peak() - start
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    embed = model.get_input_embeddings().weight.numel() * 4
    assert linear > 300e6
    assert grown < linear * 4 / 2
    assert grown < linear * (0.5 + 4 / BLOCK) + 2 * embed + (256 << 20)
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_bench_quantize_reports_agreement_and_throughput(tmp_path):
    import json

    from frugal_rlhf.cli import main

    out = tmp_path / "q.json"
    assert main(["bench", "quantize", "--model", "tiny-llama", "--repeats", "1", "--max-length", "32",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["agreement"]) == {"int8", "nf4", "int4"}
    for a in r["agreement"].values():
        assert a["mean_kl"] >= 0 and 0 <= a["top1_agreement"] <= 1
    # stored bytes per element: int8 1 + 4/in_features, nf4 and int4 0.5 + 4/64 (of fp32's 4)
    assert r["agreement"]["nf4"]["linear_bytes"] / r["agreement"]["nf4"]["linear_bytes_fp32"] == (0.5 + 4 / 64) / 4
    assert {(x["weights"], x["dtype"], x["tokens"]) for x in r["throughput"]} == {
        (w, d, t) for w in ("dense", "int8", "nf4", "int4") for d in ("float32", "bfloat16") for t in (8, 512)}
