"""Test-session setup. TRITON_INTERPRET must be set before anything imports triton."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# pytest-xdist workers share the machine's cores: one worker's torch (and its subprocesses') gets its share of them,
# so that two workers on two cores do not oversubscribe them
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)

@pytest.fixture(scope="session")
def lab_world(tmp_path_factory):
    """The default lab world, built once per test session in a temporary folder."""
    from g2rpo.lab import build_world

    return build_world(tmp_path_factory.mktemp("lab") / "base", log=None)

@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory):
    """A tiny FluxPipeline folder (its scheduler a static shift 3, as tiny_flux_pipeline builds it), saved once per
    session and only read by the tests."""
    from g2rpo.testing.tiny import tiny_flux_pipeline

    d = tmp_path_factory.mktemp("flux") / "tiny-flux"
    tiny_flux_pipeline(seed=0).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def hub_flux_dir(tmp_path_factory):
    """The same tiny FluxPipeline with FLUX.1-dev's released scheduler config (dynamic shift), saved once."""
    from g2rpo.testing.tiny import tiny_flux_pipeline, with_hub_scheduler

    d = tmp_path_factory.mktemp("hubflux") / "tiny-flux"
    with_hub_scheduler(tiny_flux_pipeline(seed=0)).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory):
    """A tiny StableDiffusion3Pipeline folder with SD3.5's released scheduler config (shift 3), saved once."""
    from g2rpo.testing.tiny import tiny_sd3_pipeline, with_hub_scheduler

    d = tmp_path_factory.mktemp("sd3") / "tiny-sd3"
    with_hub_scheduler(tiny_sd3_pipeline(seed=0)).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def wan_dir(tmp_path_factory):
    """A tiny WanPipeline folder (Wan 2.1 text-to-video), saved once."""
    from g2rpo.testing.tiny import tiny_wan_pipeline

    d = tmp_path_factory.mktemp("wan") / "tiny-wan"
    tiny_wan_pipeline(seed=0).save_pretrained(d)
    return d


TINY_CLIP_CFG = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}

@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    import open_clip

    d = tmp_path_factory.mktemp("oc")
    (d / "tiny-vit.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(d)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-vit")
    return "tiny-vit", model.state_dict()


#: A scenes world small enough to build in seconds (the default config takes about 2 minutes): everything
#: but the learned models' quality is the default world's.
TINY_SCENES = dict(pretrain_steps=30, reward_pairs=600, clip_steps=30, preference_steps=10, detector_scenes=300,
                   detector_steps=30)


@pytest.fixture(scope="session")
def scenes_world(tmp_path_factory):
    """A tiny scenes world, built once per test session in a temporary folder."""
    from g2rpo.lab.scenes.world import SceneWorldConfig, build_scene_world

    return build_scene_world(tmp_path_factory.mktemp("scenes") / "world", SceneWorldConfig(**TINY_SCENES), log=None)
