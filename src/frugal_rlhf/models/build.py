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


def build_ppo_roles(cfg, with_critic: bool = True) -> PPORoles:
    """The roles of `cfg`; `with_critic`: whether its advantage estimator learns a value function."""
    dtype = compute_dtype(override=cfg.dtype)
    # reward_model None: program rewards only (--reward without rm:), no reward model to load.
    rm_path = Path(cfg.reward_model) if cfg.reward_model else None
    rm_meta = json.loads((rm_path / META).read_text()) if rm_path and (rm_path / META).exists() else None
    if rm_path and rm_meta is None:
        raise FileNotFoundError(f"{rm_path} is not a reward model (no {META}); train one with `frugal rm`")
    quantize = check_format(cfg.quantize_base, cfg.lora_rank)
    # the reward adapter shares the base only if it was trained on the same base, quantized alike
    rm_on_base = rm_meta is not None and bool(rm_meta["adapter"]) and not rm_meta["base_in_artifact"] and \
        _same_base(rm_meta["base"], cfg.model) and rm_meta.get("quantize_base", "none") == quantize
    if not cfg.lora_rank:
        return _separate_full(cfg, dtype, with_critic)
    hf, tokenizer = load_model(cfg.model, dtype, cfg.trust_remote_code, quantize)
    lm = SharedLM(hf)
    lm.add_adapter("actor", cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    actor = Actor(lm, "actor")
    reward = load_reward_model(rm_path, shared=lm if rm_on_base else None, dtype=dtype) if rm_path else None
    if rm_path and not rm_on_base:
        log.info("reward model base %s (quantized: %s) differs from %s (%s): loading it separately", rm_meta["base"],
                 rm_meta.get("quantize_base", "none"), cfg.model, quantize)
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
