"""The FLOP formulas against a hand count and against torch's own FLOP counter."""
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode

from frugal_rlhf.bench import flops
from frugal_rlhf.cli import main
from frugal_rlhf.models.loading import DUMMY_SIZES, load_model

B, S, R = 2, 16, 4  # batch, sequence length, LoRA rank


def tiny():
    model, _ = load_model("tiny-llama")
    model.set_attn_implementation("eager")  # plain matmuls, which the counter sees (full square)
    return model


def counted(model, train: bool) -> int:
    """Torch's count, minus the rotary-frequency outer product (not a model matmul)."""
    ids = torch.randint(0, 250, (B, S), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        logits = model(ids).logits
        if train:
            logits.float().pow(2).mean().backward()
    rotary = sum(v for k, v in counter.get_flop_counts().items() if k.endswith("rotary_emb") for v in v.values())
    return counter.get_total_flops() - rotary


def test_shape_matches_hand_count():
    model = tiny()
    # hidden 128, 4 layers, 4 heads of 32 (q, o: 128x128), 2 kv heads (k, v: 128x64), MLP 3 x 128x384.
    per_layer = 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 384
    vocab = model.config.vocab_size
    assert flops.shape_of(model) == flops.Shape(body=4 * per_layer, head=128 * vocab, layers=4, attn_width=128)
    shape = flops.shape_of(model)
    # Forward of B x S: 2 FLOPs per weight per token, attention 2*2*width per (query, key) pair per layer.
    hand = 2 * (4 * per_layer + 128 * vocab) * B * S + 4 * 4 * 128 * B * S * (S + 1) / 2
    assert flops.forward_flops(shape, B, S, S) == hand


def test_forward_and_full_training_match_torch_flop_counter():
    model = tiny()
    shape = flops.shape_of(model)
    with torch.no_grad():
        assert counted(model, False) == flops.forward_flops(shape, B, S, S, causal=False)
    assert counted(model, True) == flops.train_flops(shape, B, S, S, full=True, causal=False)


def test_lora_training_matches_counter_up_to_the_documented_first_layer_overcount():
    model = tiny()
    shape = flops.shape_of(model)
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=R, target_modules="all-linear"), adapter_name="actor")
    lora = flops.lora_params(model, "actor")
    assert lora == 4 * R * (2 * (128 + 128) + 2 * (128 + 64) + 2 * (128 + 384) + (384 + 128))
    # Layer 0's q/k/v read the frozen embeddings: no input gradient for their base or lora_A.
    overcount = 2 * B * S * (128 * 128 + 2 * 128 * 64) + 2 * B * S * 3 * 128 * R
    assert counted(model, True) == flops.train_flops(shape, B, S, S, lora=lora, causal=False) - overcount


def test_ppo_step_is_the_sum_of_its_passes():
    shape = flops.Shape(body=1000, head=300, layers=2, attn_width=8)
    p, r = 10, 6
    fwd = lambda n, head, lora=0: flops.forward_flops(shape, 4, n, head, lora)  # noqa: E731
    expected = (fwd(p + r - 1, r, 7) + fwd(p + r, r, 7) + fwd(p + r, r) + fwd(p + r, 0, 5) + fwd(p + r, 0, 3)
                + 2 * (flops.train_flops(shape, 4, p + r, r, 7) + flops.train_flops(shape, 4, p + r, 0, 5)))
    assert flops.ppo_step_flops(shape, 4, p, r, 2, 7, 5, 3) == expected
    # GRPO: no critic forward (fwd(p + r, 0, 5)) and no critic training
    grpo = fwd(p + r - 1, r, 7) + fwd(p + r, r, 7) + fwd(p + r, r) + fwd(p + r, 0, 3) + 2 * flops.train_flops(shape, 4, p + r, r, 7)
    assert flops.ppo_step_flops(shape, 4, p, r, 2, 7, 0, 3, critic=False) == grpo


def test_dummy_sizes_build_with_their_parameter_counts():
    model, _ = load_model("s", torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    cfg = DUMMY_SIZES["s"]
    h, f, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    assert n == L * (4 * h * h + 3 * h * f + 2 * h) + V * h + h  # tied head; two norms per layer, one final
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert 0.015 < model.model.layers[0].mlp.up_proj.weight.float().std() < 0.025
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_bench_sft_reports_mfu_below_one(tmp_path):
    out = tmp_path / "sft.json"
    assert main(["bench", "sft", "--model", "tiny-llama", "--steps", "3", "--batch-size", "2", "--max-length", "64",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["tflops"]["median"] > 0 and r["peak_tflops"] > 0
    assert 0 < r["mfu"] <= 1
    assert r["mfu"] == pytest.approx(r["tflops"]["median"] / r["peak_tflops"])


@pytest.mark.parametrize("tied", [True, False])
def test_decode_bytes_counts_each_weight_once_and_skips_an_untied_embedding(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    # By hand: per layer q, o (32x32), k, v (16x32), MLP 3 x 32x64, two norms of 32; final norm;
    # the 300x32 head, read once per step; an untied input embedding is only looked up.
    layer = 2 * 32 * 32 + 2 * 16 * 32 + 3 * 32 * 64 + 2 * 32
    floats = 2 * layer + 32 + 300 * 32
    rotary = sum(b.numel() * b.element_size() for b in model.buffers())
    assert flops.decode_bytes(model) == 4 * floats + rotary

