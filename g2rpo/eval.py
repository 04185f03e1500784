"""`python -m g2rpo.eval`: generate with a (trained) policy, score with reward models, tabulate.

    python -m g2rpo.eval --model /ckpt/FLUX.1-dev --checkpoint runs/flux_hps_clip --prompts test.txt \\
        --steps 50 --height 1024 --width 1024 --rewards hps,clip,pickscore,imagereward \\
        --reward-options rewards.yaml --out eval/g2rpo

``--model`` is a local diffusers folder (Flux or SD3, from ``model_index.json``) or a lab
world folder; ``--checkpoint`` a training run (its ``final/`` export) or any folder with a
``transformer/`` whose weights replace the base model's. ``--reward-options`` is a YAML
mapping ``name: {option: value}`` (checkpoint paths, see the README). Sampling is the
deterministic ODE on the shifted schedule (``--shift``), noise from ``--seed`` and the
prompt's position, so two models are compared on identical noise. Under torchrun the
prompts are sharded over ranks and gathered on rank 0. Writes ``scores.csv`` (one row per
image), ``summary.md`` (the paper's Table 1 layout), ``summary.json`` and ``grid.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = ["main", "load_eval_policy", "evaluate"]

TABLE_NAMES = {"hps": "HPS-v2.1", "clip": "CLIP", "pickscore": "PickScore", "imagereward": "ImageReward",
               "unified_reward": "UnifiedReward", "digit_alignment": "Alignment", "digit_realism": "Realism"}


def _kind(model: Path) -> str:
    if (model / "lab_world.json").is_file():
        return "lab"
    index = model / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{model}: neither a diffusers folder (model_index.json) nor a lab world "
                                "(lab_world.json)")
    cls = json.loads(index.read_text()).get("_class_name", "")
    if cls.startswith("Flux2"):
        return "flux2"
    if cls.startswith("Flux"):
        return "flux"
    if cls.startswith("StableDiffusion3"):
        return "sd3"
    if cls == "WanPipeline":
        return "wan"
    if cls == "QwenImagePipeline":
        return "qwen_image"
    raise ValueError(f"{model}: unsupported pipeline {cls!r} (Flux, FLUX.2, SD3, Qwen-Image and Wan are supported)")


def load_eval_policy(model: str | Path, checkpoint: str | Path | None, dtype: torch.dtype, height: int, width: int,
                     guidance_scale: float | None, num_frames: int | None = None,
                     text_encoder_out_layers: list[int] | None = None):
    """The base policy from ``model`` (a local folder or a Hugging Face id) with the transformer of ``checkpoint``
    (a run or a folder) swapped in."""
    from .hub import resolve_path

    model = resolve_path(model, "--model", diffusers=True)
    kind = _kind(model)
    if kind == "lab":
        from .lab import load_lab_policy

        policy = load_lab_policy(model, dtype=dtype)
    else:
        from .models import load_policy

        kw = {"height": height, "width": width}
        if kind == "wan" and num_frames is not None:
            kw["num_frames"] = num_frames
        if kind == "flux2" and text_encoder_out_layers:
            kw["text_encoder_out_layers"] = tuple(text_encoder_out_layers)
        if guidance_scale is not None:
            kw["guidance_scale"] = guidance_scale
        policy = load_policy(kind, model, dtype=dtype, **kw)
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        folder = ckpt / "final" if (ckpt / "final" / "transformer").is_dir() else ckpt
        if not (folder / "transformer" / "config.json").is_file():
            raise FileNotFoundError(f"--checkpoint {ckpt}: no transformer/ export found (looked in {folder})")
        cls = type(policy.transformer)
        trained = cls.from_pretrained(folder / "transformer", torch_dtype=dtype)
        owner = getattr(policy, "velocity", policy)
        owner.transformer = trained
    return kind, policy


@torch.no_grad()
def evaluate(policy, prompts: list[str], positions: list[int], rewards: list[tuple[str, object]], steps: int,
             shift: float, seed: int, max_batch: int, device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scores per reward ``[N]`` and the images of the given prompts (one image each)."""
    from .rollout.engine import RolloutEngine

    noise = torch.stack([policy.prepare_latents(1, torch.Generator(device=device).manual_seed(seed * 1_000_003 + p),
                                                device=device)[0] for p in positions])
    engine = RolloutEngine(policy, num_steps=steps, shift=shift, max_batch=max_batch)
    latents = engine.sample_ode(noise, policy.encode_prompts(prompts))
    images = policy.decode(latents)
    scores = {name: model.score(images, prompts).float().cpu() for name, model in rewards}
    return scores, images.cpu()


def _summary_md(label: str, means: dict[str, float], stds: dict[str, float], n: int) -> str:
    names = list(means)
    head = "| method | " + " | ".join(TABLE_NAMES.get(k, k) for k in names) + " |"
    sep = "|---|" + "---|" * len(names)
    row = f"| {label} | " + " | ".join(f"{means[k]:.3f}" for k in names) + " |"
    row_std = "| (std) | " + " | ".join(f"{stds[k]:.3f}" for k in names) + " |"
    return f"{head}\n{sep}\n{row}\n{row_std}\n\n{n} images, one per prompt.\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m g2rpo.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--prompts", required=True, help="a prompt file (.txt/.jsonl/.json) or builtin:lab_test")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--num-frames", type=int, default=None, help="video models (Wan): frames per sample")
    p.add_argument("--text-encoder-layers", default=None, help="FLUX.2: Mistral-3 hidden layers, e.g. 10,20,30")
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--rewards", required=True, help="comma-separated reward names")
    p.add_argument("--reward-options", default=None, help="YAML: {reward name: {option: value}}")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="prompts generated together")
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--label", default=None, help="row label in the summary (default: the checkpoint or model)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from .yaml_numbers import load_yaml
    from .distributed import DistContext
    from .prompts import load_prompts
    from .hub import reward_options
    from .rewards import FrameAggregated, make_reward

    ctx = DistContext.init()
    device = ctx.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        kind, policy = load_eval_policy(args.model, args.checkpoint, dtype, args.height, args.width,
                                        args.guidance_scale, args.num_frames,
                                        [int(x) for x in args.text_encoder_layers.split(",")]
                                        if args.text_encoder_layers else None)
        prompts = load_prompts(args.prompts)
        options = load_yaml(Path(args.reward_options).read_text()) if args.reward_options else {}
        names = [n.strip() for n in args.rewards.split(",") if n.strip()]
        rewards = []
        for name in names:
            opts = reward_options(name, (options or {}).get(name, {}), f"--rewards {name}")
            if kind == "lab" and name.startswith("digit_"):
                opts.setdefault("world", args.model)
            try:
                rewards.append((name, FrameAggregated(make_reward(name, **opts))))
            except TypeError as err:  # a required option (a checkpoint path, ...) is missing
                raise ValueError(f"reward {name!r} is missing options ({err}): pass --reward-options FILE holding "
                                 f"{{{name}: {{option: value}}}} (README: where the checkpoints go)") from None
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"eval: {err}", file=sys.stderr)
        return 2
    policy = policy.to(device).eval()
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    mine = list(range(ctx.rank, len(prompts), ctx.world))
    rows, grid_images = [], []
    for lo in range(0, len(mine), args.batch):
        pos = mine[lo:lo + args.batch]
        scores, images = evaluate(policy, [prompts[i] for i in pos], pos, rewards, args.steps, args.shift, args.seed,
                                  max(1, args.batch), device)
        for j, i in enumerate(pos):
            rows.append({"index": i, "prompt": prompts[i], **{k: float(v[j]) for k, v in scores.items()}})
        if len(grid_images) < 16:
            firsts = images[:, :, 0] if images.ndim == 5 else images  # videos: their first frames
            grid_images.extend(list(firsts[: 16 - len(grid_images)]))
    if ctx.enabled:
        import torch.distributed as dist

        gathered = [None] * ctx.world
        dist.all_gather_object(gathered, rows)
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    if ctx.is_main:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "scores.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["index", "prompt", *names])
            w.writeheader()
            w.writerows(rows)
        means = {k: float(np.mean([r[k] for r in rows])) for k in names}
        stds = {k: float(np.std([r[k] for r in rows])) for k in names}
        label = args.label or str(args.checkpoint or args.model)
        (out / "summary.md").write_text(_summary_md(label, means, stds, len(rows)))
        (out / "summary.json").write_text(json.dumps({"label": label, "mean": means, "std": stds, "n": len(rows),
                                                      "steps": args.steps, "height": args.height,
                                                      "width": args.width}, indent=1))
        from torchvision.utils import save_image

        imgs = torch.stack([g if g.ndim == 3 else g[None] for g in grid_images]).float()
        save_image(imgs, out / "grid.png", nrow=4, padding=2)
        print((out / "summary.md").read_text())
    ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
