"""Compiled rollouts (the CPU proxy of CUDA graphs): chunk shapes are bucketed so that a whole
paper-setting rollout compiles at most 4 graphs, below dynamo's recompile limit (past it,
torch.compile silently runs eager)."""

import pytest
import torch

from g2rpo import G2RPOSampler
from g2rpo.testing.tiny import TINY_FLUX_TRANSFORMER, random_flux_velocity
from g2rpo.testing import PAPER_SETTING as PAPER
from g2rpo.rollout.engine import default_buckets



def test_default_buckets():
    assert default_buckets(64) == (8, 16, 32, 64)
    assert default_buckets(5) == (1, 2, 3, 5)
    assert default_buckets(1) == (1,)
    with pytest.raises(ValueError, match="largest is max_batch"):
        G2RPOSampler(lambda x, s, c: x, max_batch=16, batch_buckets=(4, 8))
    with pytest.raises(ValueError, match="need a max_batch"):
        G2RPOSampler(lambda x, s, c: x, max_batch=None, compile_options={})


@pytest.mark.slow
def test_bucketed_eager_rollout_equals_unbucketed():
    """Padding rows never changes the real rows (checked without compile: the same model both ways)."""
    velocity, cond, noise = random_flux_velocity(TINY_FLUX_TRANSFORMER, 64, 64, text_len=8)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    plain = G2RPOSampler(velocity, max_batch=64, **PAPER).rollout(noise, cond, generator=gen())
    padded = G2RPOSampler(velocity, max_batch=64, compile_options={"backend": "eager"}, **PAPER)
    ro = padded.rollout(noise, cond, generator=gen())
    assert ro.padded_rows > 0 and plain.padded_rows == 0
    assert ro.forward_rows == plain.forward_rows
    assert torch.allclose(ro.finals, plain.finals, atol=1e-5)
    assert torch.allclose(ro.log_probs, plain.log_probs, atol=1e-5)


@pytest.mark.slow
def test_inductor_rollout_compiles_at_most_four_graphs_and_equals_eager():
    """torch.compile(inductor, fullgraph=True, dynamic=False) on the tiny Flux velocity: a whole
    paper-setting rollout (T=16, e 0..7, Lambda {1,2,3}, G=12) uses <= 4 graphs, no fall-back."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    velocity, cond, noise = random_flux_velocity(TINY_FLUX_TRANSFORMER, 64, 64, text_len=8)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    eager = G2RPOSampler(velocity, max_batch=64, **PAPER).rollout(noise, cond, generator=gen())
    dynamo.reset()
    counters.clear()
    with dynamo.config.patch(fail_on_recompile_limit_hit=True):  # a fall-back to eager would raise
        sampler = G2RPOSampler(velocity, max_batch=64, compile_options={"backend": "inductor"}, **PAPER)
        ro = sampler.rollout(noise, cond, generator=gen())
        again = sampler.rollout(noise, cond, generator=gen())  # replays: no new graph
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 4, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert ro.forward_rows == eager.forward_rows
    for out in (ro, again):
        assert torch.allclose(out.finals, eager.finals, atol=1e-4)
        assert torch.allclose(out.log_probs, eager.log_probs, atol=1e-4)
    dynamo.reset()


@pytest.mark.slow
def test_a_dynamic_compile_pads_no_row_and_equals_eager():
    """compile_options={"dynamic": True} (the trainer's sampler.compile): one graph over any row count, so the
    chunks are not padded to buckets; dynamo's eager backend keeps the check to the engine's own logic."""
    velocity, cond, noise = random_flux_velocity(TINY_FLUX_TRANSFORMER, 64, 64, text_len=8)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    plain = G2RPOSampler(velocity, max_batch=64, **PAPER).rollout(noise, cond, generator=gen())
    sampler = G2RPOSampler(velocity, max_batch=64, compile_options={"backend": "eager", "dynamic": True}, **PAPER)
    ro = sampler.rollout(noise, cond, generator=gen())
    assert ro.padded_rows == 0 and ro.forward_rows == plain.forward_rows
    assert torch.allclose(ro.finals, plain.finals, atol=1e-5)
    assert torch.allclose(ro.log_probs, plain.log_probs, atol=1e-5)


def test_the_trainer_compiles_rollouts_only_when_asked_and_never_with_cuda_graphs(lab_world, tmp_path):
    from g2rpo.config import ConfigError, default_config_path, load_config
    from g2rpo.train import Trainer

    over = {"model": {"path": str(lab_world)}, "output_dir": str(tmp_path / "run"), "progress": False,
            "tensorboard": False}
    with pytest.raises(ConfigError, match="sampler.compile and sampler.cuda_graphs both compile"):
        load_config(default_config_path(), {**over, "sampler": {"compile": True, "cuda_graphs": True}})
    for flag, options in ((False, None), (True, {"dynamic": True})):
        cfg = load_config(default_config_path(), {**over, "sampler": {"compile": flag},
                                                  "output_dir": str(tmp_path / f"run_{flag}")})
        assert Trainer(cfg, log=lambda *a, **k: None).sampler.engine.compile_options == options
