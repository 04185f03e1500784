"""The remote reward's overhead against the same reward in process (CPU), as a ratio in one run.

    python -m pytest bench/test_remote_reward.py --benchmark-only
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from g2rpo.rewards import make_reward  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from test_served_rewards import BRIGHTNESS, serving

    d = tmp_path_factory.mktemp("mod")
    (d / "served_rewards_mod.py").write_text(BRIGHTNESS)
    sys.path.insert(0, str(d))
    with serving(["--reward", "served_rewards_mod:brightness", "--max-batch", "64"], d) as (url, _):
        yield url


IMAGES = torch.rand(64, 3, 64, 64, generator=torch.Generator().manual_seed(0))
PROMPTS = ["a cat"] * 64


@pytest.mark.benchmark(group="reward: 64 images 3x64x64, brightness")
def test_bench_in_process(benchmark, served):
    reward = make_reward("served_rewards_mod:brightness")
    benchmark(reward.score, IMAGES, PROMPTS)


@pytest.mark.benchmark(group="reward: 64 images 3x64x64, brightness")
@pytest.mark.parametrize("fmt", ["raw", "png"])
def test_bench_remote(benchmark, served, fmt):
    reward = make_reward("remote", url=served, reward="served_rewards_mod:brightness", chunk_size=16,
                         max_in_flight=4, image_format=fmt)
    out = benchmark(reward.score, IMAGES, PROMPTS)
    assert torch.allclose(out, IMAGES.flatten(1).mean(1), atol=1e-2 if fmt == "png" else 1e-6)
