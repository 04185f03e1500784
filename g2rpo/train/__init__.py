"""GRPO training, laid out along the data path.

- :mod:`.setup`: the policy (dtype, LoRA, FSDP2), the reference, the optimiser and LR schedule;
- :mod:`.update`: the update's math (log-probs at the source states, old log-probs recomputed,
  which transitions each optimizer step trains);
- :mod:`.optimize`: the optimizer steps of one iteration (surrogate, KL, clipping, checks);
- :mod:`.loop`: the :class:`Trainer`, one iteration: prompts -> rollout -> score -> advantages ->
  update -> log -> checkpoint;
- :mod:`.logs`: metrics.jsonl, TensorBoard, wandb, image grids;
- :mod:`.rundir`: checks before models load, the output folder's lock, the resume policy;
- :mod:`.cli` / ``__main__``: ``python -m g2rpo.train`` / ``torchrun --nproc_per_node N -m g2rpo.train``.
"""

from .cli import main
from .loop import Trainer
from .optimize import TrainingError

__all__ = ["Trainer", "TrainingError", "main"]
