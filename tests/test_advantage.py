import pytest
import torch

from g2rpo import group_advantages, integrate_advantages


def test_group_advantages_standardise_over_the_last_dim():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.7, 0.1]])
    adv = group_advantages(r)
    for row, a in zip(r, adv):
        expected = (row.double() - row.double().mean()) / (row.double().std() + 1e-8)
        assert torch.allclose(a.double(), expected, atol=1e-6)
        assert abs(a.sum().item()) < 1e-5 and a.double().std().item() == pytest.approx(1.0, abs=1e-6)


def test_equal_rewards_give_zero_not_nan():
    r = torch.full((3, 12), 0.1)  # mean of twelve 0.1 is not exactly 0.1 in float
    adv = group_advantages(r)
    assert torch.equal(adv, torch.zeros_like(adv))
    mixed = torch.stack([torch.full((5,), 0.3), torch.arange(5.0)])
    out = group_advantages(mixed)
    assert torch.equal(out[0], torch.zeros(5)) and out[1].abs().sum() > 0


def test_integrate_advantages_sums_granularities_and_weighted_rewards():
    g = torch.Generator().manual_seed(0)
    R, P, K, J, G = 2, 3, 4, 3, 6
    rewards = torch.randn(R, P, K, J, G, generator=g)
    rewards[1] *= 10.0  # scale does not matter after standardisation
    w = [1.0, 0.5]
    adv = integrate_advantages(rewards, w)
    assert adv.shape == (P, K, G)
    expected = torch.zeros(P, K, G)
    for r in range(R):
        for p in range(P):
            for k in range(K):
                for j in range(J):
                    x = rewards[r, p, k, j].double()
                    expected[p, k] += w[r] * ((x - x.mean()) / (x.std() + 1e-8)).float()
    assert torch.allclose(adv, expected, atol=1e-5)
    # one granularity, one reward: plain group advantages
    assert torch.allclose(integrate_advantages(rewards[:1, :, :, :1]), group_advantages(rewards[0, :, :, 0]))


def test_non_finite_rewards_are_named():
    rewards = torch.zeros(3, 1, 2, 2, 4)
    rewards[1, 0, 1, 0, 2] = float("nan")
    rewards[2, 0, 0, 1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"reward 1 has non-finite values at positions \(p, k, j, g\) \[\(0, 1, 0, 2\)\]"):
        integrate_advantages(rewards)


def test_bad_shapes_and_weights():
    with pytest.raises(ValueError, match=r"\[R, P, K, J, G\]"):
        integrate_advantages(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="weights"):
        integrate_advantages(torch.zeros(2, 1, 1, 1, 3), weights=[1.0])
    with pytest.raises(ValueError, match="group dim"):
        group_advantages(torch.zeros(3, 1))
