"""One dataclass config per stage. The CLI maps flags and an optional YAML file onto them;
the Python API takes them directly. Defaults work on a 2-core CPU."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import UserError


def opt(default, help: str):
    """A config field with its one line of help: the source of `frugal STAGE --help`, of
    docs/commands.md and of what a YAML key means."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    model: str = opt("default", "model to start from: default (SmolLM2-135M-Instruct, packaged), tiny-llama (tiny, "
                     "random: tests), a Hugging Face directory (e.g. runs/sft/final) or a .gguf file")
    output: str = opt("runs/out", "run directory: config.yaml, metrics.jsonl, plots, checkpoints/ and the result")
    data: str = opt("sharegpt", "training data: sharegpt (the packaged ShareGPT conversations) or a .jsonl, .json, "
                    ".parquet, .csv file or save_to_disk directory, format read from the columns (ppo reads --prompts)")
    max_rows: int | None = opt(None, "read at most this many rows of the data (a quick trial on a big file); "
                               "unset: all")
    skip_bad_rows: bool = opt(False, "skip malformed rows and count them, instead of stopping at the first one "
                              "(named by file and line)")
    eval_split: float = opt(0.05, "fraction of the rows held out for evaluation, at most --max-eval-rows; 0 = none")
    max_eval_rows: int = opt(64, "at most this many held-out rows, so that an evaluation stays short on big data")
    lora_rank: int = opt(16, "LoRA adapter rank (the default: the same results on our tasks in a fraction of the "
                         "memory); 0 = full fine-tuning (every weight, ~16 bytes each with AdamW)")
    lora_alpha: float | None = opt(None, "LoRA scale: the adapter's update is multiplied by alpha / rank; "
                                   "unset: 2 x rank")
    lora_targets: str = opt("all-linear", "layers that get LoRA adapters: all-linear (every attention and MLP "
                            "projection) or comma-separated module names such as q_proj,v_proj")
    max_steps: int = opt(100, "optimizer steps to train; a step is --batch-size x --grad-accum rows per process")
    batch_size: int = opt(8, "rows per micro-batch on each process; out of memory: lower it and raise --grad-accum "
                          "(or use --memory-budget)")
    grad_accum: int = opt(1, "micro-batches summed into one optimizer step, exactly: batch 4 x accum 2 = batch 8 "
                          "in less memory")
    lr: float | None = opt(None, "peak learning rate of AdamW (linear warmup, then cosine decay to a tenth); "
                           "unset: 2e-4 with LoRA, 2e-5 full fine-tuning")
    weight_decay: float = opt(0.0, "AdamW's decoupled weight decay (e.g. 0.01 pulls weights toward 0); 0 = none")
    warmup_ratio: float = opt(0.05, "fraction of the schedule's steps over which the learning rate rises linearly "
                              "to --lr")
    max_grad_norm: float = opt(1.0, "clip the gradient to this L2 norm before each update; 0 = no clipping")
    max_length: int = opt(512, "tokens per sequence, prompt and answer: longer rows lose prompt tokens on the left, "
                          "then the answer's end (ppo: --ptx-data rows)")
    eval_every: int = opt(50, "evaluate on the held-out rows every N steps (and before the first and after the "
                          "last); 0 = only then")
    save_every: int = opt(50, "write a checkpoint every N steps and at the last, for --resume; 0 = none")
    keep_checkpoints: int = opt(2, "keep the newest N checkpoints and delete older ones; 0 = keep all")
    checkpoint_format: str = opt("full", "full: one set of files any strategy loads; sharded: each rank writes its "
                                 "own shard, no gather (--strategy fsdp)")
    gradient_checkpointing: bool = opt(False, "recompute each layer's activations in backward instead of keeping "
                                       "them: much less memory, ~30% more compute")
    memory_budget: str | None = opt("auto", "fit the stage in this memory: auto (what the device has free; on a CPU "
                                    "the least memory at nearly full speed), a size (4GiB, 8GB) or off; the planner "
                                    "picks micro-batch, exact accumulation and checkpointing")
    seed: int = opt(42, "random seed: data order, held-out split, adapter initialization and sampling")
    dtype: str = opt("auto", "compute dtype: auto (bf16 where the device runs it fast, else fp32), bf16 or fp32; "
                     "trained weights stay fp32")
    quantize_base: str = opt("none", "store the frozen base quantized (QLoRA; needs --lora-rank > 0): none, int8 "
                             "(~1 byte a weight), nf4 or int4 (~0.56 byte); computed in --dtype")
    strategy: str = opt("naive", "placement: naive (one process), ddp (a full copy per process), fsdp (torch "
                        "ZeRO-2/3 sharding) or deepspeed; processes: --nproc-per-node")
    zero_stage: int = opt(3, "fsdp, deepspeed: 3 shards the parameters too (least memory); 2 keeps them whole from "
                          "forward to backward (one all-gather less)")
    offload: str = opt("none", "fsdp, deepspeed: cpu keeps the sharded state in CPU memory (fsdp: parameters, "
                       "gradients, optimizer; deepspeed: optimizer), for a GPU short of memory; none")
    resume: bool = opt(False, "continue the run in --output from its last complete checkpoint (refused when the "
                       "settings that define the run differ)")
    overwrite: bool = opt(False, "let a fresh run delete the previous run in --output (otherwise it is refused)")
    max_nonfinite_steps: int = opt(3, "stop after this many updates in a row skipped for a NaN/inf loss or "
                                   "gradient (the checkpoints keep the last finite state)")
    schedule_steps: int | None = opt(None, "length of the learning-rate schedule; unset: --max-steps (a resumed run "
                                     "keeps its own); above --max-steps to stop partway and --resume later")
    trust_remote_code: bool = opt(False, "let transformers run Python code shipped with the model (only for a "
                                  "model you trust)")
    report_to: str = opt("none", "experiment trackers fed the rows of metrics.jsonl: tensorboard, wandb, mlflow "
                         "(comma-separated) or none")
    export_gguf: str | None = opt(None, "also write final/model-QUANT.gguf for llama.cpp and Ollama: f16, q8_0 or "
                                  "q4_0; unset: none")

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora_rank else 2e-5)


@dataclass
class SFTConfig(TrainConfig):
    output: str = opt("runs/sft", "run directory; the fine-tuned model goes to final/ (and adapter/ with LoRA)")
    packing: bool = opt(False, "pack several conversations into each --max-length row, each attending only to "
                        "itself: fewer pad tokens, the same loss")


@dataclass
class RewardConfig(TrainConfig):
    output: str = opt("runs/rm", "the reward model's directory (adapter, score head, eval.json) and its run")
    data: str = opt("prefs.jsonl", "preference pairs: prompt/chosen/rejected rows (text or messages) or Anthropic "
                    "HH chosen/rejected transcripts, as .jsonl, .json, .parquet or .csv")
    loss: str = opt("logsigmoid", "logsigmoid: -log sigmoid(r_chosen - r_rejected) (Bradley-Terry); logexp: the "
                    "same loss as log(1 + exp(-diff)), as other tools name it")
    center_coef: float = opt(0.0, "reward centering: adds coef x mean((r_chosen + r_rejected)^2), holding scores "
                             "near 0 without changing their order (e.g. 0.01); 0 = off")
    pooling: str = opt("last", "what the score reads: last = the hidden state at the answer's end-of-turn token; "
                       "mean = the mean over the answer's tokens (the demo's: answer-wide qualities, few pairs)")
    head_lr: float | None = opt(None, "learning rate of the new score head; unset: --lr. About 10x --lr (the "
                                "demo's) lets the head leave its random start on few pairs")
    eval_split: float = opt(0.1, "fraction of the pairs held out for the reported accuracy, at most "
                            "--max-eval-rows")
    eval_only: bool = opt(False, "do not train: score the reward model --model on --data (accuracy, margin -> "
                          "OUTPUT/eval.json)")


@dataclass
class PPOConfig(TrainConfig):
    output: str = opt("runs/ppo", "run directory; the trained policy goes to final/ (merged) and adapter/ "
                      "(with LoRA)")
    reward_model: str = opt("runs/rm", "the reward model to maximize: a directory `frugal rm` wrote (with "
                            "--reward, only an rm:PATH spec loads one)")
    critic_model: str | None = opt(None, "give the critic a base of its own (e.g. a smaller model); unset: an "
                                   "adapter on the shared base")
    critic_init: str = opt("reward", "reward: the critic starts as the reward model's adapter and head (when on "
                           "the same base); fresh: a new adapter and value head")
    critic_warmup_steps: int = opt(0, "the first N steps update the critic alone on their rollouts (the actor "
                                   "waits for sensible values); the actor's LR schedule starts after them")
    prompts: str = opt("sharegpt", "prompts to answer: sharegpt (the packaged conversations) or a file in any "
                       "format with prompts (messages, prompt, ...)")
    eval_data: str | None = opt(None, "held-out prompts file (its first --eval-prompts rows); unset: "
                                "--eval-prompts rows held out of --prompts")
    ptx_data: str | None = opt(None, "demonstrations whose LM loss joins the actor's (PPO-ptx: keeps skills the "
                               "reward does not measure); with --ptx-coef")
    ptx_coef: float = opt(0.0, "weight of the --ptx-data LM loss in the actor's loss; 0 = off")
    max_steps: int = opt(40, "PPO steps: each samples answers to --rollout-batch-size prompts, scores them and "
                         "updates")
    rollout_batch_size: int = opt(8, "prompts sampled per PPO step (each --group-size times)")
    batch_size: int = opt(4, "sampled answers per mini-batch of the update (a step's rollout is split into them)")
    ppo_epochs: int = opt(1, "passes over each rollout; more reuses the samples but drifts off-policy "
                          "(watch clipfrac)")
    # Adam's first step moves every weight by ~lr whatever its gradient's size (m/sqrt(v) = +-1),
    # noise-only gradients included: warm up over a few steps (4 of 40), not one.
    warmup_ratio: float = opt(0.1, "fraction of the steps over which the learning rates rise linearly to their "
                              "peak")
    advantage: str = opt("gae", "gae (PPO: critic and GAE), group (GRPO: score against its prompt's group), rloo "
                         "(leave-one-out) or reinforce++ (whitened returns); the last three: no critic")
    group_size: int = opt(1, "answers sampled per prompt; group and rloo need 2 or more")
    lr: float | None = opt(None, "the actor's peak learning rate; unset: 2e-4 with LoRA, 2e-5 full fine-tuning")
    critic_lr: float | None = opt(None, "the critic's peak learning rate; unset: the actor's")
    max_prompt_length: int = opt(256, "prompt tokens kept; a longer prompt loses its start")
    max_new_tokens: int = opt(64, "the longest answer sampled, in tokens")
    temperature: float = opt(1.0, "sampling temperature of the rollouts (the log-probs use the same); 1 = the "
                             "model's own distribution")
    top_k: int = opt(0, "sample among the k likeliest tokens only; 0 = off")
    top_p: float = opt(1.0, "nucleus sampling: among the likeliest tokens holding this probability; 1 = off")
    kl_coef: float = opt(0.05, "weight of the KL penalty to the reference (SFT) model: higher stays closer and "
                         "games the reward less (--kl-target: its start)")
    kl_estimator: str = opt("k1", "per-token KL in gae/reinforce++ rewards: k1 (log-ratio) or k3 (never "
                            "negative); group/rloo: logged only, their loss uses k3")
    kl_target: float | None = opt(None, "adaptive KL: the coefficient moves each step to hold the KL per answer "
                                  "(nats) near this; unset: fixed --kl-coef")
    kl_horizon: int = opt(10000, "adaptive KL: how slowly the coefficient moves, in sampled answers (Ziegler et al. "
                          "2019)")
    gamma: float = opt(1.0, "per-token discount of gae and reinforce++ returns; 1 = none (one score at the end)")
    lam: float = opt(0.95, "GAE lambda: 1 = whole returns (no bias from the critic, more variance); lower leans on "
                     "the critic")
    clip_eps: float = opt(0.2, "PPO clip: the policy loss clips the probability ratio to [1 - eps, 1 + eps]")
    value_clip: float = opt(0.2, "clipped value loss: a value may move this far from its rollout value per update")
    vf_coef: float = opt(1.0, "scale of the critic's loss (the critic has its own AdamW: it matters mostly "
                         "through --max-grad-norm)")
    entropy_coef: float = opt(0.0, "entropy bonus in the policy loss: > 0 keeps sampling diverse; 0 = off")
    normalize_reward: bool = opt(False, "normalize scores by a running mean and std (a reward model's scale is "
                                 "arbitrary)")
    reward_clip: float | None = opt(10.0, "clip each score (after normalization) to [-x, x] against outliers")
    whiten_advantages: bool = opt(True, "gae: normalize advantages to mean 0 and std 1 over the batch")
    eval_every: int = opt(0, "score answers to the held-out prompts every N steps (and before the first and after "
                          "the last); 0 = only then")
    save_every: int = opt(10, "write a checkpoint every N steps and at the last, for --resume; 0 = none")
    eval_prompts: int = opt(16, "prompts held out for evaluation (from --prompts, or the first of --eval-data)")
    # Verifiable rewards and the GRPO family's variants (rl/rewards.py, rl/losses.py).
    reward: list[str] | None = opt(None, "a reward instead of the reward model, repeatable: math, math:strict, "
                                   "format:REGEX, length:N, python:module:fn or rm:PATH, each [=WEIGHT]")
    scale_rewards: str = opt("group", "group: GRPO's centered scores divided by their group's std; batch: by the "
                             "batch's; none: undivided (Dr. GRPO)")
    loss_agg: str = opt("token-mean", "token losses to one: token-mean (tokens alike), seq-mean-token-mean "
                        "(answers alike: GRPO), token-sum-norm (/ max-new-tokens: Dr. GRPO)")
    clip_eps_high: float | None = opt(None, "upper clip of the ratio, 1 + this (DAPO's clip-higher, e.g. 0.28); "
                                      "unset: --clip-eps")
    dynamic_sampling: bool = opt(False, "group, rloo: leave out of the update each group whose answers all scored "
                                 "the same (DAPO)")
    overlong_penalty: int = opt(0, "DAPO's soft overlong penalty: answers in the last N tokens before "
                                "--max-new-tokens lose up to 1, linearly; 0 = off")
    gold_eval: bool = opt(False, "also log eval_gold, the hidden gold judge's score of the held-out answers (the "
                          "demo's check, never a reward)")
    rollout_engine: str = opt("torch", "what samples the rollouts: torch (ours, the trainer's own weights), llamacpp, "
                              "vllm (optional extras, corrected by --tis-cap) or auto (the fastest installed here)")
    rollout_quant: str = opt("f16", "llamacpp: its copy of the base: f16, q8_0, q4_0 or base (the format nearest "
                             "--quantize-base)")
    tis_cap: float = opt(2.0, "truncated importance sampling: each token's weight min(p_trainer / p_engine, cap) "
                         "corrects an engine whose numbers differ from the trainer's (TRL's, verl's 2)")
    reward_timeout: float = opt(60.0, "seconds a program reward (--reward) may take on one batch, the probe "
                                "before training included, before the run stops")


@dataclass
class PreferenceConfig(TrainConfig):
    output: str = opt("runs/dpo", "run directory; the trained policy goes to final/ (merged) and adapter/ "
                      "(with LoRA)")
    data: str = opt("prefs.jsonl", "preference pairs (any format `frugal rm` reads); kto also takes unpaired "
                    "prompt/completion/label rows")
    loss: str = opt("dpo", "dpo, ipo, cdpo (DPO for noisy labels), simpo or orpo (no reference model), or kto "
                    "(unpaired rows)")
    beta: float | None = opt(None, "dpo, ipo, cdpo, kto: how close to the reference (higher: closer); simpo: the "
                             "reward scale; unset: 0.1, simpo 2.0")
    label_smoothing: float | None = opt(None, "dpo, cdpo, simpo: the probability that a label is wrong; unset: 0, "
                                        "cdpo 0.1")
    simpo_gamma: float = opt(1.0, "simpo: the reward margin by which chosen must beat rejected")
    orpo_lambda: float = opt(0.1, "orpo: weight of the odds-ratio term beside the chosen answer's NLL")
    desirable_weight: float = opt(1.0, "kto: loss weight of desirable rows (raise it when they are fewer)")
    undesirable_weight: float = opt(1.0, "kto: loss weight of undesirable rows (raise it when they are fewer)")
    precompute_ref: bool = opt(False, "compute the reference log-probs once before training, kept in --output: "
                               "no reference forward (or full copy) while training")
    eval_split: float = opt(0.1, "fraction of the rows held out for evaluation, at most --max-eval-rows")


@dataclass
class KTOConfig(PreferenceConfig):
    output: str = opt("runs/kto", "run directory; the trained policy goes to final/ (merged) and adapter/ "
                      "(with LoRA)")
    loss: str = opt("kto", "kto (unpaired rows; a pair gives a desirable and an undesirable row), or any loss of "
                    "`frugal dpo`")


STAGE_CONFIGS = {"sft": SFTConfig, "rm": RewardConfig, "ppo": PPOConfig, "dpo": PreferenceConfig,
                 "kto": KTOConfig}


def from_dict(cls, data: dict, source: str = "config"):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown} for {cls.__name__}")
    return validate(cls(**coerce_numbers(cls, data)), source)


def load_yaml(path) -> dict:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of field: value")
    data.pop("history", None)  # a run's config.yaml may be reused as --config: its history is not a field
    return data


# ---- validation: every field's rule in one table (field -> (test, what it asks)), applied by
# from_dict (flags and YAML: one line before anything loads) and by the trainers (the Python API).
_INF = float("inf")
_FP32_MAX = 3.4028234663852886e38
# Adam's first step moves a weight by lr / (1 - beta1) = 10 lr: past this it is no fp32 number.
LR_MAX = _FP32_MAX / 10


def _at_least(n):
    return (lambda v: v >= n), f">= {n}"


def _interval(lo, hi, lo_open=False, hi_open=False):
    text = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return (lambda v: (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)), text


_POSITIVE = (lambda v: v > 0), "> 0"
_LR = (lambda v: 0 < v <= LR_MAX), f"in (0, {LR_MAX:.3g}] (Adam's first step, 10 x lr, must be an fp32 number)"
FIELD_RULES = {
    **{name: _at_least(1) for name in ("max_steps", "batch_size", "grad_accum", "max_rows", "max_nonfinite_steps",
                                       "schedule_steps", "rollout_batch_size", "ppo_epochs", "group_size",
                                       "max_prompt_length", "max_new_tokens", "kl_horizon")},
    **{name: _at_least(0) for name in ("max_eval_rows", "lora_rank", "eval_every", "save_every", "keep_checkpoints",
                                       "top_k", "overlong_penalty", "eval_prompts", "weight_decay", "max_grad_norm",
                                       "center_coef", "ptx_coef", "temperature", "kl_coef", "vf_coef", "orpo_lambda",
                                       "critic_warmup_steps")},
    **{name: _POSITIVE for name in ("lora_alpha", "kl_target", "clip_eps", "value_clip", "reward_clip",
                                    "clip_eps_high", "beta", "desirable_weight", "undesirable_weight",
                                    "reward_timeout", "tis_cap")},
    "max_length": _at_least(2),  # a prompt token and an answer token
    "lr": _LR, "critic_lr": _LR, "head_lr": _LR,
    "seed": _interval(0, 2**32 - 1),  # numpy's seeds
    "warmup_ratio": _interval(0, 1), "eval_split": _interval(0, 1, hi_open=True),
    "top_p": _interval(0, 1, lo_open=True), "gamma": _interval(0, 1), "lam": _interval(0, 1),
    "label_smoothing": _interval(0, 0.5, hi_open=True),
}


def _type_problem(f, value) -> str | None:
    """What is wrong with the type of `value` for field `f` (its annotation), or None. Only plain
    annotations are checked (a pipeline's nested sections are their own configs)."""
    kinds = {k.strip() for k in str(f.type).split("|")}
    if not kinds <= {"int", "float", "bool", "str", "list[str]", "None"}:
        return None
    if value is None:  # a str field may be None too (ppo's reward_model with program rewards only)
        return None if kinds & {"None", "str"} else "a value (not null)"
    if "bool" in kinds:
        return None if isinstance(value, bool) else "true or false"
    if "int" in kinds:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if "float" in kinds:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if "list[str]" in kinds:
        ok = isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)
        return None if ok else "a list of strings"
    return None if isinstance(value, str) else "a string"


def validate(config, source: str = "config"):
    """Raise UserError (one line naming the flag and the value) for the first field whose type
    or range is wrong (FIELD_RULES); numbers must be finite."""
    where = "" if source in ("config", "flags") else f"{source}: "
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        flag = "--" + f.name.replace("_", "-")
        wrong = _type_problem(f, value)
        if wrong:
            raise UserError(f"{where}{flag} must be {wrong}, not {value!r}")
        if isinstance(value, float) and not -_INF < value < _INF:  # nan compares false too
            raise UserError(f"{where}{flag} must be a finite number, not {value!r}")
        test, text = FIELD_RULES.get(f.name, (None, None))
        if test and value is not None and not test(value):
            raise UserError(f"{where}{flag} must be {text}, not {value!r}")
    return config


def coerce_numbers(cls, data: dict) -> dict:
    """YAML reads 1e-4 (no dot) as a string: a numeric field's string that is a number becomes one."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = dict(data)
    for name, value in data.items():
        if isinstance(value, str) and kinds.get(name, "").split("|")[0].strip() in ("int", "float"):
            try:
                number = float(value)
            except ValueError:
                continue
            out[name] = int(number) if kinds[name].startswith("int") and number.is_integer() else number
    return out
