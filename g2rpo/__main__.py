"""`python -m g2rpo`: a short demo on the analytic Gaussian world (no weights needed)."""

from __future__ import annotations

import argparse

import torch

from .schedule import sigma_schedule
from .testing import GaussianWorld, sample_ode, sample_sde


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m g2rpo", description=__doc__)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--eta", type=float, default=0.7)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    world = GaussianWorld()
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.samples, 16, generator=gen)
    print(f"Analytic world: data ~ N({world.mu}, {world.scale}^2); {args.steps} steps, shift 3")
    for steps in (args.steps, 256):
        sigmas = sigma_schedule(steps, 3.0)
        ode = sample_ode(world, noise, sigmas)
        sde = sample_sde(world, noise, sigmas, args.eta, generator=gen)
        print(f"  T={steps:4d}  ODE mean {ode.mean():.4f} std {ode.std():.4f} | "
              f"SDE(eta={args.eta}) mean {sde.mean():.4f} std {sde.std():.4f}")


if __name__ == "__main__":
    main()
