"""The lab worlds: CPU-scale text-to-image worlds where RL runs in minutes: the digits (this package) and the
coloured compositional scenes (:mod:`g2rpo.lab.scenes`)."""

from .generator import LabPolicy, LabWorldConfig, build_base_model, load_lab_policy
from .world import build_world, combined_reward, default_cache_dir, load_judge, load_rewards, sample_images

__all__ = ["LabPolicy", "LabWorldConfig", "build_base_model", "build_world", "combined_reward",
           "default_cache_dir", "load_judge", "load_lab_policy", "load_rewards", "sample_images"]
