import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from g2rpo import granularity_grid, model_timesteps, sigma_schedule


def test_sigma_schedule_endpoints_dtype_and_shift_formula():
    s = sigma_schedule(16, shift=3.0)
    assert s.dtype == torch.float64 and s.shape == (17,)
    assert s[0].item() == 1.0 and s[-1].item() == 0.0
    assert torch.all(s[1:] < s[:-1])
    u = 1.0 - 5 / 16
    assert s[5].item() == pytest.approx(3 * u / (1 + 2 * u), abs=1e-15)
    assert torch.allclose(sigma_schedule(16, shift=1.0), torch.linspace(1, 0, 17, dtype=torch.float64))


def test_sigma_schedule_matches_diffusers_flow_match_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / 16, 16))
    assert torch.allclose(sched.sigmas.double(), sigma_schedule(16, 3.0), atol=1e-6)


@pytest.mark.parametrize("kwargs, name", [({"num_steps": 0}, "num_steps"), ({"num_steps": 4, "shift": 0.0}, "shift"),
                                          ({"num_steps": 4, "shift": -1.0}, "shift")])
def test_sigma_schedule_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sigma_schedule(**kwargs)


def test_granularity_grid_paper_example():
    assert granularity_grid(16, 0, 3) == [1, 2, 5, 8, 11, 16]
    assert granularity_grid(16, 0, 1) == list(range(1, 17))
    assert granularity_grid(16, 0, 2) == [1, 2, 4, 6, 8, 10, 12, 14, 16]
    assert granularity_grid(16, 7, 3) == [8, 9, 12, 16]
    assert granularity_grid(16, 15, 2) == [16]


@pytest.mark.parametrize("args, name", [((16, 0, 0), "granularity"), ((16, -1, 1), "sde_index"),
                                        ((16, 16, 1), "sde_index"), ((0, 0, 1), "num_steps")])
def test_granularity_grid_rejects_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        granularity_grid(*args)


@given(st.integers(1, 60).flatmap(lambda t: st.tuples(st.just(t), st.integers(0, t - 1), st.integers(1, 12))))
def test_granularity_grid_properties(args):
    num_steps, e, lam = args
    grid = granularity_grid(num_steps, e, lam)
    # number of ODE steps of the continuation = ceil((k - 1) / lambda), k = T - e
    assert len(grid) - 1 == math.ceil((num_steps - e - 1) / lam)
    assert grid[0] == e + 1 and grid[-1] == num_steps
    assert all(b > a for a, b in zip(grid, grid[1:]))
    if len(grid) > 2:
        assert grid[1] == e + 2  # the first two evaluation points are shared by every granularity
    assert all(b - a == lam for a, b in zip(grid[1:-2], grid[2:-1]))


def test_model_timesteps_quantisation_is_opt_in():
    s = sigma_schedule(16).float()
    assert torch.equal(model_timesteps(s), s)
    q = model_timesteps(s, quantize=True)
    assert q.dtype == s.dtype
    # the public code: int(sigma * 1000) of an fp32 tensor element, then a long tensor / 1000
    expected = torch.tensor([int(x * 1000) for x in s], dtype=torch.long) / 1000
    assert torch.equal(q, expected)
    assert not torch.equal(q, s)
    fp32 = torch.tensor([0.9, 0.7], dtype=torch.float32)
    assert (model_timesteps(fp32, quantize=True) * 1000).round().tolist() == [900, 700]
    assert torch.equal(model_timesteps(fp32.double(), quantize=True).float(), torch.tensor([0.9, 0.7]))
