"""GRPO training, laid out along the data path.

- :mod:`.setup`: the policy (dtype, LoRA, FSDP2), the reference, the optimiser and LR schedule;
- :mod:`.update`: the update as a component (:class:`~.update.PolicyUpdate`: which transitions each
  optimizer step trains, forward-backward per work unit with the surrogate and KL, clipping, checks);
  the log-probs themselves come from :mod:`g2rpo.rollout.scoring`;
- :mod:`.metrics`: how metrics reduce over ranks, advantage statistics, the update's summary;
- :mod:`.interrupts`: SIGINT / SIGTERM as a stop request every rank agrees on;
- :mod:`.loop`: the :class:`Trainer`, one iteration: prompts -> rollout -> score -> advantages ->
  update -> log -> checkpoint;
- :mod:`.logs`: metrics.jsonl, TensorBoard, wandb, image grids;
- :mod:`.checks`: the config's, its strategy's and its rewards' checks (:func:`check_config`);
- :mod:`.rundir`: checks before models load (files, prompts), the output folder's lock, the resume policy;
- :mod:`.cli` / ``__main__``: ``python -m g2rpo.train`` / ``torchrun --nproc_per_node N -m g2rpo.train``.
"""

from .checks import check_config
from .cli import main
from .loop import Trainer
from .update import TrainingError

__all__ = ["Trainer", "TrainingError", "check_config", "main"]
