"""The rollout's state per prompt at the paper setting (T=16, M = e 0..7, Lambda {1,2,3}, G=12), per model:
latent elements per row, forward rows per prompt (the same for every model: the plan is model-free), fp32
memory of the engine's state (peak frontier rows and their velocities, the next tick's children, the
anchor / x_k / x_next / finals it keeps) and of one 64-row chunk's input. Activations are the model's own
and are not counted.

    python bench/state_memory.py
"""

import torch

from g2rpo import G2RPOSampler

LATENT_ELEMENTS = {  # per row, at the given resolution
    "Flux.1-dev 720x720 (packed 2025 x 64)": 2025 * 64,
    "FLUX.2 [dev] 720x720 (2025 x 128)": 45 * 45 * 128,
    "Qwen-Image 720x720 (packed 2025 x 64)": 45 * 45 * 64,
    "SD3.5 720x720 (16 x 90 x 90)": 16 * 90 * 90,
    "Wan2.1 480x832, 81 frames (16 x 21 x 60 x 104)": 16 * 21 * 60 * 104,
    "Wan2.1 512x512, 33 frames (16 x 9 x 64 x 64)": 16 * 9 * 64 * 64,
    "Wan2.2 A14B 480x832, 33 frames (16 x 9 x 60 x 104)": 16 * 9 * 60 * 104,
    "Wan2.2 TI2V-5B 704x1280, 33 frames (48 x 9 x 44 x 80)": 48 * 9 * 44 * 80,
    # the 20-channel condition (mask + image latents) is one row per prompt, shared by the group
    "Wan I2V 480x832, 53 frames (16 x 14 x 60 x 104, + 20-channel condition per prompt)": 16 * 14 * 60 * 104,
}


def main() -> None:
    s = G2RPOSampler(lambda x, sig, c: torch.zeros_like(x), num_steps=16, sde_indices=range(8), granularities=(1, 2, 3),
                     group_size=12, max_batch=64)
    plan = s.plan()
    frontier = max(t.frontier_index.numel() for t in plan.ticks)
    children = max(t.child_index.numel() for t in plan.ticks)
    stored = plan.num_anchor + plan.num_sources + plan.num_k * plan.group_size + \
        plan.num_final_k * plan.num_j * plan.group_size
    rows = sum(t.frontier_index.numel() for t in plan.ticks)
    print("| model | latent elements / row | forward rows / prompt | rollout state / prompt (fp32) | "
          "one 64-row chunk (fp32) |\n|---|---|---|---|---|")
    for name, n in LATENT_ELEMENTS.items():
        state = (2 * frontier + children + stored) * n * 4 / 2**30
        print(f"| {name} | {n:,} | {rows:,} | {state:.2f} GiB | {64 * n * 4 / 2**20:,.0f} MiB |")


if __name__ == "__main__":
    main()
