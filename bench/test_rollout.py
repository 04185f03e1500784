"""Rollout engine vs the public G2RPO loop structure at the paper setting (T=16, e=0..7,
G=12, Lambda={1,2,3}, one prompt), same outputs, in one run.

    python -m pytest bench/test_rollout.py --benchmark-only
"""

import pytest
import torch

from g2rpo import G2RPOSampler
from g2rpo.testing import PAPER_SETTING as SETTING, MLPVelocity, public_loop_rollout

SHAPE = (16, 8, 8)


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    model = MLPVelocity(SHAPE, cond_dim=32, hidden=512, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    return model, torch.randn(1, *SHAPE, generator=g), torch.randn(1, 32, generator=g)


def _engine(model, noise, cond):
    s = G2RPOSampler(model, max_batch=64, **SETTING)
    return s.rollout(noise, cond, generator=torch.Generator().manual_seed(1))


def _public(model, noise, cond):
    return public_loop_rollout(model, noise, cond, generator=torch.Generator().manual_seed(1), **SETTING)


def test_engine_and_public_loop_agree(world):
    model, noise, cond = world
    ro = _engine(model, noise, cond)
    finals, rows = _public(model, noise, cond)
    assert torch.allclose(ro.finals[0], finals, atol=1e-4)
    assert (ro.forward_rows, rows) == (1708, 2188)


@pytest.mark.benchmark(group="rollout-paper-setting")
def test_bench_engine(benchmark, world):
    ro = benchmark.pedantic(_engine, args=world, rounds=5, warmup_rounds=1)
    benchmark.extra_info["forward_rows"] = ro.forward_rows
    benchmark.extra_info["forward_calls"] = ro.forward_calls


@pytest.mark.benchmark(group="rollout-paper-setting")
def test_bench_public_loop(benchmark, world):
    _, rows = benchmark.pedantic(_public, args=world, rounds=3, warmup_rounds=1)
    benchmark.extra_info["forward_rows"] = rows
