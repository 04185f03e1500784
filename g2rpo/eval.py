"""`python -m g2rpo.eval`: generate with a base and a trained policy, score with reward models, tabulate.

    python -m g2rpo.eval --model /ckpt/FLUX.1-dev --checkpoint runs/flux_hps_clip --prompts test.txt \\
        --rewards hps,clip,pickscore,imagereward --reward-options rewards.yaml --out eval/g2rpo

``--model`` is a local folder of a supported family (or a Hugging Face id); ``--checkpoint`` a training
run (its ``final/`` export, or ``--iteration N`` / its newest checkpoint when it has no export), a run's
``checkpoints/iter_N`` folder, or any folder with a ``transformer/`` whose weights replace the base
model's. Given both, the base model and the trained one are evaluated on identical noise and shown in
one table (``--no-base`` skips the base). Steps, resolution and guidance default to the model family's
(``g2rpo.models.registry``: the paper's 50 steps at 1024x1024 for Flux, the pipeline's own otherwise,
the lab world's size and 16 steps for the lab). ``--samples`` images per prompt, each with noise from
``--seed``, the prompt's position and the sample's index. ``--reward-options`` is a YAML mapping
``name: {option: value}``; a reward is a built-in name, a ``module:callable`` path or an entry point.
Under torchrun the prompts are sharded over ranks and gathered on rank 0. Writes ``scores.csv`` (one
row per image and policy), ``summary.md`` (the paper's Table 1 layout), ``summary.json`` and
``grid.png`` (labelled rows, one per prompt, upscaled; base and trained side by side).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import types
import typing
from pathlib import Path

import numpy as np
import torch

from .models.registry import FAMILIES, all_family_options

__all__ = ["main", "load_eval_policy", "evaluate"]

TABLE_NAMES = {"hps": "HPS-v2.1", "clip": "CLIP", "pickscore": "PickScore", "imagereward": "ImageReward",
               "unified_reward": "UnifiedReward", "digit_alignment": "Alignment", "digit_realism": "Realism"}


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value

    return parse


def trained_transformer_folder(checkpoint: str | Path, iteration: int | None = None) -> Path:
    """The folder whose ``transformer/`` a ``--checkpoint`` names: a run's ``final/`` (or, with ``iteration``
    or without an export, its checkpoint exported on the fly), a ``checkpoints/iter_N`` folder, or a folder
    holding ``transformer/``."""
    ckpt = Path(checkpoint)
    if iteration is None and (ckpt / "final" / "transformer" / "config.json").is_file():
        return ckpt / "final"
    if (ckpt / "transformer" / "config.json").is_file() and iteration is None:
        return ckpt
    from .export import export_checkpoint

    try:
        return export_checkpoint(ckpt, iteration)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--checkpoint {ckpt}: no transformer/ export and no usable checkpoint ({err})") \
            from None


def eval_family(model: str | Path):
    """The family of ``--model`` (a local folder or a Hugging Face id), read from its files alone."""
    from .hub import resolve_path
    from .models.registry import family_of_folder

    return family_of_folder(resolve_path(model, "--model", diffusers=True))


def load_eval_policy(model: str | Path, checkpoint: str | Path | None, dtype: torch.dtype, height: int | None = None,
                     width: int | None = None, guidance_scale: float | None = None, iteration: int | None = None,
                     **options):
    """``(family, policy)``: the base policy from ``model`` (a local folder or a Hugging Face id), with the
    transformer of ``checkpoint`` swapped in when given. Unset settings (None) take the family's defaults;
    ``options`` are the family's own (:class:`~g2rpo.models.registry.FamilyOption`)."""
    from .hub import resolve_path
    from .models.registry import family_of_folder, load_family

    model = resolve_path(model, "--model", diffusers=True)
    fam = family_of_folder(model)
    policy = load_family(fam.name, model, dtype, height=height, width=width, guidance_scale=guidance_scale, **options)
    if checkpoint is not None:
        folder = trained_transformer_folder(checkpoint, iteration)
        try:
            trained = policy.load_transformers(folder, dtype)
        except (OSError, ValueError, RuntimeError, KeyError) as err:  # a truncated / random / cut file
            raise ValueError(f"--checkpoint {checkpoint}: {folder / 'transformer'} does not load "
                             f"({type(err).__name__}: {str(err)[:300]})") from None
        policy.set_transformer(trained)
    return fam, policy


@torch.no_grad()
def evaluate(policy, prompts: list[str], positions: list[int], rewards: list[tuple[str, object]], steps: int,
             shift: float | None, seed: int, max_batch: int, device, samples: int = 1
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scores per reward ``[N * samples]`` and the images (prompt-major: each prompt's samples together), as
    validation during training samples them (:func:`g2rpo.train.validation.sample_and_score`). ``shift`` None: the
    pipeline's own default schedule (:meth:`~g2rpo.models.base.PolicyAdapter.pipeline_sigmas`)."""
    from .schedule import sigma_schedule
    from .train.validation import sample_and_score

    sigmas = policy.pipeline_sigmas(steps) if shift is None else sigma_schedule(steps, shift)
    return sample_and_score(policy, prompts, positions, rewards, sigmas, seed, max_batch, device, samples)


def _summary_md(rows: dict[str, dict[str, tuple[float, float]]], names: list[str], n: int, samples: int) -> str:
    head = "| method | " + " | ".join(TABLE_NAMES.get(k, k) for k in names) + " |"
    sep = "|---|" + "---|" * len(names)
    lines = [head, sep]
    for label, stats in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{stats[k][0]:.3f} ± {stats[k][1]:.3f}" for k in names) + " |")
    return "\n".join(lines) + f"\n\n{n} prompts x {samples} samples per policy (mean ± std over images).\n"


def _family_flags() -> list:
    """The family options eval takes a flag for."""
    return [s for s in all_family_options().values() if s.flag and s.setting]


def _option_parser(spec):
    """argparse's ``type=`` for a family option: a list comma-separated, an int >= its minimum, a float."""
    base = spec.hint
    if typing.get_origin(base) in (typing.Union, types.UnionType):  # X | None
        base = next(a for a in typing.get_args(base) if a is not type(None))
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)

        def parse_list(text: str):
            try:
                return [item(x) for x in text.split(",")]
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__}s, got {text!r}") from None
        return parse_list
    if base is int and spec.minimum == 1:
        return _positive(spec.flag)
    return base


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m g2rpo.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the base model: a local folder or a Hugging Face id")
    p.add_argument("--checkpoint", default=None, help="a run, its checkpoints/iter_N, or a folder with transformer/")
    p.add_argument("--iteration", type=_positive("--iteration"), default=None,
                   help="with a run as --checkpoint: evaluate its checkpoint after this iteration")
    p.add_argument("--no-base", action="store_true", help="with --checkpoint: skip the base model's row")
    p.add_argument("--prompts", required=True, help="a prompt file (.txt/.jsonl/.json) or builtin:lab_test")
    p.add_argument("--steps", type=_positive("--steps"), default=None, help="default: the family's")
    p.add_argument("--height", type=_positive("--height"), default=None)
    p.add_argument("--width", type=_positive("--width"), default=None)
    for spec in _family_flags():  # the families' own settings (g2rpo.models.registry's FamilyOption rows)
        p.add_argument(spec.flag, dest=spec.name, type=_option_parser(spec), default=None,
                       help=f"{', '.join(f.name for f in FAMILIES.values() if spec.name in f.option_names)}: "
                            f"{spec.help}" + (" (comma-separated)" if typing.get_origin(spec.hint) is list else ""))
    p.add_argument("--shift", type=float, default=None,
                   help="the static shift of linspace(1, 0, T+1); default: the family's schedule (the pipeline's own "
                        "for Flux, SD3, Qwen-Image, FLUX.2; shift 3 for Wan and the lab worlds)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the family's")
    p.add_argument("--rewards", required=True, help="comma-separated reward names, module:callable paths or "
                                                    "entry points")
    p.add_argument("--reward-options", default=None, help="YAML: {reward name: {option: value}}")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=_positive("--samples"), default=4, help="images per prompt")
    p.add_argument("--batch", type=_positive("--batch"), default=8, help="prompts generated together")
    p.add_argument("--max-prompts", type=_positive("--max-prompts"), default=None)
    p.add_argument("--label", default=None, help="the trained row's label (default: the checkpoint or model)")
    p.add_argument("--out", required=True)
    return p


def _writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--out {out} is not writable: {err.strerror or err}") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from .distributed import DistContext
    from .hub import reward_options
    from .models.registry import family
    from .prompts import load_prompts
    from .rewards import FrameAggregated, make_reward
    from .rewards.registry import takes_prompt_file
    from .yaml_numbers import load_yaml

    ctx = DistContext.init()
    device = ctx.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    out = Path(args.out)
    try:
        if ctx.is_main:
            _writable(out)  # before any generation
        prompts = load_prompts(args.prompts)
        settings = dict(height=args.height, width=args.width, guidance_scale=args.guidance_scale,
                        **{s.name: getattr(args, s.name) for s in _family_flags()})
        images = None
        if eval_family(args.model).prompt_images:  # image-to-video: every image checked before any model loads
            from .prompts import load_prompt_images

            images = load_prompt_images(args.prompts)
        fam, trained = load_eval_policy(args.model, args.checkpoint, dtype, iteration=args.iteration, **settings)
        policies = {}
        if args.checkpoint is not None and not args.no_base:
            policies["base"] = load_eval_policy(args.model, None, dtype, **settings)[1]
        for policy in (*policies.values(), trained) if images is not None else ():
            policy.set_prompt_images(images)
        label = args.label or str(args.checkpoint or args.model)
        policies[label] = trained
        options = load_yaml(Path(args.reward_options).read_text()) if args.reward_options else {}
        names = [n.strip() for n in args.rewards.split(",") if n.strip()]
        model_root = Path(args.model)
        rewards = []
        for name in names:
            opts = reward_options(name, (options or {}).get(name, {}), f"--rewards {name}")
            if name in fam.world_rewards:
                opts.setdefault("world", str(model_root))
            if takes_prompt_file(name):  # e.g. first_frame: the prompts' conditioning images
                opts.setdefault("prompt_file", args.prompts)
            try:
                rewards.append((name, FrameAggregated(make_reward(name, **opts))))
            except TypeError as err:  # a required option (a checkpoint path, ...) is missing
                raise ValueError(f"reward {name!r} is missing options ({err}): pass --reward-options FILE holding "
                                 f"{{{name}: {{option: value}}}} (README: where the checkpoints go)") from None
    except (OSError, ValueError, TypeError) as err:
        print(f"eval: {err}", file=sys.stderr)
        return 2
    d = family(fam.name).defaults
    steps = args.steps or d.eval_steps
    shift = args.shift if args.shift is not None else (None if d.schedule == "pipeline" else d.shift)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    mine = list(range(ctx.rank, len(prompts), ctx.world))
    rows, grids = [], {k: [] for k in policies}
    grid_prompts = list(range(min(4, len(prompts))))
    for key, policy in policies.items():
        policy = policy.to(device).eval()
        for lo in range(0, len(mine), args.batch):
            pos = mine[lo:lo + args.batch]
            scores, images = evaluate(policy, [prompts[i] for i in pos], pos, rewards, steps, shift, args.seed,
                                      max(1, args.batch * args.samples), device, args.samples)
            for j, (i, s) in enumerate((i, s) for i in pos for s in range(args.samples)):
                rows.append({"policy": key, "index": i, "sample": s, "prompt": prompts[i],
                             **{k: float(v[j]) for k, v in scores.items()}})
                if i in grid_prompts:
                    img = images[j][:, 0] if images.ndim == 5 else images[j]  # videos: their first frames
                    grids[key].append((i, s, img))
        policy.to("cpu")
    if ctx.enabled:
        import torch.distributed as dist

        gathered, grid_parts = [None] * ctx.world, [None] * ctx.world
        dist.all_gather_object(gathered, rows)
        dist.all_gather_object(grid_parts, grids)
        rows = [r for part in gathered for r in part]
        grids = {k: [g for part in grid_parts for g in part[k]] for k in policies}
    if ctx.is_main:
        groups = {}  # a reward that groups prompts (the scenes judges: GenEval's categories) is also reported by group
        for name, model in rewards:
            group_of = getattr(getattr(model, "model", model), "prompt_group", None)
            if group_of is not None:
                groups[name] = {p: group_of(p) for p in set(prompts)}
        _write(out, rows, grids, names, policies, prompts, grid_prompts, args, fam, steps, shift, groups)
    ctx.close()
    return 0


def _write(out, rows, grids, names, policies, prompts, grid_prompts, args, fam, steps, shift, groups=None) -> None:
    from .train.logs import save_prompt_grid

    rows.sort(key=lambda r: (list(policies).index(r["policy"]), r["index"], r["sample"]))
    with (out / "scores.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["policy", "index", "sample", "prompt", *names])
        w.writeheader()
        w.writerows(rows)
    stats = {key: {k: (float(np.mean([r[k] for r in rows if r["policy"] == key])),
                       float(np.std([r[k] for r in rows if r["policy"] == key]))) for k in names} for key in policies}
    columns = list(names)
    for name, group_of in (groups or {}).items():
        for group in sorted(set(group_of.values())):
            columns.append(f"{name}/{group}")
            for key in policies:
                vals = [r[name] for r in rows if r["policy"] == key and group_of[r["prompt"]] == group]
                stats[key][columns[-1]] = (float(np.mean(vals)), float(np.std(vals)))
    n = len({r["index"] for r in rows})
    (out / "summary.md").write_text(_summary_md(stats, columns, n, args.samples))
    first = next(iter(policies.values()))
    summary = {"family": fam.name, "policies": list(policies), "label": list(policies)[-1],
               "mean": {k: v[0] for k, v in stats[list(policies)[-1]].items()},
               "std": {k: v[1] for k, v in stats[list(policies)[-1]].items()},
               "by_policy": {key: {k: {"mean": m, "std": s} for k, (m, s) in st.items()} for key, st in stats.items()},
               "n_prompts": n, "samples_per_prompt": args.samples, "n": n * args.samples, "steps": steps,
               "shift": shift, "schedule": "pipeline" if shift is None else "shift", "height": int(first.height),
               "width": int(first.width),
               "guidance_scale": first.guidance_scale, "seed": args.seed}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    images, labels = [], []
    for i in grid_prompts:
        for key in policies:
            cells = sorted((s, img) for j, s, img in grids[key] if j == i)
            images += [img for _, img in cells]
            labels.append(f"{key}: {prompts[i]}" if len(policies) > 1 else prompts[i])
    if images:
        save_prompt_grid(out / "grid.png", torch.stack([im if im.ndim == 3 else im[None] for im in images]).float(),
                         labels, args.samples)
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
