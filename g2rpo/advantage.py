"""Group-relative advantages (Eq. 4) and their multi-granularity, multi-reward sum (Eq. 11)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["mgai_diagnostics", "GROUP_STD_EPS", "reward_weights", "batch_std", "group_advantages", "integrate_advantages",
           "check_finite_rewards"]

#: Added to the group's std (DanceGRPO's convention: unbiased std + 1e-8).
GROUP_STD_EPS = 1e-8


def group_advantages(rewards: torch.Tensor, eps: float = GROUP_STD_EPS, unbiased: bool = True,
                     std: torch.Tensor | None = None) -> torch.Tensor:
    """Standardise over the group dim (the last): ``(r - mean) / (std + eps)`` (Eq. 4).

    ``std`` is the group's sample std, unbiased (torch ``.std()``, as G2RPO and DanceGRPO) or
    biased (``np.std``, as Flow-GRPO), unless a ``std`` tensor broadcastable to ``rewards`` is
    given (Flow-GRPO's ``global_std``: see :func:`batch_std`). A group whose rewards are all
    exactly equal carries no signal and gets zero advantages (never NaN, never the rounding
    noise of ``r - mean``). Computed in float64, returned as float32.
    """
    if rewards.ndim < 1 or rewards.shape[-1] < 2:
        raise ValueError(f"need a group dim (last) of size >= 2, got shape {tuple(rewards.shape)}")
    r = rewards.double()
    mean = r.mean(dim=-1, keepdim=True)
    sd = r.std(dim=-1, keepdim=True, correction=1 if unbiased else 0) if std is None else std.double()
    adv = (r - mean) / (sd + eps)
    flat = (r.amax(dim=-1, keepdim=True) == r.amin(dim=-1, keepdim=True))
    return torch.where(flat, torch.zeros_like(adv), adv).float()


def batch_std(rewards: torch.Tensor, unbiased: bool = False, all_reduce=None) -> torch.Tensor:
    """The std of all rewards of the batch per (reward, step slot, granularity): ``rewards
    [R, P, K, J, G] -> [R, 1, K, J, 1]``, over every prompt and branch, and over every rank when
    ``all_reduce`` (an in-place sum over ranks, e.g. ``torch.distributed.all_reduce``) is given.
    Flow-GRPO's ``global_std`` is the biased one (``np.std`` of the gathered rewards)."""
    r = rewards.double()
    stats = torch.stack([r.sum(dim=(1, 4)), (r * r).sum(dim=(1, 4)),
                         torch.full_like(r[:, 0, :, :, 0], r.shape[1] * r.shape[4])])
    if all_reduce is not None:
        all_reduce(stats)
    s1, s2, n = stats
    var = (s2 - s1 * s1 / n).clamp_min(0) / (n - 1 if unbiased else n)
    return var.sqrt()[:, None, :, :, None]


def reward_weights(weights: Sequence[float], normalize: bool = False) -> list[float]:
    """The weights of Eq. 11's sum over rewards: as given, or divided by their sum (MixGRPO's
    ``train_grpo_flux.py`` normalises ``reward_weights`` to sum to 1 before it sums the weighted advantages)."""
    w = [float(x) for x in weights]
    if not normalize:
        return w
    total = sum(w)
    if not total > 0:
        raise ValueError(f"normalised reward weights need a positive sum, got {w}")
    return [x / total for x in w]


def check_finite_rewards(rewards: torch.Tensor, names: Sequence[str] | None = None, max_report: int = 8) -> None:
    """Raise a ValueError naming the reward index (and name) and positions of NaN/inf rewards, or of finite rewards
    so large (|r| near 3e38) that their mean or spread over a group or the batch overflows (the advantages and the
    logged means would be NaN or silently zero)."""
    bad = ~torch.isfinite(rewards)
    if not bad.any():
        for r in range(rewards.shape[0]):
            x = rewards[r]
            if not (torch.isfinite(x.mean()) and torch.isfinite(x.std()) and torch.isfinite(x.mean(-1)).all()
                    and torch.isfinite(x.std(-1)).all()):
                label = f"reward {r}" + (f" ({names[r]})" if names is not None else "")
                raise ValueError(f"{label}: scores up to {float(x.abs().max()):.3g} overflow their mean or spread "
                                 "(scale the reward)")
        return
    for r in range(rewards.shape[0]):
        where = bad[r].nonzero().tolist()
        if where:
            label = f"reward {r}" + (f" ({names[r]})" if names is not None else "")
            more = f" and {len(where) - max_report} more" if len(where) > max_report else ""
            raise ValueError(f"{label} has non-finite values at positions (p, k, j, g) "
                             f"{[tuple(w) for w in where[:max_report]]}{more}")


def integrate_advantages(rewards: torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None,
                         eps: float = GROUP_STD_EPS, unbiased: bool = True,
                         std: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-granularity, multi-reward advantages (Eq. 11).

    ``rewards [R, P, K, J, G]`` (R reward models, P prompts, K SDE steps, J granularities,
    G branches) -> ``[P, K, G]`` = sum over r (weighted) and j of the group-standardised
    ``rewards[r, p, k, j, :]`` (:func:`group_advantages`; ``std`` replaces the group's std, e.g.
    :func:`batch_std`). NaN/inf rewards raise a ValueError naming them.
    """
    if rewards.ndim != 5:
        raise ValueError(f"rewards must be [R, P, K, J, G], got shape {tuple(rewards.shape)}")
    check_finite_rewards(rewards)
    R = rewards.shape[0]
    w = torch.ones(R, dtype=torch.float32) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (R,):
        raise ValueError(f"weights must have one entry per reward model ({R}), got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    adv = group_advantages(rewards, eps, unbiased, std)  # [R, P, K, J, G]
    return torch.einsum("r,rpkjg->pkg", w.to(adv.device), adv)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dim (ties broken by position), as float64."""
    return x.argsort(dim=-1).argsort(dim=-1).double()


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    den = (a.square().sum(-1) * b.square().sum(-1)).sqrt()
    return torch.where(den > 0, (a * b).sum(-1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def mgai_diagnostics(rewards: torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None,
                     eps: float = GROUP_STD_EPS, unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether each granularity carries information, per SDE slot: ``(spearman [K, J], share [K, J])`` from rewards
    ``[R, P, K, J, G]``.

    ``spearman[k, j]``: the within-group Spearman correlation between granularity j's rewards (the rewards'
    weighted sum) and the finest granularity's (j = 0), averaged over the prompts whose groups are not flat
    (NaN when none is); 1 means granularity j ranks the branches as the finest one does. ``share[k, j]``: the
    share of the summed advantage's variance (Eq. 11) that granularity j adds, ``Cov(A_j, A) / Var(A)``, averaged
    over prompts; the shares of a slot sum to 1."""
    R = rewards.shape[0]
    w = torch.ones(R, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    combined = torch.einsum("r,rpkjg->pkjg", w.to(rewards.device), rewards.double())
    ranks = _ranks(combined)
    rho = _corr(ranks, ranks[:, :, :1].expand_as(ranks))  # [P, K, J]
    flat = (combined.amax(-1) == combined.amin(-1)) | (combined[:, :, :1].amax(-1) == combined[:, :, :1].amin(-1))
    rho = torch.where(flat, torch.full_like(rho, float("nan")), rho)  # no ranking in a flat group
    spearman = torch.nanmean(rho, dim=0)
    adv = torch.einsum("r,rpkjg->pkjg", w.to(rewards.device),
                       group_advantages(rewards, eps=eps, unbiased=unbiased).double())
    total = adv.sum(dim=2, keepdim=True)  # [P, K, 1, G]
    tc = total - total.mean(-1, keepdim=True)
    cov = ((adv - adv.mean(-1, keepdim=True)) * tc).sum(-1)  # [P, K, J]
    var = tc.square().sum(-1)  # [P, K, 1]
    share = torch.where(var > 0, cov / var.clamp_min(1e-300), torch.full_like(cov, float("nan")))
    return spearman.float(), torch.nanmean(share, dim=0).float()
