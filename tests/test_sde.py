import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

import g2rpo.sde as sde_mod
from g2rpo import ode_step, sde_coefficients, sde_step_with_logprob, sigma_schedule
from g2rpo.testing import GaussianWorld, sample_ode, sample_sde

T = 16
SIGMAS = sigma_schedule(T, 3.0)


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _paper_step64(v, x, t, t_next, eta, eps, sigma_t=None):
    """Eq. 2-3 written out in float64, independently of g2rpo.sde."""
    v, x, eps = v.double(), x.double(), eps.double()
    dt = t_next - t
    if sigma_t is None:
        sigma_t = eta * math.sqrt(t / (1 - t))
    mean = x + (v + sigma_t**2 / (2 * t) * (x + (1 - t) * v)) * dt
    std = sigma_t * math.sqrt(-dt)
    return mean, std, mean + std * eps


@pytest.mark.parametrize("index", [0, 3, 15])
def test_flow_grpo_step_matches_paper_equation_in_float64(index):
    x, v, eps = _rand(4, 3, 8, 8, seed=1), _rand(4, 3, 8, 8, seed=2), _rand(4, 3, 8, 8, seed=3)
    t, t_next = SIGMAS[index].item(), SIGMAS[index + 1].item()
    # t = 1 rule: (1 - t) is evaluated with the next schedule value (Flow-GRPO)
    sigma_t = 0.7 * math.sqrt(1.0 / (1.0 - SIGMAS[1].item())) if index == 0 else None
    mean64, std64, nxt64 = _paper_step64(v, x, t, t_next, 0.7, eps, sigma_t)
    nxt, lp, mean, std = sde_step_with_logprob(v, x, SIGMAS, index, 0.7, noise=eps)
    assert torch.isfinite(nxt).all() and torch.isfinite(lp).all()
    assert torch.allclose(mean.double(), mean64, atol=1e-5, rtol=1e-5)
    assert torch.allclose(nxt.double(), nxt64, atol=1e-5, rtol=1e-5)
    assert std.flatten()[0].item() == pytest.approx(std64, rel=1e-6)
    lp64 = norm.logpdf(nxt64.numpy(), loc=mean64.numpy(), scale=std64).reshape(4, -1).mean(axis=1)
    assert np.allclose(lp.double().numpy(), lp64, atol=1e-4)


def test_t_equal_one_rule_is_finite_and_uses_next_sigma():
    a, b, std = sde_coefficients(SIGMAS, 0, 0.7)
    assert all(torch.isfinite(c) for c in (a, b, std))
    dt = SIGMAS[1] - 1.0
    sigma_t = 0.7 * math.sqrt(1.0 / (1.0 - SIGMAS[1].item()))
    assert std.item() == pytest.approx(sigma_t * math.sqrt(-dt.item()), rel=1e-12)
    assert a.item() == pytest.approx(1 + sigma_t**2 / 2 * dt.item(), rel=1e-12)
    assert b.item() == pytest.approx(dt.item(), rel=1e-12)  # (1 - t) v term vanishes at t = 1


def test_dance_grpo_variant_matches_their_flux_step():
    x, v, eps = _rand(3, 16, 4, seed=4), _rand(3, 16, 4, seed=5), _rand(3, 16, 4, seed=6)
    eta = 0.3
    for index in (0, 5, 14):
        sigma, nxt_sigma = SIGMAS[index].item(), SIGMAS[index + 1].item()
        dsigma = nxt_sigma - sigma
        # DanceGRPO flux_step, restated in float64
        x64, v64 = x.double(), v.double()
        mean = x64 + dsigma * v64
        x0_hat = x64 - sigma * v64
        score = -(x64 - x0_hat * (1 - sigma)) / sigma**2
        mean = mean + (-0.5 * eta**2 * score) * dsigma
        std = eta * math.sqrt(sigma - nxt_sigma)
        nxt64 = mean + std * eps.double()
        nxt, lp, m, s = sde_step_with_logprob(v, x, SIGMAS, index, eta, noise=eps, kind="dance_grpo")
        assert torch.allclose(m.double(), mean, atol=1e-5)
        assert torch.allclose(nxt.double(), nxt64, atol=1e-5)
        lp64 = (-(nxt64 - mean) ** 2 / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2))
        assert torch.allclose(lp.double(), lp64, atol=1e-4)


def test_bf16_inputs_run_in_fp32_and_shapes():
    x, v = _rand(5, 4, 6, 6, dtype=torch.bfloat16), _rand(5, 4, 6, 6, seed=9, dtype=torch.bfloat16)
    nxt, lp, mean, std = sde_step_with_logprob(v, x, SIGMAS, 2, 0.7, generator=torch.Generator().manual_seed(0))
    assert nxt.dtype == lp.dtype == mean.dtype == std.dtype == torch.float32
    assert nxt.shape == x.shape and mean.shape == x.shape and lp.shape == (5,) and std.shape == (1, 1, 1, 1)
    ref = sde_step_with_logprob(v.float(), x.float(), SIGMAS, 2, 0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(nxt, ref[0]) and torch.equal(lp, ref[1])


def test_shared_velocity_broadcasts_over_the_group():
    x, v1, eps = _rand(12, 2, 10, seed=1), _rand(1, 2, 10, seed=2), _rand(12, 2, 10, seed=3)
    shared = sde_step_with_logprob(v1, x, SIGMAS, 4, 0.7, noise=eps)
    repeated = sde_step_with_logprob(v1.expand(12, 2, 10).clone(), x, SIGMAS, 4, 0.7, noise=eps)
    for s, r in zip(shared, repeated):
        assert torch.equal(s, r)
    # a shared x_k and v_k: one row of x with per-branch noise
    x1 = x[:1]
    nxt, lp, mean, _ = sde_step_with_logprob(v1, x1.expand(12, 2, 10), SIGMAS, 4, 0.7, noise=eps)
    assert torch.equal(mean, mean[:1].expand_as(mean)) and not torch.equal(nxt[0], nxt[1])


def test_prev_sample_is_scored_and_gradients_flow_through_mean_only():
    x, eps = _rand(6, 3, 5, seed=1), _rand(6, 3, 5, seed=3)
    v = _rand(6, 3, 5, seed=2).requires_grad_(True)
    nxt, lp, _, _ = sde_step_with_logprob(v.detach(), x, SIGMAS, 6, 0.7, noise=eps)
    nxt = nxt.requires_grad_(True)
    _, lp2, _, _ = sde_step_with_logprob(v, x, SIGMAS, 6, 0.7, prev_sample=nxt)
    assert torch.allclose(lp2, lp, atol=1e-6)
    lp2.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0 and nxt.grad is None
    # d logp / d mean = (x_next - mean) / (std^2 N); d mean / d v = b
    a, b, std = sde_coefficients(SIGMAS, 6, 0.7)
    mean = a.float() * x + b.float() * v.detach()
    expected = b.float() * (nxt.detach() - mean) / (std.float() ** 2 * 15)
    assert torch.allclose(v.grad, expected, rtol=1e-4, atol=1e-6)


def test_per_row_indices_equal_separate_steps():
    x, v, eps = _rand(3, 7, seed=1), _rand(3, 7, seed=2), _rand(3, 7, seed=3)
    idx = torch.tensor([0, 5, 11])
    nxt, lp, _, _ = sde_step_with_logprob(v, x, SIGMAS, idx, 0.7, noise=eps)
    for r, i in enumerate(idx.tolist()):
        n1, l1, _, _ = sde_step_with_logprob(v[r:r + 1], x[r:r + 1], SIGMAS, i, 0.7, noise=eps[r:r + 1])
        assert torch.allclose(nxt[r], n1[0], atol=1e-6) and torch.allclose(lp[r], l1[0], atol=1e-6)
    out = ode_step(v, x, SIGMAS, idx, idx + 2)
    for r, i in enumerate(idx.tolist()):
        assert torch.allclose(out[r], ode_step(v[r:r + 1], x[r:r + 1], SIGMAS, i, i + 2)[0])


def test_generator_reproducibility_and_independent_noise():
    x, v = _rand(4, 9, seed=1), _rand(4, 9, seed=2)
    a = sde_step_with_logprob(v, x, SIGMAS, 1, 0.7, generator=torch.Generator().manual_seed(7))[0]
    b = sde_step_with_logprob(v, x, SIGMAS, 1, 0.7, generator=torch.Generator().manual_seed(7))[0]
    c = sde_step_with_logprob(v, x, SIGMAS, 1, 0.7, generator=torch.Generator().manual_seed(8))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("index", [0, 4, 15])
def test_eta_zero_equals_diffusers_euler_step(index):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / T, T))
    x, v = _rand(2, 4, 8, 8, seed=1), _rand(2, 4, 8, 8, seed=2)
    sched._step_index = index
    ref = sched.step(v, sched.timesteps[index], x, return_dict=False)[0]
    nxt, lp, _, _ = sde_step_with_logprob(v, x, SIGMAS, index, 0.0)
    assert torch.allclose(nxt, ref, atol=1e-6) and torch.isnan(lp).all()
    assert torch.allclose(ode_step(v, x, SIGMAS, index, index + 1), ref, atol=1e-6)


def test_bad_inputs_raise_named_errors():
    x, v = _rand(4, 3, 5), _rand(4, 3, 5)
    with pytest.raises(ValueError, match="velocity shape"):
        sde_step_with_logprob(_rand(2, 3, 5), x, SIGMAS, 0, 0.7)
    with pytest.raises(ValueError, match="index"):
        sde_step_with_logprob(v, x, SIGMAS, 16, 0.7)
    with pytest.raises(ValueError, match="kind"):
        sde_step_with_logprob(v, x, SIGMAS, 0, 0.7, kind="ddim")
    with pytest.raises(ValueError, match="eta"):
        sde_step_with_logprob(v, x, SIGMAS, 0, float("nan"))
    with pytest.raises(ValueError, match="noise or generator"):
        sde_step_with_logprob(v, x, SIGMAS, 0, 0.7, noise=x, generator=torch.Generator())
    with pytest.raises(ValueError, match="prev_sample"):
        sde_step_with_logprob(v, x, SIGMAS, 0, 0.7, prev_sample=x, noise=x)
    with pytest.raises(ValueError, match="per-row index"):
        sde_step_with_logprob(v, x, SIGMAS, torch.tensor([0, 1]), 0.7)
    with pytest.raises(ValueError, match="next_index"):
        ode_step(v, x, SIGMAS, 0, 17)


# ---- the analytic world: exact marginals -------------------------------------------------
WORLD = GaussianWorld(mu=0.5, scale=0.5)
N_ROWS, DIM, FINE_STEPS = 2048, 32, 1024
# Monte-Carlo standard errors of the mean / std of N_ROWS*DIM scalars, and a 4.5-sigma band.
_N = N_ROWS * DIM
MEAN_TOL = 4.5 * WORLD.scale / math.sqrt(_N)
STD_TOL = 4.5 * WORLD.scale / math.sqrt(2 * _N) + 0.003  # + the Euler bias at 1024 steps (<0.0015)


def _assert_marginal(x, mean, std):
    assert abs(x.mean().item() - mean) < MEAN_TOL, (x.mean().item(), mean)
    assert abs(x.std().item() - std) < STD_TOL, (x.std().item(), std)


def test_ode_sampler_reaches_the_data_distribution():
    noise = _rand(N_ROWS, DIM, seed=11)
    sigmas = sigma_schedule(FINE_STEPS, 3.0)
    _assert_marginal(sample_ode(WORLD, noise, sigmas), WORLD.mu, WORLD.scale)
    # 16 steps on the paper's schedule: the Euler bias shrinks the std but keeps the mean
    x16 = sample_ode(WORLD, noise, SIGMAS)
    assert abs(x16.mean().item() - WORLD.mu) < MEAN_TOL and 0.38 < x16.std().item() < WORLD.scale


def test_sde_sampler_keeps_the_ode_marginals():
    noise = _rand(N_ROWS, DIM, seed=12)
    sigmas = sigma_schedule(FINE_STEPS, 3.0)
    x = sample_sde(WORLD, noise, sigmas, 0.7, generator=torch.Generator().manual_seed(3))
    _assert_marginal(x, WORLD.mu, WORLD.scale)


def _mutant(which):
    real = sde_mod.sde_coefficients

    def coefficients(sigmas, index, eta, kind="flow_grpo"):
        a, b, std = real(sigmas, index, eta, kind)
        dt = sigmas[index + 1] - sigmas[index]
        if which == "sign":
            return 2 - a, 2 * dt - b, std
        if which == "factor2":
            return 1 + 2 * (a - 1), dt + 2 * (b - dt), std
        if which == "std_sqrt2":
            return a, b, std * math.sqrt(2)
        raise AssertionError(which)

    return coefficients


@pytest.mark.parametrize("which", ["sign", "factor2", "std_sqrt2"])
def test_marginal_check_catches_sign_and_factor_errors(which, monkeypatch):
    monkeypatch.setattr(sde_mod, "sde_coefficients", _mutant(which))
    noise = _rand(N_ROWS, DIM, seed=12)
    x = sample_sde(WORLD, noise, sigma_schedule(FINE_STEPS, 3.0), 0.7, generator=torch.Generator().manual_seed(3))
    with pytest.raises(AssertionError):
        _assert_marginal(x, WORLD.mu, WORLD.scale)


def test_log_prob_of_a_drawn_sample_equals_float64_density():
    sigmas = sigma_schedule(T, 3.0)
    x = _rand(8, DIM, seed=21)
    for index in (0, 3, 9):
        t = sigmas[index].item()
        v = WORLD(x, torch.full((8,), t))
        nxt, lp, _, _ = sde_step_with_logprob(v, x, sigmas, index, 0.7, generator=torch.Generator().manual_seed(index))
        sigma_t = 0.7 * math.sqrt(t / (1 - (sigmas[1].item() if t == 1.0 else t)))
        dt = sigmas[index + 1].item() - t
        x64, v64 = x.double().numpy(), v.double().numpy()
        mean64 = x64 + (v64 + sigma_t**2 / (2 * t) * (x64 + (1 - t) * v64)) * dt
        lp64 = norm.logpdf(nxt.double().numpy(), mean64, sigma_t * math.sqrt(-dt)).mean(axis=1)
        assert np.allclose(lp.double().numpy(), lp64, atol=2e-5)
        assert np.all(np.isfinite(lp64))
