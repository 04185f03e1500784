import json

import pytest

from g2rpo.experiments.compare import CompareSettings, compare, run_method

SMALL = {"sampler": {"group_size": 4, "sde_indices": [0, 1, 2]}, "data": {"prompts_per_iteration": 4}}


@pytest.mark.slow
def test_g2rpo_raises_the_in_domain_reward_above_the_base_model(lab_world, tmp_path):
    r = run_method(lab_world, "g2rpo", seed=0, lr=3e-4, iterations=8, out=tmp_path / "run", eval_every=8,
                   overrides=SMALL)
    (it0, base), (it8, trained) = r["curve"][0], r["curve"][-1]
    assert (it0, it8) == (0, 8)
    assert trained > base + 0.02, (base, trained)
    assert set(r["final"]) == {"16", "8", "4"} and "judge_accuracy" in r["final"]["16"]


@pytest.mark.slow
def test_compare_writes_both_families_equal_lr_tables_curves_and_grids(lab_world, tmp_path):
    s = CompareSettings(methods=("dance_grpo", "g2rpo"), seeds=2, iterations=2, lr_grid=(1e-4, 3e-4),
                        eval_every=2, overrides=SMALL, eval_per_class=2, curve_per_class=2, extend_lr=0)
    res = compare(tmp_path, s, world=lab_world, log=lambda *a: None)
    assert set(res["grid"]) == {"paper", "official"}
    for family in res["grid"].values():
        assert set(family) == {"dance_grpo", "g2rpo"}
        assert all(set(per_lr) == {"0.0001", "0.0003"} and all(len(v) == 2 for v in per_lr.values())
                   for per_lr in family.values())
    assert res["lr_choice"]["official"]["g2rpo"] in {1e-4, 3e-4}
    off, pap = res["grid"]["official"]["g2rpo"]["0.0001"][0], res["grid"]["paper"]["g2rpo"]["0.0001"][0]
    assert off["optimizer_steps_per_iter"] == 3 and pap["optimizer_steps_per_iter"] == 1  # per_sde_step vs Alg. 1
    assert set(res["per_sde_step_variant"]) == {"g2rpo"}  # G2RPO's official update schedule; DanceGRPO has none
    assert res["per_sde_step_variant"]["g2rpo"][0]["optimizer_steps_per_iter"] == 3
    text = (tmp_path / "tables.md").read_text()
    for heading in ("Family `paper`", "Family `official`", "Table 1 analogue", "Equal-lr table", "Orderings",
                    "Table 4 analogue", "Fig. 1a analogue", "Reward hacking", "the update schedule alone"):
        assert heading in text
    assert (tmp_path / "curves.png").is_file()
    assert (tmp_path / "grids" / "paper.png").is_file() and (tmp_path / "grids" / "official.png").is_file()
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["iterations"] == 2


@pytest.mark.slow
def test_compare_at_equal_compute_runs_every_method_to_the_same_cost(lab_world, tmp_path):
    from g2rpo.experiments.compare import CHEAPER_VARIANTS

    s = CompareSettings(methods=("dance_grpo", "g2rpo"), families=("paper",), seeds=1, iterations=2,
                        lr_grid=(1e-4,), eval_every=1, overrides=SMALL, eval_per_class=2, curve_per_class=2,
                        per_sde_step_variant=False, budget=4000.0, cost_points=3, extend_lr=0,
                        variants={"g2rpo_subset2": CHEAPER_VARIANTS["g2rpo_subset2"]}, control=True)
    res = compare(tmp_path, s, world=lab_world, log=lambda *a: None)
    runs = [res["grid"]["paper"][m]["0.0001"][0] for m in ("dance_grpo", "g2rpo")] + \
        [res["variants"]["g2rpo_subset2"]["0.0001"][0]]
    for r in runs:  # each ends at its last iteration within the budget: equal means equal
        assert r["cost_used"] == r["total_cost"] == r["cost_curve"][-1][0] <= 4000
        assert len(r["judge_curve"]) == s.cost_points
        for point in r["judge_curve"]:  # the state evaluated at each cost point is within it
            assert point["cost"] <= point["cost_point"] and "judge_accuracy" in point
    for r in runs[:2]:  # constant cost per iteration: one more would have passed the budget
        assert r["cost_used"] + r["cost_per_iter"] > 4000
    dance, g2rpo, subset = runs
    assert dance["iterations_run"] > g2rpo["iterations_run"]  # the cheaper iteration runs more often
    assert subset["cost_per_iter"] < g2rpo["cost_per_iter"]
    text = (tmp_path / "tables.md").read_text()
    assert "Equal compute" in text and "g2rpo_subset2 (variant)" in text and "against cost" in text
    assert "Reward hacking over training" in text and "MGAI" in text
    assert (tmp_path / "cost_curves.png").is_file()
    # the random-reward control: each method at its chosen lr, trained on random_control with the run's seed
    for m in ("dance_grpo", "g2rpo"):
        (ctrl,) = res["controls"]["paper"][m]
        assert ctrl["lr"] == 1e-4 and ctrl["cost_used"] <= 4000 and ctrl["cost_per_iter"] == res["grid"]["paper"][m][
            "0.0001"][0]["cost_per_iter"]
        log = tmp_path / "runs" / f"control_paper_{m}_lr0.0001_s0" / "metrics.jsonl"
        metrics = [json.loads(x) for x in log.read_text().splitlines()]
        assert "reward/random_control" in metrics[0] and not any(k.startswith("reward/digit") for k in metrics[0])
    assert "## The random-reward control" in text and "no spread to read it by (one seed)" in text


def test_every_cheaper_variant_is_a_valid_lab_config_and_cheaper_than_g2rpo():
    """Each cheaper G2RPO variant of the equal-compute comparison loads on the lab scale (no option silently
    dropped) and rolls out fewer rows per iteration than the paper's G2RPO (the auto one once it drops)."""
    from g2rpo.config import default_config_path, load_config, merge_dicts
    from g2rpo.experiments.compare import CHEAPER_VARIANTS, LAB_WORLD, CompareSettings, preset_path
    from g2rpo.rollout.configured import strategy_from_config

    scale = merge_dicts(LAB_WORLD, CompareSettings().lab_scale)
    rows = {}
    for name, (method, family, extra) in {"g2rpo": ("g2rpo", "paper", {}), **CHEAPER_VARIANTS}.items():
        cfg = load_config([default_config_path(), preset_path(method, family)], merge_dicts(scale, extra))
        rows[name] = strategy_from_config(cfg.sampler).plan(0).forward_rows
    assert all(rows[n] < rows["g2rpo"] for n in ("g2rpo_x0", "g2rpo_coarse", "g2rpo_chain", "g2rpo_coarse_chain",
                                                  "g2rpo_subset2"))
    assert rows["g2rpo_coarse_chain"] < rows["g2rpo_coarse"] and rows["g2rpo_auto"] == rows["g2rpo"]


@pytest.mark.slow
def test_an_lr_grid_is_extended_past_the_edge_that_holds_a_methods_best(lab_world, tmp_path):
    """Two lrs: the best is always at an edge, so one more lr beyond it is run (extend_lr=1), and no more. With
    grid_seeds=1 every lr runs seed 0 and only the chosen one runs the other seed."""
    s = CompareSettings(methods=("g2rpo",), families=("paper",), seeds=2, grid_seeds=1, iterations=1,
                        lr_grid=(1e-4, 3e-4), extend_lr=1, eval_every=1, overrides=SMALL, eval_per_class=2,
                        curve_per_class=2, per_sde_step_variant=False)
    res = compare(tmp_path, s, world=lab_world, log=lambda *a: None)
    per_lr = res["grid"]["paper"]["g2rpo"]
    lrs = sorted(float(k) for k in per_lr)
    assert len(lrs) == 3 and any(abs(lr - x) < 1e-4 * x for lr in lrs for x in (1e-4 / 3, 9e-4))
    chosen = res["lr_choice"]["paper"]["g2rpo"]
    assert chosen in lrs
    assert {k: [r["seed"] for r in v] for k, v in per_lr.items()} == {
        k: ([0, 1] if float(k) == chosen else [0]) for k in per_lr}
    assert "mean over 1 seed(s) but at the chosen lr, which ran 2" in (tmp_path / "tables.md").read_text()
