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


def test_g2rpo_official_flow_grpo_step_fp32_option():
    sigmas = torch.tensor(sigma_schedule(16).tolist(), dtype=torch.float32)
    x, v = _inputs(torch.float32, 1)
    for index, eta in ((0, 0.7), (6, 0.7), (6, 0.0)):
        gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
        v_bf16 = v.to(torch.bfloat16)  # as under autocast: noise drawn in bf16
        prev, x0, lp = flow_grpo_step(v_bf16, x, eta, sigmas, index, None, generator=gen(), precision="fp32")
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
def test_dance_grpo_flux_step_fp32_option(sde_solver, grpo, dtype):
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
    out = flux_step(v, x, eta, sigmas, index, None, grpo, sde_solver, precision="fp32")
    assert torch.allclose(out[1].double(), x0, atol=1e-5)
    if not grpo:
        assert torch.allclose(out[0].double(), mean, atol=1e-5)
        return
    torch.manual_seed(11)
    prev = mean + torch.randn_like(x.float()).double() * std
    lp = (-((prev - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))).flatten(1).mean(1)
    assert torch.allclose(out[0].double(), prev, atol=1e-5)
    assert torch.allclose(out[2].double(), lp, atol=1e-4)
    scored = flux_step(v, x, eta, sigmas, index, prev.float(), grpo, sde_solver, precision="fp32")
    assert torch.allclose(scored[2].double(), lp, atol=1e-4)


# ---- bit-faithful by default: the public functions' arithmetic, re-derived here step by step ---------------------
# Both public functions are called with a bf16 model output (autocast) and fp32 latents: a 0-d fp32 schedule value
# times the bf16 output stays bf16 and only then meets the fp32 latents. Written out here op by op, in the inputs'
# dtypes, and compared to the bit.

def _dance_public(v, x, eta, sigmas, i, prev, grpo, sde_solver):
    s0, s1 = sigmas[i], sigmas[i + 1]
    d = s1 - s0
    m = x + d * v
    x0 = x - s0 * v
    sd = eta * math.sqrt(s0 - s1)
    if sde_solver:
        m = m + (-0.5 * eta ** 2 * (-(x - x0 * (1 - s0)) / s0 ** 2)) * d
    if not grpo:
        return m, x0
    if prev is None:
        prev = m + torch.randn_like(m) * sd
    lp = -((prev.float() - m.float()) ** 2) / (2 * sd ** 2) - math.log(sd) - torch.log(torch.sqrt(2 * torch.as_tensor(
        math.pi)))
    return prev, x0, lp.mean(dim=tuple(range(1, lp.ndim)))


def _official_public(v, x, eta, sigmas, i, prev, gen):
    s0, s1 = sigmas[i], sigmas[i + 1]
    d = s1 - s0
    x0 = x - s0 * v
    st = torch.sqrt(s0 / (1 - torch.where(s0 == 1, sigmas[1].item(), s0))) * eta
    m = x * (1 + st ** 2 / (2 * s0) * d) + v * (1 + st ** 2 * (1 - s0) / (2 * s0)) * d
    if prev is None:
        prev = m + st * torch.sqrt(-1 * d) * torch.randn(v.shape, generator=gen, dtype=v.dtype)
    sd = st * torch.sqrt(-1 * d)
    lp = -((prev - m) ** 2) / (2 * sd ** 2) - torch.log(sd) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    return prev, x0, lp.mean(dim=tuple(range(1, lp.ndim)))


def _same(a, b):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert torch.equal(a, b) or (torch.isnan(a) == torch.isnan(b)).all() and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.float32)], ids=["bf16-v,fp32-x", "bf16", "fp32"])
@pytest.mark.parametrize("grpo, sde_solver", [(True, True), (True, False), (False, True)])
def test_dance_grpo_flux_step_is_bit_faithful_by_default(dtypes, grpo, sde_solver):
    sigmas = torch.linspace(1, 0, 17)
    sigmas = 3.0 * sigmas / (1 + 2.0 * sigmas)  # sd3_time_shift in fp32, as DanceGRPO
    g = torch.Generator().manual_seed(5)
    v, x = torch.randn(SHAPE, generator=g).to(dtypes[0]), torch.randn(SHAPE, generator=g).to(dtypes[1])
    for i in (0, 7, 15):
        torch.manual_seed(3)
        ours = flux_step(v, x, 0.3, sigmas, i, None, grpo, sde_solver)
        torch.manual_seed(3)
        ref = _dance_public(v, x, 0.3, sigmas, i, None, grpo, sde_solver)
        for a, b in zip(ours, ref):
            _same(a, b)
        if grpo:  # scoring a given sample
            for a, b in zip(flux_step(v, x, 0.3, sigmas, i, ref[0], grpo, sde_solver),
                            _dance_public(v, x, 0.3, sigmas, i, ref[0], grpo, sde_solver)):
                _same(a, b)
    if dtypes == (torch.bfloat16, torch.float32):  # what DanceGRPO's trainer passes: fp32 samples, bf16 products
        assert ours[0].dtype == torch.float32
        fp32 = flux_step(v, x, 0.3, sigmas, 15, ref[0] if grpo else None, grpo, sde_solver, precision="fp32")
        assert not torch.equal(fp32[1], ours[1])  # the fp32 option differs in the last bits


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.float32)], ids=["bf16-v,fp32-x", "bf16", "fp32"])
def test_official_flow_grpo_step_is_bit_faithful_by_default(dtypes):
    sigmas = torch.linspace(1, 0, 17)
    sigmas = 3.0 * sigmas / (1 + 2.0 * sigmas)
    g = torch.Generator().manual_seed(6)
    v, x = torch.randn(SHAPE, generator=g).to(dtypes[0]), torch.randn(SHAPE, generator=g).to(dtypes[1])
    for i, eta in ((0, 0.7), (7, 0.7), (7, 0.0)):
        ours = flow_grpo_step(v, x, eta, sigmas, i, None, generator=torch.Generator().manual_seed(4))
        ref = _official_public(v, x, eta, sigmas, i, None, torch.Generator().manual_seed(4))
        for a, b in zip(ours, ref):
            _same(a, b)
        scored = flow_grpo_step(v, x, eta, sigmas, i, ref[0])
        for a, b in zip(scored, _official_public(v, x, eta, sigmas, i, ref[0], None)):
            _same(a, b)
    with pytest.raises(ValueError, match="precision must be one of"):
        flow_grpo_step(v, x, 0.7, sigmas, 0, None, precision="fp16")


@pytest.mark.parametrize("step", ["dance", "official"])
def test_drop_in_steps_refuse_wrong_inputs_naming_the_argument(step):
    sigmas = torch.linspace(1, 0, 9)
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)

    def call(mo=v, lat=x, sig=sigmas, index=2, prev=None):
        if step == "dance":
            return flux_step(mo, lat, 0.3, sig, index, prev, True, True)
        return flow_grpo_step(mo, lat, 0.7, sig, index, prev)

    for kwargs, msg in (({"mo": v[..., :1]}, "model_output has shape"),
                        ({"prev": x[:1]}, "prev_sample has shape"),
                        ({"mo": v[0, 0, 0], "lat": x[0, 0, 0]}, "batch dim"),
                        ({"index": 8}, r"index must be in 0\.\.7"),
                        ({"index": 1.5}, "index must be an int"),
                        ({"sig": sigmas[None]}, "sigmas must be a 1-D"),
                        ({"sig": torch.linspace(0, 1, 9)}, "must decrease"),
                        ({"sig": torch.ones(9)}, "must decrease")):
        with pytest.raises(ValueError, match=msg):
            call(**kwargs)
    assert call(index=torch.tensor(2))[0].shape == SHAPE  # a 0-d integer index is an index


def test_flow_grpo_step_refuses_wrong_timesteps():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(16)
    x, v = _inputs(torch.float32)
    t = sched.timesteps[[0, 1, 2]]
    with pytest.raises(ValueError, match="not in the scheduler's timesteps"):
        sde_step_with_logprob(sched, v, t + 0.5, x)
    with pytest.raises(ValueError, match="timestep must be 1-D"):
        sde_step_with_logprob(sched, v, t[0], x)
    with pytest.raises(ValueError, match="model_output has shape"):
        sde_step_with_logprob(sched, v[:1], t, x)
