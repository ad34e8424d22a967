"""Process-group set-up and the few collectives the trainer needs, the same on GPU (NCCL) and CPU (gloo)."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Join the process group started by `deepspeed`, torchrun, SLURM srun or a single plain process.

    A plain `python launch/pretrain.py` has no launcher environment: we make a world of one so the same code runs.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    accel = get_accelerator()
    backend = accel.communication_backend_name()
    if accel.device_name() == "cpu":
        backend = "gloo"  # ccl is not installed on plain CPU machines; gloo always is
    timeout = datetime.timedelta(seconds=timeout_s or float(os.environ.get("DISTIL_DIST_TIMEOUT_S", 1800)))
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    if accel.device_name() == "cuda":
        accel.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any: health decisions are taken together."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
