"""One G2RPO rollout at the paper setting on the full-size Flux.1-dev transformer architecture
(random bf16 weights, 720x720, T=16, G=12, e=0..7, Lambda={1,2,3}): the engine vs the public
code's loop structure. Needs a GPU (skipped otherwise); its correctness at tiny size runs in CI
(tests/test_models.py::test_tiny_flux_engine_equals_public_loop).

    python -m pytest bench/test_flux_rollout.py --benchmark-only -s

Achieved TFLOP/s = forward rows x 37.3 TFLOP (one 720x720 image-step) / seconds.
"""

import pytest
import torch

from g2rpo import G2RPOSampler
from g2rpo.testing.tiny import FLUX_DEV_TRANSFORMER, random_flux_velocity
from g2rpo.testing import PAPER_SETTING as SETTING, public_loop_rollout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]
TFLOP_PER_ROW = 37.3


@pytest.fixture(scope="module")
def flux():
    return random_flux_velocity(FLUX_DEV_TRANSFORMER, 720, 720, device="cuda", dtype=torch.bfloat16)


def _engine(velocity, cond, noise, max_batch=24):
    s = G2RPOSampler(velocity, max_batch=max_batch, **SETTING)
    ro = s.rollout(noise, cond, generator=torch.Generator("cuda").manual_seed(1))
    torch.cuda.synchronize()
    return ro


def _public(velocity, cond, noise):
    out = public_loop_rollout(velocity, noise, cond, generator=torch.Generator("cuda").manual_seed(1), **SETTING)
    torch.cuda.synchronize()
    return out


@pytest.mark.benchmark(group="flux-rollout-720")
def test_bench_flux_engine(benchmark, flux):
    ro = benchmark.pedantic(_engine, args=flux, rounds=2, warmup_rounds=1)
    sec = benchmark.stats.stats.median
    benchmark.extra_info.update(forward_rows=ro.forward_rows, tflops=ro.forward_rows * TFLOP_PER_ROW / sec,
                                gpu=torch.cuda.get_device_name())


@pytest.mark.benchmark(group="flux-rollout-720")
def test_bench_flux_public_loop(benchmark, flux):
    _, rows = benchmark.pedantic(_public, args=flux, rounds=1, warmup_rounds=0)
    sec = benchmark.stats.stats.median
    benchmark.extra_info.update(forward_rows=rows, tflops=rows * TFLOP_PER_ROW / sec, gpu=torch.cuda.get_device_name())
