"""The third fidelity pass (issue 29): the pipelines' own schedules, MixGRPO's reward weights, DanceGRPO's last
step, one home for the strategies' defaults, Flow-GRPO's EMA, noise dtypes, PickScore's scale, cost accounting."""

from pathlib import Path

import pytest
import torch

from g2rpo.advantage import reward_weights
from g2rpo.config import ConfigError, load_config
from g2rpo.train import Trainer

from test_train import tiny

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "configs" / "lab.yaml"
METHODS = ROOT / "configs" / "methods"


def test_mix_grpo_official_normalises_the_reward_weights(lab_world, tmp_path):
    """train_grpo_flux.py divides reward_weights by their sum before it sums the weighted advantages: with two
    rewards at weight 1 the advantage is half the unnormalised sum (Eq. 11 as G2RPO's code sums it)."""
    assert load_config([LAB, METHODS / "mix_grpo-official.yaml"]).advantage.normalize_weights
    assert not load_config([LAB, METHODS / "g2rpo-official.yaml"]).advantage.normalize_weights
    assert reward_weights([1.0, 1.0, 1.0], normalize=True) == pytest.approx([1 / 3] * 3)
    assert reward_weights([2.0, 1.0]) == [2.0, 1.0]
    advs = {}
    for norm in (False, True):
        cfg = load_config(None, tiny(lab_world, tmp_path / str(norm), iterations=1, **{
            "advantage.normalize_weights": norm,
            "rewards": [{"name": "digit_alignment", "weight": 1.0}, {"name": "digit_realism", "weight": 3.0}]}))
        trainer = Trainer(cfg, log=lambda *a, **k: None)
        real_train = trainer.train_on
        trainer.train_on = lambda ro, adv, *a, _n=norm, **k: advs.setdefault(_n, adv) is not None and \
            real_train(ro, adv, *a, **k)
        trainer.run()
    assert advs[False].abs().max() > 0
    assert torch.allclose(advs[True], advs[False] / 4, atol=1e-6)
    with pytest.raises(ConfigError, match="advantage.normalize_weights"):
        load_config(None, tiny(lab_world, tmp_path / "zero", **{
            "advantage.normalize_weights": True, "rewards": [{"name": "digit_alignment", "weight": 0.0}]}))
