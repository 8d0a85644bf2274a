"""What a pipeline run is: its YAML (configs/*.yaml), read into PipelineConfig."""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..config import from_dict


@dataclass
class SplitConfig:
    held_out: int = 32          # prompts kept apart for the before/after comparison
    prefs: int = 256            # prompts turned into preference pairs
    ppo: int = 512              # prompts for PPO rollouts
    sft: int = 2000             # demonstrations for SFT
    max_prompt_chars: int = 400  # prompt files keep short first questions (fast, on topic)


@dataclass
class PipelineConfig:
    model: str = "default"
    data: str = "sharegpt"
    output: str = "runs/pipeline"
    seed: int = 42
    dtype: str = "auto"
    quantize_base: str = "none"  # none | int8 | nf4 | int4: every stage's frozen base (QLoRA; stages need lora_rank)
    gradient_checkpointing: bool = False  # every trained stage recomputes activations in backward (a section may say otherwise)
    memory_budget: str = "auto"  # every stage's memory plan: auto, a size (4GiB) or off (a section may say otherwise)
    isolate_stages: bool | None = None  # each stage in its own process; unset: when quantize_base is set
    strategy: str = "naive"
    zero_stage: int = 3         # fsdp | deepspeed (as the stages' own field)
    offload: str = "none"       # none | cpu
    report_to: str = "none"     # experiment trackers of every stage: tensorboard,wandb,mlflow | none
    rollout_engine: str = "torch"  # what samples in prefs, ppo (unless its section says) and the report: torch |
    #                                llamacpp | vllm | auto (generation/engines.py)
    rollout_quant: str = "f16"  # llamacpp's copy of the weights: f16 | q8_0 | q4_0 | base
    split: SplitConfig = field(default_factory=SplitConfig)
    sft: dict = field(default_factory=dict)     # SFTConfig fields
    prefs: dict = field(default_factory=dict)   # prefs.build_pairs arguments: labeler, temperatures, ...
    rm: dict = field(default_factory=dict)      # RewardConfig fields
    ppo: dict = field(default_factory=dict)     # PPOConfig fields
    eval: dict = field(default_factory=dict)    # max_new_tokens, temperature, batch_size
    method: str = "ppo"                         # ppo (RM -> PPO) | dpo (DPO on the pairs: no RM, no PPO)
    dpo: dict = field(default_factory=dict)     # PreferenceConfig fields (method dpo)


def load_pipeline_config(path=None, overrides: dict | None = None) -> PipelineConfig:
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    split = from_dict(SplitConfig, data.pop("split", {}) or {}, source=f"{path}: split")
    return from_dict(PipelineConfig, {**data, "split": split}, source=str(path))


def packaged_config(name: str) -> Path:
    return Path(str(resources.files("frugal_rlhf") / "configs" / f"{name}.yaml"))
