"""Write a causal LM as one GGUF file (llama.cpp, Ollama, LM Studio), with the `gguf` package.

The file holds the weights (f16, q8_0 or q4_0; norms and other 1-D tensors stay f32), the
model's shape under the llama.cpp architecture names, and the tokenizer with its chat template,
so that llama.cpp, and transformers' GGUF loader (the one that reads our embedded default),
rebuild the same model and tokenizer from it.

Families: the Llama layout (SmolLM2, TinyLlama, Llama) and Qwen2. Tokenizers: byte-level BPE
(GPT-2 style: SmolLM2, Llama 3, Qwen2). Anything else is refused before writing, naming what
is missing.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from ..rundir import atomic_write

QUANTS = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# Hugging Face model_type -> (llama.cpp architecture, whether q/k rows are reordered).
# llama.cpp's Llama computes rotary embeddings on interleaved pairs (GPT-J style) where Hugging
# Face's rotate_half pairs dimension i with i + d/2; its converter reorders the rows of q and k
# to match, and readers (transformers' GGUF loader among them) undo it. Qwen2 is stored as is.
ARCHS = {"llama": (gguf.MODEL_ARCH.LLAMA, True), "qwen2": (gguf.MODEL_ARCH.QWEN2, False)}


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def _byte_level(spec: dict | None) -> dict | None:
    """The ByteLevel step of a pre-tokenizer (alone or in a Sequence), if any."""
    steps = (spec or {}).get("pretokenizers", [spec]) if spec else []
    return next((s for s in steps if s and s.get("type") == "ByteLevel"), None)


def gguf_problem(config, tokenizer) -> str | None:
    """Why this model cannot be written as GGUF, naming what is missing (None: it can)."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHS:
        return (f"model type {kind!r} cannot be written as GGUF: the writer knows {', '.join(ARCHS)} "
                f"(missing: a tensor-name map and metadata for {kind})")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rope scaling {rope['rope_type']!r} is not written (missing: llama.cpp's rope-scaling metadata)"
    if kind == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        return "a Llama with bias terms is not written (missing: llama.cpp's bias tensors for the llama layout)"
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {}).get("type")
    if model != "BPE" or _byte_level(spec.get("pre_tokenizer")) is None:
        return (f"tokenizer {type(tokenizer).__name__} ({model or 'no tokenizers backend'}, pre-tokenizer "
                f"{(spec.get('pre_tokenizer') or {}).get('type')}) is not byte-level BPE; only GPT-2-style "
                "vocabularies are written (missing: the sentencepiece 'llama' vocabulary writer)")
    return None


def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for how text is split before BPE: "gpt2" for plain ByteLevel (GPT-2's
    regex, the split our tokenizer applied in training), else the regex's known name."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        return "gpt2" if pre.get("use_regex", True) else "default"
    patterns = [s.get("pattern", {}).get("Regex") for s in pre.get("pretokenizers", []) if s.get("type") == "Split"]
    return next((name for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex in patterns), "default")


def _add_tokenizer(writer, tokenizer, vocab_size: int):
    spec = _tokenizer_json(tokenizer)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    tokens, types = [], []
    for i in range(vocab_size):  # rows of the embedding the tokenizer never emits are padding
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.CONTROL if i in special
                     else gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if merges:
        writer.add_token_merges(merges)
    else:  # a vocabulary without merges (bytes only): readers then derive merges from scores
        writer.add_token_scores([0.0] * vocab_size)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            add(token_id)
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer("x")["input_ids"][:1] == [bos])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _add_shape(writer, config, arch_permutes: bool, file_type):
    heads = config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    if arch_permutes:
        writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _interleave_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from halves (i, i + d/2) to pairs (2i, 2i + 1): llama.cpp's order."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(w: np.ndarray, qtype):
    """(data, raw type) of one tensor: 1-D tensors in f32 (llama.cpp keeps norms exact); a
    matrix whose rows do not split into the format's blocks falls back to f16."""
    if w.ndim == 1:
        return w, None
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if qtype == gguf.GGMLQuantizationType.F16 or w.shape[-1] % block:
        return w.astype(np.float16), None
    return gguf.quants.quantize(w, qtype), qtype


def write_gguf(config, tensors, tokenizer, path, quant: str = "f16", name: str | None = None) -> Path:
    """Write (hf_name, make) pairs, `make()` giving that tensor, as a GGUF file at `path`."""
    if quant not in QUANTS:
        raise ValueError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
    problem = gguf_problem(config, tokenizer)
    if problem:
        raise ValueError(problem)
    arch, permutes = ARCHS[config.model_type]
    qtype, file_type = QUANTS[quant]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    path = Path(path)

    def write(tmp):
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch], use_temp_file=True)  # tensors spill to disk
        writer.add_name(name or path.stem)
        _add_shape(writer, config, permutes, file_type)
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        for hf_name, make in tensors:
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # no output.weight: readers tie the head to token_embd
            target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise ValueError(f"tensor {hf_name} has no GGUF name in the {config.model_type} layout")
            w = make().detach().float().cpu().numpy()
            if permutes and ".self_attn.q_proj." in hf_name:
                w = _interleave_rotary(w, config.num_attention_heads)
            elif permutes and ".self_attn.k_proj." in hf_name:
                w = _interleave_rotary(w, kv_heads)
            data, raw = _encode(w, qtype)
            writer.add_tensor(target, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)
    return path
