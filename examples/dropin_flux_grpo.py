"""A complete GRPO loop on any diffusers Flux folder with g2rpo's sampler, for any of the five strategies.

    python examples/dropin_flux_grpo.py --pipeline /ckpt/FLUX.1-dev --strategy g2rpo --iterations 300
    python examples/dropin_flux_grpo.py --pipeline DIR --strategy dance_grpo --iterations 2 --height 32 --width 32

With no --reward it maximises mean brightness (runs anywhere); pass --reward module:function for a
callable ``reward(images [N, 3, H, W] in [0, 1], prompts: list[str]) -> tensor [N]``.
"""

import argparse
import importlib

import torch
from diffusers import FluxPipeline

from g2rpo import integrate_advantages
from g2rpo.hub import dtype_kwarg
from g2rpo.schedule import distinct_sde_indices
from g2rpo.pipelines import rollout, unit_log_probs


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="a local diffusers Flux folder")
    p.add_argument("--strategy", default="g2rpo", choices=["g2rpo", "g2rpo_no_mgai", "dance_grpo", "flow_grpo",
                                                           "mix_grpo"])
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--prompts", default="a red apple,a snowy mountain")
    p.add_argument("--reward", default=None, help="module:function (default: mean brightness)")
    p.add_argument("--lr", type=float, default=2e-6)
    p.add_argument("--group-size", type=int, default=12)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=720)
    a = p.parse_args(argv)
    reward = brightness
    if a.reward:
        module, name = a.reward.split(":")
        reward = getattr(importlib.import_module(module), name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = FluxPipeline.from_pretrained(a.pipeline, **dtype_kwarg(dtype)).to(device)  # dtype= (torch_dtype= before)
    pipe.transformer.to(torch.float32).requires_grad_(True)  # fp32 master weights: lr 2e-6 moves them
    opt = torch.optim.AdamW(pipe.transformer.parameters(), lr=a.lr, weight_decay=1e-4)
    prompts = [s.strip() for s in a.prompts.split(",") if s.strip()]
    # the first 8 steps (the paper's M), keeping only those after which Lambda {1, 2, 3} gives three different
    # continuations (at a small T two granularities can share one: the same rewards would count twice)
    lams = (1, 2, 3) if a.strategy == "g2rpo" else (1,)
    steps = distinct_sde_indices(a.steps, lams, range(min(8, a.steps - 1)))
    g2rpo_only = {"sde_indices": steps} if a.strategy.startswith("g2rpo") else {}
    for it in range(a.iterations):
        out = rollout(pipe, prompts, strategy=a.strategy, num_steps=a.steps, group_size=a.group_size,
                      height=a.height, width=a.width, seed=1000 * it, **g2rpo_only)
        ro = out.rollout
        r = reward(out.images, out.prompts_per_image).float().view(1, *ro.reward_shape)  # [R=1, P, K', J, G]
        adv = integrate_advantages(r.to(ro.log_probs.device)).clamp(-5, 5)  # [P, K', G]
        units = list(ro.training_units())
        opt.zero_grad()
        for unit in units:  # one forward per source state; for G2RPO it scores the whole group
            with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
                logp = unit_log_probs(out.policy, ro, unit, out.cond)
            ratio = torch.exp(logp - unit.old_log_probs)
            a_u = adv[unit.prompt, unit.adv_slot, unit.branches.to(adv.device)]
            loss = torch.max(-a_u * ratio, -a_u * ratio.clamp(1 - 1e-4, 1 + 1e-4)).sum()
            (loss / ro.log_probs.numel()).backward()
        torch.nn.utils.clip_grad_norm_(pipe.transformer.parameters(), 1.0)
        opt.step()
        print(f"iteration {it + 1}: reward {r.mean().item():.4f}, {len(units)} training forwards, "
              f"{ro.forward_rows} rollout rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
