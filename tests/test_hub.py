"""Hugging Face ids as model and reward paths: resolved offline from a cache laid out here by the test
(the layout huggingface_hub itself writes: models--ORG--NAME/refs/main + snapshots/COMMIT/...)."""

import json

import pytest
import torch

from g2rpo.config import ModelConfig, RewardSpec
from g2rpo.models.loading import check_paths

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cached_repo(cache, repo):
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_open_clip):
    from g2rpo.testing.tiny import tiny_flux_pipeline

    cache = tmp_path / "hf"
    tiny_flux_pipeline(seed=0).save_pretrained(_cached_repo(cache, "tiny-org/tiny-flux"))
    name, state = tiny_open_clip
    torch.save({"state_dict": state}, _cached_repo(cache, "hps-org/hps") / "hps.pt")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, name


def test_train_and_eval_from_hub_ids_offline(hub_cache, tmp_path):
    from g2rpo.eval import main as eval_main
    from g2rpo.train import main as train_main

    _, clip_name = hub_cache
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    out = tmp_path / "run"
    reward = f"[{{name: hps, options: {{checkpoint: hps-org/hps/hps.pt, model_name: {clip_name}}}}}]"
    assert train_main(["model.kind=flux", "model.path=tiny-org/tiny-flux", "model.dtype=float32", "model.height=32",
                       "model.width=32", "model.max_sequence_length=16", f"rewards={reward}",
                       f"data.prompts={prompts}", "data.prompts_per_iteration=2", "sampler.num_steps=4",
                       "sampler.sde_indices=[0]", "sampler.granularities=[1]", "sampler.group_size=2", "iterations=1",
                       "progress=false", "tensorboard=false", f"output_dir={out}"]) == 0
    import math

    assert math.isfinite(json.loads((out / "metrics.jsonl").read_text())["reward/hps"])
    (tmp_path / "r.yaml").write_text(f"hps: {{checkpoint: hps-org/hps/hps.pt, model_name: {clip_name}}}\n")
    assert eval_main(["--model", "tiny-org/tiny-flux", "--checkpoint", str(out), "--prompts", str(prompts),
                      "--steps", "2", "--height", "32", "--width", "32", "--rewards", "hps", "--reward-options",
                      str(tmp_path / "r.yaml"), "--out", str(tmp_path / "ev")]) == 0


def test_hub_ids_missing_from_the_cache_are_named_before_any_model_loads(hub_cache):
    with pytest.raises(FileNotFoundError) as err:
        check_paths(ModelConfig(kind="flux", path="nobody/no-model"), [RewardSpec(name="hps"),
                                                                        RewardSpec(name="pickscore")])
    msg = str(err.value)
    assert "model.path: 'nobody/no-model' is not a local path and was not found in the local Hugging Face cache" in msg
    assert "'xswu/HPSv2/HPS_v2.1_compressed.pt'" in msg  # the usual repos of rewards given no path
    assert "'yuvalkirstain/PickScore_v1'" in msg and "'laion/CLIP-ViT-H-14-laion2B-s32B-b79K'" in msg
    check_paths(ModelConfig(kind="flux", path="tiny-org/tiny-flux"), [RewardSpec(name="hps", options={
        "checkpoint": "hps-org/hps/hps.pt"})])  # both in the cache: no error


def test_an_unreachable_hub_is_probed_once_and_read_as_offline(monkeypatch):
    """With HF_HUB_OFFLINE unset and no network, one quick probe (not huggingface_hub's retries per file) and the
    local cache only; the error says the Hub could not be reached and how to download ahead."""
    import huggingface_hub.constants as constants

    from g2rpo.hub import HubError, hub_reachable, resolve_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed port: refused at once
    hub_reachable.cache_clear()
    for _ in range(2):
        with pytest.raises(HubError, match=r"could not be reached \(one probe\); download it first \(hf download "
                                           r"no-such-org/no-such-model\)"):
            resolve_path("no-such-org/no-such-model", "model.path", diffusers=True)
    assert hub_reachable.cache_info().misses == 1  # one probe for the process
    hub_reachable.cache_clear()
