"""Saving before a requeue: a stop signal makes every rank checkpoint at the next step, then leave.

Slurm warns a job before its time limit with the signal submitit asks for (`--signal USR2@90`)
and sends SIGTERM on preemption or `scancel`. Left alone, a requeued training resumes from
its last periodic checkpoint and redoes up to `save_every` steps. `StopSignals` catches both
signals on every rank and only records them; after each step the ranks agree (one scalar
all_reduce) whether any of them was signalled, all write the checkpoint of that step, and
then the signal's earlier handler runs: submitit's requeues the job (rank 0) and exits; with
no handler of its own (a plain `python -m pipeline.train`) the process ends as the signal's
default would. A rank left standing after that (not rank 0 under submitit) exits too, so the
job ends together.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

import torch

from pipeline.trainer.distributed import DistInfo

log = logging.getLogger("pipeline.train")
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopSignals:
    """Records SIGUSR2 / SIGTERM while installed (a context manager); `agreed` tells every rank
    whether any rank got one; `leave` hands the signal to the handler it replaced."""

    def __init__(self, info: DistInfo):
        self.info, self.received, self.previous = info, None, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def agreed(self) -> bool:
        """Whether any rank has been signalled (every rank calls this after each step)."""
        flag = 1 if self.received is not None else 0
        if self.info.distributed:
            t = torch.tensor([flag], device=self.info.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = int(t.item())
        return bool(flag)

    def leave(self, step: int) -> None:
        """After the checkpoint of `step`: run the replaced handler of the signal received (or
        its default action), and end this rank in any case."""
        signum = self.received
        name = signal.Signals(signum).name if signum is not None else "a stop signal on another rank"
        log.warning("%s: checkpoint of step %d written; stopping (a requeued job resumes there)", name, step)
        handlers = dict(self.previous)
        self.__exit__()
        if signum is not None:
            handler = handlers.get(signum, signal.SIG_DFL)
            if callable(handler):
                handler(signum, None)  # submitit: requeue and exit (rank 0), or log and return
            elif handler == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
        raise SystemExit(128 + (signum or signal.SIGTERM))
