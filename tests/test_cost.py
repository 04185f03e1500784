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
