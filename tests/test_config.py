import pytest

from g2rpo.config import ConfigError, load_config, parse_overrides
from g2rpo.train.checks import check_config


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
        check_config(load_config(None, override))
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
                                        ("flux2_hps", "flux2"), ("wan22_t2v_hps", "wan"), ("wan_i2v_hps", "wan_i2v")])
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


@pytest.mark.parametrize("spelling, value", [("1e-5", 1e-5), ("1E-5", 1e-5), (".5", 0.5), ("1.0e-5", 1e-5),
                                             ("1", 1.0), ("+.5e-1", 0.05), ("1e-08", 1e-8)])
def test_numbers_in_every_spelling_in_files_and_overrides(tmp_path, spelling, value):
    """YAML 1.1 reads 1e-5 as a string; numeric fields take every spelling a user writes."""
    f = tmp_path / "c.yaml"
    f.write_text(f"model: {{kind: lab}}\noptim: {{lr: {spelling}}}\nadvantage: {{eps: {spelling}}}\n")
    cfg = load_config(f)
    assert cfg.optim.lr == value and isinstance(cfg.optim.lr, float) and cfg.advantage.eps == value
    assert load_config(None, [f"optim.lr={spelling}"]).optim.lr == value


def test_a_runs_config_json_loads_back_with_config(tmp_path):
    import json

    from g2rpo.config import config_to_dict

    cfg = load_config(None, ["optim.lr=3e-5", "advantage.eps=1e-8"])
    f = tmp_path / "config.json"
    f.write_text(json.dumps(config_to_dict(cfg), indent=1))  # as a run writes it: 1e-08, 3e-05
    assert config_to_dict(load_config(f)) == config_to_dict(cfg)


def test_unknown_key_says_did_you_mean_and_which_file(tmp_path):
    a, b = tmp_path / "model.yaml", tmp_path / "preset.yaml"
    a.write_text("model: {kind: lab}\n")
    b.write_text("sampler:\n  gruop_size: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config([a, b])
    assert str(err.value).startswith(str(b)) and "did you mean sampler.group_size?" in str(err.value)
    with pytest.raises(ConfigError, match="command line: unknown config key optim.learning_rat"):
        load_config(None, ["optim.learning_rat=1"])
    with pytest.raises(ConfigError, match=r"did you mean iterations\?"):
        load_config(None, ["iteratons=3"])


def test_list_keys_hint_the_list_syntax():
    with pytest.raises(ConfigError, match=r"write a YAML list: sampler.sde_indices=\[0,1\]"):
        load_config(None, ["sampler.sde_indices=0,1"])


def test_a_method_preset_alone_says_what_it_combined_with():
    from pathlib import Path

    preset = Path(__file__).resolve().parents[1] / "configs" / "methods" / "dance_grpo-official.yaml"
    notes = []
    cfg = load_config(preset, log=notes.append)
    assert cfg.model.kind == "lab" and cfg.sampler.strategy == "dance_grpo"
    assert cfg.rewards[0].name == "digit_alignment" and cfg.output_dir == "runs/lab"  # the embedded default's
    assert len(notes) == 1 and "method preset" in notes[0] and "lab.yaml" in notes[0]


@pytest.mark.parametrize("overrides, match", [
    (["sampler.strategy=flow_grpo", "sampler.sde_subset=2"], "sampler.sde_subset is a G2RPO option"),
    (["sampler.strategy=mix_grpo", "sampler.chain_sources=true"], "sampler.chain_sources is a G2RPO option"),
    (["sampler.strategy=g2rpo_no_mgai", "sampler.auto_granularity_threshold=0.9"],
     "sampler.auto_granularity_threshold drops granularities"),
    (["sampler.granularities=[1]", "sampler.auto_granularity_threshold=0.9"], "has none to drop"),
    (["sampler.auto_granularity_threshold=1.5"], r"must be a correlation in \[-1, 1\]"),
])
def test_cheaper_g2rpo_options_are_not_silently_ignored(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_config(load_config(None, overrides))
    assert check_config(load_config(None, ["sampler.sde_subset=2", "sampler.auto_granularity_threshold=0.9"]))


def test_family_options_are_written_flat_read_as_attributes_and_checked_by_their_row():
    """``model.num_frames`` (a FamilyOption row of the registry) is decoded into ModelConfig.options, read back as
    ``cfg.model.num_frames`` (the row's default when unset), written flat again, and checked by its row."""
    from g2rpo.config import config_to_dict, from_dict

    cfg = load_config(None, {"model": {"kind": "wan", "path": "x", "num_frames": 9}, "rewards": [{"name": "clip"}]})
    assert cfg.model.options == {"num_frames": 9} and cfg.model.num_frames == 9
    assert cfg.model.train_experts == "auto" and cfg.model.guidance_scale_2 is None  # the rows' defaults
    d = config_to_dict(cfg)
    assert d["model"]["num_frames"] == 9 and "options" not in d["model"]
    assert from_dict(type(cfg), d) == cfg  # a stored config reads back the same
    with pytest.raises(ConfigError, match=r"model.num_frames must be >= 1, got 0"):
        load_config(None, {"model": {"kind": "wan", "path": "x", "num_frames": 0}, "rewards": [{"name": "clip"}]})
    with pytest.raises(ConfigError, match=r"model.train_experts must be one of auto, both, .*got 'middle'"):
        load_config(None, {"model": {"kind": "wan", "path": "x", "train_experts": "middle"},
                           "rewards": [{"name": "clip"}]})
    with pytest.raises(ConfigError, match=r"model.num_frames does not apply to model.kind 'flux' \(only to wan, "):
        load_config(None, {"model": {"kind": "flux", "path": "x", "num_frames": 9}, "rewards": [{"name": "clip"}]})
    with pytest.raises(ConfigError, match=r"model.num_frames: expected an integer, got 'many'"):
        load_config(None, ["model.kind=wan", "model.num_frames=many"])
    with pytest.raises(ConfigError, match=r"unknown config key model.options"):
        load_config(None, {"model": {"options": {"num_frames": 9}}})


def test_model_family_is_read_as_model_kind(tmp_path):
    """The registry calls it a family, the config's key is model.kind: model.family is the same setting, in files
    and overrides; both, disagreeing, is an error naming them."""
    cfg = load_config(None, ["model.family=wan", "model.path=x", "rewards=[{name: clip}]"])
    assert cfg.model.kind == "wan"
    (tmp_path / "m.yaml").write_text("model: {family: flux, path: x}\nrewards: [{name: clip}]\n")
    assert load_config(tmp_path / "m.yaml").model.kind == "flux"
    assert load_config(tmp_path / "m.yaml", ["model.family=sd3"]).model.kind == "sd3"  # an override wins
    with pytest.raises(ConfigError, match=r"model.family \('wan'\) and model.kind \('flux'\) name the same setting"):
        load_config(None, {"model": {"family": "wan", "kind": "flux"}})


def test_only_true_and_false_are_booleans(tmp_path):
    """YAML 1.2's core schema: output_dir=off (or on, yes, no) is the text written, in files and overrides alike; a
    boolean key still takes true / false."""
    for word in ("off", "on", "yes", "no"):
        assert load_config(None, [f"output_dir={word}"]).output_dir == word
    (tmp_path / "c.yaml").write_text("output_dir: off\ntensorboard: false\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.output_dir == "off" and cfg.tensorboard is False
    with pytest.raises(ConfigError, match="tensorboard: expected true/false, got 'no'"):
        load_config(None, ["tensorboard=no"])
