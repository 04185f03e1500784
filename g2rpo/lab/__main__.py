"""`python -m g2rpo.lab {build,sample,grid,diagnose}`: build a lab world, sample it, look at it, check its
rewards against its judges. The method comparison on it is ``python -m g2rpo.experiments compare``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from .generator import LabWorldConfig, load_lab_policy
from .world import build_world, default_cache_dir, lab_prompts_for, sample_images


def _checkpoint(arg: str | None) -> Path:
    """A lab model folder: the given one, a training run's ``final/`` export, or the cached base model."""
    if arg is not None:
        folder = Path(arg)
        if (folder / "lab_world.json").is_file():
            return folder
        if (folder / "final" / "lab_world.json").is_file():  # a run's output_dir: its exported policy
            return folder / "final"
        sys.exit(f"{folder} is not a lab model: no lab_world.json there nor in {folder / 'final'} "
                 "(pass a lab world, a run's output_dir or its final/ folder)")
    folder = default_cache_dir() / "base"
    if not (folder / "lab_world.json").is_file():
        sys.exit(f"no lab world at {folder}: run `python -m g2rpo.lab build` first or pass --checkpoint")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m g2rpo.lab", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="pretrain the base generator and fit the rewards (cached)")
    b.add_argument("--world", choices=("digits", "scenes"), default="digits",
                   help="digits (8x8 grey digits) or scenes (coloured compositional scenes, about 2 minutes)")
    b.add_argument("--out", default=None, help=f"folder (default {default_cache_dir() / 'base'}, or "
                                               f"{default_cache_dir() / 'scenes'} for the scenes)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--image-size", type=int, default=8, choices=(8, 16))
    b.add_argument("--pretrain-steps", type=int, default=LabWorldConfig.pretrain_steps)
    b.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    s = sub.add_parser("sample", help="ODE samples to an .npz (images (N,H,W) in [0,1], labels (N,))")
    s.add_argument("--checkpoint", default=None)
    s.add_argument("--n", type=int, default=100)
    s.add_argument("--steps", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    g = sub.add_parser("grid", help="an image grid, one row per class")
    g.add_argument("--checkpoint", default=None)
    g.add_argument("--per-class", type=int, default=10)
    g.add_argument("--steps", type=int, default=16)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True)
    d = sub.add_parser("diagnose", help="the scenes world: do its learned rewards and judges agree on the base "
                                        "generator's samples? (ROC AUC within prompts, kappa)")
    d.add_argument("--checkpoint", default=None, help="a built scenes world (default: the cached one)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:  # the alias of an earlier version: the comparison lives above the trainer
        print("`python -m g2rpo.lab compare` is now `python -m g2rpo.experiments compare` (the same options)",
              file=sys.stderr)
        raise SystemExit(2)
    args = parser.parse_args(argv)

    if args.cmd == "diagnose":
        from .scenes.world import MARKER, reward_judge_agreement

        folder = Path(args.checkpoint) if args.checkpoint else default_cache_dir() / "scenes"
        if not (folder / MARKER).is_file():
            sys.exit(f"{folder} is not a built scenes world: run `python -m g2rpo.lab build --world scenes` first "
                     "or pass --checkpoint")
        for key, value in reward_judge_agreement(folder).items():
            print(f"{key:36s} {value:.3f}")
        return
    if args.cmd == "build" and args.world == "scenes":
        from .scenes.world import SceneWorldConfig, build_scene_world

        if args.image_size != 8 or args.pretrain_steps != LabWorldConfig.pretrain_steps:
            sys.exit("--image-size and --pretrain-steps are the digits world's; the scenes world's config is "
                     "SceneWorldConfig")
        build_scene_world(args.out, SceneWorldConfig(seed=args.seed), force=args.force)
        return
    if args.cmd == "build":
        cfg = LabWorldConfig(seed=args.seed, image_size=args.image_size, pretrain_steps=args.pretrain_steps)
        build_world(args.out, cfg, force=args.force)
        return
    if args.cmd == "sample":
        if args.n < 1:
            sys.exit("--n must be >= 1")
        policy = load_lab_policy(_checkpoint(args.checkpoint))
        labels = [i % 10 for i in range(args.n)]
        images = sample_images(policy, lab_prompts_for(labels), steps=args.steps, seed=args.seed)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.out, images=images.numpy().astype(np.float32), labels=np.asarray(labels, dtype=np.int64))
        print(f"wrote {args.n} samples to {args.out}")
        return
    if args.cmd == "grid":
        from torchvision.utils import save_image

        policy = load_lab_policy(_checkpoint(args.checkpoint))
        labels = [c for c in range(10) for _ in range(args.per_class)]
        images = sample_images(policy, lab_prompts_for(labels), steps=args.steps, seed=args.seed)
        big = torch.nn.functional.interpolate(images[:, None], scale_factor=32 // policy.size, mode="nearest")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_image(big, args.out, nrow=args.per_class, padding=2, pad_value=0.5)
        print(f"wrote a {10}x{args.per_class} grid to {args.out}")


if __name__ == "__main__":
    main()
