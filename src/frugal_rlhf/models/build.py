"""Build the four PPO roles. Default: one frozen base in memory, every role an adapter on it.

    reference = base, adapters off        actor  = base + actor LoRA
    critic    = base + critic LoRA + value head (initialized from the reward adapter + head)
    reward    = base + reward LoRA + score head (from stage 2)

Separate models remain possible: full fine-tuning (lora_rank 0) gives the actor its own
trainable copy and the reference a frozen one; `critic_model` puts the critic on another
base; a reward model trained on another base is loaded on its own. The caller says whether
there is a critic (its advantage estimator's need, rl/algorithms.py).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from ..device import compute_dtype
from .loading import load_model, resolve_spec
from .quantize import check_format
from .reward_io import HEAD, META, load_reward_model
from .roles import Actor, Critic, RewardModel, SharedLM

log = logging.getLogger("frugal_rlhf")


@dataclass
class PPORoles:
    actor: Actor
    critic: Critic | None
    reward_model: RewardModel | None
    reference: Actor
    tokenizer: object
    shared: bool


def _same_base(a: str, b: str) -> bool:
    try:
        return Path(resolve_spec(a)).resolve() == Path(resolve_spec(b)).resolve()
    except FileNotFoundError:
        return False


def reward_meta(rm_path: Path | None) -> dict | None:
    """A reward-model artifact's metadata (None without a path: program rewards only)."""
    if rm_path is None:
        return None
    if not (rm_path / META).exists():
        raise FileNotFoundError(f"{rm_path} is not a reward model (no {META}); train one with `frugal rm`")
    return json.loads((rm_path / META).read_text())


def on_base(rm_meta: dict | None, base: str, quantize: str) -> bool:
    """Whether the reward model is an adapter trained on `base`, quantized alike: then it
    shares that base in memory instead of loading its own."""
    return rm_meta is not None and bool(rm_meta["adapter"]) and not rm_meta["base_in_artifact"] and \
        _same_base(rm_meta["base"], base) and rm_meta.get("quantize_base", "none") == quantize


def reward_beside(lm: SharedLM, rm_path: Path | None, base: str, quantize: str, dtype):
    """The reward model on `lm` (the base `base`) when it was trained there, else on its own."""
    meta = reward_meta(rm_path)
    if meta is None:
        return None
    shared = on_base(meta, base, quantize)
    if not shared:
        log.info("reward model base %s (quantized: %s) differs from %s (%s): loading it separately", meta["base"],
                 meta.get("quantize_base", "none"), base, quantize)
    return load_reward_model(rm_path, shared=lm if shared else None, dtype=dtype)


def build_ppo_roles(cfg, with_critic: bool = True) -> PPORoles:
    """The roles of `cfg`; `with_critic`: whether its advantage estimator learns a value function."""
    dtype = compute_dtype(override=cfg.dtype)
    # reward_model None: program rewards only (--reward without rm:), no reward model to load.
    rm_path = Path(cfg.reward_model) if cfg.reward_model else None
    rm_meta = reward_meta(rm_path)
    quantize = check_format(cfg.quantize_base, cfg.lora_rank)
    rm_on_base = on_base(rm_meta, cfg.model, quantize)
    if not cfg.lora_rank:
        return _separate_full(cfg, dtype, with_critic)
    hf, tokenizer = load_model(cfg.model, dtype, cfg.trust_remote_code, quantize)
    lm = SharedLM(hf)
    lm.add_adapter("actor", cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    actor = Actor(lm, "actor")
    reward = reward_beside(lm, rm_path, cfg.model, quantize, dtype)
    if not with_critic:
        critic = None
    elif cfg.critic_model:
        critic = Critic(cfg.critic_model, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                        lora_targets=cfg.lora_targets, dtype=cfg.dtype, quantize=quantize)
    elif cfg.critic_init == "reward" and rm_on_base:
        # InstructGPT initializes the value function from the reward model.
        lm.load_adapter(rm_path / rm_meta["adapter"], "critic", trainable=True)
        critic = Critic(lm, "critic", pooling=rm_meta.get("pooling", "last"))  # values a prefix as the RM scores it
        critic.head.load_state_dict(load_file(rm_path / HEAD))
    else:
        if cfg.critic_init == "reward":
            log.info("critic: a fresh adapter and value head (the reward model is not an adapter on this base, "
                     "so it cannot start the critic)")
        lm.add_adapter("critic", cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        critic = Critic(lm, "critic")
    return PPORoles(actor, critic, reward, Actor(lm, None), tokenizer,
                    shared=(rm_on_base or rm_path is None) and not cfg.critic_model)


def _separate_full(cfg, dtype, with_critic: bool) -> PPORoles:
    """Full fine-tuning: the actor needs its own trainable copy, the reference a frozen one."""
    actor = Actor(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    hf, _ = load_model(cfg.model, dtype, cfg.trust_remote_code)
    reference = Actor(SharedLM(hf.requires_grad_(False)), None)
    critic = Critic(cfg.critic_model or cfg.model, dtype=cfg.dtype,
                    trust_remote_code=cfg.trust_remote_code) if with_critic else None
    reward = load_reward_model(cfg.reward_model, dtype=dtype) if cfg.reward_model else None
    return PPORoles(actor, critic, reward, reference, actor.tokenizer, shared=False)
