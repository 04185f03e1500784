"""Every backend of g2rpo.ops against a float64 reference written here (Triton runs under
TRITON_INTERPRET=1, set in conftest.py)."""

import math

import pytest
import torch

from g2rpo.ops import available_backends, logprob, logprob_ratio_loss, sde_step_logprob

BACKENDS = [b for b in ("torch", "triton", "cpp") if b in available_backends()]
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)



def _seed(*parts) -> int:
    """A seed fixed by the test's parameters (Python's str hash changes with every process: PYTHONHASHSEED)."""
    import zlib

    return zlib.crc32(repr(parts).encode()) % 10_000

def _inputs(seed, B, shape, shared, dtype):
    g = torch.Generator().manual_seed(seed)
    rows = 1 if shared else B
    x = torch.randn(rows, *shape, generator=g).to(dtype)
    v = torch.randn(rows, *shape, generator=g).to(dtype)
    z = torch.randn(B, *shape, generator=g).to(dtype)
    a = 1.0 + 0.1 * torch.rand(B, generator=g)
    b = -0.05 - 0.1 * torch.rand(B, generator=g)
    s = 0.05 + 0.3 * torch.rand(B, generator=g)
    return x, v, z, a, b, s, g


def _ref_step(x, v, z, a, b, s):
    """float64: x_next and the Gaussian log-prob averaged over dims."""
    x, v, z = x.double(), v.double(), z.double()
    view = (-1,) + (1,) * (z.ndim - 1)
    a, b, s = a.double().view(view), b.double().view(view), s.double().view(view)
    mean = a * x + b * v
    xn = mean + s * z
    lp = (-(xn - mean) ** 2 / (2 * s**2) - torch.log(s) - LOG_SQRT_2PI).flatten(1).mean(1)
    return xn, lp, mean


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7,), (3, 1001), (12345,), (5, 9, 300)])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sde_step_matches_float64_reference(backend, shape, shared, dtype):
    seed = _seed(backend, shape, shared, dtype)
    x, v, z, a, b, s, _ = _inputs(seed, 6, shape, shared, dtype)
    xn, lp = sde_step_logprob(x, v, z, a, b, s, backend=backend)
    ref_xn, ref_lp, _ = _ref_step(x, v, z, a, b, s)
    assert xn.dtype == torch.float32 and xn.shape == z.shape and lp.shape == (6,)
    assert torch.allclose(xn.double(), ref_xn, atol=1e-5, rtol=1e-5)
    assert torch.allclose(lp.double(), ref_lp, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ratio_loss_forward_and_backward_match_autograd_reference(backend, shared, dtype):
    seed = _seed(backend, shared, dtype, "loss")
    B, shape = 12, (3, 4099)
    x, v, z, a, b, s, g = _inputs(seed, B, shape, shared, dtype)
    xn_ref, lp_ref, _ = _ref_step(x, v, z, a, b, s)
    x_next = xn_ref.float()
    old = lp_ref.float() + 0.02 * torch.randn(B, generator=g)  # ratios on both sides of the clip range
    adv = torch.randn(B, generator=g) * 3
    clip, adv_clip = 0.01, 2.0

    v_op = v.clone().requires_grad_(True)
    out = logprob_ratio_loss(x, x_next, v_op, old, adv, a, b, s, clip, adv_clip, backend=backend)
    w = torch.rand(B, generator=g)
    (out.loss * w).sum().backward()

    v64 = v.double().clone().requires_grad_(True)
    view = (-1,) + (1,) * len(shape)
    mean = a.double().view(view) * x.double() + b.double().view(view) * v64
    lp = (-(x_next.double() - mean) ** 2 / (2 * s.double().view(view) ** 2) - torch.log(s.double().view(view))
          - LOG_SQRT_2PI).flatten(1).mean(1)
    ratio = torch.exp(lp - old.double())
    A = adv.double().clamp(-adv_clip, adv_clip)
    loss = torch.maximum(-A * ratio, -A * ratio.clamp(1 - clip, 1 + clip))
    (loss * w.double()).sum().backward()

    assert torch.allclose(out.loss.double(), loss.detach(), atol=1e-5, rtol=1e-4)
    assert torch.allclose(out.ratio.double(), ratio.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(out.clipped, (ratio.detach() - 1).abs() > clip)
    assert out.clipped.any() and not out.clipped.all()
    assert v_op.grad.shape == v.shape and v_op.grad.dtype == v.dtype
    scale = v64.grad.abs().max()
    if dtype == torch.bfloat16:  # the gradient is stored in v's dtype: 8 mantissa bits
        assert torch.allclose(v_op.grad.double(), v64.grad, rtol=1e-2, atol=1e-3 * scale)
    else:
        assert torch.allclose(v_op.grad.double(), v64.grad, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_in_float64(backend):
    x, v, z, a, b, s, g = _inputs(3, 4, (37,), True, torch.float64)
    xn = _ref_step(x, v, z, a, b, s)[0]
    v = v.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda vv: logprob(x, xn, vv, a.double(), b.double(), s.double(), backend=backend),
                                    (v,), eps=1e-6, atol=1e-6)


def test_auto_backend_and_errors():
    x, v, z, a, b, s, _ = _inputs(5, 3, (10,), False, torch.float32)
    ref = sde_step_logprob(x, v, z, a, b, s, backend="torch")
    auto = sde_step_logprob(x, v, z, a, b, s, backend="auto")
    assert torch.allclose(auto[0], ref[0], atol=1e-6) and torch.allclose(auto[1], ref[1], atol=1e-5)
    with pytest.raises(ValueError, match="backend must be one of"):
        sde_step_logprob(x, v, z, a, b, s, backend="cudnn")
    with pytest.raises(ValueError, match="expected 1 \\(shared\\) or 3"):
        sde_step_logprob(x[:2].repeat(1, 1), v, z, a, b, s)


def test_custom_op_traces_under_torch_compile_and_passes_opcheck():
    x, v, z, a, b, s, g = _inputs(11, 4, (64,), True, torch.float32)
    xn = _ref_step(x, v, z, a, b, s)[0].float()
    old, adv = torch.zeros(4), torch.randn(4, generator=g)

    def f(vv):
        return logprob_ratio_loss(x, xn, vv, old, adv, a, b, s, 0.1, 5.0, backend="torch").loss.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    v1, v2 = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    f(v1).backward()
    compiled(v2).backward()
    assert torch.allclose(v1.grad, v2.grad, atol=1e-6)
    xr, vr, xnr = x.reshape(1, -1), v.reshape(1, -1).clone().requires_grad_(True), xn.reshape(4, -1)
    torch.library.opcheck(torch.ops.g2rpo.residual_sums.default, (xr, vr, xnr, a, b, "torch"))
