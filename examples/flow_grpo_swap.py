"""Swapping g2rpo into a Flow-GRPO-style loop.

1. Change ONE import: Flow-GRPO's step function becomes g2rpo's (same signature, same returns).
2. Switch the loop's rollout to G2RPO's singular-SDE sampling: one SDE step per trajectory, branches
   finished by the ODE at several granularities, one shared forward for the whole group.

    python examples/flow_grpo_swap.py --pipeline /ckpt/FLUX.1-dev            # a GPU: the paper's 720x720
    python -m g2rpo.testing tiny-pipeline flux /tmp/tiny-flux                # no weights: a tiny random Flux
    python examples/flow_grpo_swap.py --pipeline /tmp/tiny-flux --height 32 --width 32 --steps 6 --group-size 3

On a CPU, Flux.1-dev at 720x720 takes minutes per forward: use a tiny pipeline (above), or at least
--height 256 --width 256 --steps 6 --group-size 3. Progress bars show both loops.
"""

import argparse

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from tqdm import tqdm

# from flow_grpo.diffusers_patch.sd3_sde_with_logprob import sde_step_with_logprob   # Flow-GRPO
from g2rpo.compat.flow_grpo import sde_step_with_logprob  # g2rpo: the only line that changes
from g2rpo.pipelines import policy_for, rollout
from g2rpo.schedule import distinct_sde_indices


def flow_grpo_rollout(policy, scheduler, prompt, group_size, steps, generator):
    """A Flow-GRPO-style rollout: the SDE at every step, its log-prob recorded per step."""
    scheduler.set_timesteps(steps)
    cond = policy.encode_prompts([prompt] * group_size)
    x = policy.prepare_latents(group_size, generator)
    log_probs = []
    with torch.no_grad():
        for i, t in enumerate(tqdm(scheduler.timesteps, desc="Flow-GRPO rollout (steps)", leave=False)):
            v = policy(x, scheduler.sigmas[i].expand(group_size), cond)
            x, log_prob, _, _ = sde_step_with_logprob(scheduler, v, t.expand(group_size), x, noise_level=0.7,
                                                      generator=generator)
            log_probs.append(log_prob)
    return x, torch.stack(log_probs, dim=1)  # [G, ...], [G, steps]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True)
    p.add_argument("--prompt", default="a red apple")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--group-size", type=int, default=12)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=720)
    a = p.parse_args(argv)
    print(f"loading {a.pipeline} ...", flush=True)
    pipe = FluxPipeline.from_pretrained(a.pipeline)
    policy = policy_for(pipe, a.height, a.width)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # the static shift the loop trains with
    x, log_probs = flow_grpo_rollout(policy, scheduler, a.prompt, a.group_size, a.steps, torch.Generator().manual_seed(0))
    print(f"Flow-GRPO loop with g2rpo's step: finals {tuple(x.shape)}, log-probs {tuple(log_probs.shape)}, "
          f"{a.steps * a.group_size} forward rows")
    print("G2RPO rollout (one batched plan) ...", flush=True)
    out = rollout(pipe, [a.prompt], strategy="g2rpo", num_steps=a.steps, group_size=a.group_size,
                  sde_indices=distinct_sde_indices(a.steps, (1, 2, 3), range(min(8, a.steps - 1))),
                  height=a.height, width=a.width)
    print(f"G2RPO rollout: {out.images.shape[0]} images (K'={out.rollout.reward_shape[1]} SDE steps x "
          f"J={out.rollout.reward_shape[2]} granularities x G={a.group_size}), {out.rollout.forward_rows} forward rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
