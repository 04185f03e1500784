"""Experiments that drive the trainer: the method comparison on the lab world (equal iterations and equal
compute), above the trainer on the data path. The lab supplies the world (model, rewards, prompts)."""
