"""Log-likelihoods of whole answers, for the offline preference losses (DPO family).

Only answer positions go through the LM head (in chunks: token_logprobs), and chosen and
rejected of a pair may share their prompt's forward (PairCollator's layout, `shared` > 0).
"""
from __future__ import annotations

import torch

from .roles import Actor, token_logprobs


class SequenceScorer(Actor):
    """The policy (its adapter) or the reference (adapter None: the base with adapters off)."""

    def forward(self, input_ids, attention_mask, answer_mask, shared: int = 0):
        """(summed log-prob [B], answer token count [B]) of the tokens where `answer_mask` is set.
        With `shared` > 0, rows come in pairs whose first `shared` columns are identical, and
        every row's first answer token lies after them (its predicting position is computed)."""
        hidden, head = self.hidden(input_ids, attention_mask, shared_prefix=(2, shared) if shared else (1, 0))
        skipped = input_ids.shape[1] - hidden.shape[1]  # the shared prefix's columns, if split off
        # column j of the row predicts token j + 1: select the positions that predict answer tokens
        targets = answer_mask[:, skipped + 1:]
        logp, _ = token_logprobs(hidden[:, :-1][targets].unsqueeze(0), head,
                                 input_ids[:, skipped + 1:][targets].unsqueeze(0))
        rows = targets.nonzero()[:, 0]
        total = torch.zeros(input_ids.shape[0], dtype=logp.dtype, device=logp.device).index_add(0, rows, logp[0])
        return total, targets.sum(1)
