import math

import pytest
import torch

from g2rpo import G2RPOSampler, granularity_grid, ode_step, sde_step_with_logprob, sigma_schedule
from g2rpo.testing import MLPVelocity

T = 16
SHAPE = (4, 4, 4)


class Counting:
    """Wraps a model and records every call's rows and sigmas (independent of the engine's counter)."""

    def __init__(self, model):
        self.model, self.rows, self.calls, self.sigma_sets = model, 0, 0, []

    def __call__(self, x, sigma, cond):
        self.rows += x.shape[0]
        self.calls += 1
        self.sigma_sets.append(set(sigma.tolist()))
        return self.model(x, sigma, cond)


@pytest.fixture(scope="module")
def model():
    return MLPVelocity(SHAPE, cond_dim=8, hidden=64, seed=1).eval()


def _setup(P=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(P, *SHAPE, generator=g), torch.randn(P, 8, generator=g)


@torch.no_grad()
def test_g2rpo_finals_equal_a_plain_per_branch_loop(model):
    noise, cond = _setup(P=2)
    sampler = G2RPOSampler(model, num_steps=T, sde_indices=[0, 3, 7, 12], granularities=(1, 2, 3),
                           group_size=3, max_batch=17)
    ro = sampler.rollout(noise, cond, generator=torch.Generator().manual_seed(5))
    sig = sigma_schedule(T, 3.0)
    v = lambda x, i, p: model(x, torch.full((x.shape[0],), float(sig[i]), dtype=torch.float32), cond[p:p + 1])
    for p in range(2):
        x = noise[p:p + 1]
        anchor = [x]
        for i in range(T):  # the plain ODE anchor
            x = ode_step(v(x, i, p), x, sig, i, i + 1)
            anchor.append(x)
        assert torch.allclose(ro.anchor[p], torch.cat(anchor), atol=1e-5)
        for k, e in enumerate(ro.sde_indices):
            assert torch.allclose(ro.x_k[p, k], anchor[e][0], atol=1e-5)
            for g in range(3):
                # the SDE transition is the shared x_k moved by the shared v_k
                xn = ro.x_next[p, k, g:g + 1]
                _, lp, _, _ = sde_step_with_logprob(v(anchor[e], e, p), anchor[e], sig, e, 0.7, prev_sample=xn)
                assert torch.allclose(lp, ro.log_probs[p, k, g:g + 1], atol=1e-5)
                for j, lam in enumerate(ro.granularities):
                    x = xn
                    grid = granularity_grid(T, e, lam)
                    for i, nxt in zip(grid, grid[1:]):
                        x = ode_step(v(x, i, p), x, sig, i, nxt)
                    assert torch.allclose(ro.finals[p, k, j, g], x[0], atol=1e-5), (p, k, j, g)


def test_forward_rows_at_the_paper_setting(model):
    counting = Counting(model)
    sampler = G2RPOSampler(counting, num_steps=16, eta=0.7, sde_indices=range(8), granularities=(1, 2, 3),
                           group_size=12, max_batch=64)
    noise, cond = _setup(P=1)
    ro = sampler.rollout(noise, cond, generator=torch.Generator().manual_seed(0))
    # 16 anchor rows + per branch: 2 shared points + the rest of each granularity's grid
    expected = 16 + 12 * sum(
        sum(len(granularity_grid(16, e, lam)) - 1 for lam in (1, 2, 3)) - 2 * 2 for e in range(8))
    assert expected == 1708
    assert counting.rows == ro.forward_rows == 1708
    assert counting.calls == ro.forward_calls
    public_code_rows = 16 + 12 * sum(1 + sum(math.ceil((16 - e - 1) / lam) for lam in (1, 2, 3)) for e in range(8))
    assert public_code_rows == 2188


def test_rows_are_batched_across_ticks_in_max_batch_chunks(model):
    counting = Counting(model)
    sampler = G2RPOSampler(counting, num_steps=16, group_size=4, max_batch=10)
    noise, cond = _setup(P=3)
    ro = sampler.rollout(noise, cond, generator=torch.Generator().manual_seed(0))
    assert counting.rows == ro.forward_rows == 3 * sampler.plan().forward_rows
    # one tick per depth: ceil(rows_in_tick / 10) calls each, every call at most 10 rows
    per_tick = [3 * t.frontier_index.numel() for t in sampler.plan().ticks]
    assert counting.calls == sum(math.ceil(n / 10) for n in per_tick)
    assert any(len(s) > 1 for s in counting.sigma_sets)  # rows of one chunk with different sigmas


def test_no_mgai_and_baseline_row_counts(model):
    noise, cond = _setup(P=1)
    counts = {}
    for name in ("g2rpo_no_mgai", "dance_grpo", "mix_grpo", "flow_grpo"):
        c = Counting(model)
        s = G2RPOSampler(c, strategy=name, eta=None, group_size=12)
        nz = s.initial_noise(1, SHAPE, torch.Generator().manual_seed(0))
        s.rollout(nz, cond, generator=torch.Generator().manual_seed(0))
        counts[name] = c.rows
    assert counts["g2rpo_no_mgai"] == 16 + 12 * sum(16 - e - 1 for e in range(8))
    assert counts["dance_grpo"] == 1 + 12 * 15  # shared noise: the first velocity is shared
    assert counts["mix_grpo"] == 1 + 12 * 15
    assert counts["flow_grpo"] == 12 * 16  # independent noise per member


@torch.no_grad()
@pytest.mark.parametrize("name", ["dance_grpo", "flow_grpo", "mix_grpo"])
def test_trajectory_strategies_are_consistent_chains(model, name):
    noise, cond = _setup(P=2)
    sampler = G2RPOSampler(model, strategy=name, eta=None, group_size=3, max_batch=7)
    nz = sampler.initial_noise(2, SHAPE, torch.Generator().manual_seed(1))
    ro = sampler.rollout(nz, cond, generator=torch.Generator().manual_seed(2), iteration=60)
    sig = sigma_schedule(T, 3.0)
    steps = ro.step_index.tolist()
    if name == "mix_grpo":
        assert steps == [2, 3, 4, 5]  # window moved twice after 50 iterations
    s = sampler.strategy
    for p in range(2):
        for g in range(3):
            x = nz[p] if nz.ndim == 2 + len(SHAPE) - 1 else nz[p, g]
            x = x.unsqueeze(0)
            for t in range(T):
                vel = model(x, torch.full((1,), float(sig[t])), cond[p:p + 1])
                if t in steps:
                    k = steps.index(t)
                    assert torch.allclose(ro.x_k[p, ro.source_of[k, g]], x[0], atol=1e-5)
                    xn = ro.x_next[p, k, g:g + 1]
                    _, lp, _, _ = sde_step_with_logprob(vel, x, sig, t, s.eta, prev_sample=xn, kind=s.sde_kind)
                    assert torch.allclose(lp, ro.log_probs[p, k, g:g + 1], atol=1e-5)
                    # DanceGRPO scores the last step's x0 prediction x - sigma v (= the Euler step to sigma 0)
                    x = ode_step(vel, x, sig, t, t + 1) if t == T - 1 and s.score_x0 else xn
                else:
                    x = ode_step(vel, x, sig, t, t + 1)
            assert torch.allclose(ro.finals[p, 0, 0, g], x[0], atol=1e-5)


def test_reproducible_and_independent_branches(model):
    noise, cond = _setup(P=2)
    sampler = G2RPOSampler(model, group_size=4, sde_indices=[0, 5])
    a = sampler.rollout(noise, cond, generator=torch.Generator().manual_seed(3))
    b = sampler.rollout(noise, cond, generator=torch.Generator().manual_seed(3))
    c = sampler.rollout(noise, cond, generator=torch.Generator().manual_seed(4))
    for f in ("anchor", "x_k", "x_next", "log_probs", "finals"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert not torch.equal(a.x_next, c.x_next) and torch.equal(a.anchor, c.anchor)
    xn = a.x_next.flatten(3)
    for g in range(1, 4):
        assert not torch.allclose(xn[:, :, 0], xn[:, :, g])
    # the branch noise is standard normal and uncorrelated across branches
    std = sde_step_with_logprob(torch.zeros(1, *SHAPE), a.x_k[0, :1], sigma_schedule(T), 0, 0.7)[3].item()
    _, _, mean, _ = sde_step_with_logprob(model(a.x_k[0, :1], torch.ones(1), cond[:1]), a.x_k[0, :1],
                                          sigma_schedule(T), 0, 0.7)
    eps = (a.x_next[0, 0] - mean) / std
    assert abs(eps.mean().item()) < 0.3 and 0.7 < eps.std().item() < 1.3
    corr = torch.corrcoef(eps.flatten(1))[0, 1:]
    assert corr.abs().max() < 0.5


def test_bad_input_errors(model):
    noise, cond = _setup(P=2)
    with pytest.raises(ValueError, match="prompts"):
        G2RPOSampler(model, group_size=2).rollout(noise, cond[:1])
    with pytest.raises(ValueError, match="sde_indices"):
        G2RPOSampler(model, sde_indices=[3, 16])
    with pytest.raises(ValueError, match="granularities"):
        G2RPOSampler(model, granularities=())
    with pytest.raises(ValueError, match="group_size"):
        G2RPOSampler(model, group_size=1)
    with pytest.raises(ValueError, match="unknown strategy"):
        G2RPOSampler(model, strategy="ppo")
    with pytest.raises(ValueError, match=r"model returned \(2, 3\)"):
        G2RPOSampler(lambda x, s, c: x.flatten(1)[:, :3], group_size=2).rollout(noise, cond)

    def nan_late(x, s, c):
        v = model(x, s, c)
        return torch.where((s < 0.5).view(-1, 1, 1, 1), float("nan"), v)
    with pytest.raises(ValueError, match=r"non-finite velocity at sigma=\[0\.3\]"):
        G2RPOSampler(nan_late, group_size=2, sde_indices=[0]).rollout(noise, cond)
    with pytest.raises(ValueError, match=r"noise must be \[P, 3"):
        G2RPOSampler(model, strategy="flow_grpo", group_size=3).rollout(noise, cond)


def test_dict_and_list_conditioning_are_gathered_per_row():
    seen = []

    def model(x, sigma, cond):
        seen.append((cond["emb"][:, 0].tolist(), cond["names"]))
        return torch.zeros_like(x) + cond["emb"][:, :1].view(-1, 1)

    cond = {"emb": torch.tensor([[1.0, 0.0], [2.0, 0.0]]), "names": ["a", "b"]}
    ro = G2RPOSampler(model, num_steps=4, sde_indices=[1], granularities=(1,), group_size=2).rollout(
        torch.zeros(2, 3), cond, generator=torch.Generator().manual_seed(0))
    assert ro.finals.shape == (2, 1, 1, 2, 3)
    for emb, names in seen:
        assert [{1.0: "a", 2.0: "b"}[e] for e in emb] == names
    # prompt 1's velocity is twice prompt 0's, so its anchor moves twice as far
    assert torch.allclose(ro.anchor[1, -1], 2 * ro.anchor[0, -1])


def test_per_prompt_generators_make_prompts_independent_of_batching(model):
    noise, cond = _setup(P=3)
    sampler = G2RPOSampler(model, group_size=3, sde_indices=[0, 4], max_batch=16)
    gens = lambda: [torch.Generator().manual_seed(100 + p) for p in range(3)]  # noqa: E731
    together = sampler.rollout(noise, cond, generator=gens())
    for p in range(3):
        alone = sampler.rollout(noise[p:p + 1], cond[p:p + 1], generator=[gens()[p]])
        assert torch.allclose(together.finals[p], alone.finals[0], atol=1e-5)
        assert torch.allclose(together.log_probs[p], alone.log_probs[0], atol=1e-5)
    with pytest.raises(ValueError, match="generators for 3 prompts"):
        sampler.rollout(noise, cond, generator=gens()[:2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_rollout_equals_eager():
    model = MLPVelocity(SHAPE, cond_dim=8, hidden=64, seed=1).cuda().eval()
    noise, cond = (t.cuda() for t in _setup(P=2))
    runs = []
    for graphs in (False, True, True):  # the second graphed run replays captured graphs
        s = G2RPOSampler(model, group_size=4, sde_indices=[0, 5], max_batch=16, cuda_graphs=graphs)
        runs.append(s.rollout(noise, cond, generator=torch.Generator("cuda").manual_seed(3)))
    for ro in runs[1:]:
        assert torch.allclose(ro.finals, runs[0].finals, atol=1e-5)
        assert torch.allclose(ro.log_probs, runs[0].log_probs, atol=1e-5)


def test_cuda_graphs_are_off_on_cpu(model):
    s = G2RPOSampler(model, group_size=2, sde_indices=[0], cuda_graphs=True)
    assert s.engine._model_for(torch.device("cpu")) == (model, False)
