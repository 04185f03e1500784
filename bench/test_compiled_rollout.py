"""`sampler.compile`: one G2RPO rollout at the paper setting (T=16, e=0..7, G=12, Lambda={1,2,3}, one prompt)
on the scenes world's transformer architecture (random weights: 4 slot tokens, 16 text tokens, width 64),
eager against one dynamic-batch ``torch.compile`` graph (inductor, unpadded), same outputs, in one run. The
first compiled rollout compiles (the warm-up round); the ratio is of the rounds after it.

    python -m pytest bench/test_compiled_rollout.py --benchmark-only
"""

import pytest
import torch

from g2rpo import G2RPOSampler
from g2rpo.lab.scenes.world import SceneWorldConfig
from g2rpo.testing import PAPER_SETTING as SETTING
from g2rpo.testing.tiny import random_flux_velocity


@pytest.fixture(scope="module")
def scenes_shape():
    config = SceneWorldConfig()  # 32 x 32 "pixels" at the VAE factor 8 -> 2 x 2 = 4 tokens, as the 4 slots
    return random_flux_velocity(config.transformer_kwargs(), 32, 32, text_len=config.max_length)


@pytest.fixture(scope="module")
def samplers(scenes_shape):
    velocity, _, _ = scenes_shape
    return {"eager": G2RPOSampler(velocity, max_batch=512, **SETTING),
            "compiled": G2RPOSampler(velocity, max_batch=512, compile_options={"dynamic": True}, **SETTING)}


def _rollout(sampler, scenes_shape):
    _, cond, noise = scenes_shape
    return sampler.rollout(noise, cond, generator=torch.Generator().manual_seed(1))


def test_compiled_and_eager_rollouts_agree(samplers, scenes_shape):
    eager, compiled = (_rollout(samplers[k], scenes_shape) for k in ("eager", "compiled"))
    assert compiled.padded_rows == 0 and compiled.forward_rows == eager.forward_rows
    assert torch.allclose(compiled.finals, eager.finals, atol=1e-4)
    assert torch.allclose(compiled.log_probs, eager.log_probs, atol=1e-4)


@pytest.mark.benchmark(group="rollout-scenes-compile")
@pytest.mark.parametrize("kind", ["eager", "compiled"])
def test_bench_scenes_rollout(benchmark, samplers, scenes_shape, kind):
    ro = benchmark.pedantic(_rollout, args=(samplers[kind], scenes_shape), rounds=3, warmup_rounds=1)
    benchmark.extra_info["forward_rows"] = ro.forward_rows
