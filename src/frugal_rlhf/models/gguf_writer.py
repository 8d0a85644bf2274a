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


def gguf_problem(config, tokenizer=None) -> str | None:
    """Why this model (and its tokenizer, if given) cannot be written as GGUF, naming what is
    missing (None: it can)."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHS:
        return (f"model type {kind!r} cannot be written as GGUF: the writer knows {', '.join(ARCHS)} "
                f"(missing: a tensor-name map and metadata for {kind})")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rope scaling {rope['rope_type']!r} is not written (missing: llama.cpp's rope-scaling metadata)"
    if kind == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        return "a Llama with bias terms is not written (missing: llama.cpp's bias tensors for the llama layout)"
    if tokenizer is None:
        return None
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {}).get("type")
    if model != "BPE" or _byte_level(spec.get("pre_tokenizer")) is None:
        return (f"tokenizer {type(tokenizer).__name__} ({model or 'no tokenizers backend'}, pre-tokenizer "
                f"{(spec.get('pre_tokenizer') or {}).get('type')}) is not byte-level BPE; only GPT-2-style "
                "vocabularies are written (missing: the sentencepiece 'llama' vocabulary writer)")
    return None


def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for how text is split before BPE (`tokenizer.ggml.pre`; llama.cpp refuses
    a name it does not know): "gpt-2" for plain ByteLevel (GPT-2's regex), "smollm" for single
    digits then ByteLevel (SmolLM's tokenizer.json), else the known name of the Split regex.
    "default" (llama.cpp's own regex) is right only where no merge crosses a split: a byte-level
    vocabulary without merges (our tiny models)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) else "default"
    steps = pre.get("pretokenizers", [])
    if ([s.get("type") for s in steps] == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True)):
        return "smollm"
    patterns = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    return next((name for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex in patterns), "default")


class _Writer(gguf.GGUFWriter):
    """gguf's writer, able to write an empty array: llama.cpp refuses a BPE vocabulary without
    the `tokenizer.ggml.merges` key even when there are no merges (a bytes-only vocabulary),
    and gguf refuses to write an empty array."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            return ((self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type)
                    + self._pack("Q", 0))
        return super()._pack_val(val, vtype, add_vtype, sub_type)


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
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, merges, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
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


def _llama_rows(config, hf_name: str, w: np.ndarray) -> np.ndarray:
    """`w`'s rows in llama.cpp's order: q and k reordered for its rotary pairs (see ARCHS)."""
    if not ARCHS[config.model_type][1]:
        return w
    if ".self_attn.q_proj." in hf_name:
        return _interleave_rotary(w, config.num_attention_heads)
    if ".self_attn.k_proj." in hf_name:
        return _interleave_rotary(w, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return w


def _gguf_name(config, names, hf_name: str) -> str:
    target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if target is None:
        raise ValueError(f"tensor {hf_name} has no GGUF name in the {config.model_type} layout")
    return target


def _check_writable(config, tokenizer=None):
    problem = gguf_problem(config, tokenizer)
    if problem:
        raise ValueError(problem)


def write_gguf(config, tensors, tokenizer, path, quant: str = "f16", name: str | None = None) -> Path:
    """Write (hf_name, make) pairs, `make()` giving that tensor, as a GGUF file at `path`."""
    if quant not in QUANTS:
        raise ValueError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
    _check_writable(config, tokenizer)
    arch, permutes = ARCHS[config.model_type]
    qtype, file_type = QUANTS[quant]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    path = Path(path)

    def write(tmp):
        writer = _Writer(tmp, gguf.MODEL_ARCH_NAMES[arch], use_temp_file=True)  # tensors spill to disk
        writer.add_name(name or path.stem)
        _add_shape(writer, config, permutes, file_type)
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        for hf_name, make in tensors:
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # no output.weight: readers tie the head to token_embd
            target = _gguf_name(config, names, hf_name)
            data, raw = _encode(_llama_rows(config, hf_name, make().detach().float().cpu().numpy()), qtype)
            writer.add_tensor(target, data, raw_dtype=raw)
        _finish(writer)

    atomic_write(path, write)
    return path


def write_gguf_lora(config, factors, path, alpha: float) -> Path:
    """A LoRA adapter as llama.cpp loads it over a base written by `write_gguf` (its
    llama_adapter_lora_init): general.type "adapter", adapter.type "lora", adapter.lora.alpha
    (llama.cpp adds (alpha / rank) * B A x, the rank read from each B), and for each adapted
    weight, given as (hf_name, A [r, in], B [out, r]), tensors `<base tensor name>.lora_a` and
    `.lora_b` in f32. B's rows follow the base's row order (q and k reordered as in write_gguf)."""
    _check_writable(config)
    arch, _ = ARCHS[config.model_type]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)

    def write(tmp):
        writer = _Writer(tmp, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for hf_name, a, b in factors:
            target = _gguf_name(config, names, hf_name)
            writer.add_tensor(f"{target}.lora_a", a.detach().float().cpu().numpy())
            writer.add_tensor(f"{target}.lora_b", _llama_rows(config, hf_name, b.detach().float().cpu().numpy()))
        _finish(writer)

    atomic_write(Path(path), write)
    return Path(path)


def _finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
