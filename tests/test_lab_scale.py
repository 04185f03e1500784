"""``python -m g2rpo.train --config configs/methods/<preset>.yaml --lab digits|scenes``: a published recipe at lab
scale in one step (the world's model, rewards, prompts and schedule, the comparison's scale, the lab config's run
length and lr), the same reset the method comparison applies."""

import pytest

from g2rpo.config import load_config, read_config_file
from g2rpo.experiments.compare import preset_path
from g2rpo.experiments.worlds import WORLDS
from g2rpo.lab.scale import at_lab_scale, lab_config_path, world_reset
from g2rpo.train.checks import check_config

from test_train import _run_main

PRESETS = [p.stem for p in preset_path("g2rpo", "paper").parent.glob("*.yaml")]


@pytest.mark.parametrize("world", ["digits", "scenes"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_at_lab_scale_is_a_valid_lab_run_that_keeps_its_method_keys(preset, world):
    path = preset_path(*preset.rsplit("-", 1))
    alone = read_config_file(path)
    cfg = load_config([lab_config_path(world), path], ["iterations=2"], after_files=at_lab_scale(world))
    check_config(cfg)  # no hub reward, no pipeline schedule, no Flux-scale M left over
    own = load_config(lab_config_path(world))
    assert cfg.model.kind == own.model.kind and cfg.model.path is None and not cfg.lora.enabled
    assert [r.name for r in cfg.rewards] == [r.name for r in own.rewards]
    assert (cfg.data.prompts, cfg.sampler.num_steps, cfg.sampler.group_size) == (own.data.prompts, 16, 8)
    assert cfg.sampler.schedule == "shift" and cfg.sampler.static_shift == 3.0 and not cfg.sampler.dynamic_shift
    assert cfg.optim.lr == own.optim.lr and cfg.output_dir == own.output_dir
    assert cfg.iterations == 2  # the command line still has the last word
    # the method's own keys survive: strategy, eta, windows, clipping, advantage and update conventions
    kept = {"sampler": set(alone.get("sampler", {})) - {"num_steps", "group_size", "sde_indices", "max_batch",
                                                        "schedule", "shift", "dynamic_shift"},
            "loss": set(alone.get("loss", {})), "advantage": set(alone.get("advantage", {})),
            "optim": set(alone.get("optim", {})) - {"lr"}}
    assert kept["sampler"] and kept["loss"]
    for section, keys in kept.items():
        for key in keys:
            assert getattr(getattr(cfg, section), key) == alone[section][key], f"{section}.{key}"


def test_the_comparison_resets_presets_as_lab_scale_does():
    for name, spec in WORLDS.items():
        assert spec.reset == world_reset(name)


@pytest.mark.slow
def test_flow_grpo_official_trains_on_the_digits_in_one_documented_step(lab_world, tmp_path):
    """It stopped at once before ("the pipeline's scheduler does not shift dynamically"); a Flux-scale preset ran
    its 300 iterations on the lab."""
    r = _run_main(["--config", str(preset_path("flow_grpo", "official")), "--lab", "digits", "iterations=2",
                   f"model.path={lab_world}", f"output_dir={tmp_path / 'run'}", "progress=false",
                   "tensorboard=false", "export_final=false"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 2


def test_lab_with_resume_is_refused_rather_than_ignored(tmp_path, capsys):
    from g2rpo.train.cli import main

    assert main(["--config", str(preset_path("dance_grpo", "official")), "--lab", "digits", "--resume",
                 f"output_dir={tmp_path}"]) == 2
    assert "--lab sets up a new run; --resume continues" in capsys.readouterr().err

