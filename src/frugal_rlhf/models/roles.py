"""The four RLHF roles as small nn.Modules over a (possibly shared) causal LM.

One base, four roles: the reference is the base with adapters off; actor, critic and reward
are the base with their own LoRA adapter (+ a value or score head). Switching a role switches
the active adapter of the one shared peft model; no weight is ever copied. A role built
without a shared base simply owns its model (the "separate models" path).
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.tokenize import answer_length, answer_mask, encode_prompt, encode_response, last_token_index, pad
from ..device import compute_dtype
from ..ops import entropy_from_logits
from .loading import load_model
from .quantize import check_format

LOGIT_CHUNK = 512  # tokens per chunk of the vocabulary projection; bounds logits memory


class SharedLM:
    """A causal LM (plain or peft) plus the bookkeeping that makes adapter switching safe.

    peft's set_adapter() flips requires_grad off on inactive adapters; we switch with it and
    then restore requires_grad for every adapter that is being trained, so actor and critic
    can both train on one base.
    """

    def __init__(self, model):
        self.model = model
        self.trainable: set[str] = set()

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    def hf_model(self):
        return self.model.get_base_model() if self.is_peft else self.model

    def add_adapter(self, name: str, rank: int, alpha: float | None = None, targets="all-linear",
                    dropout: float = 0.0, trainable: bool = True):
        from peft import LoraConfig, get_peft_model

        if targets != "all-linear" and isinstance(targets, str):  # "q_proj,v_proj" from the CLI
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=targets,
                            lora_dropout=dropout, task_type="CAUSAL_LM")
        if self.is_peft:
            self.model.add_adapter(name, config)
        else:
            # peft keeps adapter weights in fp32 over a bf16 base (master weights for LoRA).
            self.model = get_peft_model(self.model, config, adapter_name=name)
        self._mark(name, trainable)

    def load_adapter(self, path, name: str, trainable: bool = False):
        from peft import PeftModel

        if self.is_peft:
            self.model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name,
                                                   is_trainable=trainable)
        self._mark(name, trainable)

    def _mark(self, name, trainable):
        if trainable:
            self.trainable.add(name)
        else:
            self.trainable.discard(name)
        self._restore_grad_flags()

    def _restore_grad_flags(self):
        for pname, p in self.model.named_parameters():
            if ".lora_" in pname:
                p.requires_grad_(any(f".{a}." in pname for a in self.trainable))

    @contextlib.contextmanager
    def role(self, adapter: str | None):
        """Run the model as a role: `None` = the base with adapters off (the reference)."""
        if not self.is_peft:
            yield self.model
        elif adapter is None:
            with self.model.disable_adapter():
                yield self.model
        else:
            if self.model.active_adapter != adapter:
                self.model.set_adapter(adapter)
                self._restore_grad_flags()
            yield self.model


def _chunk_logprobs(hidden, weight, targets, temperature, with_entropy, entropy_grad):
    logits = (hidden @ weight.t()).float()
    if temperature != 1.0:
        logits = logits / temperature
    logsumexp = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logsumexp
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    # A logged entropy keeps no graph: its softmax would hold ~3 more chunk-sized copies through
    # the chunk's backward (measured on the nf4 demo's PPO update: +0.2 GiB at 256 answer tokens).
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return logp, entropy_from_logits(logits)


def token_logprobs(hidden, head: nn.Module, targets, temperature: float = 1.0, with_entropy: bool = False,
                   entropy_grad: bool = True):
    """Log-probs (and entropies) of `targets` [B, T] under `head(hidden)` [B, T, V], in chunks.
    `entropy_grad` False: the entropies are for the log and carry no gradient.

    Full fp32 logits of a batch (B*T*V) are never held: each chunk's logits are recomputed in
    backward (activation checkpointing) instead of being saved.
    """
    b, t, h = hidden.shape
    flat_h, flat_t = hidden.reshape(b * t, h), targets.reshape(b * t)
    weight = head.weight
    out_lp, out_ent = [], []
    for start in range(0, b * t, LOGIT_CHUNK):
        args = (flat_h[start:start + LOGIT_CHUNK], weight, flat_t[start:start + LOGIT_CHUNK],
                temperature, with_entropy, entropy_grad)
        if torch.is_grad_enabled() and (flat_h.requires_grad or weight.requires_grad):
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        out_lp.append(lp)
        out_ent.append(ent)
    logp = torch.cat(out_lp).view(b, t)
    return logp, (torch.cat(out_ent).view(b, t) if with_entropy else None)


@functools.lru_cache(maxsize=None)
def _takes_position_ids(cls) -> bool:
    return "position_ids" in inspect.signature(cls.forward).parameters


def packed_attention(segments):
    """Positions restarting at 0 in every segment, and a block-diagonal causal mask [B, 1, T, T]
    for rows packed with several sequences (`segments`: 1, 2, ... per sequence, 0 = pad)."""
    t = segments.shape[1]
    idx = torch.arange(t, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    positions = idx - torch.where(starts, idx, 0).cummax(-1).values
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    mask = (segments[:, :, None] == segments[:, None, :]) & causal & (segments[:, None, :] > 0)
    # a pad query attends to itself: a row with no key at all turns softmax into NaN
    mask |= torch.eye(t, dtype=torch.bool, device=segments.device)
    return positions, mask[:, None]


def _layers_drop_cache(body) -> bool:
    """Whether transformers will drop the KV cache passed to the body's decoder layers: a layer
    that checkpoints its activations does when it is in training mode with gradients on. The
    layer's own flag decides, not the body's: `train_without_dropout` leaves the body in eval
    mode and only the layers in training mode. (Reading the body's flag, GRPO with
    --gradient-checkpointing ran each answer without its prompt in the update: gradient norms
    of 1e7 and more on the demo, clipped to garbage steps.)"""
    return torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) and m.training
                                           for m in body.modules())


def _hidden_states(model, input_ids, attention_mask, packed: bool = False, shared_prefix: tuple[int, int] = (1, 0)):
    """Last hidden states of the transformer body (no logits computed). `attention_mask` is
    0/1, or with `packed` segment numbers (SFTCollator). The caller says which: inspecting the
    mask would cost a device sync on every forward of every role.

    `shared_prefix` (group, p): rows come in groups of `group` whose first `p` columns are
    identical (GRPO's completions of one prompt). The body then runs those columns once per
    group, repeats their keys and values for the group, and runs only the rest of each row:
    the hidden states returned are those of the last T - p columns (exact, not an estimate).
    Every row runs whole (the same outputs, the plain cost) where the split cannot work: a
    decoder layer that checkpoints its activations drops the KV cache it is given (see
    `_layers_drop_cache`), and under FSDP (`fsdp_sharded`, set by the strategy) with gradients a block used twice
    in one forward is resharded after its first backward, before its second one needs it."""
    hf = model.get_base_model() if hasattr(model, "peft_config") else model
    body = hf.base_model
    kwargs = {}
    if packed:
        kwargs["position_ids"], attention_mask = packed_attention(attention_mask)
    elif _takes_position_ids(type(body)):  # BLOOM (ALiBi) has no positions; others need them for left padding
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    group, p = shared_prefix
    if (group > 1 and p > 0 and not packed and not _layers_drop_cache(body)
            and not (torch.is_grad_enabled() and getattr(body, "fsdp_sharded", False))):
        first = {k: v[::group, :p] for k, v in kwargs.items()}
        cache = body(input_ids=input_ids[::group, :p], attention_mask=attention_mask[::group, :p], use_cache=True,
                     **first).cache
        cache.batch_repeat_interleave(group)
        out = body(input_ids=input_ids[:, p:], attention_mask=attention_mask, cache=cache, use_cache=True,
                   **{k: v[:, p:] for k, v in kwargs.items()})
    else:
        out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return out.last_hidden_state, hf.get_output_embeddings()


class Role(nn.Module):
    """Base of the roles: an adapter name on a SharedLM, plus an optional fp32 head.

    `model` is a SharedLM (roles on one base) or a model spec string (this role owns its
    model; with `lora_rank` > 0 it gets its own adapter, otherwise it is fully trainable;
    `trainable=False` gives a frozen copy, e.g. the reference of the separate-models path).
    """

    kind = "role"

    def __init__(self, model, adapter: str | None = None, head: nn.Module | None = None, *,
                 lora_rank: int = 0, lora_alpha: float | None = None, lora_targets="all-linear",
                 dtype: str | None = None, trust_remote_code: bool = False, trainable: bool = True,
                 quantize: str = "none"):
        super().__init__()
        self.tokenizer = None
        if isinstance(model, str):
            # A frozen base is kept in the compute dtype (or quantized); fully trained weights stay fp32.
            full = trainable and not lora_rank
            check_format(quantize, lora_rank if trainable else None)
            hf, self.tokenizer = load_model(model, torch.float32 if full else compute_dtype(override=dtype),
                                            trust_remote_code, quantize)
            hf.requires_grad_(full)
            model = SharedLM(hf)
            if lora_rank and trainable:
                adapter = adapter or self.kind
                model.add_adapter(adapter, lora_rank, lora_alpha, lora_targets)
        self.lm = model
        self.adapter = adapter
        self.head = head if head is not None else self.make_head()
        # Register the LM's parameters so optimizers, strategies and state dicts see them; a
        # shared LM is registered under several roles, which PyTorch handles (same tensors).
        self.body = model.model

    def make_head(self):
        return None

    def trainable_parameters(self):
        names = self.trainable_state_names()
        return [p for n, p in self.named_parameters() if n in names]

    def trainable_state_names(self) -> set[str]:
        """This role's own trained tensors: its adapter (or the whole body) and its head."""
        names = set()
        for n, p in self.named_parameters():
            if n.startswith("head."):
                names.add(n)
            elif self.adapter is not None and f".{self.adapter}." in n:
                names.add(n)
            elif self.adapter is None and ".lora_" not in n and p.requires_grad:
                names.add(n)
        return names

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = self.trainable_state_names()
        return {n: t for n, t in self.state_dict().items() if n in names}

    def hidden(self, input_ids, attention_mask, packed: bool = False, shared_prefix: tuple[int, int] = (1, 0)):
        with self.lm.role(self.adapter) as model:
            return _hidden_states(model, input_ids, attention_mask, packed, shared_prefix)


class Actor(Role):
    """The policy (adapter) or the reference (adapter=None on a peft base: adapters off)."""

    kind = "actor"

    def forward(self, input_ids, attention_mask, num_actions: int | None = None,
                temperature: float = 1.0, with_entropy: bool = False, packed: bool = False,
                shared_prefix: tuple[int, int] = (1, 0), entropy_grad: bool = True):
        """Log-probs of the last `num_actions` tokens (all but the first when None), and with
        `with_entropy` their entropies (without gradient when not `entropy_grad`).
        `shared_prefix` (group, p) must leave the position before the first action: p < T - n."""
        hidden, lm_head = self.hidden(input_ids, attention_mask, packed, shared_prefix)
        n = num_actions or input_ids.shape[1] - 1
        # Position i predicts token i+1: only the positions that predict actions go through the head.
        return token_logprobs(hidden[:, -n - 1:-1], lm_head, input_ids[:, -n:], temperature, with_entropy,
                              entropy_grad)


class Critic(Role):
    """Values V(s_t) for the state before each of the last `num_actions` tokens.

    `pooling` reads the state as a reward model of that pooling reads an answer, so that a
    critic started from a reward model (InstructGPT's initialization) values a partial answer
    as the reward model would score it: `last`, the hidden state at the answer's last token so
    far; `mean`, the mean hidden state over the answer's tokens so far (before the first
    answer token: the prompt's last state)."""

    kind = "critic"

    def __init__(self, *args, pooling: str = "last", **kwargs):
        if pooling not in POOLINGS:
            raise ValueError(f"critic pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        super().__init__(*args, **kwargs)
        self.pooling = pooling

    def make_head(self):
        # A fresh critic starts at V=0: random values would only add noise to the first
        # advantages, and the value loss trains the head directly anyway.
        return scalar_head(self.lm.hf_model().config.get_text_config().hidden_size, random=False)

    def forward(self, input_ids, attention_mask, num_actions: int, shared_prefix: tuple[int, int] = (1, 0)):
        hidden, _ = self.hidden(input_ids, attention_mask, shared_prefix=shared_prefix)
        states = hidden[:, -num_actions - 1:-1].float()  # state t: the prompt and actions before t
        if self.pooling == "mean":  # state 0: the prompt's last; state t > 0: the mean over actions 1..t
            counts = torch.arange(num_actions, device=states.device, dtype=states.dtype).clamp(min=1)
            answer = torch.cumsum(states[:, 1:], dim=1) / counts[1:, None]
            states = torch.cat([states[:, :1], answer], 1)
        return self.head(states).squeeze(-1)


POOLINGS = ("last", "mean")


class RewardModel(Role):
    """A scalar score of each (prompt, answer) sequence, from the hidden state at its last
    non-pad token (`pooling="last"`, the InstructGPT head) or from the mean hidden state over
    its answer tokens (`"mean"`: every answer token reaches the head directly, which learned
    the gold judge's answer-wide qualities from a few hundred pairs where the last token's
    state did not; docs/benchmarks.md, issue 18)."""

    kind = "reward"

    def __init__(self, *args, pooling: str = "last", **kwargs):
        if pooling not in POOLINGS:
            raise ValueError(f"reward pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        super().__init__(*args, **kwargs)
        self.pooling = pooling

    def make_head(self):
        return scalar_head(self.lm.hf_model().config.get_text_config().hidden_size)

    def score(self, prompts, responses, **kw) -> torch.Tensor:
        """Scores [N] of (prompt, response) pairs; prompts are strings or message lists."""
        return score_texts(self, self.tokenizer, prompts, responses, **kw)

    def forward(self, input_ids, attention_mask, shared_prefix: tuple[int, int] = (1, 0), answer_mask=None):
        """`shared_prefix` (group, p) must end before every row's last token, and before its
        answer when pooling the mean; `answer_mask` [B, T] marks the answer tokens (needed
        then, ignored otherwise)."""
        hidden, _ = self.hidden(input_ids, attention_mask, shared_prefix=shared_prefix)
        skipped = input_ids.shape[1] - hidden.shape[1]  # the shared prefix's columns, if any
        if self.pooling == "mean":
            if answer_mask is None:
                raise ValueError("a mean-pooled reward model needs answer_mask (which tokens are the answer)")
            weights = answer_mask[:, skipped:].float()
            pooled = (hidden.float() * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
            return self.head(pooled).squeeze(-1)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.head(hidden[rows, last_token_index(attention_mask) - skipped].float()).squeeze(-1)


def scalar_head(hidden_size: int, random: bool = True) -> nn.Linear:
    head = nn.Linear(hidden_size, 1, dtype=torch.float32)
    # A reward head gets small random weights, not zeros: with a zero head no gradient reaches
    # the LoRA adapter below it until the head has grown, which wasted most of a short RM run.
    if random:
        nn.init.normal_(head.weight, std=1 / (hidden_size + 1) ** 0.5)
    else:
        nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


@torch.no_grad()
def score_texts(reward_model: RewardModel, tokenizer, prompts, responses, max_length: int = 1024,
                batch_size: int = 8) -> torch.Tensor:
    """Scores of (prompt, response) pairs; prompts are strings or message lists."""
    device = next(reward_model.parameters()).device
    seqs, answers = [], []
    for prompt, response in zip(prompts, responses):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        seqs.append(encode_response(tokenizer, encode_prompt(tokenizer, messages, max_length), response, max_length))
        answers.append(answer_length(tokenizer, response, max_length))
    scores = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        ids = pad(chunk, tokenizer.pad_token_id, "left").to(device)
        mask = pad([[1] * len(s) for s in chunk], 0, "left").to(device)
        scores.append(reward_model(ids, mask, answer_mask=answer_mask(mask, answers[i:i + batch_size])).float().cpu())
    return torch.cat(scores)
