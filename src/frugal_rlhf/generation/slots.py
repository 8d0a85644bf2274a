"""The decode batch: a preallocated KV cache of slots that rows join and leave between steps.

Every layer's keys and values live in one tensor [slots, kv_heads, capacity, head_dim],
allocated once (grown only when a joining row needs more columns than any before it), so
a decode step writes one column per row instead of concatenating the whole cache.

Rows are independent inside it: a row joins with a prefill of its prompt (left-padded
with the other rows joining at the same time, exactly as a plain batched prefill), its
keys and values are copied into a free slot, and from then on every decode step writes
its new key at its own next column. Columns a row does not own (padding, columns past its
end) are masked out per row, so rows of any lengths and ages share a step. When rows
leave, the live rows are moved down to the lowest slots, so a step always runs on the
contiguous slots [0, active): nothing is computed for finished rows, and their slots are
reused by the next rows to join (iteration-level scheduling, as vLLM and TGI do it).
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from ..device import compile_decode


class SlotCache(Cache):
    """The model-facing side: `update` writes each row's new key at that row's column.

    Before each decode step the batch points it at (rows, columns, width); the model's
    attention layers then call `update` once per layer and attend over columns [0, width).
    """

    def __init__(self):
        super().__init__(layers=[])
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.rows = self.cols = None
        self.width = 0

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self.rows, :, self.cols] = key_states[:, :, 0]
        values[self.rows, :, self.cols] = value_states[:, :, 0]
        n = key_states.shape[0]
        return keys[:n, :, :self.width], values[:n, :, :self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.width - 1, 0)


def _positions(attention_mask: Tensor) -> Tensor:
    # With left padding, column index != token position. Real tokens must be numbered
    # 0, 1, 2, ... from their own first real token, otherwise a padded row sees shifted
    # (rotary / learned) positions and samples differently from the same prompt alone.
    return (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)


def _contiguous_head_input(model) -> None:
    """Hand the LM head a contiguous input. With `logits_to_keep=1` a prefill's last position
    reaches the head as a strided view [B, 1, H], on which torch's CPU linear broadcasts the
    [V, H] weight to every row: one prefill of 32 prompts on SmolLM2-135M's 49152 x 576 head in
    bf16 took 1.7 GiB more (the nf4 demo's preference stage peaked at 2.46 GiB for it), against
    0.01 GiB for the same rows contiguous. Registered once per model."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_contiguous_input", False):
        return
    head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    head._contiguous_input = True


class DecodeBatch:
    """Up to `slots` rows decoding together; `rows` holds the caller's handle of each active slot.

    `adapters`: the model is a peft model with several LoRA adapters and every row names
    its own (peft's mixed-batch inference), so rows of different policies share a step.
    """

    def __init__(self, model, slots: int, adapters: bool = False):
        self.model, self.slots = model, slots
        _contiguous_head_input(model)
        self.cache = SlotCache()
        self.rows: list = []
        self.adapter_names: list[str] | None = [] if adapters else None
        self.device = next(model.parameters()).device
        self.length = torch.zeros(slots, dtype=torch.long, device=self.device)  # next column to write
        self.position = torch.zeros(slots, dtype=torch.long, device=self.device)  # next token position
        self.valid = torch.zeros(slots, 0, dtype=torch.bool, device=self.device)  # columns a row attends to
        self.steps = 0  # decode steps run (tests count them: latency in steps, not seconds)
        eager = getattr(getattr(model, "config", None), "_attn_implementation", None) == "eager"
        self._additive_mask = eager  # eager attention adds its mask; sdpa takes booleans
        self._keep = True
        # The decode step (one token per row; only the row count and the attended width vary,
        # compiled as dynamic dimensions) is what a compiler can speed up; prefills stay eager.
        options = compile_decode(self.device)
        self._decoder = torch.compile(model, **options) if options is not None else model

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def free(self) -> int:
        return self.slots - len(self.rows)

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def _forward(self, model=None, **kwargs) -> tuple[Tensor, object]:
        """One forward pass returning last-position logits [B, V] and the model's cache.

        `logits_to_keep=1` stops the LM head from projecting every prompt position to the
        vocabulary (B*P*V floats at prefill). Models (or wrappers) that do not accept it get
        a TypeError once, after which we stop passing it.
        """
        model = self.model if model is None else model
        if self._keep:
            try:
                out = model(**kwargs, logits_to_keep=1)
            except TypeError as err:
                if "logits_to_keep" not in str(err):
                    raise
                self._keep = False
                out = model(**kwargs)
        else:
            out = model(**kwargs)
        return out.logits[:, -1], getattr(out, "cache", None)

    def _reserve(self, columns: int, like: tuple[list[Tensor], list[Tensor]] | None = None) -> None:
        """Make room for `columns` columns per slot: allocated on the first join (shaped like
        the prefill's keys and values), then grown by doubling, so growth copies stay rare."""
        if columns <= self.capacity:
            return
        new = max(columns, 2 * self.capacity)
        like = like or (self.cache.keys, self.cache.values)
        for store, fresh in zip((self.cache.keys, self.cache.values), like):
            for layer, src in enumerate(fresh):
                grown = torch.zeros(self.slots, src.shape[1], new, src.shape[3], dtype=src.dtype, device=self.device)
                if layer < len(store):
                    grown[:, :, :self.capacity] = store[layer]
                    store[layer] = grown
                else:
                    store.append(grown)
        valid = torch.zeros(self.slots, new, dtype=torch.bool, device=self.device)
        valid[:, :self.capacity] = self.valid
        self.valid = valid

    def join(self, input_ids: Tensor, attention_mask: Tensor, rows: list, room: int, copies: int = 1,
             adapter_names: list[str] | None = None) -> Tensor:
        """Prefill left-padded prompts [k, W] into k*copies free slots; next-token logits [k*copies, V].

        `rows`: the caller's handles, k*copies of them (each prompt's copies adjacent: a prompt
        shared by a group is prefilled once). `room`: the columns reserved for each row's new
        tokens now (a row that needs more later makes the cache grow).
        `adapter_names`: with adapters, one per prompt.
        """
        k, width = input_ids.shape
        count = k * copies
        if count > self.free or len(rows) != count:
            raise ValueError(f"{count} rows to join, {self.free} free slots, {len(rows)} handles")
        mask = attention_mask.long()
        extra = {"adapter_names": adapter_names} if self.adapter_names is not None else {}
        # With no cache passed, the model builds its own from its config for the prefill; its
        # keys and values are then copied into the slots.
        logits, prefill = self._forward(input_ids=input_ids, attention_mask=mask, position_ids=_positions(mask),
                                        use_cache=True, **extra)
        layers = prefill.layers
        if any(getattr(layer, "is_sliding", False) for layer in layers):
            raise ValueError("models with sliding-window attention layers are not supported by the generation engine")
        self._reserve(width + room, ([layer.keys for layer in layers], [layer.values for layer in layers]))
        start, end = self.active, self.active + count
        for store, fresh in ((self.cache.keys, [layer.keys for layer in layers]),
                             (self.cache.values, [layer.values for layer in layers])):
            for layer, src in enumerate(fresh):
                # The whole slot is rewritten: a masked column still enters attention as
                # 0 * value, and a stale NaN left by a failed row would poison the new one.
                store[layer][start:end].zero_()
                store[layer][start:end, :, :width] = src.repeat_interleave(copies, 0) if copies > 1 else src
        self.valid[start:end] = False
        self.valid[start:end, :width] = mask.bool().repeat_interleave(copies, 0)
        self.length[start:end] = width
        self.position[start:end] = mask.sum(-1).repeat_interleave(copies, 0)
        self.rows.extend(rows)
        if self.adapter_names is not None:
            self.adapter_names.extend(name for name in adapter_names for _ in range(copies))
        return logits.repeat_interleave(copies, 0) if copies > 1 else logits

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per active row ([active], slot order); next-token logits [active, V]."""
        n = self.active
        rows = torch.arange(n, device=self.device)
        cols = self.length[:n]
        self._reserve(int(cols.max()) + 1)
        self.valid[rows, cols] = True
        width = int(cols.max()) + 1
        self.cache.rows, self.cache.cols, self.cache.width = rows, cols.clone(), width
        allowed = self.valid[:n, None, None, :width]
        mask = allowed if not self._additive_mask else torch.zeros(
            allowed.shape, dtype=self.cache.keys[0].dtype, device=self.device).masked_fill(
            ~allowed, torch.finfo(self.cache.keys[0].dtype).min)
        extra = {"adapter_names": self.adapter_names} if self.adapter_names is not None else {}
        logits, _ = self._forward(self._decoder, input_ids=tokens[:, None], attention_mask=mask,
                                  position_ids=self.position[:n, None].clone(), cache=self.cache, use_cache=True,
                                  **extra)
        self.length[:n] += 1
        self.position[:n] += 1
        self.steps += 1
        return logits

    def leave(self, keep: list[bool]) -> None:
        """Drop the active rows whose `keep` is False; the others move down to the lowest slots."""
        live = [i for i, k in enumerate(keep) if k]
        if len(live) == self.active:
            return
        moves = [(dst, src) for dst, src in enumerate(live) if dst != src]
        if moves:
            dst = torch.tensor([d for d, _ in moves], device=self.device)
            src = torch.tensor([s for _, s in moves], device=self.device)
            for store in (self.cache.keys, self.cache.values):
                for tensor in store:
                    tensor[dst] = tensor[src]  # whole slots: see join() on stale columns
            for state in (self.length, self.position, self.valid):
                state[dst] = state[src]
        self.rows = [self.rows[i] for i in live]
        if self.adapter_names is not None:
            self.adapter_names = [self.adapter_names[i] for i in live]
