"""Bring your own reward: ``module:callable`` paths and entry points, in the trainer, eval and the lab tools."""

import json
import textwrap

import pytest
import torch

from g2rpo.config import ConfigError, load_config
from g2rpo.train.checks import check_config
from g2rpo.rewards import make_reward

MODULE = textwrap.dedent('''
    import torch

    def brightness(images, prompts, scale=1.0):
        """A scoring function: fn(images, prompts, **options) -> [N]."""
        return scale * images.flatten(1).mean(1)

    class Contrast:
        """A class taking the reward's options, with score()."""
        def __init__(self, power=1.0):
            self.power = power
        def score(self, images, prompts):
            return images.flatten(1).std(1) ** self.power

    def make_length(offset=0.0):
        """A builder returning a plain callable."""
        return lambda images, prompts: [len(p) + offset for p in prompts]

    def wrong_count(images, prompts):
        return [1.0]
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_rewards_mod.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_rewards_mod", tmp_path


def test_module_callable_rewards_of_each_shape(user_module):
    mod, _ = user_module
    images = torch.rand(3, 3, 8, 8)
    prompts = ["a", "bb", "ccc"]
    b = make_reward(f"{mod}:brightness", scale=2.0)
    assert torch.allclose(b.score(images, prompts), 2.0 * images.flatten(1).mean(1))
    c = make_reward(f"{mod}:Contrast", power=2)
    assert torch.allclose(c.score(images, prompts), images.flatten(1).std(1) ** 2)
    n = make_reward(f"{mod}:make_length", offset=1.0)
    assert n.score(images, prompts).tolist() == [2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="returned 1 scores for 3 images"):
        make_reward(f"{mod}:wrong_count").score(images, prompts)
    with pytest.raises(TypeError, match="options .*'colour'.* do not fit"):
        make_reward(f"{mod}:Contrast", colour=1)


@pytest.mark.parametrize("name, match", [("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
                                         ("user_rewards_mod:nothing", "has no attribute 'nothing'"),
                                         ("hps_v9", "unknown reward 'hps_v9'")])
def test_bad_reward_paths_are_refused_by_the_config_naming_the_problem(user_module, name, match):
    with pytest.raises(ConfigError, match=match):
        check_config(load_config(None, {"rewards": [{"name": name}]}))


def test_entry_point_rewards(tmp_path, monkeypatch):
    """A package registering ``g2rpo.rewards`` entry points (its dist-info built here, found on sys.path)."""
    import importlib

    (tmp_path / "plugin_rewards_pkg.py").write_text(MODULE)
    info = tmp_path / "plugin_rewards_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-rewards-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[g2rpo.rewards]\nshiny = plugin_rewards_pkg:brightness\n"
                                           "broken = plugin_rewards_pkg:missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    from g2rpo.rewards import known_rewards

    assert "shiny" in known_rewards()
    images = torch.rand(2, 3, 4, 4)
    assert torch.allclose(make_reward("shiny").score(images, ["x", "y"]), images.flatten(1).mean(1))
    cfg = load_config(None, {"rewards": [{"name": "shiny"}]})
    check_config(cfg)
    assert cfg.rewards[0].name == "shiny"
    with pytest.raises(ConfigError, match="entry point 'plugin_rewards_pkg:missing' .* failed to load"):
        check_config(load_config(None, {"rewards": [{"name": "broken"}]}))


def test_trainer_and_eval_with_a_module_callable_reward(user_module, lab_world, tmp_path):
    from g2rpo.eval import main as eval_main
    from g2rpo.train import main as train_main

    mod, _ = user_module
    out = tmp_path / "run"
    rewards = f"[{{name: '{mod}:brightness', options: {{scale: 2.0}}}}, {{name: digit_alignment}}]"
    assert train_main([f"model.path={lab_world}", f"output_dir={out}", "iterations=1", "sampler.num_steps=6",
                       "sampler.sde_indices=[0]", "sampler.granularities=[1]", "sampler.group_size=3",
                       "data.prompts_per_iteration=2", "progress=false", "tensorboard=false", "image_every=0",
                       f"rewards={rewards}"]) == 0
    m = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert m[f"reward/{mod}:brightness"] > 0 and "reward/digit_alignment" in m
    opts = tmp_path / "opts.yaml"
    opts.write_text(f"'{mod}:brightness': {{scale: 2.0}}\n")
    assert eval_main(["--model", str(lab_world), "--prompts", "builtin:lab_test", "--steps", "4", "--max-prompts", "3",
                      "--rewards", f"{mod}:brightness,{mod}:Contrast", "--reward-options", str(opts),
                      "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert set(summary["mean"]) == {f"{mod}:brightness", f"{mod}:Contrast"}


def test_lab_comparison_trains_on_a_module_callable_reward(user_module, lab_world, tmp_path):
    from g2rpo.experiments.cli import main as experiments_main
    from g2rpo.experiments.compare import run_method

    mod, _ = user_module
    o = {"sampler": {"group_size": 3, "sde_indices": [0]}, "data": {"prompts_per_iteration": 2},
         "rewards": [{"name": f"{mod}:brightness"}]}
    seen = []
    r = run_method(lab_world, "g2rpo", seed=0, lr=1e-4, iterations=1, out=tmp_path / "run", overrides=o,
                   eval_per_class=2, curve_per_class=2)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    seen = [k for k in metrics[0] if k.startswith("reward/") and k.count("/") == 1]
    assert seen == [f"reward/{mod}:brightness"] and len(r["curve"]) == 2
    with pytest.raises(SystemExit, match="--set: rewards.0..name: .*cannot import module 'nope_mod'"):
        experiments_main(["compare", "--set", "rewards=[{name: 'nope_mod:fn'}]", "--out", str(tmp_path / "c")])


@pytest.mark.slow
def test_the_random_control_ignores_its_inputs_and_trains_by_name(lab_world, tmp_path):
    """``random_control`` (the negative control of docs/lab-results.md): N(0, 1) draws from its own seeded
    generator, whatever the images; the same seed gives the same stream; a bad seed or a length mismatch is
    refused; a training config takes it by name."""
    from g2rpo.experiments.compare import run_method

    images, prompts = torch.rand(4, 3, 8, 8), ["a"] * 4
    a, b = make_reward("random_control", seed=3), make_reward("random_control", seed=3)
    first = a.score(images, prompts)
    assert first.shape == (4,) and torch.equal(first, b.score(torch.zeros(4, 3, 8, 8), prompts))
    assert not torch.equal(a.score(images, prompts), first)  # a new draw each call, the same images
    assert not torch.equal(make_reward("random_control", seed=4).score(images, prompts), first)
    with pytest.raises(ValueError, match="seed must be an integer"):
        make_reward("random_control", seed=0.5)
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        a.score(images, prompts[:3])
    o = {"sampler": {"group_size": 3, "sde_indices": [0]}, "data": {"prompts_per_iteration": 2},
         "rewards": [{"name": "random_control", "options": {"seed": 1}}]}
    r = run_method(lab_world, "g2rpo", seed=0, lr=1e-4, iterations=1, out=tmp_path / "run", overrides=o,
                   eval_per_class=2, curve_per_class=2)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "reward/random_control" in metrics[0] and len(r["curve"]) == 2
