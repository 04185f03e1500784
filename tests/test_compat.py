"""The public step functions (g2rpo.compat) against independent float64 re-derivations written here
from the public code's equations (not from g2rpo.sde)."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from g2rpo.compat.dance_grpo import flux_step
from g2rpo.compat.flow_grpo import sde_step_with_logprob
from g2rpo.compat.g2rpo_official import flow_grpo_step
from g2rpo.schedule import sigma_schedule

SHAPE = (3, 4, 6, 6)


def _flow_ref(x, v, sig, sig_next, sig_max, eta, prev=None, noise=None):
    """Flow-GRPO's step in float64: returns (prev, log_prob, mean, std_dev_t)."""
    x, v = x.double(), v.double()
    view = (-1,) + (1,) * (x.ndim - 1)
    sig, sig_next = sig.double().view(view), sig_next.double().view(view)
    dt = sig_next - sig
    std_dev_t = torch.sqrt(sig / (1 - torch.where(sig == 1, torch.as_tensor(sig_max, dtype=torch.float64), sig))) * eta
    mean = x * (1 + std_dev_t**2 / (2 * sig) * dt) + v * (1 + std_dev_t**2 * (1 - sig) / (2 * sig)) * dt
    if prev is None:
        prev = mean + std_dev_t * torch.sqrt(-dt) * noise.double()
    prev = prev.double()
    s = std_dev_t * torch.sqrt(-dt)
    lp = (-((prev - mean) ** 2) / (2 * s**2) - torch.log(s) - math.log(math.sqrt(2 * math.pi))).flatten(1).mean(1)
    return prev, lp, mean, std_dev_t


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g).to(dtype), torch.randn(SHAPE, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [[0, 0, 0], [0, 5, 11]], ids=["t=1", "mixed"])
def test_flow_grpo_sde_step_with_logprob(dtype, rows):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(16)
    x, v = _inputs(dtype)
    t = sched.timesteps[rows]
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    prev, lp, mean, std = sde_step_with_logprob(sched, v, t, x, noise_level=0.7, generator=gen())
    sig, sig_next = sched.sigmas[rows], sched.sigmas[[r + 1 for r in rows]]
    noise = torch.randn(SHAPE, generator=gen())
    r_prev, r_lp, r_mean, r_std = _flow_ref(x.float(), v.float(), sig, sig_next, sched.sigmas[1].item(), 0.7,
                                            noise=noise)
    assert prev.dtype == lp.dtype == mean.dtype == torch.float32 and std.shape == (3, 1, 1, 1)
    assert torch.allclose(prev.double(), r_prev, atol=1e-5)
    assert torch.allclose(mean.double(), r_mean, atol=1e-5)
    assert torch.allclose(std.double(), r_std, rtol=1e-5)
    assert torch.allclose(lp.double(), r_lp, atol=1e-4)
    # scoring a given prev_sample draws no noise and gives its log-prob
    lp2 = sde_step_with_logprob(sched, v, t, x, 0.7, prev_sample=r_prev.float())[1]
    assert torch.allclose(lp2.double(), r_lp, atol=1e-4)


def test_g2rpo_official_flow_grpo_step():
    sigmas = torch.tensor(sigma_schedule(16).tolist(), dtype=torch.float32)
    x, v = _inputs(torch.float32, 1)
    for index, eta in ((0, 0.7), (6, 0.7), (6, 0.0)):
        gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
        v_bf16 = v.to(torch.bfloat16)  # as under autocast: noise drawn in bf16
        prev, x0, lp = flow_grpo_step(v_bf16, x, eta, sigmas, index, None, generator=gen())
        noise = torch.randn(SHAPE, generator=gen(), dtype=torch.bfloat16).float()
        sig = sigmas[index].expand(3)
        r_prev, r_lp, r_mean, _ = _flow_ref(x, v_bf16.float(), sig, sigmas[index + 1].expand(3), sigmas[1].item(), eta,
                                            noise=noise)
        assert torch.allclose(x0.double(), x.double() - sigmas[index].double() * v_bf16.double(), atol=1e-6)
        if eta == 0:
            assert torch.allclose(prev.double(), r_mean, atol=1e-5) and torch.isnan(lp).all()
        else:
            assert torch.allclose(prev.double(), r_prev, atol=1e-5)
            assert torch.allclose(lp.double(), r_lp, atol=1e-4)


@pytest.mark.parametrize("sde_solver", [True, False])
@pytest.mark.parametrize("grpo", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dance_grpo_flux_step(sde_solver, grpo, dtype):
    sigmas = torch.tensor(sigma_schedule(16).tolist(), dtype=torch.float32)
    x, v = _inputs(dtype, 2)
    eta, index = 0.3, 4
    xd, vd = x.double(), v.double()
    sig, nxt = sigmas[index].double(), sigmas[index + 1].double()
    mean = xd + (nxt - sig) * vd
    x0 = xd - sig * vd
    if sde_solver:
        score = -(xd - x0 * (1 - sig)) / sig**2
        mean = mean + (-0.5 * eta**2 * score) * (nxt - sig)
    std = eta * math.sqrt(float(sig - nxt))
    torch.manual_seed(11)
    out = flux_step(v, x, eta, sigmas, index, None, grpo, sde_solver)
    assert torch.allclose(out[1].double(), x0, atol=1e-5)
    if not grpo:
        assert torch.allclose(out[0].double(), mean, atol=1e-5)
        return
    torch.manual_seed(11)
    prev = mean + torch.randn_like(x.float()).double() * std
    lp = (-((prev - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))).flatten(1).mean(1)
    assert torch.allclose(out[0].double(), prev, atol=1e-5)
    assert torch.allclose(out[2].double(), lp, atol=1e-4)
    scored = flux_step(v, x, eta, sigmas, index, prev.float(), grpo, sde_solver)
    assert torch.allclose(scored[2].double(), lp, atol=1e-4)
