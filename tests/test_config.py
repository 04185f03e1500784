import pytest

from g2rpo.config import ConfigError, load_config, parse_overrides


def test_default_config_is_the_lab_world():
    cfg = load_config()
    assert cfg.model.kind == "lab" and cfg.sampler.strategy == "g2rpo"
    assert [r.name for r in cfg.rewards] == ["digit_alignment", "digit_realism"]


def test_overrides_dotted_and_flag_forms():
    cfg = load_config(None, ["sampler.group_size=5", "--optim.lr", "1e-5", "--sampler.sde_indices=[0, 2]",
                             "iterations=7", "--resume", "true"])
    assert cfg.sampler.group_size == 5 and cfg.optim.lr == 1e-5 and cfg.sampler.sde_indices == [0, 2]
    assert cfg.iterations == 7 and cfg.resume is True
    assert parse_overrides(["a.b.c=x"]) == {"a": {"b": {"c": "x"}}}


@pytest.mark.parametrize("override, key", [
    (["sampler.gruop_size=4"], "sampler.gruop_size"),
    (["bogus=1"], "bogus"),
    (["sampler.group_size=four"], "sampler.group_size"),
    (["sampler.group_size=1.5"], "sampler.group_size"),
    (["resume=3"], "resume"),
    (["sampler.sde_indices=[0, 16]"], "sampler.sde_indices"),
    (["sampler.group_size=1"], "sampler.group_size"),
    (["sampler.granularities=[]"], "sampler.granularities"),
    (["optim.schedule=exp"], "optim.schedule"),
    (["rewards=[{name: hps_v9}]"], "rewards[0].name"),
    (["rewards=[{name: digit_alignment, wieght: 2}]"], "rewards[0].wieght"),
    (["sampler.strategy=ppo"], "sampler"),
])
def test_bad_configs_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert key in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


@pytest.mark.parametrize("name", ["lab", "flux_hps", "flux_hps_clip", "dance_grpo", "flow_grpo", "mix_grpo",
                                  "g2rpo_no_mgai"])
def test_shipped_configs_validate(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    assert cfg.sampler.num_steps == 16 and cfg.loss.adv_clip_max == 5.0


@pytest.mark.parametrize("name, kind", [("wan_t2v_hps", "wan"), ("qwen_image_hps", "qwen_image"),
                                        ("flux2_hps", "flux2")])
def test_shipped_model_family_configs_validate_and_cite_sources(name, kind):
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    assert cfg.model.kind == kind and cfg.loss.adv_clip_max == 5.0
    cited = [line for line in path.read_text().splitlines() if re.match(r"^\s+\w+:\s*\S", line) and "#" in line]
    assert len(cited) >= 10


def test_flux_config_names_every_missing_file(capsys):
    from pathlib import Path

    from g2rpo.train import main

    cfg = Path(__file__).resolve().parents[1] / "configs" / "flux_hps_clip.yaml"
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    for needle in ("model.path: /path/to/FLUX.1-dev/model_index.json", "rewards[0] (hps).options.checkpoint",
                   "rewards[1] (clip).options.model_dir"):
        assert needle in err
    paper = load_config(cfg)
    assert (paper.sampler.sde_indices, paper.sampler.granularities, paper.sampler.group_size) == (
        list(range(8)), [1, 2, 3], 12)
    assert (paper.optim.lr, paper.loss.clip_range, paper.seed, paper.sampler_seed) == (2e-6, 1e-4, 42, 1223627)
