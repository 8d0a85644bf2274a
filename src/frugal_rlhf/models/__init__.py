"""Model loading, the four RLHF roles, and export."""
from .export import export_adapter, export_merged
from .loading import load_model
from .roles import Actor, Critic, RewardModel, SharedLM

__all__ = ["load_model", "Actor", "Critic", "RewardModel", "SharedLM", "export_merged", "export_adapter"]
