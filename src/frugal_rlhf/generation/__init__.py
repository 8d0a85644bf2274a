"""The generation engine: a preallocated KV cache of slots that rows join and leave between
decode steps (slots), the next-token rule (sampling), and batch rollouts on top (rollout).
Rollouts, preference sampling, evaluation, chat and the server all generate through it."""
from .rollout import Rollout, reference_sample, sample
from .sampling import SampleConfig, choose_next, draw_uniforms, picked_logprobs
from .slots import DecodeBatch

__all__ = ["DecodeBatch", "Rollout", "SampleConfig", "choose_next", "draw_uniforms", "picked_logprobs",
           "reference_sample", "sample"]
