"""SIGINT / SIGTERM as a stop request that every rank agrees on (Ctrl-C, a scheduler's preemption).

The first signal asks the run to stop at the next safe point; every rank reads the request at
the same points (an all-reduce), so they stop together:

* during the rollout (between its ticks) or before the update: the iteration is abandoned, its
  effects undone (nothing has changed the weights yet), and the checkpoint is that of the
  iterations completed;
* during the update: the update finishes and the checkpoint includes that iteration.

The trainer then raises :class:`Interrupted`; the CLI prints ``interrupted at iteration N; continue
with --resume`` and exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM). A second
signal more than :data:`REPEAT_S` seconds after the first stops at once (:class:`StopNow`): when it comes
before the iteration's update began (one process), the state of the completed iterations is still written
(nothing has changed it); during an update nothing is written and the last checkpoint is intact. Signals
closer together are one request: torchrun forwards the terminal's Ctrl-C to workers that already received it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

from ..distributed import DistContext

__all__ = ["Interrupted", "RolloutStopped", "StopNow", "StopRequest", "REPEAT_S", "fault_point"]

#: A second signal later than this after the first stops at once.
REPEAT_S = 2.0
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint of ``iteration`` completed iterations."""

    def __init__(self, iteration: int, signum: int, message: str | None = None) -> None:
        super().__init__(message or f"interrupted at iteration {iteration}; continue with --resume")
        self.iteration, self.signum = iteration, signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopNow(KeyboardInterrupt):
    """A second signal: stop at once (the exit status is still 128 + that signal's number). ``saved``: the
    completed iterations whose state was still written (the signal came before the update began, on one
    process), else None."""

    def __init__(self, signum: int, saved: int | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.saved = signum, saved


class RolloutStopped(Exception):
    """Raised inside an iteration to abandon it (no weight has changed)."""


class StopRequest:
    """Installs SIGINT/SIGTERM handlers (main thread only) for the duration of a ``with`` block."""

    def __init__(self, ctx: DistContext, log=print) -> None:
        self.ctx, self.log = ctx, log
        self.signum: int | None = None
        self._first = 0.0
        self._saved: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                self._saved[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._saved.items():
            signal.signal(s, h)
        self._saved.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first = signum, now
            self.log(f"\n{signal.Signals(signum).name}: stopping at the next safe point and writing a checkpoint "
                     f"(signal again to stop at once)")
        elif now - self._first > REPEAT_S:
            raise StopNow(signum)

    def agreed(self) -> int | None:
        """The signal if any rank received one (a collective: every rank calls it at the same points)."""
        local = float(self.signum or 0)
        if self.ctx.enabled:
            import torch.distributed as dist

            t = torch.tensor([local], device=self.ctx.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            local = float(t[0])
        return int(local) or None

    def check(self) -> None:
        """Raise :class:`RolloutStopped` when a stop was requested on any rank."""
        if self.agreed() is not None:
            raise RolloutStopped


def fault_point(iteration: int, phase: str) -> None:
    """Fault injection for the kill-and-resume and interrupt tests: ``G2RPO_FAULT=SIG@ITER:PHASE[:RANK]``
    with SIG kill, int or term (the process signals itself; RANK: only that rank)."""
    spec = os.environ.get("G2RPO_FAULT")
    if not spec:
        return
    sig, _, where = spec.partition("@")
    target = where.split(":")
    if len(target) == 3 and target[2] != os.environ.get("RANK", "0"):
        return
    if ":".join(target[:2]) == f"{iteration}:{phase}":
        os.kill(os.getpid(), {"kill": signal.SIGKILL, "int": signal.SIGINT, "term": signal.SIGTERM}[sig])
