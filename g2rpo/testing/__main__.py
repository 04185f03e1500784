"""`python -m g2rpo.testing tiny-pipeline FAMILY DIR`: a tiny, randomly initialised pipeline of a model
family saved in its diffusers layout, to try the examples, the trainer and eval without weights.

    python -m g2rpo.testing tiny-pipeline flux /tmp/tiny-flux      # 32x32 images, seconds on a CPU
    python examples/dropin_flux_grpo.py --pipeline /tmp/tiny-flux --height 32 --width 32
"""

from __future__ import annotations

import argparse
import sys

from . import tiny

BUILDERS = {"flux": tiny.tiny_flux_pipeline, "flux2": tiny.tiny_flux2_pipeline, "sd3": tiny.tiny_sd3_pipeline,
            "qwen_image": tiny.tiny_qwen_image_pipeline, "wan": tiny.tiny_wan_pipeline}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m g2rpo.testing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny-pipeline", help="save a tiny random pipeline of a model family")
    t.add_argument("family", choices=sorted(BUILDERS))
    t.add_argument("out")
    t.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    pipe = BUILDERS[args.family](seed=args.seed)
    pipe.save_pretrained(args.out)
    print(f"saved a tiny {type(pipe).__name__} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
