"""The memory planner: which micro-batch, gradient accumulation and activation checkpointing
fit a stage into a memory budget, decided from the model's config before any weight loads.

The estimate is a sum of parts, each a pure function of a few numbers:
  runtime      the process before the model (interpreter, torch, libraries)
  load         while loading, the checkpoint's tensors beside the model being built
  weights      the frozen base in its dtype (fully trained weights: fp32)
  trained      trainable parameters: gradient and Adam's two moments (and an adapter's weight), fp32
  activations  what backward keeps per layer and token (measured on a one-layer copy of the
               model: the same dtype, kernels and adapters), plus one layer's worth in flight
  logits       one chunk of the chunked LM head (models/roles.LOGIT_CHUNK) and its gradient
  kv cache     PPO rollouts: keys and values of every generated sequence
PPO's peak is the larger of its two phases: the rollout (generation, scoring) and the update.

Exactness: the planner only splits a batch into micro-batches whose losses are summed and
divided by the weight of the whole batch (trainers/supervised.py), so the loss curve equals
the unconstrained run's up to float rounding. PPO's mini-batch is one optimizer step and
stays whole: there the planner chooses checkpointing only.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass

import torch

from ..config import PPOConfig, PreferenceConfig, RewardConfig
from ..device import autocast, compute_dtype, default_device, use_lean_heap
from ..errors import UserError
from .loading import load_config
from .quantize import bytes_per_weight
from .roles import LOGIT_CHUNK, SharedLM, _hidden_states

log = logging.getLogger("frugal_rlhf")

GiB = 2**30
UNITS = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6}
RUNTIME_BYTES = int(0.34 * GiB)  # RSS after importing torch, transformers and peft (measured: 0.34 GiB)
AUTO_MARGIN = 0.9                # --memory-budget auto: 90% of what the device has free
LOGIT_COPIES = 4                 # fp32 chunk logits, their exp, their gradient and the bf16 matmul output
# Peak RSS per byte autograd saves: gradients in flight and the allocator's retained blocks on
# top of the saved tensors. Measured (embedded default, LoRA 8, bf16; docs/benchmarks.md): RSS
# above the other parts was 1.62x the probe's saved bytes at 8 x 256 tokens (sft and rm) and
# 1.77x (sft, 4 x 512), 1.85x (rm, 4 x 512): the largest, so that a plan errs on the safe side.
ACTIVATION_RSS = 1.85
# With checkpointing (a plan that checkpoints also holds the heap lean, device.use_lean_heap): RSS
# per byte saved. Measured (`frugal bench rm --model default --dtype fp32 --gradient-checkpointing`,
# lean heap, LoRA 8, 8 pairs x 256 tokens): 1.37 GiB against 2.00 predicted with 1.85, i.e. ~0.8x
# the probe's bytes (each recomputed layer's tensors are freed at once and leave the process);
# 1.0 keeps the prediction above the measurement (1.48 GiB).
ACTIVATION_RSS_LEAN = 1.0
ADAM_BYTES = 12                  # per trained element: fp32 gradient and Adam's two moments
# `auto` on a CPU: the smallest micro-batch of at least this many tokens (accumulated exactly to
# the configured batch). Measured (docs/benchmarks.md, "The defaults"): a CPU's matmuls run at
# the same rate from this size up, so smaller micro-batches cost little speed and much memory.
LEAN_MICRO_TOKENS = 1024


def parse_size(text: str) -> int:
    """'4GiB', '8GB', '512MiB' or a number of bytes."""
    low = text.strip().lower()
    for unit, scale in UNITS.items():
        if low.endswith(unit):
            return int(float(low[:-len(unit)]) * scale)
    try:
        return int(low)
    except ValueError:
        raise UserError(f"memory size {text!r}: write e.g. 4GiB, 8GB, 512MiB or a number of bytes") from None


@dataclass(frozen=True)
class Shape:
    """What memory depends on, read from the model's config and the stage's settings."""
    params: int            # the base's parameters (tied ones once)
    layers: int
    hidden: int
    vocab: int
    kv_width: int          # keys (= values) per token per layer
    weight_bytes: int      # bytes per base element: the compute dtype, 4 when fully trained
    trained: int           # trainable elements of one role beside the base (adapter + head; 0: the base)
    extra_weights: int     # bytes of another frozen model (DPO's reference in full fine-tuning)
    load_bytes: int        # at load time: the checkpoint read (mapped) beside the dense model being built
    base_bytes: int = 0    # the base as held while training (quantized: its codes and scales); 0: params x weight_bytes


@dataclass(frozen=True)
class Costs:
    """Bytes backward keeps per layer, measured on a one-layer copy (measure_costs)."""
    per_token: float       # grows with tokens
    per_token_sq: float    # grows with tokens x sequence length (attention scores, math kernel)
    per_layer: float       # fixed per forward (e.g. autocast's low-precision copies of fp32 weights)
    checkpointed: float    # per token with activation checkpointing: the layer's input only


@dataclass(frozen=True)
class Work:
    """One optimizer step of a stage. `batch` counts rows (sft), pairs (rm, dpo: two
    sequences each) or the PPO update's mini-batch; `rollout` PPO's sequences per step."""
    stage: str
    batch: int
    accum: int
    seq_len: int
    rollout: int = 0
    roles_trained: int = 1  # PPO with a critic: 2


def layer_activations(costs: Costs, sequences: int, seq_len: int) -> float:
    return costs.per_layer + sequences * seq_len * (costs.per_token + seq_len * costs.per_token_sq)


def estimate(shape: Shape, costs: Costs, work: Work, micro: int, checkpointing: bool) -> dict[str, int]:
    """Predicted bytes of each part and the peak, for micro-batches of `micro` (rows, pairs or
    PPO sequences) with or without activation checkpointing."""
    seqs = micro * (2 if work.stage in ("rm", "dpo") else 1)
    one_layer = layer_activations(costs, seqs, work.seq_len)
    if checkpointing:  # every layer's input kept, one layer recomputed with its gradients in flight
        act = ACTIVATION_RSS_LEAN * (shape.layers * seqs * work.seq_len * costs.checkpointed + 2 * one_layer)
    else:
        act = ACTIVATION_RSS * (shape.layers + 1) * one_layer
    logit_tokens = 0 if work.stage == "rm" else min(LOGIT_CHUNK, seqs * work.seq_len)
    parts = {"runtime": RUNTIME_BYTES,
             "weights": (shape.base_bytes or shape.params * shape.weight_bytes) + shape.extra_weights,
             # an adapter's own fp32 weight beside its gradient and moments; a fully trained base
             # is its weights
             "trained": work.roles_trained * ((shape.trained * (4 + ADAM_BYTES)) if shape.trained
                                              else shape.params * ADAM_BYTES),
             "activations": int(act),
             "logits": logit_tokens * shape.vocab * 4 * LOGIT_COPIES}
    steady = parts["runtime"] + parts["weights"] + parts["trained"]
    load = parts["runtime"] + shape.extra_weights + shape.load_bytes
    update = steady + parts["activations"] + parts["logits"]
    if work.stage == "ppo":
        parts["kv_cache"] = work.rollout * work.seq_len * shape.layers * 2 * shape.kv_width * shape.weight_bytes
        # scoring forwards without gradients: one layer's activations of the whole rollout
        rollout = steady + parts["kv_cache"] + int(layer_activations(costs, work.rollout, work.seq_len))
        update = max(update, rollout)
    parts["peak"] = max(load, update)
    return parts


def choices(work: Work, lean_from: int | None = None):
    """(micro, checkpointing) in the order they are tried: on a CPU a smaller micro-batch costs
    little while recomputing activations costs ~30-40% more time, so every micro-batch without
    checkpointing comes first. PPO's mini-batch stays whole. The fastest first by default;
    with `lean_from` (the default budget, `auto`) the smallest micro-batch of at least that
    many tokens first, then the larger ones, then the smaller ones: the least memory at (nearly)
    the speed of the whole batch."""
    micros = [work.batch] if work.stage == "ppo" else [m for m in range(work.batch, 0, -1) if work.batch % m == 0]
    if lean_from:
        seqs = 2 if work.stage in ("rm", "dpo") else 1
        efficient = [m for m in micros if m * seqs * work.seq_len >= lean_from] or micros[:1]
        micros = efficient[::-1] + [m for m in micros if m not in efficient]
    return [(m, ckpt) for ckpt in (False, True) for m in micros]


@dataclass(frozen=True)
class Plan:
    micro: int
    accum: int
    checkpointing: bool
    parts: dict
    budget: int


def plan(shape: Shape, costs: Costs, work: Work, budget: int, lean_from: int | None = None) -> Plan:
    """The first choice (in `choices`' order) whose predicted peak fits, or a one-line refusal."""
    for micro, ckpt in choices(work, lean_from):
        parts = estimate(shape, costs, work, micro, ckpt)
        if parts["peak"] <= budget:
            return Plan(micro, work.accum * work.batch // micro, ckpt, parts, budget)
    least = estimate(shape, costs, work, *choices(work)[-1])
    raise UserError(f"--memory-budget {budget / GiB:.2f} GiB: nothing fits; the leanest choice ("
                    f"micro-batch {choices(work)[-1][0]}, activation checkpointing) needs {least['peak'] / GiB:.2f} "
                    f"GiB; lower --max-length or the batch size, use LoRA (--lora-rank) or a smaller model")


def table(p: Plan, work: Work) -> str:
    """The start-up table: what the planner chose and what it predicts."""
    rows = [("micro-batch", f"{p.micro} x {p.accum} = {p.micro * p.accum} per step"
             if work.stage != "ppo" else f"{p.micro} (the PPO mini-batch)"),
            ("activation checkpointing", "on" if p.checkpointing else "off"),
            *((k.replace("_", " "), f"{v / GiB:.2f} GiB") for k, v in p.parts.items() if k != "peak"),
            ("predicted peak", f"{p.parts['peak'] / GiB:.2f} GiB of {p.budget / GiB:.2f} GiB")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


# ---- from a stage config (the parts above are pure; these read configs and measure) ------------

def budget_bytes(text: str) -> int:
    """--memory-budget: a size, or `auto` = 90% of what the device has free now."""
    if text != "auto":
        return parse_size(text)
    return free_bytes()


def free_bytes() -> int:
    """90% of what the device has free now (CUDA: its free memory; CPU: MemAvailable)."""
    device = default_device()
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * AUTO_MARGIN)
    with open("/proc/meminfo") as f:
        free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    return int(free * AUTO_MARGIN)


def unmodelled(cfg) -> str | None:
    """Why the estimate does not describe this stage config (None: it does)."""
    if isinstance(cfg, PPOConfig) and not cfg.lora_rank:  # four separate models
        return "--memory-budget for ppo needs --lora-rank (the planner models the roles on one shared base)"
    return None


@dataclass(frozen=True)
class Held:
    """What a stage's algorithm holds beside the policy (its caller asks rl/algorithms.py)."""

    critic: bool = False     # PPO with a learned value function: a second trained adapter
    reference: bool = False  # a reference forward (in full fine-tuning, a frozen copy of the model)


def work_of(cfg, held: Held = Held()) -> Work:
    reason = unmodelled(cfg)
    if reason:
        raise UserError(reason)
    if isinstance(cfg, PPOConfig):
        return Work("ppo", cfg.batch_size, 1, cfg.max_prompt_length + cfg.max_new_tokens,
                    cfg.rollout_batch_size * cfg.group_size, 2 if held.critic else 1)
    stage = "dpo" if isinstance(cfg, PreferenceConfig) else "rm" if isinstance(cfg, RewardConfig) else "sft"
    return Work(stage, cfg.batch_size, cfg.grad_accum, cfg.max_length)


def shape_of(cfg, held: Held = Held()) -> tuple[Shape, Costs]:
    """The model's shape from its config and its per-layer costs measured on a one-layer
    copy: no weights are loaded."""
    hf_config = load_config(cfg.model, cfg.trust_remote_code)
    text = hf_config.get_text_config()
    dtype = compute_dtype(override=cfg.dtype)
    costs, counts = measure_costs(hf_config, dtype, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    layers, heads = text.num_hidden_layers, text.num_attention_heads
    params = counts["embedding"] + layers * counts["layer"]
    full = not cfg.lora_rank
    reference = full and held.reference  # a frozen copy of the model for the reference
    weight_bytes = 4 if full else dtype.itemsize
    base = params * weight_bytes
    if cfg.quantize_base != "none":  # the layers' weights as codes and scales; embeddings and head dense
        base = counts["embedding"] * dtype.itemsize + int(
            layers * counts["layer"] * bytes_per_weight(cfg.quantize_base, text.hidden_size))
    shape = Shape(params=params, layers=layers, hidden=text.hidden_size, vocab=text.vocab_size,
                  kv_width=(getattr(text, "num_key_value_heads", None) or heads) * (text.hidden_size // heads),
                  weight_bytes=weight_bytes,
                  trained=0 if full else layers * counts["adapter"] + text.hidden_size + 1,
                  extra_weights=params * dtype.itemsize if reference else 0,
                  # the checkpoints we convert and cache are fp32 safetensors, read beside the dense model
                  load_bytes=params * 4 + params * weight_bytes, base_bytes=base)
    return shape, costs


def measure_costs(hf_config, dtype, lora_rank: int, lora_alpha, lora_targets):
    """Bytes autograd saves for one decoder layer at three sequence lengths (a quadratic in
    the length, solved exactly), on a copy of the model with one layer and a small vocabulary:
    random weights, the run's dtype, autocast, LoRA adapters and device, a padded batch (so
    the attention takes the masked path training batches take). Also the parameter counts of
    the embeddings, of a layer and of a layer's adapter."""
    from transformers import AutoModelForCausalLM

    small = copy.deepcopy(hf_config)
    text = small.get_text_config()
    vocab, small_vocab = text.vocab_size, 256
    text.num_hidden_layers, text.vocab_size = 1, small_vocab
    for special in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids of the real vocabulary
        setattr(text, special, None)
    full = not lora_rank
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(small, dtype=torch.float32 if full else dtype)
    layer = sum(p.numel() for n, p in model.named_parameters() if ".0." in n)  # layers.0. or h.0.
    head = model.get_output_embeddings()
    vocab_rows = model.get_input_embeddings().weight.numel() + (
        0 if head is None or head.weight is model.get_input_embeddings().weight else head.weight.numel())
    embed = sum(p.numel() for p in model.parameters()) - layer + vocab_rows // small_vocab * (vocab - small_vocab)
    counts = {"embedding": embed, "layer": layer, "adapter": 0}
    device = default_device()
    model.requires_grad_(full)
    lm = SharedLM(model.to(device))
    if lora_rank:
        lm.add_adapter("measure", lora_rank, lora_alpha, lora_targets)
        counts["adapter"] = sum(p.numel() for p in lm.model.parameters() if p.requires_grad)
    params = {p.untyped_storage().data_ptr() for p in lm.model.parameters()}
    lengths, saved = (64, 128, 256), []
    for t in lengths:
        seen: dict[int, int] = {}

        def pack(x):
            storage = x.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return x

        ids = torch.randint(0, small_vocab, (1, t), device=device)
        mask = torch.ones_like(ids)
        mask[:, -1] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), autocast(device, dtype):
            hidden, _ = _hidden_states(lm.model, ids, mask)
        saved.append(sum(seen.values()))
    # c0 + c1 t + c2 t^2 through the three points (divided differences)
    (t0, t1, t2), (s0, s1, s2) = lengths, saved
    c2 = ((s2 - s1) / (t2 - t1) - (s1 - s0) / (t1 - t0)) / (t2 - t0)
    c1 = (s1 - s0) / (t1 - t0) - c2 * (t1 + t0)
    c0 = s0 - c1 * t0 - c2 * t0 * t0
    costs = Costs(per_token=max(c1, 0.0), per_token_sq=max(c2, 0.0), per_layer=max(c0, 0.0),
                  checkpointed=text.hidden_size * hidden.element_size())
    return costs, counts


def sampling_batch(hf_config, itemsize: int, batch: int, seq_len: int, budget: int | None = None) -> int:
    """The largest batch up to `batch` whose sampling state fits `budget` (default: what is free
    now, the model already loaded): per row, the KV cache of `seq_len` tokens in the compute
    dtype and a few fp32 rows of next-token logits (preference sampling, evaluation)."""
    text = hf_config.get_text_config()
    heads = text.num_attention_heads
    kv_width = (getattr(text, "num_key_value_heads", None) or heads) * (text.hidden_size // heads)
    per_row = text.num_hidden_layers * 2 * kv_width * seq_len * itemsize + LOGIT_COPIES * text.vocab_size * 4
    fits = max(1, int((free_bytes() if budget is None else budget) // per_row))
    if fits < batch:
        log.info("memory plan: sampling %d rows at a time instead of %d (%.2f GiB of state each)", fits, batch,
                 per_row / GiB)
    return min(batch, fits)


def apply_plan(cfg, held: Held = Held()):
    """A copy of a stage config with the plan for cfg.memory_budget applied (the config as it
    is with `off`); logs the table. Raises UserError when nothing fits. `auto`, the default,
    plans for what the device has free and, on a CPU, for the least memory at (nearly) full
    speed (LEAN_MICRO_TOKENS); where the planner does not model the stage it says so and
    runs the stage as configured."""
    if cfg.memory_budget in (None, "off"):
        return cfg
    auto = cfg.memory_budget == "auto"
    reason = unmodelled(cfg)
    if reason and auto:
        log.info("memory plan: none (%s); the stage runs as configured", reason.replace("--memory-budget ", ""))
        return cfg
    shape, costs = shape_of(cfg, held)
    work = work_of(cfg, held)
    lean_from = LEAN_MICRO_TOKENS if auto and default_device().type == "cpu" else None
    chosen = plan(shape, costs, work, budget_bytes(cfg.memory_budget), lean_from)
    log.info("memory plan (%s, --memory-budget %s):\n%s", work.stage, cfg.memory_budget, table(chosen, work))
    if chosen.checkpointing:
        # With checkpointing, what a layer recomputes is freed at once, and glibc's moving mmap
        # threshold keeps it resident in heap fragments: an RM step predicted at 2.0 GiB
        # peaked at 5.5 GiB that way, and at 1.4 GiB with the threshold held (device.py).
        use_lean_heap()
    else:
        hold_budget(cfg.memory_budget)
    if work.stage == "ppo":
        return dataclasses.replace(cfg, gradient_checkpointing=chosen.checkpointing or cfg.gradient_checkpointing)
    return dataclasses.replace(cfg, batch_size=chosen.micro, grad_accum=chosen.accum,
                               gradient_checkpointing=chosen.checkpointing or cfg.gradient_checkpointing)


def hold_budget(memory_budget: str | None) -> None:
    """A size given as --memory-budget is a ceiling to keep, not a hint: the heap is held lean in
    every stage under it, planned or not (sampling too), at some speed (device.use_lean_heap).
    Measured on the nf4 demo at 1.5 GiB: the reward model's stage, planned at 1.23 GiB without
    checkpointing, peaked at 2.28 GiB on a heap left to glibc."""
    if memory_budget not in (None, "off", "auto"):
        use_lean_heap()


def predicted_peak(cfg, held: Held = Held()) -> int | None:
    """The estimate for a config as it stands (the bench prints it beside the measured peak);
    None where the planner does not model the stage (PPO's four full models)."""
    if unmodelled(cfg):
        return None
    shape, costs = shape_of(cfg, held)
    return estimate(shape, costs, work_of(cfg, held), cfg.batch_size, cfg.gradient_checkpointing)["peak"]
