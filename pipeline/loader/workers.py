"""DataLoader workers of the training loaders: which stream a worker process plays, and
starting them safely."""
from __future__ import annotations

import atexit
import functools
import logging
import time

import torch
from torch.utils.data import DataLoader, get_worker_info

log = logging.getLogger("pipeline.loader")


def stream_role(start: dict[int, int]) -> tuple[int, int]:
    """(the stream this DataLoader worker process plays, workers). Stream w makes batches
    w, w + workers, ... of the epoch's order; `start` holds each stream's batches made
    before a resume. The DataLoader asks its worker 0 first, while the next batch in order
    belongs to stream `consumed % workers`: the processes take the streams rotated by that
    much, so a resumed epoch goes on in the uninterrupted order."""
    info = get_worker_info()
    process, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return (process + sum(start.values())) % workers, workers


def make_loader(stream, workers: int, seed: int, worker_init_fn=None, prefetch: int | None = 4) -> DataLoader:
    """The DataLoader of a batch stream: `workers` processes, each keeping `prefetch` batches
    ready (pipeline.loader.memory sizes both)."""
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available(), prefetch_factor=(prefetch or 1) if workers else None,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=worker_init_fn)


WORKER_START_TIMEOUT_S = 60


def _mark_started(counter, worker_id: int) -> None:
    import signal

    # a stop signal is the trainer's to handle (pipeline.trainer.preemption): a worker it killed
    # would end the rank before its checkpoint is written
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    with counter.get_lock():
        counter.value += 1


def _kill_workers_at_exit() -> None:
    """DataLoader workers ignore SIGTERM (`_mark_started`), so the interpreter's join of its
    child processes at exit would wait for good for one that is still reading (a rank ending
    on an error in the middle of an epoch): the ones still running are killed first."""
    import multiprocessing
    import signal

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's check of its workers has nothing left to report
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(5)


_reaper = []


def start_batches(stream, workers: int, seed: int, timeout: float = WORKER_START_TIMEOUT_S, prefetch: int | None = 4):
    """`iter(make_loader(...))`, once every worker process has started. A worker forked while
    another thread of the rank held CPython's runtime lock never starts: Python 3.11 takes that
    lock in the child before it re-creates it (seen here: a worker stuck in PyOS_AfterFork_Child
    at an epoch's start, the ranks waiting on it for good). Such a start is shut down and made
    again, with a warning; the epoch's batches are the same, as nothing was consumed yet."""
    import multiprocessing

    if not workers:
        return iter(make_loader(stream, workers, seed, prefetch=prefetch))
    if not _reaper:  # registered after multiprocessing's own exit function: runs before it
        atexit.register(_kill_workers_at_exit)
        _reaper.append(True)
    for _ in range(3):
        started = multiprocessing.get_context("fork").Value("i", 0)
        batches = iter(make_loader(stream, workers, seed, functools.partial(_mark_started, started), prefetch))
        deadline = time.monotonic() + timeout
        while started.value < workers and time.monotonic() < deadline:
            time.sleep(0.02)
        if started.value >= workers:
            return batches
        log.warning("%d of %d DataLoader workers did not start within %.0f s (stuck after fork); "
                    "starting them again", workers - started.value, workers, timeout)
        batches._shutdown_workers()  # terminates the stuck ones
    raise RuntimeError(f"DataLoader workers did not start within {timeout:.0f} s, three times")
