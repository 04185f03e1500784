"""The lab world: a CPU-scale text-to-image world (digits) where RL measurably works in minutes."""

from .generator import LabPolicy, LabWorldConfig, build_base_model, load_lab_policy
from .world import build_world, combined_reward, default_cache_dir, load_judge, load_rewards, sample_images

__all__ = ["LabPolicy", "LabWorldConfig", "build_base_model", "build_world", "combined_reward",
           "default_cache_dir", "load_judge", "load_lab_policy", "load_rewards", "sample_images"]
