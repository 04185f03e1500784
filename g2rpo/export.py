"""`python -m g2rpo.export RUN_DIR [--iteration N] [--out DIR]`: any checkpoint as a loadable model.

Writes what a run's ``final/`` holds (diffusers' ``save_pretrained`` layout, EMA weights when the run
keeps them, LoRA fused, and with LoRA the adapter in ``<out>_lora/``) from the checkpoint after
iteration N (default: the newest complete one) of ``RUN_DIR``, or from a checkpoint folder
(``RUN_DIR/checkpoints/iter_N``). The run's stored config says how to rebuild the model. Default
output: ``RUN_DIR/exports/iter_N``; an export already there for that iteration is reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

__all__ = ["export_checkpoint", "main"]


def _checkpoint_folder(path: Path, iteration: int | None) -> tuple[Path, Path]:
    """``(run_dir, checkpoint folder)`` for a run (+ iteration) or a checkpoint folder."""
    from .checkpoint import MARKER, checkpoint_dir, complete_checkpoints

    if (path / MARKER).is_file():
        return path.parent.parent, path
    if iteration is not None:
        ckpt = checkpoint_dir(path, iteration)
        if not (ckpt / MARKER).is_file():
            have = [int(p.name.split("_")[1]) for p in complete_checkpoints(path)]
            raise FileNotFoundError(f"{path}: no complete checkpoint after iteration {iteration} (complete: {have})")
        return path, ckpt
    done = complete_checkpoints(path)
    if not done:
        raise FileNotFoundError(f"{path}: no complete checkpoint under {path / 'checkpoints'}")
    return path, done[0]


def export_checkpoint(path: str | Path, iteration: int | None = None, out: str | Path | None = None,
                      log=None) -> Path:
    """Export a checkpoint (see the module docstring); returns the export folder."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from .checkpoint import read_trainer_state
    from .config import TrainConfig, from_dict
    from .distributed import DistContext
    from .train.rundir import stored_config
    from .train.setup import EXPORT_MARKER, build_policy, export_policy

    run, ckpt = _checkpoint_folder(Path(path), iteration)
    it = int(read_trainer_state(ckpt)["iteration"])
    target = Path(out) if out is not None else run / "exports" / f"iter_{it:06d}"
    marker = target / EXPORT_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("iteration") == it:
        return target
    cfg: TrainConfig = from_dict(TrainConfig, stored_config(ckpt))
    ctx = DistContext(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    setup = build_policy(cfg, ctx, log=log or (lambda *a, **k: None))
    module = setup.module
    ema = ({n: p.detach().clone().float() for n, p in module.named_parameters() if p.requires_grad}
           if cfg.ema_decay is not None else None)
    want = {"model": get_model_state_dict(module), **({"ema": ema} if ema is not None else {})}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(want, checkpoint_id=str(ckpt))
    set_model_state_dict(module, want["model"])
    return export_policy(cfg, ctx, module, ema, setup.base_path, target, it)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m g2rpo.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run's output_dir, or one of its checkpoints/iter_N folders")
    p.add_argument("--iteration", type=int, default=None, help="the checkpoint after this iteration (default: newest)")
    p.add_argument("--out", default=None, help="default: RUN_DIR/exports/iter_N")
    args = p.parse_args(argv)
    if args.iteration is not None and args.iteration < 1:
        print(f"export: --iteration must be >= 1, got {args.iteration}", file=sys.stderr)
        return 2
    try:
        folder = export_checkpoint(args.run, args.iteration, args.out, log=print)
    except (OSError, ValueError) as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    print(f"exported to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
