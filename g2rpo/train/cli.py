"""`python -m g2rpo.train` / `torchrun --nproc_per_node N -m g2rpo.train`: GRPO training.

One iteration: prompts -> rollout (the strategy's plan on the batched engine) -> decode ->
rewards ``[R, P, K', J, G]`` -> advantages (Eq. 11) -> the clipped surrogate (Eq. 12) at the
trained SDE steps, ONE forward per (prompt, source state) scoring every branch that
leaves it -> one optimiser step per minibatch. With no arguments it trains G2RPO on the
CPU lab world (``g2rpo/configs/lab.yaml``).
"""

from __future__ import annotations

import json
import signal
import sys

import numpy as np
import torch

from ..config import ConfigError, load_config
from ..safeload import UnsafeFileError
from .checks import check_config
from ..distributed import rollout_mode
from .loop import Trainer
from .interrupts import Interrupted
from .setup import export_is_current
from .update import TrainingError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    import argparse

    from ..config import config_to_dict

    parser = argparse.ArgumentParser(
        prog="python -m g2rpo.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides: key=value or --key value (dotted keys, YAML values), e.g. "
               "sampler.group_size=8 --optim.lr 1e-5 --resume. --print-config lists every key.")
    parser.add_argument("--config", action="append", default=None,
                        help="YAML config (default: the embedded lab config); repeat to merge left to right, "
                             "e.g. --config configs/lab.yaml --config configs/methods/dance_grpo-official.yaml")
    parser.add_argument("--lab", choices=("digits", "scenes"), default=None,
                        help="run the --config files (a method preset) at lab scale on this CPU lab world: the world's "
                             "model, rewards, prompts and shift-3 schedule, T=16, G=8, M=[0..3], and its lab config's "
                             "iterations, lr and output_dir over the preset (overrides still apply last), e.g. "
                             "--config configs/methods/dance_grpo-official.yaml --lab digits")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    args, rest = parser.parse_known_args(argv)
    overrides = list(rest) + (["resume=true"] if args.resume else [])
    try:
        if args.lab is not None and (args.resume or "resume=true" in overrides):
            raise ConfigError("--lab sets up a new run; --resume continues from the config stored in the checkpoint "
                              "(which already holds the lab scale it was started with): drop --lab")
        if args.resume or "resume=true" in overrides:  # the checkpoint's config is the base
            from .rundir import resume_base

            base = resume_base(args.config, overrides)
            cfg = load_config(args.config, overrides, base=base)
        elif args.lab is not None:
            from ..lab.scale import at_lab_scale, lab_config_path

            cfg = load_config([lab_config_path(args.lab), *(args.config or [])], overrides,
                              after_files=at_lab_scale(args.lab))
        else:
            cfg = load_config(args.config, overrides, log=lambda msg: print(msg, file=sys.stderr))
        check_config(cfg)
    except (ConfigError, FileNotFoundError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    try:
        return _train(cfg)
    except KeyboardInterrupt as err:  # a second signal, or one before training started: no traceback
        from ..checkpoint import latest_checkpoint

        last = latest_checkpoint(cfg.output_dir)
        saved = getattr(err, "saved", None)
        if saved is not None:
            print(f"interrupted: the state after iteration {saved}, the last completed, was written to {last}; the "
                  f"iteration in progress is lost; continue with --resume", file=sys.stderr)
            return 128 + err.signum
        kept = (f"the last checkpoint, {last} ({int((last / 'COMPLETE').read_text() or 0)} iterations), is intact; "
                "the iterations after it are lost" if last is not None else
                "no checkpoint was written: every iteration of this run is lost")
        print(f"interrupted; nothing more was written: {kept}", file=sys.stderr)
        return 128 + getattr(err, "signum", signal.SIGINT)


def _train(cfg) -> int:
    import time

    started = time.perf_counter()
    try:
        trainer = Trainer(cfg)
    except (ConfigError, FileNotFoundError, UnsafeFileError) as err:  # before training: nothing was written
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if trainer.complete:
            final, done = trainer.out / "final", trainer.start_iteration
            if cfg.export_final and not export_is_current(final, done):
                trainer.export(final, done)
                if trainer.ctx.is_main:
                    print(f"{final} was missing or incomplete: exported it again from the last checkpoint")
            why = (f"its max_cost budget is spent ({trainer.cost:,.0f} of {cfg.max_cost:,.0f}; raise max_cost to "
                   "continue it)" if trainer.budget_spent else f"all {cfg.iterations} iterations are done (raise "
                   "iterations=N to continue it)")
            print(f"run complete: {trainer.out} holds {done} iterations and {why}")
            return 0
        base_eval = _held_out_eval(trainer, base=True)
        history = trainer.run()
        final_eval = _held_out_eval(trainer) if base_eval is not None and history else None
    except TrainingError as err:
        print(f"training stopped: {err}", file=sys.stderr)
        return 3
    except RuntimeError as err:  # a collective that timed out: another rank hung or died
        if not (trainer.ctx.enabled and _is_collective_timeout(err)):
            raise
        print(f"training stopped: rank {trainer.ctx.rank}: a collective across the {trainer.ctx.world} ranks got no "
              f"answer within dist_timeout_s={cfg.dist_timeout_s} s (another rank hung or died: see its log); the "
              f"last checkpoint is intact, --resume continues ({str(err).splitlines()[0][-160:]})", file=sys.stderr)
        return 3
    except _write_errors() as err:  # a failed export (disk full, final/ not writable): the checkpoints are intact
        print(f"training stopped: {type(err).__name__}: {err}; the last checkpoint is intact, --resume continues "
              "(and exports again)", file=sys.stderr)
        return 3
    except Interrupted as err:
        if trainer.ctx.is_main:
            print(str(err), file=sys.stderr)
        return err.exit_code
    finally:
        trainer.close()
    if trainer.ctx.is_main and history:
        _print_curve(history, trainer)
        if final_eval is not None:
            print("held-out evaluation (the world's held-out prompts, ODE samples, fixed noise):")
            width = max(16, *map(len, final_eval))
            for key in final_eval:
                print(f"  {key:{width}s} base {base_eval[key]:8.4f}  ->  trained {final_eval[key]:8.4f}")
            (trainer.out / "lab_eval.json").write_text(json.dumps({"base": base_eval, "trained": final_eval}, indent=1))
            _held_out_to_tensorboard(trainer, base_eval, final_eval)
        print(f"wall clock: {time.perf_counter() - started:.1f} s (set-up, training, evaluation and export)")
    return 0


def _held_out_to_tensorboard(trainer: Trainer, base: dict[str, float], final: dict[str, float]) -> None:
    """The end-of-run held-out evaluation as ``held_out/<metric>`` scalars: the base model at step 0, the trained
    policy at its last iteration."""
    if not trainer.cfg.tensorboard:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # preflight refused tensorboard=true without it
        return
    with SummaryWriter(str(trainer.out / "tensorboard")) as tb:
        for step, values in ((0, base), (trainer.final_iteration, final)):
            for key, value in values.items():
                tb.add_scalar(f"held_out/{key}", value, step)


def _write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError, and safetensors' SafetensorError (not an OSError: "No space left on
    device" while an export's weights are saved)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors comes with diffusers
        return (OSError,)
    return (OSError, SafetensorError)


def _is_collective_timeout(err: BaseException) -> bool:
    """gloo's "Timed out waiting ... for recv" and NCCL's watchdog / DistBackendError timeouts."""
    import torch.distributed as dist

    text = str(err)
    return (isinstance(err, getattr(dist, "DistBackendError", ())) or "Timed out" in text or "timed out" in text
            or "Watchdog caught collective operation timeout" in text)


def _held_out_eval(trainer: Trainer, base: bool = False) -> dict[str, float] | None:
    """The family's held-out evaluation (the lab world's) of the trained policy, or (``base``) of the base
    model loaded afresh (a resumed run's policy is not the base model); None for families without one.
    Every rank runs it (sharded forwards are collective)."""
    from ..models.registry import family, import_path, load_family

    fam = family(trainer.cfg.model.kind)
    if fam.held_out_eval is None:
        return None
    evaluate, steps = import_path(fam.held_out_eval), trainer.cfg.sampler.num_steps
    if base:
        policy = load_family(fam.name, trainer.base_path).to(trainer.ctx.device)
        with torch.no_grad(), trainer.autocast():
            return evaluate(policy, trainer.base_path, steps=steps)
    with rollout_mode(trainer.module), trainer.autocast():
        return evaluate(trainer.policy, trainer.base_path, steps=steps)


def _print_curve(history: list[dict[str, float]], trainer: Trainer) -> None:
    keys = [k for k in history[0] if k.startswith("reward/") and k.count("/") == 1]
    n = len(history)
    window = max(1, n // 6)
    print(f"\nreward curve (rollout rewards, mean over windows of {window} iterations):")
    print("  iterations  " + "  ".join(f"{k.split('/')[1]:>16s}" for k in keys))
    for lo in range(0, n, window):
        part = history[lo:lo + window]
        first, last = int(part[0]["iteration"]), int(part[-1]["iteration"])
        print(f"  {first:4d}-{last:<5d}  " + "  ".join(f"{np.mean([m[k] for m in part]):16.4f}" for k in keys))
    exported = ", final/" if trainer.cfg.export_final and export_is_current(trainer.out / "final",
                                                                            int(history[-1]["iteration"])) else ""
    print(f"outputs in {trainer.out} (metrics.jsonl, checkpoints/{exported})")

