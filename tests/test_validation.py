"""Validation during training (the ``eval:`` section, g2rpo.train.validation): held-out prompts on fixed noise at
iteration 0 and every N, logged under eval/ with grids, resumable, invisible to the training run; the reward-hacking
warning; keep_best."""

import json

import pytest
import torch

from g2rpo.config import ConfigError, load_config
from g2rpo.train import main as train_main
from g2rpo.train.checks import check_config
from g2rpo.rewards.diversity import diversity
from g2rpo.train.validation import hacking_streaks

from test_train import _flat, _run_main, tiny
from test_logging import _events


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _training(m):
    return {k: v for k, v in m.items() if not k.startswith(("eval/", "time"))}


# ---- the pieces ---------------------------------------------------------------------------------------------------

def test_hacking_streaks_fire_only_when_training_rises_and_eval_falls_k_times_in_a_row():
    up_down = [{"iteration": i, "reward/hps": 0.1 * i, "eval/clip": 1.0 - 0.1 * i, "eval/hps": 0.1 * i}
               for i in range(0, 8, 2)]
    assert hacking_streaks(up_down, ["reward/hps"], ["eval/clip", "eval/hps"], 3) == [("reward/hps", "eval/clip", 0)]
    assert hacking_streaks(up_down, ["reward/hps"], ["eval/clip"], 4) == []  # not yet 4 evaluations in a row
    broken = [dict(m) for m in up_down]
    broken[2]["eval/clip"] = 2.0  # the eval reward rose once: no streak of 3
    assert hacking_streaks(broken, ["reward/hps"], ["eval/clip"], 3) == []
    flat = [dict(m, **{"reward/hps": 0.5}) for m in up_down]  # the training reward did not rise
    assert hacking_streaks(flat, ["reward/hps"], ["eval/clip"], 2) == []


def test_diversity_is_zero_for_identical_samples_and_grows_with_spread():
    same = torch.ones(6, 3, 4, 4)
    assert diversity(same, 3, cosine=False) == 0.0
    spread = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)] * 3)
    assert diversity(spread, 2, cosine=False) == pytest.approx(1.0)
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])  # prompt 1 orthogonal, prompt 2 parallel
    assert diversity(emb, 2, cosine=True) == pytest.approx(0.5)


@pytest.mark.parametrize("override, match", [
    ("eval.every=-1", "eval.every must be >= 0"),
    ("eval.keep_best=digit_judge", "eval.keep_best names an evaluation metric, eval/<reward>"),
    ("eval.keep_best=eval/digit_judge", "eval.keep_best needs evaluations: set eval.every > 0"),
    ("eval.rewards=[{name: no_such_module_xyz:fn}]",
     "eval.rewards\\[0\\].name: reward .no_such_module_xyz:fn.: cannot import"),
    ("eval.samples=0", "eval.samples must be >= 1"),
])
def test_bad_eval_settings_are_config_errors_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        check_config(load_config(None, [override]))


def test_a_family_without_held_out_prompts_needs_eval_prompts_before_any_model_loads(flux_dir, tmp_path):
    (tmp_path / "p.txt").write_text("a red cube\n")
    r = _run_main(["model.kind=flux", f"model.path={flux_dir}", f"data.prompts={tmp_path / 'p.txt'}",
                   "rewards=[{name: family_e2e:brightness}]", "eval.every=2", f"output_dir={tmp_path / 'o'}"])
    assert r.returncode == 2 and "eval.prompts: set a held-out prompt file" in r.stderr
    r = _run_main(["model.kind=flux", f"model.path={flux_dir}", f"data.prompts={tmp_path / 'p.txt'}",
                   "rewards=[{name: family_e2e:brightness}]", "eval.every=2", f"eval.prompts={tmp_path / 'no.txt'}",
                   "eval.rewards=[{name: digit_judge}]", f"output_dir={tmp_path / 'o'}"])
    assert r.returncode == 2 and "eval.rewards[0].name: digit_judge scores the lab world's images" in r.stderr
    r = _run_main(["model.kind=flux", f"model.path={flux_dir}", f"data.prompts={tmp_path / 'p.txt'}",
                   "rewards=[{name: family_e2e:brightness}]", "eval.every=2", f"eval.prompts={tmp_path / 'no.txt'}",
                   f"output_dir={tmp_path / 'o'}"])
    assert r.returncode == 2 and f"eval.prompts: {tmp_path / 'no.txt'}" in r.stderr


def test_the_progress_bar_names_the_strategy():
    from g2rpo.train.logs import ProgressBar

    bar = ProgressBar(True, 3, 0, "dance_grpo")
    assert bar.bar.desc == "dance_grpo"
    bar.close()


def test_keep_best_naming_no_evaluation_metric_stops_before_any_model_loads(tmp_path):
    r = _run_main(["eval.every=2", "eval.keep_best=eval/digit_judgement", f"output_dir={tmp_path / 'o'}"])
    assert r.returncode == 2
    assert ("eval.keep_best: eval/digit_judgement is not an evaluation metric; the eval rewards log eval/digit_judge, "
            "eval/digit_alignment, eval/digit_realism") in r.stderr
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


# ---- the lab world ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_eval_every_on_the_lab_logs_the_base_and_every_nth_changes_no_training_metric_and_resumes(lab_world,
                                                                                                  tmp_path):
    on, off = tmp_path / "on", tmp_path / "off"
    opts = dict(iterations=4, checkpoint_every=2)
    assert _run_main(_flat(tiny(lab_world, off, **opts))).returncode == 0
    r = _run_main(_flat(tiny(lab_world, on, tensorboard=True, **opts, **{
        "eval.every": 2, "eval.hacking_patience": 2, "eval.keep_best": "eval/digit_judge"})))
    assert r.returncode == 0, r.stderr
    assert "reward hacking" not in r.stdout + r.stderr  # a healthy run stays silent
    m_on, m_off = _metrics(on), _metrics(off)
    evals = [m for m in m_on if "eval/digit_judge" in m]
    assert [m["iteration"] for m in evals] == [0, 2, 4]  # the base model, then every 2nd
    assert [_training(m) for m in m_on if m["iteration"] > 0] == [_training(m) for m in m_off]  # bit for bit
    for key in ("eval/digit_judge", "eval/digit_alignment", "eval/digit_realism", "eval/diversity",
                "eval/digit_judge_std", "eval/cost_rows", "eval/hacking_suspected"):
        assert all(key in m for m in evals), key
    assert evals[0]["eval/cost_rows"] > 0 and evals[-1]["eval/cost_rows"] == 3 * evals[0]["eval/cost_rows"]
    assert all(m["cost"] == o["cost"] for m, o in zip(m_on[1:], m_off))  # its cost is its own line
    assert sum(m["eval/hacking_suspected"] for m in evals) == 0
    assert "wall clock:" in r.stdout
    ev = _events(on / "tensorboard")
    assert [e.step for e in ev.Scalars("held_out/judge_accuracy")] == [0, 4]  # the end-of-run evaluation too
    assert [e.step for e in ev.Images("eval/grid")] == [0, 2, 4]
    assert [e.step for e in ev.Scalars("eval/digit_judge")] == [0, 2, 4]
    assert sorted(p.name for p in (on / "images").iterdir()) == [f"eval_iter_00000{i}.png" for i in (0, 2, 4)]
    best = json.loads((on / "best" / "best.json").read_text())
    assert best["metric"] == "eval/digit_judge" and best["iteration"] in (2, 4)
    assert best["value"] == max(m["eval/digit_judge"] for m in evals[1:])
    assert (on / "best" / "transformer" / "config.json").is_file()
    # --resume to 6 iterations: one evaluation more (6), none repeated; the eval settings may change on resume
    r = _run_main(["--resume", f"output_dir={on}", "iterations=6", "eval.samples=2"])
    assert r.returncode == 0, r.stderr
    assert [m["iteration"] for m in _metrics(on) if "eval/digit_judge" in m] == [0, 2, 4, 6]
    assert [e.step for e in _events(on / "tensorboard").Images("eval/grid")] == [0, 2, 4, 6]


@pytest.mark.slow
def test_the_hacking_warning_fires_on_a_reward_that_is_easy_to_hack(lab_world, tmp_path):
    """Training on brightness at a high learning rate: the digits turn into bright blobs, the judge falls."""
    out = tmp_path / "run"
    r = _run_main(_flat(tiny(lab_world, out, iterations=6, checkpoint_every=0, export_final=False, **{
        "rewards": [{"name": "family_e2e:brightness"}], "optim.lr": 3e-3, "eval.every": 1,
        "eval.hacking_patience": 2})))
    assert r.returncode == 0, r.stderr
    lines = [line for line in (r.stdout + r.stderr).splitlines() if "reward hacking suspected" in line]
    assert lines and all("reward/family_e2e:brightness rose while eval/" in line for line in lines)
    assert any("eval/digit_judge" in line for line in lines)
    m = [x for x in _metrics(out) if "eval/hacking_suspected" in x]
    assert m[-1]["eval/hacking_suspected"] == 1.0 and m[0]["eval/hacking_suspected"] == 0.0
    assert m[-1]["eval/diversity"] < m[0]["eval/diversity"]  # the collapse shows in the diversity too


# ---- the pipelines ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flux", "sd3", "wan"])
def test_eval_every_on_tiny_pipelines(kind, request, tmp_path):
    model_dir = request.getfixturevalue({"flux": "flux_dir", "sd3": "sd3_dir", "wan": "wan_dir"}[kind])
    size = ["model.height=16", "model.width=16", "model.num_frames=3"] if kind == "wan" else \
        ["model.height=32", "model.width=32"]
    (tmp_path / "p.txt").write_text("a red cube\na blue sphere on grass\n")
    (tmp_path / "test.txt").write_text("a green cone\na yellow ring\na white box\n")
    out = tmp_path / "run"
    assert train_main([f"model.kind={kind}", f"model.path={model_dir}", "model.dtype=float32", *size,
                       "model.max_sequence_length=16", "rewards=[{name: family_e2e:brightness}]",
                       f"data.prompts={tmp_path / 'p.txt'}", "data.prompts_per_iteration=2", "sampler.num_steps=4",
                       "sampler.sde_indices=[0]", "sampler.granularities=[1]", "sampler.group_size=3",
                       "iterations=2", "checkpoint_every=0", "export_final=false", "progress=false",
                       f"output_dir={out}", "optim.lr=1e-4", "eval.every=1", f"eval.prompts={tmp_path / 'test.txt'}",
                       "eval.steps=3", "eval.rewards=[{name: family_e2e:brightness, label: bright}]"]) == 0
    evals = [m for m in _metrics(out) if "eval/bright" in m]
    assert [m["iteration"] for m in evals] == [0, 1, 2]
    assert all(m["eval/diversity"] > 0 and 0 <= m["eval/bright"] <= 1 for m in evals)
    ev = _events(out / "tensorboard")
    assert [e.step for e in ev.Images("eval/grid")] == [0, 1, 2]
    if kind == "wan":  # video: an animated GIF beside each grid
        assert [e.step for e in ev.Images("eval/video")] == [0, 1, 2]
        assert (out / "images" / "eval_iter_000002.gif").is_file()


def test_preflight_names_every_missing_path_at_once(tmp_path):
    """The model folder, a reward's checkpoint, the prompt file and the eval prompt file: one error, before any
    model loads (they were reported one fix at a time)."""
    r = _run_main(["model.kind=flux", f"model.path={tmp_path / 'no-flux'}",
                   f"rewards=[{{name: hps, options: {{checkpoint: {tmp_path / 'no-hps.pt'}}}}}]",
                   f"data.prompts={tmp_path / 'no-prompts.txt'}", "eval.every=4",
                   f"eval.prompts={tmp_path / 'no-test.txt'}", f"output_dir={tmp_path / 'o'}"])
    assert r.returncode == 2
    for missing in ("no-flux", "no-hps.pt", "data.prompts: " + str(tmp_path / "no-prompts.txt"),
                    "eval.prompts: " + str(tmp_path / "no-test.txt")):
        assert missing in r.stderr, missing
