"""torch.distributed plumbing: process group, FSDP2 sharding, metric reduction.

Rollouts with FSDP2: a sharded module would all-gather every block's parameters in every
forward, and a G2RPO rollout makes ~16 ticks x several chunks of forwards. Instead, for
the rollout phase every FSDP module is set to keep its parameters after forward
(``set_reshard_after_forward(False)``): the first forward of the phase gathers each block
once, later forwards reuse it, and :func:`rollout_mode` reshards at the end of the phase.
This costs one full (bf16 on GPU) copy of the weights during rollouts, the same memory as
a separate bf16 replica but with no copy to refresh after each update.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "exit_with_parent", "shard_module", "rollout_mode", "is_fsdp"]


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def init(cls, timeout_s: float = 900) -> "DistContext":
        """Initialise from torchrun's environment (nccl on GPU, gloo on CPU); a plain run is rank 0 of 1.

        Collectives time out after ``timeout_s`` (a hung rank stops the others instead of hanging
        them forever), and a worker exits when its launcher dies (no orphans training on).
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if world > 1:
            exit_with_parent()
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))
        rank = dist.get_rank() if dist.is_initialized() else 0
        return cls(rank=rank, world=world, local_rank=local, device=device)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (a no-op on one rank); gloo reduces on CPU."""
        if self.enabled:
            dev = t.device
            buf = t if dev.type == self.device.type else t.to(self.device)
            dist.all_reduce(buf)
            if buf is not t:
                t.copy_(buf.to(dev))
        return t

    def reduce_metrics(self, metrics: dict[str, float], ops: dict[str, str]) -> dict[str, float]:
        """All-reduce metrics: ``ops[key]`` is ``mean`` (default), ``sum``, ``min`` or ``max``."""
        if not self.enabled or not metrics:
            return dict(metrics)
        keys = sorted(metrics)
        out = {}
        for op_name, op in (("mean", dist.ReduceOp.SUM), ("sum", dist.ReduceOp.SUM), ("min", dist.ReduceOp.MIN),
                            ("max", dist.ReduceOp.MAX)):
            sel = [k for k in keys if ops.get(k, "mean") == op_name]
            if not sel:
                continue
            t = torch.tensor([float(metrics[k]) for k in sel], dtype=torch.float64)
            dist.all_reduce(t, op=op)
            if op_name == "mean":
                t /= self.world
            out.update(zip(sel, t.tolist()))
        return out

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def exit_with_parent() -> None:
    """Die with the launcher: Linux's PR_SET_PDEATHSIG (SIGTERM when the parent exits, SIGKILL included),
    and a watchdog thread that notices a changed parent elsewhere (or if the signal is handled)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        except OSError:
            pass
    if os.getppid() != parent:  # the parent died before the call: go now
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(2.0)
            if os.getppid() != parent:
                print(f"g2rpo: launcher (pid {parent}) is gone; rank exiting", file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="g2rpo-parent-watchdog", daemon=True).start()


def is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_module(module: torch.nn.Module, blocks: list[torch.nn.Module], device: torch.device,
                 param_dtype: torch.dtype | None) -> torch.nn.Module:
    """FSDP2: shard each of ``blocks`` (the adapter's ``shard_blocks()``), then the root ``module``. With
    ``param_dtype`` (bf16 for Flux on GPU) the fp32 master shards are gathered in that dtype for compute and
    gradients are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype is not None
          else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    return module


@contextlib.contextmanager
def rollout_mode(module: torch.nn.Module):
    """Eval mode, no grad; with FSDP2, gather each block once for the whole phase (see module doc)."""
    from torch.distributed.fsdp import FSDPModule

    was_training = module.training
    module.eval()
    fsdp = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        with torch.no_grad():
            yield
    finally:
        for m in fsdp:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)
        module.train(was_training)
