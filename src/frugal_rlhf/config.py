"""One dataclass config per stage. The CLI maps flags and an optional YAML file onto them;
the Python API takes them directly. Defaults work on a 2-core CPU."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    model: str = "default"            # "default", tiny-llama, a HF directory or a .gguf file
    output: str = "runs/out"
    data: str = "sharegpt"             # "sharegpt" or a file (json/jsonl/parquet/csv/save_to_disk dir)
    max_rows: int | None = None        # use at most this many rows of the data
    skip_bad_rows: bool = False        # skip (and count) bad rows instead of stopping
    eval_split: float = 0.05           # fraction of rows held out for evaluation
    max_eval_rows: int = 64
    lora_rank: int = 0                 # 0 = full fine-tuning
    lora_alpha: float | None = None    # default 2 * rank
    lora_targets: str = "all-linear"   # comma-separated module names, or all-linear (attention + MLP)
    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None            # default 2e-4 with LoRA, 2e-5 full
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    max_length: int = 512
    eval_every: int = 50               # 0 = only at the end
    save_every: int = 50               # 0 = no intermediate checkpoints
    keep_checkpoints: int = 2          # the newest N checkpoints are kept; 0 = keep all
    checkpoint_format: str = "full"    # full: one file any strategy loads | sharded (fsdp): each rank its shard
    gradient_checkpointing: bool = False
    memory_budget: str | None = None   # e.g. 4GiB, 8GB, auto (90% of the free memory): the planner picks micro-batch,
    #                                    accumulation, checkpointing (models/memory.py); None = off
    seed: int = 42
    dtype: str = "auto"                # auto | bf16 | fp32 (compute dtype; trained weights stay fp32)
    quantize_base: str = "none"        # none | int8 | nf4 | int4: the frozen base stored quantized (QLoRA; needs
    #                                    lora_rank > 0), computing in the compute dtype (models/quantize.py)
    strategy: str = "naive"            # naive | ddp | fsdp | deepspeed
    zero_stage: int = 3
    offload: str = "none"              # none | cpu
    resume: bool = False
    overwrite: bool = False            # a fresh run may replace the run already in --output
    max_nonfinite_steps: int = 3       # stop after this many updates in a row skipped for NaN/inf
    schedule_steps: int | None = None  # LR schedule length; default max_steps (a resumed run keeps its own)
    trust_remote_code: bool = False
    report_to: str = "none"            # experiment trackers, comma-separated: tensorboard,wandb,mlflow | none
    export_gguf: str | None = None     # f16 | q8_0 | q4_0: also write final/model-QUANT.gguf (llama.cpp, Ollama)

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora_rank else 2e-5)


@dataclass
class SFTConfig(TrainConfig):
    output: str = "runs/sft"
    packing: bool = False              # several conversations per max_length row, attention kept apart


@dataclass
class RewardConfig(TrainConfig):
    output: str = "runs/rm"
    data: str = "prefs.jsonl"
    loss: str = "logsigmoid"           # logsigmoid | logexp
    center_coef: float = 0.0           # reward centering: coef * mean((r_c + r_r)^2)
    pooling: str = "last"              # last (hidden state at the end of turn) | mean (over the answer's tokens)
    head_lr: float | None = None       # the score head's learning rate (default: lr, as the adapter's)
    eval_split: float = 0.1
    eval_only: bool = False            # score an existing reward model (--model) on --data


@dataclass
class PPOConfig(TrainConfig):
    output: str = "runs/ppo"
    reward_model: str = "runs/rm"      # a reward-model artifact directory
    critic_model: str | None = None    # a separate critic base; default: critic on the shared base
    critic_init: str = "reward"        # reward (start from the reward adapter+head) | fresh
    prompts: str = "sharegpt"
    eval_data: str | None = None       # held-out prompts file; default: eval_prompts split off --prompts
    ptx_data: str | None = None        # demonstrations for the PPO-ptx loss
    ptx_coef: float = 0.0
    max_steps: int = 40
    rollout_batch_size: int = 8        # prompts per PPO step
    batch_size: int = 4                # mini-batch for the update
    ppo_epochs: int = 1
    # Adam's first step moves every weight by ~lr whatever its gradient's size (m/sqrt(v) = +-1),
    # noise-only gradients included: warm up over a few steps (4 of 40), not one.
    warmup_ratio: float = 0.1
    advantage: str = "gae"             # gae (learned critic) | group (GRPO) | rloo | reinforce++ (no critic)
    group_size: int = 1                # completions sampled per prompt (a step has rollout_batch_size x this)
    lr: float | None = None
    critic_lr: float | None = None
    max_prompt_length: int = 256
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    kl_coef: float = 0.05
    kl_estimator: str = "k1"           # k1 | k3 (per-token penalty in the reward)
    kl_target: float | None = None     # adaptive KL controller when set
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 1.0
    entropy_coef: float = 0.0
    normalize_reward: bool = False     # running mean/std normalization of the score
    reward_clip: float | None = 10.0
    whiten_advantages: bool = True
    eval_every: int = 0
    save_every: int = 10
    eval_prompts: int = 16
    # Verifiable rewards and the GRPO family's variants (rl/rewards.py, rl/losses.py).
    reward: list[str] | None = None    # reward specs (math, math:strict, format:RE, length:N, python:m:f, rm:PATH)
    #                                    each [=WEIGHT]; None = the reward model at reward_model
    scale_rewards: str = "group"       # group | batch | none (Dr. GRPO): the std dividing group advantages
    loss_agg: str = "token-mean"       # token-mean | seq-mean-token-mean | token-sum-norm (Dr. GRPO)
    clip_eps_high: float | None = None  # DAPO's decoupled upper clip (default: clip_eps)
    dynamic_sampling: bool = False     # DAPO: drop groups whose rewards are all equal from the update
    overlong_penalty: int = 0          # DAPO's soft overlong punishment over the last N tokens (0 = off)
    gold_eval: bool = False            # also log the hidden gold judge's held-out score (eval_gold; never a reward)
    rollout_engine: str = "torch"      # torch | llamacpp | vllm | auto: what samples the rollouts (generation/engines.py)
    rollout_quant: str = "f16"         # llamacpp: the engine's copy of the base in f16 | q8_0 | q4_0 | base (as stored)
    tis_cap: float = 2.0               # truncated importance sampling cap C for an engine that differs from the trainer


@dataclass
class PreferenceConfig(TrainConfig):
    output: str = "runs/dpo"
    data: str = "prefs.jsonl"          # preference pairs (any format `frugal rm` reads); kto: unpaired rows too
    loss: str = "dpo"                  # dpo | ipo | cdpo | simpo | orpo | kto
    beta: float | None = None          # default 0.1 (simpo: 2.0)
    label_smoothing: float | None = None  # dpo/cdpo/simpo: probability a label is wrong (default 0; cdpo 0.1)
    simpo_gamma: float = 1.0           # simpo: the reward margin chosen must win by
    orpo_lambda: float = 0.1           # orpo: weight of the odds-ratio term beside the NLL
    desirable_weight: float = 1.0      # kto
    undesirable_weight: float = 1.0    # kto
    precompute_ref: bool = False       # reference log-probs once before training (no reference in memory)
    eval_split: float = 0.1


@dataclass
class KTOConfig(PreferenceConfig):
    output: str = "runs/kto"
    loss: str = "kto"


STAGE_CONFIGS = {"sft": SFTConfig, "rm": RewardConfig, "ppo": PPOConfig, "dpo": PreferenceConfig,
                 "kto": KTOConfig}


def from_dict(cls, data: dict, source: str = "config"):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown} for {cls.__name__}")
    return cls(**data)


def load_yaml(path) -> dict:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of field: value")
    data.pop("history", None)  # a run's config.yaml may be reused as --config: its history is not a field
    return data
