"""Cost accounting (issue 21): rows counted are the rows the model ran, the cumulative cost in forward-row
equivalents, and max_cost stops a run within one iteration of its budget, across --resume."""

import json

import pytest
import torch

from g2rpo.config import load_config
from g2rpo.train import Trainer, main

from test_train import _flat, _metrics, tiny

QUIET = lambda *a, **k: None  # noqa: E731


def test_rows_counted_are_rows_run_and_the_cost_adds_up(lab_world, tmp_path):
    trainer = Trainer(load_config(None, tiny(lab_world, tmp_path, iterations=2, **{"loss.kl_beta": 0.1})), log=QUIET)
    seen = {"grad": 0, "no_grad": 0}
    velocity = trainer.policy.velocity
    real = velocity.forward

    def counting(x, sigma, cond):
        seen["grad" if torch.is_grad_enabled() else "no_grad"] += x.shape[0]
        return real(x, sigma, cond)

    velocity.forward = counting
    hist = trainer.run()
    m = hist[0]
    assert m["cost/train_rows"] == 4 * 2  # one forward per (prompt, SDE slot): 4 prompts x 2 slots
    assert m["cost/reference_rows"] == m["cost/train_rows"]  # the KL term's reference forwards
    assert seen["grad"] == sum(h["cost/train_rows"] for h in hist)
    assert seen["no_grad"] == sum(h["cost/rollout_rows"] + h["cost/recompute_rows"] + h["cost/reference_rows"]
                                  for h in hist)
    for h in hist:
        assert h["cost/iteration"] == h["cost/rollout_rows"] + h["cost/recompute_rows"] + h["cost/reference_rows"] \
            + 3 * h["cost/train_rows"]
    assert hist[1]["cost"] == pytest.approx(hist[0]["cost/iteration"] + hist[1]["cost/iteration"])
    assert hist[1]["cost/total/rollout_rows"] == 2 * m["cost/rollout_rows"]
    assert all(h[k] > 0 for h in hist for k in ("time_total/rollout", "time_total/score", "time_total/update"))
    assert hist[1]["time_total/rollout"] == pytest.approx(hist[0]["time_rollout"] + hist[1]["time_rollout"])
    cfg = load_config(None, tiny(lab_world, tmp_path / "gc", iterations=1, **{"model.gradient_checkpointing": True}))
    (g,) = Trainer(cfg, log=QUIET).run()
    assert g["cost/iteration"] == g["cost/rollout_rows"] + g["cost/recompute_rows"] + 4 * g["cost/train_rows"]


def test_max_cost_stops_within_one_iteration_and_holds_across_resume(lab_world, tmp_path, capsys):
    probe = Trainer(load_config(None, tiny(lab_world, tmp_path / "probe", iterations=1)), log=QUIET).run()[0]
    per_iteration = probe["cost/iteration"]
    out = tmp_path / "run"
    args = _flat(tiny(lab_world, out, iterations=10, checkpoint_every=0))
    assert main(args + [f"max_cost={1.5 * per_iteration}"]) == 0
    metrics = _metrics(out)
    assert [m["iteration"] for m in metrics] == [1, 2]  # stopped once the budget was spent
    assert metrics[-1]["cost"] == pytest.approx(2 * per_iteration)
    assert json.loads((out / "final" / "g2rpo_export.json").read_text())["iteration"] == 2
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["iter_000002"]
    capsys.readouterr()
    assert main([f"output_dir={out}", "--resume"]) == 0  # the budget holds: nothing more to do
    assert "max_cost budget is spent" in capsys.readouterr().out
    assert main([f"output_dir={out}", "--resume", f"max_cost={3.5 * per_iteration}"]) == 0
    metrics = _metrics(out)
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["cost"] == pytest.approx(4 * per_iteration)  # the cumulative cost survived the resume


@pytest.mark.slow
def test_auto_granularity_drops_a_redundant_granularity_and_resume_keeps_it_dropped(lab_world, tmp_path):
    """sampler.auto_granularity_threshold: a granularity whose Spearman correlation with the finest stays above
    the threshold for the window stops being rolled out (fewer rows); the choice is checkpointed."""
    auto = {"sampler.granularities": [1, 2, 4], "sampler.auto_granularity_threshold": -1.0,
            "sampler.auto_granularity_window": 2}
    hist = Trainer(load_config(None, tiny(lab_world, tmp_path / "a", iterations=4, **auto)), log=QUIET).run()
    assert [h["mgai/active_granularities"] for h in hist] == [3, 1, 1, 1]  # dropped after 2 iterations above -1
    assert hist[2]["cost/rollout_rows"] < hist[1]["cost/rollout_rows"]
    lam2 = lambda m: [k for k in m if k.startswith("reward/") and k.endswith("/lambda2")]  # noqa: E731
    assert lam2(hist[1]) and not lam2(hist[2])
    plain = Trainer(load_config(None, tiny(lab_world, tmp_path / "p", iterations=1,
                                           **{"sampler.granularities": [1]})), log=QUIET).run()
    assert hist[2]["cost/rollout_rows"] == plain[0]["cost/rollout_rows"]  # exactly G2RPO with Lambda = {1}
    never = {**auto, "sampler.auto_granularity_threshold": 1.0}  # a correlation is never above 1: plain G2RPO
    off = Trainer(load_config(None, tiny(lab_world, tmp_path / "n", iterations=3, **never)), log=QUIET).run()
    full = Trainer(load_config(None, tiny(lab_world, tmp_path / "f", iterations=3,
                                          **{"sampler.granularities": [1, 2, 4]})), log=QUIET).run()
    rewards = lambda hs: [{k: v for k, v in h.items() if k.startswith("reward/")} for h in hs]  # noqa: E731
    assert rewards(off) == rewards(full) and all(h["mgai/active_granularities"] == 3 for h in off)
    out = tmp_path / "r"
    assert main(_flat(tiny(lab_world, out, iterations=2, **auto))) == 0
    assert main([f"output_dir={out}", "--resume", "iterations=4"]) == 0
    resumed = _metrics(out)
    assert [m["mgai/active_granularities"] for m in resumed] == [3, 1, 1, 1]
    assert [m["cost/rollout_rows"] for m in resumed] == [h["cost/rollout_rows"] for h in hist]
