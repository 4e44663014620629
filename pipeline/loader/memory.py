"""Host memory of the training loader: DataLoader workers and prefetch sized by it.

A rank's DataLoader keeps up to `workers x prefetch_factor` finished batches in host memory
(shared memory between its worker processes and the trainer). A batch's bytes are its
uint8 images (B x 3 x H x W: 150 MB at B = 1,000 and 224 px) and its tokens; the float32
images of the earlier loader were four times that (602 MB: 64 of them, 16 workers x 4, held
38.5 GB per rank). `workers: null` takes the rank's CPUs less one (the trainer's), at most
16; `prefetch_factor: null` takes as many batches per worker as `loader_memory_gb` holds
across the workers, from 1 to 4. Values set in the config are kept.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

MAX_AUTO_WORKERS = 16
MAX_AUTO_PREFETCH = 4
GB = 1e9


def rank_cpus() -> int:
    """The CPUs this process may run on (Slurm's cpus_per_task, a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def auto_workers(cpus: int | None = None) -> int:
    """DataLoader workers for a rank with `cpus` CPUs (default: this process's): one CPU is
    the trainer's, at most MAX_AUTO_WORKERS, and at least one worker when there is a CPU
    left for it, else none (the trainer decodes)."""
    cpus = rank_cpus() if cpus is None else cpus
    return max(0, min(MAX_AUTO_WORKERS, cpus - 1))


def batch_bytes(batch_size: int, image_shape: tuple[int, ...], context_length: int = 77,
                image_dtype: torch.dtype = torch.uint8) -> int:
    """Bytes of one training batch in host memory: images [B, *image_shape] of `image_dtype`,
    int64 tokens [B, context_length], and the int64 labels and caption ids, bool valid flags."""
    pixels = batch_size
    for n in image_shape:
        pixels *= int(n)
    item = torch.empty((), dtype=image_dtype).element_size()
    return pixels * item + batch_size * (8 * context_length + 8 + 8 + 1)


def auto_prefetch(memory_gb: float, workers: int, per_batch: int) -> int:
    """Batches each worker keeps ready: as many as `memory_gb` holds across the workers,
    from 1 to MAX_AUTO_PREFETCH."""
    if workers < 1 or per_batch < 1:
        return 1
    return max(1, min(MAX_AUTO_PREFETCH, int(memory_gb * GB // (workers * per_batch))))


class LoaderPlan(NamedTuple):
    """A rank's DataLoader as resolved from the config."""
    workers: int
    prefetch: int | None     # None without workers (the trainer makes each batch when it needs it)
    cpus: int
    batch_bytes: int

    @property
    def held_bytes(self) -> int:
        """Host memory for finished batches: every worker's prefetched ones (one being used
        without workers)."""
        return self.batch_bytes * (self.workers * self.prefetch if self.workers else 1)

    def describe(self) -> str:
        held = f"{self.held_bytes / GB:.1f} GB" if self.held_bytes >= 0.1 * GB else f"{self.held_bytes / 1e6:.1f} MB"
        return (f"loader: {self.workers} workers (of {self.cpus} CPUs), prefetch {self.prefetch or 0} batches each: "
                f"{held} host memory for batches")


def plan_loader(workers: int | None, prefetch: int | None, memory_gb: float, per_batch: int,
                cpus: int | None = None) -> LoaderPlan:
    """Workers and prefetch for the config's values (None: automatic) and one batch's bytes."""
    cpus = rank_cpus() if cpus is None else cpus
    workers = auto_workers(cpus) if workers is None else workers
    if not workers:
        return LoaderPlan(0, None, cpus, per_batch)
    return LoaderPlan(workers, auto_prefetch(memory_gb, workers, per_batch) if prefetch is None else prefetch, cpus,
                      per_batch)
