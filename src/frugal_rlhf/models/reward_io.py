"""The reward-model artifact: a small directory that names its base.

    OUT/reward_model.json     {"format": "frugal-reward-model", "base": spec, "base_in_artifact": bool,
                               "adapter": "adapter" | null, "pooling": "last" | "mean",
                               "quantize_base": "none" | "int8" | "nf4" | "int4"}
    OUT/score_head.safetensors
    OUT/adapter/              the reward LoRA adapter (PEFT layout), when trained with LoRA
    OUT/final/                standalone: the merged LM + score head + its own reward_model.json

With LoRA the artifact is a few MB and, in PPO, its adapter is loaded onto the shared base.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..device import compute_dtype
from .export import export_adapter, export_merged
from .loading import load_model, prepare_tokenizer
from .quantize import quantize_base
from .roles import RewardModel, SharedLM

META = "reward_model.json"
HEAD = "score_head.safetensors"


def _write_meta(path: Path, base: str, base_in_artifact: bool, adapter: str | None, pooling: str,
                quantized: str = "none"):
    meta = {"format": "frugal-reward-model", "version": 1, "base": base, "base_in_artifact": base_in_artifact,
            "adapter": adapter, "pooling": pooling, "quantize_base": quantized}
    (path / META).write_text(json.dumps(meta, indent=2) + "\n")


def _save_head(rm: RewardModel, path: Path):
    save_file({k: v.detach().cpu().contiguous() for k, v in rm.head.state_dict().items()}, path / HEAD)


def save_reward_model(rm: RewardModel, tokenizer, path, base: str, standalone: bool = True):
    """Write the artifact (adapter + head naming `base`) and its standalone merged form
    (`standalone=False` skips the latter, whose merged copy of the model doubles the peak)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if Path(base).exists():  # a local base named relative to today's directory: keep it findable from any other
        base = str(Path(base).resolve())
    if standalone or not rm.adapter:
        final = export_merged(rm, tokenizer, path / "final")
        _save_head(rm, final)
        _write_meta(final, ".", True, None, rm.pooling)
    if rm.adapter:
        export_adapter(rm, tokenizer, path / "adapter", base=base)
        _save_head(rm, path)
        # the adapter was trained on the base quantized so: loaded on it the same way
        _write_meta(path, base, False, "adapter", rm.pooling, quantize_base(rm.lm.hf_model()))
    else:
        _write_meta(path, "final", True, None, rm.pooling)
    return path


def load_reward_model(path, shared: SharedLM | None = None, dtype=None, trust_remote_code=False) -> RewardModel:
    """Load an artifact, frozen. With `shared`, its adapter goes onto that base as "reward"
    (the caller has checked that the base is the one the adapter was trained on)."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.exists():
        raise FileNotFoundError(f"{path} is not a reward model (no {META}); train one with `frugal rm`")
    meta = json.loads(meta_path.read_text())
    dtype = dtype or compute_dtype()
    base = str(path / meta["base"]) if meta["base_in_artifact"] else meta["base"]
    if meta["adapter"] and shared is not None:
        lm, tokenizer = shared, None
    else:
        # an adapter goes back onto its base quantized as in training; a merged model is dense
        quantize = meta.get("quantize_base", "none") if meta["adapter"] else "none"
        hf, tokenizer = load_model(base, dtype, trust_remote_code, quantize)
        lm = SharedLM(hf)
    if meta["adapter"]:
        lm.load_adapter(path / meta["adapter"], "reward", trainable=False)
        if (path / meta["adapter"] / "tokenizer_config.json").exists() and tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path / meta["adapter"]))
    # Artifacts written before pooling was a setting read the last token.
    rm = RewardModel(lm, "reward" if meta["adapter"] else None, pooling=meta.get("pooling", "last"))
    # A full fine-tune's output directory names its final/ as the base; the head is there.
    head = path / HEAD if (path / HEAD).exists() or not meta["base_in_artifact"] else Path(base) / HEAD
    rm.head.load_state_dict(load_file(head))
    rm.head.requires_grad_(False)
    if not meta["adapter"]:
        lm.model.requires_grad_(False)
    rm.tokenizer = tokenizer
    rm.base_spec = base
    return rm
