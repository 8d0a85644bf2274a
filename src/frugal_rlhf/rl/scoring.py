"""What a rollout's answers score: a programmatic reward, the --reward specs or the reward
model (closing the turns it was trained to score), plus DAPO's overlong penalty."""
from __future__ import annotations

import torch

from ..data.tokenize import last_token_index
from . import losses as L
from .rewards import prompt_texts


def close_turns(seq, attn, stop_ids, eos_id, pad_id):
    """Append `eos_id` after the last real token of rows that do not end in a stop token
    (real tokens are contiguous: prompts padded on the left, responses on the right)."""
    last = last_token_index(attn)
    rows = torch.arange(seq.shape[0], device=seq.device)
    open_rows = ~torch.isin(seq[rows, last], torch.tensor(stop_ids, device=seq.device))
    seq = torch.cat([seq, seq.new_full((seq.shape[0], 1), pad_id)], 1)
    attn = torch.cat([attn, attn.new_zeros((attn.shape[0], 1))], 1)
    seq[rows[open_rows], last[open_rows] + 1] = eos_id
    attn[rows[open_rows], last[open_rows] + 1] = 1
    return seq, attn


class Scorer:
    """Scores [B] of a rollout's answers and their components {name: [B]} (raw, per row).

    `custom(sequences, attention_mask, prompt_length) -> [B]` replaces the reward model; a
    RewardSet (rl/rewards.py: --reward specs) scores decoded answers against their data rows
    (each prompt's `group_size` copies adjacent); otherwise the reward model scores."""

    def __init__(self, tokenizer, reward_model, rewards=None, custom=None, group_size: int = 1, stop_ids=(),
                 max_new_tokens: int = 0, overlong: int = 0):
        self.tokenizer, self.reward_model, self.rewards, self.custom = tokenizer, reward_model, rewards, custom
        self.group_size, self.stop_ids = group_size, stop_ids
        self.max_new_tokens, self.overlong = max_new_tokens, overlong
        self.names: set[str] = set()  # every component seen (the run's reward plot)

    def __call__(self, seq, attn, prompt_length, rows=None):
        parts = {}
        if self.custom is not None:
            score = self.custom(seq, attn, prompt_length)
        elif self.rewards is not None:
            score, parts = self.program_rewards(seq, attn, prompt_length, rows)
        else:
            score = self.model_score(seq, attn, prompt_length)
        if self.overlong:
            penalty = L.overlong_penalty(attn[:, prompt_length:].sum(1), self.max_new_tokens, self.overlong)
            parts["reward_overlong"] = penalty.cpu()
            score = score + penalty.to(score.device, score.dtype)
        self.names.update(parts)
        return score, parts

    def program_rewards(self, seq, attn, prompt_length, rows):
        rows = [r for r in rows for _ in range(self.group_size)]  # a group's copies are adjacent
        resp, resp_mask = seq[:, prompt_length:], attn[:, prompt_length:]
        completions = [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(resp, resp_mask)]
        model = self.model_score(seq, attn, prompt_length) if self.rewards.model_path else None
        total, parts = self.rewards(prompt_texts(rows), completions, rows, resp_mask.sum(1).tolist(), model)
        return total.to(seq.device), parts

    def model_score(self, seq, attn, prompt_length):
        # The reward model learned to score at an end-of-turn token (every training answer ends
        # with one); a response cut at max_new_tokens gets one appended so it is scored the same
        # way, instead of at an arbitrary mid-answer token the head never saw.
        seq, attn = close_turns(seq, attn, self.stop_ids, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
        answer = attn.bool()
        answer[:, :prompt_length] = False  # prompts are left-padded to prompt_length columns
        return self.reward_model(seq, attn, (self.group_size, prompt_length - 1), answer_mask=answer)
