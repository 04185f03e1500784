"""The experiments' command line: ``python -m g2rpo.experiments compare ...`` (also ``python -m g2rpo.lab compare``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_compare_parser", "main", "run_compare"]


def add_compare_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("compare", help="train every method from the base model under both preset families and "
                                          "compare (Tables 1, 4, Fig. 1a, equal-lr table)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--world", choices=("digits", "scenes"), default="digits",
                   help="the lab world: digits (8x8 grey digits) or scenes (coloured compositional scenes)")
    c.add_argument("--methods", default="dance_grpo,flow_grpo,mix_grpo,g2rpo_no_mgai,g2rpo",
                   help="comma-separated, of dance_grpo, flow_grpo, mix_grpo, g2rpo_no_mgai, g2rpo")
    c.add_argument("--families", default="paper,official",
                   help="comma-separated preset families (configs/methods/<method>-<family>.yaml): paper, official")
    c.add_argument("--seeds", type=int, default=3, help="seeds per (method, family, lr): 0, 1, ..., N-1")
    c.add_argument("--grid-seeds", type=int, default=None,
                   help="seeds run at each lr of the grid (default: --seeds); the lr is chosen on seed 0 and the "
                        "chosen lr then runs every seed (1: the other lrs run seed 0 only)")
    c.add_argument("--iterations", type=int, default=32, help="iterations per run (an upper bound with --budget)")
    c.add_argument("--lr-grid", default="1e-4,3e-4,1e-3", help="comma-separated learning rates tried per method")
    c.add_argument("--extend-lr", type=int, default=2,
                   help="lrs added at most beyond an edge of the grid that holds a method's best (0: never)")
    c.add_argument("--eval-every", type=int, default=8, help="iterations between held-out evaluations")
    c.add_argument("--no-variant", action="store_true", help="skip the paper preset + per_sde_step runs")
    c.add_argument("--checkpoint", default=None, help="the built world's folder (default: the cached one)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a training-config override for every run, e.g. --set 'rewards=[{name: my_pkg.rewards:fn}]' "
                        "(a reward by name, module:callable path or entry point)")
    c.add_argument("--budget", type=float, default=None,
                   help="train every method to this cumulative cost (forward-row equivalents) instead of --iterations "
                        "(which stays an upper bound; each run ends at its last iteration within the budget); also "
                        "runs the cheaper G2RPO variants and the Lambda ablation")
    c.add_argument("--cost-points", type=int, default=8,
                   help="with --budget: held-out evaluations at this many evenly spaced costs (judge-vs-cost curves)")
    c.add_argument("--control", action="store_true",
                   help="also train every compared method at its chosen lr on random_control (N(0, 1) draws that "
                        "ignore the image), the same seeds: the random-reward control, a table of each method's judge "
                        "gain against what drift alone gives")
    c.add_argument("--variants", default=None,
                   help="with --budget: the G2RPO variants to run, comma-separated (default: all cheaper variants and "
                        "the Lambda ablation; 'none')")
    c.add_argument("--out", required=True)
    return c


def run_compare(args: argparse.Namespace) -> None:
    """The comparison of ``args`` (both CLIs' ``compare``); ``--checkpoint`` must hold a built world of ``--world``."""
    from .compare import CHEAPER_VARIANTS, PRESET_FAMILIES, LAMBDA_ABLATION, METHODS, CompareSettings, compare

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    unknown = [m for m in methods if m not in METHODS] + [f for f in families if f not in PRESET_FAMILIES]
    if unknown:
        sys.exit(f"unknown methods/families {unknown}; choose from {list(METHODS)} and {list(PRESET_FAMILIES)}")
    from ..config import ConfigError, load_config, merge_dicts, parse_overrides

    try:
        overrides = parse_overrides(args.set)
        from .worlds import world_spec

        from ..train import check_config

        check_config(load_config(None, merge_dicts(world_spec(args.world).reset, overrides)))  # before any run
    except ConfigError as err:
        sys.exit(f"--set: {err}")
    known = {**CHEAPER_VARIANTS, **LAMBDA_ABLATION}
    variants = known if args.budget is not None else {}
    if args.variants is not None:
        names = [v.strip() for v in args.variants.split(",") if v.strip() and v.strip() != "none"]
        wrong = [v for v in names if v not in known]
        if wrong or args.budget is None:
            sys.exit(f"--variants: unknown {wrong}; choose from {list(known)}" if wrong
                     else "--variants needs --budget (the variants are compared at equal cost)")
        variants = {v: known[v] for v in names}
    if args.budget is not None and args.budget <= 0:
        sys.exit(f"--budget must be > 0, got {args.budget:g}")
    if args.cost_points < 1 or args.extend_lr < 0 or args.seeds < 1:
        sys.exit("--cost-points and --seeds must be >= 1, --extend-lr >= 0")
    if args.grid_seeds is not None and not 1 <= args.grid_seeds <= args.seeds:
        sys.exit(f"--grid-seeds must be between 1 and --seeds ({args.seeds}), got {args.grid_seeds}")
    settings = CompareSettings(methods=methods, families=families, seeds=args.seeds, iterations=args.iterations,
                               lr_grid=tuple(float(x) for x in args.lr_grid.split(",")),
                               eval_every=args.eval_every, per_sde_step_variant=not args.no_variant,
                               overrides=overrides, budget=args.budget, variants=variants, control=args.control,
                               extend_lr=args.extend_lr, cost_points=args.cost_points, world=args.world,
                               grid_seeds=args.grid_seeds)
    world = None
    if args.checkpoint:
        from .worlds import world_spec

        world, marker = Path(args.checkpoint), world_spec(args.world).marker
        if not (world / marker).is_file():
            sys.exit(f"--checkpoint {world}: not a {args.world} world (no {marker})")
    compare(args.out, settings, world)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m g2rpo.experiments", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_compare_parser(sub)
    args = parser.parse_args(argv)
    run_compare(args)

