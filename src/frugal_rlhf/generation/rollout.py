"""Rollouts: a batch of left-padded prompts sampled to completion through the decode batch.

Used by PPO/GRPO rollouts, preference sampling, evaluation and chat. All rows join at the
first step (copies of one prompt, GRPO's group, are prefilled once); a row leaves the
decode batch as soon as it emits a stop token, so the batch's longest row no longer makes
finished rows compute. The result keeps the familiar shape: prompt (left-padded) + response
columns, pad after a row's first stop token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .sampling import SampleConfig, choose_next, draw_uniforms, picked_logprobs
from .slots import DecodeBatch, _positions


@dataclass
class Rollout:
    sequences: Tensor  # [B, P+N] prompt (left-padded) + response (pad after the first EOS)
    attention_mask: Tensor  # [B, P+N] 1 for real prompt and response tokens (incl. the first EOS)
    action_mask: Tensor  # [B, N] 1 for response tokens up to and including the first EOS
    prompt_length: int  # P
    logprobs: Tensor  # [B, N] float32 log-prob of each response token when it was sampled (0 where masked)


class _Columns:
    """The response columns being filled: tokens, their log-probs, which rows are finished."""

    def __init__(self, batch: int, steps: int, config: SampleConfig, device):
        self.tokens = torch.full((batch, steps), config.pad_token_id, dtype=torch.long, device=device)
        self.actions = torch.zeros(batch, steps, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(batch, steps, dtype=torch.float32, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos = torch.tensor(config.eos_token_ids, dtype=torch.long, device=device)
        self.temperature = config.temperature
        self.used = 0

    def put(self, step: int, rows: Tensor, logits: Tensor, tokens: Tensor) -> Tensor:
        """Record the tokens picked for `rows` at `step`; returns which of them stopped."""
        self.tokens[rows, step] = tokens
        self.actions[rows, step] = 1  # the EOS-emitting step still counts
        self.logprobs[rows, step] = picked_logprobs(logits, tokens, self.temperature)
        stopped = torch.isin(tokens, self.eos)
        self.finished[rows[stopped]] = True
        self.used = step + 1
        return stopped

    def rollout(self, input_ids: Tensor, attention_mask: Tensor) -> Rollout:
        n = self.used
        actions = self.actions[:, :n]
        return Rollout(torch.cat([input_ids, self.tokens[:, :n]], 1), torch.cat([attention_mask, actions], 1),
                       actions, input_ids.shape[1], self.logprobs[:, :n])


def decode_loop(new_batch, input_ids, attention_mask, config: SampleConfig, generator=None, on_step=None,
                group: int = 1) -> Rollout:
    """The sampling loop over a decode batch: `new_batch(slots)` gives one with `join`, `step` and
    `leave` as slots.DecodeBatch has them (our model's; llama.cpp's in generation/llamacpp.py),
    so that every engine picks tokens with the same rule from the same random stream."""
    device = input_ids.device
    batch = input_ids.shape[0]
    ids, mask = input_ids.long(), attention_mask.long().to(device)
    cols = _Columns(batch, config.max_new_tokens, config, device)
    if config.max_new_tokens == 0:
        return cols.rollout(ids, mask)
    decode = new_batch(batch)
    live = torch.arange(batch, device=device)  # the row in each active slot
    logits = decode.join(ids[::group], mask[::group], live.tolist(), config.max_new_tokens, copies=group)
    for step in range(config.max_new_tokens):
        # Uniforms for every row, finished or not: the random stream does not depend on
        # which rows are still running (the reference draws the same way).
        uniforms = draw_uniforms(batch, generator, device)[live] if config.temperature > 0 else None
        tokens = choose_next(logits, config, uniforms=uniforms)
        stopped = cols.put(step, live, logits, tokens)
        keep_going = on_step(cols.tokens[:, step].clone(), cols.finished.clone()) if on_step is not None else True
        if cols.finished.all() or keep_going is False or step == config.max_new_tokens - 1:
            break  # no forward for a token we would never sample from
        decode.leave((~stopped).tolist())
        live = live[~stopped]
        logits = decode.step(tokens[~stopped])
    return cols.rollout(ids, mask)


def _run(model, input_ids, attention_mask, config, generator, on_step, group) -> Rollout:
    return decode_loop(lambda slots: DecodeBatch(model, slots), input_ids, attention_mask, config, generator, on_step,
                       group)


def _reference_run(model, input_ids, attention_mask, config, generator) -> Rollout:
    """No cache and no decode batch: every step runs the whole sequence, finished rows included."""
    device = input_ids.device
    batch = input_ids.shape[0]
    seqs, mask = input_ids.long(), attention_mask.long().to(device)
    cols = _Columns(batch, config.max_new_tokens, config, device)
    everyone = torch.arange(batch, device=device)
    for step in range(config.max_new_tokens):
        logits = model(input_ids=seqs, attention_mask=mask, position_ids=_positions(mask)).logits[:, -1]
        tokens = choose_next(logits, config, generator)
        alive = ~cols.finished
        tokens = torch.where(alive, tokens, torch.full_like(tokens, config.pad_token_id))
        cols.put(step, everyone[alive], logits[alive], tokens[alive])
        seqs = torch.cat([seqs, tokens[:, None]], 1)
        mask = torch.cat([mask, alive.long()[:, None]], 1)
        if cols.finished.all():
            break
    return cols.rollout(input_ids.long(), attention_mask.long().to(device))


def _guarded(run, model, *args) -> Rollout:
    was_training = model.training
    model.eval()  # dropout off while sampling, whatever the caller was doing
    try:
        with torch.inference_mode():
            out = run(model, *args)
    finally:
        model.train(was_training)
    # Inference tensors cannot be saved for backward (e.g. by an embedding lookup in
    # the PPO update); cloning outside inference_mode gives ordinary tensors.
    return Rollout(out.sequences.clone(), out.attention_mask.clone(), out.action_mask.clone(), out.prompt_length,
                   out.logprobs.clone())


def sample(model, input_ids: Tensor, attention_mask: Tensor, config: SampleConfig,
           generator: torch.Generator | None = None,
           on_step: Callable[[Tensor, Tensor], bool] | None = None, group: int = 1) -> Rollout:
    """Sample up to `config.max_new_tokens` tokens per row through the decode batch.

    `on_step(new_tokens [B], finished [B])` runs after every step (streaming); returning
    False stops generation after that step (cancellation). `group` > 1: the rows are groups
    of that many adjacent copies of a prompt (GRPO), whose prompt is prefilled once.
    """
    return _guarded(_run, model, input_ids, attention_mask, config, generator, on_step, group)


def reference_sample(model, input_ids: Tensor, attention_mask: Tensor, config: SampleConfig,
                     generator: torch.Generator | None = None) -> Rollout:
    """The same sampling without a KV cache (full forward each step); for tests only."""
    return _guarded(_reference_run, model, input_ids, attention_mask, config, generator)
