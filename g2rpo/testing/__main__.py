"""`python -m g2rpo.testing tiny-pipeline FAMILY DIR`: a tiny, randomly initialised pipeline of a model
family saved in its diffusers layout, to try the examples, the trainer and eval without weights.

    python -m g2rpo.testing tiny-pipeline flux /tmp/tiny-flux      # 32x32 images, seconds on a CPU
    python examples/dropin_flux_grpo.py --pipeline /tmp/tiny-flux --height 32 --width 32
"""

from __future__ import annotations

import argparse
import sys

from ..models.registry import FAMILIES
from . import tiny

#: ``tiny_<family>_pipeline`` for every family with a diffusers pipeline.
BUILDERS = {name: getattr(tiny, f"tiny_{name}_pipeline") for name, fam in FAMILIES.items() if fam.pipeline}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m g2rpo.testing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny-pipeline", help="save a tiny random pipeline of a model family")
    t.add_argument("family", choices=sorted(BUILDERS))
    t.add_argument("out")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--variant", default=None, help="wan: 2.1, 2.2 (two experts) or ti2v; wan_i2v: 2.1 or 2.2")
    args = p.parse_args(argv)
    try:
        pipe = BUILDERS[args.family](seed=args.seed, **({"variant": args.variant} if args.variant else {}))
    except (TypeError, ValueError) as err:
        p.error(f"--variant {args.variant}: {err}")
    pipe.save_pretrained(args.out)
    print(f"saved a tiny {type(pipe).__name__} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
