import json

from g2rpo.lab.compare import CompareSettings, compare, run_method

SMALL = {"sampler": {"group_size": 4, "sde_indices": [0, 1, 2]}, "data": {"prompts_per_iteration": 4}}


def test_g2rpo_raises_the_in_domain_reward_above_the_base_model(lab_world, tmp_path):
    r = run_method(lab_world, "g2rpo", seed=0, lr=3e-4, iterations=8, out=tmp_path / "run", eval_every=8,
                   overrides=SMALL)
    (it0, base), (it8, trained) = r["curve"][0], r["curve"][-1]
    assert (it0, it8) == (0, 8)
    assert trained > base + 0.02, (base, trained)
    assert set(r["final"]) == {"16", "8", "4"} and "judge_accuracy" in r["final"]["16"]


def test_compare_writes_tables_curves_and_grids(lab_world, tmp_path):
    s = CompareSettings(methods=("dance_grpo", "g2rpo"), seeds=2, iterations=2, lr_grid=(1e-4, 3e-4), eval_every=1,
                        ablation=((1,), (1, 2, 3)), overrides=SMALL, eval_per_class=3, curve_per_class=3)
    res = compare(tmp_path, s, world=lab_world, log=lambda *a: None)
    assert set(res["runs"]) == {"dance_grpo", "g2rpo"} and all(len(v) == 2 for v in res["runs"].values())
    assert res["lr_choice"]["g2rpo"] in {1e-4, 3e-4}
    assert set(res["ablation"]) == {"{1}", "{1,2,3}"} and res["ablation"]["{1,2,3}"] is res["runs"]["g2rpo"]
    text = (tmp_path / "tables.md").read_text()
    for heading in ("Table 1 analogue", "Table 2 analogue", "Table 4 analogue", "Fig. 1a analogue", "Reward hacking"):
        assert heading in text
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "grids" / "g2rpo.png").is_file()
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["iterations"] == 2
