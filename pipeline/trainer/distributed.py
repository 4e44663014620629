"""torch.distributed setup: from torchrun's or Slurm's environment, gloo on CPU, nccl on GPU.

Under torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT. Under Slurm, with nothing
else (`srun python -m pipeline.train ...`, one task per GPU, on any number of nodes):
SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, and the first host of SLURM_JOB_NODELIST.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if os.environ.get(n, "") != "":
            return int(os.environ[n])
    return default


def rendezvous() -> dict[str, str]:
    """MASTER_ADDR and MASTER_PORT when the launcher gave none: under Slurm (a bare `srun`,
    or submitit's job) the first host of the step's nodes (SLURM_STEP_NODELIST, else
    SLURM_JOB_NODELIST) and a port derived from the job and step ids (two trainings sharing a
    node do not collide); else this host."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    if nodelist:
        from submitit.slurm.slurm import _parse_node_list

        job, step = os.environ.get("SLURM_JOB_ID", "0"), os.environ.get("SLURM_STEP_ID", "0")
        ident = int(job) * 131 + int(step) if job.isdigit() and step.isdigit() else 9500
        return {"MASTER_ADDR": _parse_node_list(nodelist)[0], "MASTER_PORT": str(20000 + ident % 20000)}
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def init_distributed(backend: str = "auto") -> DistInfo:
    """Join the process group described by the environment (torchrun, or srun one task per
    GPU); a single process when there is none. `backend`: auto | gloo | nccl."""
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count())) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world <= 1:
        return DistInfo(0, 1, 0, device, None)
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        for name, value in rendezvous().items():
            os.environ.setdefault(name, value)
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world, local_rank, device, backend)


def node_name() -> str:
    """The Slurm node this process runs on (SLURMD_NODENAME), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
