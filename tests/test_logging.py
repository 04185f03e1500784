"""Logs users read elsewhere: TensorBoard and wandb (offline) get scalars and image grids; a resumed run
continues the same wandb run; wandb/tensorboard requested but missing stop before training."""

import json

import pytest
import torch

from g2rpo.config import ConfigError, load_config
from g2rpo.train import Trainer

from test_train import tiny


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    ev.Reload()
    return ev


@pytest.mark.slow
def test_tensorboard_and_wandb_get_grids_and_a_resume_continues_the_wandb_run(lab_world, tmp_path):
    """Through the CLI (wandb's service process stays out of the test process), wandb offline."""
    from test_train import _cli, _flat

    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    opts = dict(tensorboard=True, wandb=True, image_every=1)
    r = _cli(_flat(tiny(lab_world, tmp_path, iterations=1, **opts)), env)
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    r = _cli([f"output_dir={tmp_path}", "iterations=2", "--resume"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    assert any((r / "files" / "media" / "images").is_dir() for r in runs)
    ev = _events(tmp_path / "tensorboard")
    assert [e.step for e in ev.Images("samples/grid")] == [1, 2]
    assert ev.Images("samples/grid")[0].encoded_image_string[:4] == b"\x89PNG"


def test_video_grids_reach_tensorboard_as_animated_gifs(tmp_path):
    from g2rpo.config import TrainConfig
    from g2rpo.train.logs import RunLog, save_prompt_grid, save_video_gif

    cfg = TrainConfig(tensorboard=True)
    log = RunLog(tmp_path, cfg, True, 0, log=lambda *a: None)
    videos = torch.rand(2, 3, 4, 8, 8)
    save_video_gif(tmp_path / "v.gif", videos, 2)
    save_prompt_grid(tmp_path / "v.png", videos[:, :, 0], ["a cat"], 2)
    log.images(3, tmp_path / "v.png", tmp_path / "v.gif")
    log.close()
    gif = _events(tmp_path / "tensorboard").Images("samples/video")
    assert [e.step for e in gif] == [3] and gif[0].encoded_image_string[:3] == b"GIF"


@pytest.mark.parametrize("key", ["wandb", "tensorboard"])
def test_a_requested_logger_that_is_not_installed_stops_before_training(lab_world, tmp_path, monkeypatch, key):
    import importlib.util

    import g2rpo.train.setup as setup_mod

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == key else real(name, *a))

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(setup_mod, "load_configured_policy", boom)
    with pytest.raises(ConfigError, match=f"{key}=true but {key} is not installed"):
        Trainer(load_config(None, tiny(lab_world, tmp_path, **{key: True})), log=lambda *a: None)


def test_tensorboard_is_on_by_default_and_installed():
    import importlib.util

    assert load_config().tensorboard is True and importlib.util.find_spec("tensorboard") is not None
    deps = (json.dumps(__import__("importlib.metadata").metadata.requires("g2rpo")))
    assert '"tensorboard"' in deps
