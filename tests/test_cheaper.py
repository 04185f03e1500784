"""Cheaper G2RPO (issue 21): a random subset of M per iteration, x0 scoring as a granularity, and the MGAI
diagnostics a user reads to decide whether the extra granularities are worth their cost."""

import pytest
import torch

from g2rpo import G2RPOSampler
from g2rpo.advantage import mgai_diagnostics
from g2rpo.testing import MLPVelocity

SHAPE = (4, 4)


class Counting(torch.nn.Module):
    """A real velocity model that counts the rows it runs."""

    def __init__(self):
        super().__init__()
        self.model, self.rows = MLPVelocity(SHAPE, cond_dim=4, hidden=32, seed=0), 0

    def forward(self, x, sigma, cond):
        self.rows += x.shape[0]
        return self.model(x, sigma, cond)


def _rollout(model, **kw):
    s = G2RPOSampler(model, num_steps=16, group_size=4, max_batch=64, **kw)
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    return s, [s.rollout(noise, cond, generator=[torch.Generator().manual_seed(2 + p) for p in range(2)],
                         iteration=it) for it in range(3)]


def test_sde_subset_rolls_out_a_seeded_subset_and_counts_the_rows_it_runs():
    model = Counting()
    sampler, ros = _rollout(model, sde_subset=3, subset_seed=7)
    steps = [ro.step_index.tolist() for ro in ros]
    assert all(len(s) == 3 and s == sorted(s) and set(s) <= set(range(8)) for s in steps)
    assert len({tuple(s) for s in steps}) > 1  # another subset each iteration
    again, _ = _rollout(Counting(), sde_subset=3, subset_seed=7)
    assert [again.strategy.sde_steps(it) for it in range(3)] == steps  # a function of (seed, iteration) alone
    assert model.rows == sum(ro.forward_rows for ro in ros)  # rows counted = rows run
    _, full = _rollout(Counting())
    assert all(ro.forward_rows < f.forward_rows for ro, f in zip(ros, full))


@pytest.mark.parametrize("subset", [None, 8])
def test_sde_subset_off_or_all_is_exactly_g2rpo(subset):
    _, plain = _rollout(Counting())
    _, ros = _rollout(Counting(), sde_subset=subset, subset_seed=3)
    for a, b in zip(plain, ros):
        assert torch.equal(a.finals, b.finals) and torch.equal(a.log_probs, b.log_probs)
        assert a.forward_rows == b.forward_rows


def test_x0_scoring_is_a_granularity_one_forward_per_branch():
    """Scoring each branch's one-step x0 prediction x - sigma v is the granularity that jumps straight to T
    (lambda >= T - 1): one forward per branch after the SDE step."""
    model = Counting()
    sampler, (ro, *_) = _rollout(model, granularities=(15,), sde_indices=(0, 3, 7))
    K, G = 3, 4
    anchor = 16
    assert ro.forward_rows == 2 * (anchor + K * G)  # the anchor, then one row per branch
    e = 3
    x_next = ro.x_next[:, 1]  # [P, G, ...] after the SDE step at e = 3
    sig = sampler.sigmas[e + 1].float()
    cond = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    v = model.model(x_next.reshape(8, *SHAPE), sig.expand(8), cond.repeat_interleave(4, 0)).reshape(x_next.shape)
    assert torch.allclose(ro.finals[:, 1, 0], x_next - sig * v, atol=1e-5)


def test_mgai_diagnostics():
    g = torch.Generator().manual_seed(0)
    fine = torch.randn(1, 3, 2, 1, 8, generator=g)
    rewards = torch.cat([fine, 2 * fine + 1, -fine], dim=3)  # the same ranking, then the reverse one
    spearman, share = mgai_diagnostics(rewards)
    assert torch.allclose(spearman[:, 1], torch.ones(2)) and torch.allclose(spearman[:, 2], -torch.ones(2))
    assert torch.allclose(share.sum(dim=1), torch.ones(2), atol=1e-5)
    flat = torch.zeros(1, 2, 1, 2, 4)
    spearman, share = mgai_diagnostics(flat)
    assert torch.isnan(spearman).all() and torch.isnan(share).all()


def test_chain_sources_branch_later_steps_from_the_first_branch_and_count_the_rows_they_run():
    """Shared continuations across k: step e' branches from the state its predecessor's first branch reaches on
    the finest continuation; the anchor trajectory's rows after the first SDE step are not run."""
    model = Counting()
    sampler, ros = _rollout(model, chain_sources=True, sde_indices=(0, 1, 2, 5))
    assert model.rows == sum(ro.forward_rows for ro in ros)  # rows counted = rows run
    ro = ros[0]
    assert ro.anchor is None
    assert torch.equal(ro.x_k[:, 1], ro.x_next[:, 0, 0]) and torch.equal(ro.x_k[:, 2], ro.x_next[:, 1, 0])
    # e = 2 -> e' = 5 on the first (lambda = 1) continuation of branch 0: three ODE steps from x_next[:, 2, 0]
    sig = sampler.sigmas.float()
    cond = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    x = ro.x_next[:, 2, 0]
    for t in (3, 4):
        x = x + (sig[t + 1] - sig[t]) * model.model(x, sig[t].expand(2), cond)
    assert torch.allclose(ro.x_k[:, 3], x, atol=1e-5)
    _, plain = _rollout(Counting(), sde_indices=(0, 1, 2, 5))
    assert plain[0].forward_rows - ro.forward_rows == 2 * 15  # the anchor's 15 ODE rows after index 0, per prompt
    # without lambda = 1 the chain takes the coarsest path it can share: x0 scoring (lambda 15) then one step
    _, x0 = _rollout(Counting(), chain_sources=True, sde_indices=(0, 3), granularities=(15,))
    _, x0_plain = _rollout(Counting(), sde_indices=(0, 3), granularities=(15,))
    assert x0[0].forward_rows < x0_plain[0].forward_rows


def test_chain_sources_off_or_one_step_is_exactly_g2rpo():
    _, plain = _rollout(Counting())
    _, off = _rollout(Counting(), chain_sources=False)
    for a, b in zip(plain, off):
        assert torch.equal(a.finals, b.finals) and a.forward_rows == b.forward_rows
    _, single = _rollout(Counting(), sde_indices=(3,))
    _, chained = _rollout(Counting(), sde_indices=(3,), chain_sources=True)
    for a, b in zip(single, chained):  # one SDE step: the same states and draws (other batch shapes: rounding)
        assert torch.allclose(a.finals, b.finals, atol=1e-5) and torch.allclose(a.log_probs, b.log_probs, atol=1e-4)
        assert a.forward_rows - b.forward_rows == 2 * (16 - 1 - 3)
