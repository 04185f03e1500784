"""GPU checks (marked ``gpu``; skipped without CUDA), run by ``bench/gpu/run.sh`` on a lent GPU.
Their CPU proxies are in test_ops.py, test_compile.py and test_train.py."""

import pytest
import torch

from g2rpo import G2RPOSampler
from g2rpo.ops import available_backends, sde_step_logprob

from test_compile import PAPER
from test_ops import _inputs, _ref_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_match_float64_reference(backend, shared, dtype):
    if backend not in available_backends():
        pytest.skip(f"{backend} backend not built/available")
    x, v, z, a, b, s, _ = _inputs(7, 12, (2025, 64), shared, dtype)
    xn, lp = sde_step_logprob(*(t.cuda() for t in (x, v, z, a, b, s)), backend=backend)
    ref_xn, ref_lp, _ = _ref_step(x, v, z, a, b, s)
    assert torch.allclose(xn.double().cpu(), ref_xn, atol=1e-5, rtol=1e-5)
    assert torch.allclose(lp.double().cpu(), ref_lp, atol=1e-4, rtol=1e-5)


def test_cuda_graph_paper_rollout_uses_at_most_four_graphs():
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from g2rpo.testing.tiny import TINY_FLUX_TRANSFORMER, random_flux_velocity

    velocity, cond, noise = random_flux_velocity(TINY_FLUX_TRANSFORMER, 64, 64, device="cuda", text_len=8)
    gen = lambda: torch.Generator("cuda").manual_seed(1)  # noqa: E731
    eager = G2RPOSampler(velocity, max_batch=64, **PAPER).rollout(noise, cond, generator=gen())
    dynamo.reset()
    counters.clear()
    with dynamo.config.patch(fail_on_recompile_limit_hit=True):
        sampler = G2RPOSampler(velocity, max_batch=64, cuda_graphs=True, **PAPER)
        runs = [sampler.rollout(noise, cond, generator=gen()) for _ in range(2)]
    assert 1 <= counters["stats"]["unique_graphs"] <= 4
    for ro in runs:
        assert torch.allclose(ro.finals, eager.finals, atol=1e-3)
    dynamo.reset()


def test_bf16_trainer_ratio_on_gpu(lab_world, tmp_path):
    from g2rpo.config import load_config
    from g2rpo.train import Trainer

    from test_train import tiny

    cfg = load_config(None, tiny(lab_world, tmp_path, iterations=1, **{"model.dtype": "bfloat16",
                                                                       "loss.recompute_old_logprob": True}))
    m = Trainer(cfg, log=lambda *a, **k: None).run()[0]
    assert m["ratio_first_max_dev"] <= 1e-6
