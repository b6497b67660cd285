"""How a trainer rank joins its group's torch.distributed process group: NCCL on GPUs, gloo on CPUs."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def join(rank: int, world_size: int, address: str, port: int) -> torch.device:
    """Join the group hosted at ``address:port`` (rank 0's rendezvous point); returns this rank's device."""
    os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return device
