"""The training loops: `from frugal_rlhf.trainers import SFTTrainer, RewardTrainer, PPOTrainer, PreferenceTrainer`."""
from .ppo import PPOTrainer
from .preference import PreferenceTrainer
from .reward import RewardTrainer
from .supervised import SFTTrainer

__all__ = ["PPOTrainer", "PreferenceTrainer", "RewardTrainer", "SFTTrainer"]
