"""Which forwards may use dropout: none of RL's.

Hugging Face configs default to dropout 0.1 (GPT-2, OPT, Phi ...), and a model from a config
starts in training mode. PPO compares the update's log-probs with the rollout's (ratio =
exp(new - old)) and scores with the reference, the reward model and the critic: with dropout
on, two identical calls differ (measured 0.28 nats per answer, 1.0 in reward score) and the
first epoch's ratio is no longer 1. So rollouts, scoring and evaluation run in eval mode, and
the update runs in training mode (activation checkpointing needs it) with dropout off, as
the peers do.
"""
from __future__ import annotations

from torch import nn


def inference(*models):
    """Eval mode for every given model that is a module (None and plain functions are skipped)."""
    for m in models:
        if isinstance(m, nn.Module):
            m.eval()


def train_without_dropout(model: nn.Module):
    """Training mode only where it is needed besides dropout: the decoder layers that checkpoint
    their activations (transformers checks the layer's own `training` flag). Every other module,
    including the attention and MLP blocks whose dropout reads `self.training`, stays in eval mode."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.eval()
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer):
            m.training = True
