r"""Checkpoints through torch.distributed.checkpoint (DCP).

``OUTPUT/checkpoints/iter_NNNNNN/`` holds the model and optimiser state (sharded under
FSDP2) and the EMA weights (DCP), ``trainer_state.pt`` (the trainer's components' ``state_dict``\ s: the
update's LR schedule and step count, the cost, the granularities; the iteration, data position and config) and
one RNG file per rank. Both small files hold tensors and plain containers only and are read with
``weights_only=True`` (:mod:`g2rpo.safeload`): a crafted one is refused, nothing in it runs. A checkpoint is written to ``iter_NNNNNN.tmp`` and renamed when complete
(with a ``COMPLETE`` marker), so a crash while saving never replaces a good checkpoint
and ``latest_checkpoint`` only ever returns complete ones.
"""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .distributed import DistContext
from .safeload import load_torch_file, numpy_array_globals

__all__ = ["CheckpointWriteError", "save_checkpoint", "load_checkpoint", "complete_checkpoints", "latest_checkpoint",
           "checkpoint_dir", "read_trainer_state", "rng_state", "set_rng_state"]

MARKER = "COMPLETE"


def checkpoint_dir(output_dir: str | Path, iteration: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"iter_{iteration:06d}"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints under ``output_dir`` (``COMPLETE`` marker), newest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp")
                   and (p / MARKER).is_file()), reverse=True)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir``, or None."""
    done = complete_checkpoints(output_dir)
    return done[0] if done else None


def rng_state() -> dict[str, Any]:
    """This process's global RNG states (torch, CUDA, numpy, Python) as tensors and plain containers."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    if isinstance(n, dict):
        n = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)  # a tuple: an RNG file written before the state was stored as tensors
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ctx: DistContext, output_dir: str | Path, iteration: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, ema: dict[str, torch.Tensor] | None,
                    trainer_state: dict[str, Any]) -> Path:
    """Save after ``iteration`` iterations are complete; returns the final folder. ``trainer_state`` (tensors and
    plain containers) is written by the main rank."""
    final = checkpoint_dir(output_dir, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema
    failed = None
    try:
        with warnings.catch_warnings():  # single-process DCP is intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng_rank{ctx.rank}.pt")
        if ctx.is_main:
            torch.save({"iteration": iteration, **trainer_state}, tmp / "trainer_state.pt")
    except Exception as err:  # noqa: BLE001  (a full disk surfaces as "unexpected pos ..." from the writer)
        failed = err
    if ctx.all_reduce_sum(torch.tensor([float(failed is not None)]))[0]:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(_write_failure(final, failed))
    ctx.barrier()
    if ctx.is_main:
        (tmp / MARKER).write_text(str(iteration))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    ctx.barrier()
    return final


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; its temporary folder is removed, earlier checkpoints are intact."""


def _write_failure(final: Path, err: BaseException | None) -> str:
    try:
        free = shutil.disk_usage(final.parent).free
    except OSError:
        free = None
    what = f"{type(err).__name__}: {err}" if err is not None else "failed on another rank"
    space = ""
    if free is not None:
        space = f"; {free / 2**20:.0f} MiB free on that disk" + (" (no space left on the device?)" if free < 2**30
                                                                  else "")
    return f"writing checkpoint {final.name} failed ({what}){space}; the earlier checkpoints are intact"


def read_trainer_state(folder: str | Path) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.pt`` (UnsafeFileError when it holds more than tensors and containers)."""
    return load_torch_file(Path(folder) / "trainer_state.pt", "checkpoint trainer state")


def load_checkpoint(ctx: DistContext, folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    ema: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Restore the weights, optimizer, EMA and RNG saved by :func:`save_checkpoint`; returns the trainer state
    (the iteration, the components' states) for the caller to hand to its components."""
    folder = Path(folder)
    if not (folder / MARKER).is_file():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {MARKER} marker)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer_state = read_trainer_state(folder)
    rng = folder / f"rng_rank{ctx.rank}.pt"
    if rng.is_file():
        set_rng_state(load_torch_file(rng, "checkpoint RNG state", allow=numpy_array_globals()))
    return trainer_state
