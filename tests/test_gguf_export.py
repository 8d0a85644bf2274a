"""GGUF export round trip: the written file loads back through transformers' GGUF loader (the
path that reads our embedded default) as the same model and tokenizer, and runs in llama.cpp
itself, whose greedy answers equal transformers' on the file's own weights up to llama.cpp's
rounding of its matmul inputs (tests/llamacpp_bounds.py; where the [llamacpp] extra is installed).

Tolerances come from the formats, never from a run on this machine:
- per weight: f16 rounds to nearest, |dw| <= 2^-11 |w| (plus 2^-25 below f16's normal range);
  q8_0 stores q = round(w / d), d = amax/127 per block of 32, d itself in f16:
  |dw| <= d/2 + 127 |d - f16(d)| <= d (1/2 + 127 * 2^-11); q4_0 (d = amax/8, q in -8..7,
  the clamp at 7 costs up to a whole step): |dw| <= d (1 + 8 * 2^-11).
- per logit: to first order |ds| <= sum over weights of |ds/dw| * bound(w), the worst case
  with every error aligned; twice that leaves room for the second-order terms, which are
  smaller by the relative weight error (<= 1/254 for q8_0).
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import needs_embedded
from frugal_rlhf.models.gguf_writer import write_gguf
from frugal_rlhf.models.loading import build_tiny, load_model

BLOCK = 32


def weight_bound(w: torch.Tensor, quant: str) -> torch.Tensor:
    """The largest error the format allows on each element of w (see the module docstring)."""
    if w.dim() == 1:
        return torch.zeros_like(w)  # 1-D tensors are written in f32
    if quant == "f16" or w.shape[-1] % BLOCK:  # rows that do not split into blocks fall back to f16
        return w.abs() * 2.0**-11 + 2.0**-25
    amax = w.reshape(-1, BLOCK).abs().amax(dim=1, keepdim=True)
    d = amax / 127 * (0.5 + 127 * 2.0**-11) if quant == "q8_0" else amax / 8 * (1 + 8 * 2.0**-11)
    return d.expand(-1, BLOCK).reshape(w.shape)


def round_trip(model, tok, tmp_path, quant):
    path = write_gguf(model.config, ((k, lambda v=v: v) for k, v in model.state_dict().items()), tok,
                      tmp_path / f"model-{quant}.gguf", quant)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    return loaded, AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)


def greedy(model, ids, n=16):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def first_order_bound(model, ids, quant, tokens):
    """For each token id, the first-order worst case of its last-position logit's change."""
    bounds = []
    for t in tokens:
        model.zero_grad()
        model(ids).logits[0, -1, t].backward()
        bounds.append(sum(float((p.grad.abs() * weight_bound(p.detach(), quant)).sum())
                          for p in model.parameters() if p.grad is not None))
    return torch.tensor(bounds)


def check_round_trip(model, tok, tmp_path, quant, prompt):
    model.eval()
    loaded, tok2 = round_trip(model, tok, tmp_path, quant)
    # the tokenizer: same ids, same specials, same chat template
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert (tok2.bos_token, tok2.eos_token, tok2.chat_template) == (tok.bos_token, tok.eos_token, tok.chat_template)
    # the weights: every one within the format's bound (q and k back in Hugging Face's row order)
    original = model.state_dict()
    for name, w in loaded.state_dict().items():
        assert w.shape == original[name].shape, name
        assert ((w - original[name]).abs() <= weight_bound(original[name], quant)).all(), name
    # the logits of the most likely tokens: within the first-order bound
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        ref, got = model(ids).logits[0, -1], loaded(ids).logits[0, -1]
    top = ref.topk(3).indices
    bound = first_order_bound(model, ids, quant, top.tolist())
    assert ((got[top] - ref[top]).abs() <= 2 * bound).all(), (got[top] - ref[top], bound)
    return model, loaded, ids


def assert_llama_cpp_agrees(path, tok, prompt: str, n=16) -> int:
    """The file runs in llama.cpp: its greedy answer (and log-probs) equal transformers' on the
    weights transformers reads from the same file (exactly llama.cpp's: f16, or the blocks' codes
    times their scale), up to the rounding bound of llama.cpp's matmul inputs in that format."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [llamacpp] extra) is not installed")
    from llamacpp_bounds import assert_greedy_agrees, llama_greedy

    quant = path.stem.rsplit("-", 1)[-1]
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = tok(text)["input_ids"]
    ours = greedy(loaded, torch.tensor([ids]), n)
    theirs, logprobs = llama_greedy(path, ids, n)
    assert len(theirs) == n
    return assert_greedy_agrees(loaded, ids, ours, theirs, logprobs, quant)


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_tiny_llama_export_runs_in_llama_cpp(tmp_path, quant):
    model, tok = build_tiny("tiny-llama")
    path = write_gguf(model.config, ((k, lambda v=v: v) for k, v in model.state_dict().items()), tok,
                      tmp_path / f"model-{quant}.gguf", quant)
    compared = assert_llama_cpp_agrees(path, tok, "What is 2 plus 2?")
    # f16: every step's margin is beyond the bound, so the whole text is equal; q8_0 and q4_0
    # round activations ~8x coarser (blocks of 32), and the tiny model's answers may part at a tie.
    assert compared == 16 if quant == "f16" else compared >= 1


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_tiny_llama_round_trip(tmp_path, quant):
    model, tok = build_tiny("tiny-llama")
    model, loaded, ids = check_round_trip(model, tok, tmp_path, quant, "What is 2 plus 2?")
    if quant == "f16":
        assert greedy(loaded, ids) == greedy(model, ids)


def tiny_qwen2():
    from transformers import AutoConfig

    _, tok = build_tiny("tiny-llama")
    config = AutoConfig.for_model("qwen2", vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, tie_word_embeddings=False,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    for layer in model.model.layers:  # Qwen2's q/k/v biases start at 0: make them count
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.normal_(proj.bias, std=0.1)
    return model.eval(), tok


def test_tiny_qwen2_round_trip(tmp_path):
    model, tok = tiny_qwen2()
    model, loaded, ids = check_round_trip(model, tok, tmp_path, "f16", "Hello")
    assert greedy(loaded, ids) == greedy(model, ids)


def test_tiny_qwen2_export_runs_in_llama_cpp(tmp_path):
    model, tok = tiny_qwen2()
    path = write_gguf(model.config, ((k, lambda v=v: v) for k, v in model.state_dict().items()), tok,
                      tmp_path / "model-f16.gguf", "f16")
    assert assert_llama_cpp_agrees(path, tok, "Hello") == 16


def test_families_we_cannot_write_are_named(tmp_path):
    model, tok = load_model("tiny-gpt2")
    with pytest.raises(ValueError, match="model type 'gpt2' cannot be written as GGUF.*missing: a tensor-name map"):
        write_gguf(model.config, [], tok, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.embedded
@needs_embedded
def test_embedded_default_round_trip_at_f16(tmp_path):
    model, tok = load_model("default")
    model, loaded, ids = check_round_trip(model, tok, tmp_path, "f16", "What is the capital of France?")
    assert greedy(loaded, ids, 24) == greedy(model, ids, 24)
    assert assert_llama_cpp_agrees(tmp_path / "model-f16.gguf", tok, "What is the capital of France?", 24) >= 1


def test_training_with_export_gguf_writes_it_and_a_model_card(tmp_path, rows):
    import yaml

    from test_sft import run_sft

    trainer, _ = run_sft(tmp_path, rows, max_steps=2, lora_rank=4, export_gguf="f16")
    final = trainer.out / "final"
    loaded = AutoModelForCausalLM.from_pretrained(final, gguf_file="model-f16.gguf", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).state_dict()
    for name, w in loaded.state_dict().items():
        assert ((w - merged[name]).abs() <= weight_bound(merged[name], "f16")).all(), name
    card = (final / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "unknown" and "sft" in meta["tags"] and "base_model" not in meta  # tiny: random
    assert "frugal sft --config frugal_config.yaml" in card and "| eval_loss |" in card
    assert yaml.safe_load((final / "frugal_config.yaml").read_text())["lora_rank"] == 4


def test_training_export_runs_in_llama_cpp(tmp_path, rows):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [llamacpp] extra) is not installed")
    from test_sft import run_sft

    trainer, _ = run_sft(tmp_path, rows, max_steps=2, lora_rank=4, export_gguf="q8_0")
    assert assert_llama_cpp_agrees(trainer.out / "final" / "model-q8_0.gguf", trainer.tokenizer, "Hi") >= 1


def test_model_card_inherits_the_embedded_default_license():
    from frugal_rlhf.models.card import base_facts

    if not __import__("conftest").embedded_available():
        pytest.skip("embedded default not installed")
    assert base_facts("default") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")


def test_export_gguf_is_refused_before_training_where_it_cannot_work(tmp_path, rows):
    from frugal_rlhf.errors import UserError
    from test_sft import run_sft

    with pytest.raises(UserError, match="--export-gguf: model type 'gpt2' cannot be written"):
        run_sft(tmp_path / "a", rows, model="tiny-gpt2", export_gguf="q8_0")
    assert not (tmp_path / "a" / "sft" / "metrics.jsonl").exists()
    with pytest.raises(UserError, match="--export-gguf 'q5'"):
        run_sft(tmp_path / "b", rows, export_gguf="q5")
