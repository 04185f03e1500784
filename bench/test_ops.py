"""Fused ops vs torch eager at a realistic shape: 12 rows x 720x720 Flux latents = 12 x 2025 x 64 fp32,
with the group's x_k and v_k shared (G2RPO) and per row (trajectory baselines).

    python -m pytest bench/test_ops.py --benchmark-only

On a GPU the same file measures Triton's achieved bandwidth against a device-to-device copy.
"""

import pytest
import torch

from g2rpo.ops import available_backends, logprob_ratio_loss, sde_step_logprob

B, SHAPE = 12, (2025, 64)
CPU_BACKENDS = [b for b in ("torch", "cpp") if b in available_backends()]


def _inputs(shared: bool, device="cpu"):
    g = torch.Generator().manual_seed(0)
    rows = 1 if shared else B
    x = torch.randn(rows, *SHAPE, generator=g).to(device)
    v = torch.randn(rows, *SHAPE, generator=g).to(device)
    z = torch.randn(B, *SHAPE, generator=g).to(device)
    a = (1.0 + 0.1 * torch.rand(B, generator=g)).to(device)
    b = (-0.1 * torch.rand(B, generator=g)).to(device)
    s = (0.1 + 0.2 * torch.rand(B, generator=g)).to(device)
    return x, v, z, a, b, s


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bench_sde_step_cpu(benchmark, backend, shared):
    benchmark.group = f"sde_step forward, 12x2025x64 fp32, {'shared' if shared else 'per-row'} x/v"
    args = _inputs(shared)
    benchmark(sde_step_logprob, *args, backend=backend)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bench_ratio_loss_fwd_bwd_cpu(benchmark, backend, shared):
    benchmark.group = f"log-prob ratio loss forward+backward, 12x2025x64 fp32, {'shared' if shared else 'per-row'} v"
    x, v, z, a, b, s = _inputs(shared)
    x_next = sde_step_logprob(x, v, z, a, b, s, backend="torch")[0]
    old, adv = torch.zeros(B), torch.randn(B)
    v = v.requires_grad_(True)

    def step():
        v.grad = None
        logprob_ratio_loss(x, x_next, v, old, adv, a, b, s, 1e-4, 5.0, backend=backend).loss.sum().backward()

    benchmark(step)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("what", ["copy", "triton"])
def test_bench_triton_bandwidth(benchmark, what):
    benchmark.group = "GPU bandwidth: sde_step (per-row x, v) vs device-to-device copy"
    x, v, z, a, b, s = _inputs(False, "cuda")
    out = torch.empty_like(z)
    nbytes = 4 * z.numel() * (4 if what == "triton" else 2)  # triton: read x, v, z + write x_next; copy: r + w

    def run():
        if what == "copy":
            out.copy_(z)
        else:
            sde_step_logprob(x, v, z, a, b, s, backend="triton")
        torch.cuda.synchronize()

    benchmark(run)
    benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
