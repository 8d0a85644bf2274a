"""The training loops: `from frugal_rlhf.trainers import SFTTrainer, RewardTrainer, PPOTrainer`."""
from .ppo import PPOTrainer
from .reward import RewardTrainer
from .supervised import SFTTrainer

__all__ = ["PPOTrainer", "RewardTrainer", "SFTTrainer"]
