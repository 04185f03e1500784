"""GRPO training, laid out along the data path.

- :mod:`.update`: the update's math (log-probs at the source states, old log-probs recomputed);
- :mod:`.trainer`: set-up, one iteration (prompts -> rollout -> score -> advantages -> update),
  logging, checkpoints, export;
- :mod:`.cli`: ``python -m g2rpo.train`` / ``torchrun --nproc_per_node N -m g2rpo.train``.
"""

from .cli import main
from .trainer import Trainer, TrainingError

__all__ = ["Trainer", "TrainingError", "main"]
