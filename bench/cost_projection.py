"""What each G2RPO variant costs on Flux.1-dev at the paper's setting (720x720, T=16, G=12, M = the first 8 steps,
Lambda {1,2,3}), projected from the plans (model-free row counts) and one row's forward FLOPs, counted on the
real FluxTransformer2DModel architecture on the meta device (no weights), at a bf16 matmul rate of 790 TFLOP/s
(one H200, as measured by bench/gpu's matmul probe). Training rows count 4x a forward (forward + backward with
gradient checkpointing, which the Flux configs use); the bf16 trainer also recomputes the old log-probs in the
training layout (``loss.recompute_old_logprob: auto``): one no-grad forward per training row, counted 1x, as the
trainer's ``cost/recompute_rows`` metric. The baselines are listed at their paper presets' T, G.

    python bench/cost_projection.py
"""

from __future__ import annotations

import torch

from g2rpo import G2RPOSampler
from g2rpo.testing.tiny import FLUX_DEV_TRANSFORMER

H200_BF16_TFLOPS = 790.0
VARIANTS = {  # name -> strategy and options (the paper's setting unless changed)
    "G2RPO (paper)": ("g2rpo", {}),
    "G2RPO Lambda {1,2}": ("g2rpo", {"granularities": (1, 2)}),
    "G2RPO w/o MGAI": ("g2rpo_no_mgai", {}),
    "G2RPO coarse {2,4} (g2rpo-efficient)": ("g2rpo", {"granularities": (2, 4)}),
    "G2RPO x0 scoring": ("g2rpo", {"granularities": (15,)}),
    "G2RPO subset 2 of M": ("g2rpo", {"sde_subset": 2}),
    "G2RPO chained sources": ("g2rpo", {"chain_sources": True}),
    "G2RPO coarse {2,4} + chained sources": ("g2rpo", {"granularities": (2, 4), "chain_sources": True}),
    "DanceGRPO": ("dance_grpo", {}),
    "MixGRPO": ("mix_grpo", {}),
}


def flops_per_row(height: int = 720, width: int = 720, text_len: int = 512) -> float:
    """One Flux.1-dev forward of one row (2025 image + 512 text tokens at 720x720), counted on the meta device."""
    from diffusers import FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER).to(torch.bfloat16)
        n = (height // 16) * (width // 16)
        kw = dict(hidden_states=torch.zeros(1, n, 64, dtype=torch.bfloat16),
                  encoder_hidden_states=torch.zeros(1, text_len, 4096, dtype=torch.bfloat16),
                  pooled_projections=torch.zeros(1, 768, dtype=torch.bfloat16),
                  timestep=torch.ones(1, dtype=torch.bfloat16), img_ids=torch.zeros(n, 3),
                  txt_ids=torch.zeros(text_len, 3), guidance=torch.ones(1), return_dict=False)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**kw)
    return float(counter.get_total_flops())


def rows(strategy: str, options: dict) -> tuple[float, float]:
    """(rollout rows, training rows) per prompt and iteration, averaged over 64 iterations (subsets, windows)."""
    setting = dict(num_steps=16, group_size=12, sde_indices=range(8), granularities=(1, 2, 3), max_batch=64)
    setting.update(options)
    s = G2RPOSampler(lambda x, sig, c: torch.zeros_like(x), strategy=strategy, **setting)
    rollout, train = 0.0, 0.0
    for it in range(64):
        plan = s.plan(it)
        rollout += sum(t.frontier_index.numel() for t in plan.ticks)
        mask = s.strategy.train_mask(plan, 1, torch.Generator().manual_seed(it))[0]  # [K, G]
        for k in range(plan.num_k):  # one forward per (prompt, source state) the trained transitions leave
            src = plan.source_of[k][mask[k]]
            train += int(torch.unique(src).numel())
    return rollout / 64, train / 64


def main() -> None:
    flop = flops_per_row()
    print(f"Flux.1-dev, 720x720, 512 text tokens: {flop / 1e12:.2f} TFLOP per row forward; "
          f"H200 bf16 at {H200_BF16_TFLOPS:.0f} TFLOP/s\n")
    print("| variant | rollout rows / prompt | training rows / prompt | recomputed rows / prompt | "
          "cost / prompt (fwd-row eq.: rollout + recompute + 4x train) | seconds / prompt-iteration on one H200 | "
          "vs G2RPO |\n|---|---|---|---|---|---|---|")
    base = None
    for name, (strategy, options) in VARIANTS.items():
        r, t = rows(strategy, options)
        cost = projected_cost(r, t)
        base = base or cost
        print(f"| {name} | {r:,.0f} | {t:,.1f} | {t:,.1f} | {cost:,.0f} | "
              f"{cost * flop / (H200_BF16_TFLOPS * 1e12):.1f} | {cost / base:.2f} |")


def projected_cost(rollout_rows: float, train_rows: float, recompute: bool = True) -> float:
    """Forward-row equivalents: rollout rows, the recomputed old log-probs (one forward per training row, on by
    default in bf16), and 4x each training row (gradient checkpointing)."""
    return rollout_rows + (train_rows if recompute else 0.0) + 4.0 * train_rows


if __name__ == "__main__":
    main()
