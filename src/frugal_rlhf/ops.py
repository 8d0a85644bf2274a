"""Pure tensor functions that the model layer needs as much as the RL math does; here, at the
bottom, so that models/ does not import rl/."""
from __future__ import annotations

import torch
from torch import Tensor


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: logsumexp(z) - sum(p * z).
    ``-inf`` logits are clamped to the dtype minimum so they contribute exactly 0."""
    logits = logits.clamp(min=torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
