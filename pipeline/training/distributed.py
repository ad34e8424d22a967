"""Process-group set-up and the few collectives the trainer needs, the same on GPU (NCCL) and CPU (gloo)."""
from __future__ import annotations

import datetime
import glob
import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


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
    if accel.device_name() == "cpu" and os.environ.get("LOCAL_RANK", "0") == "0":
        lock = stale_build_lock()
        if lock:
            # every node's local rank 0 says it: each node has its own build folder
            log.warning(f"warning: {lock} is {(time.time() - os.path.getmtime(lock)) / 60:.0f} minutes old. A "
                        f"DeepSpeed op build that died leaves this lock behind, and every later build (the CPU "
                        f"all-reduce op is built at start-up) waits for it forever. If no build is running, delete "
                        f"it: rm {lock}", extra={"all_ranks": True})
    timeout = collective_timeout(timeout_s)
    set_default_group_timeout(timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if accel.device_name() == "cpu":
        release_cpu_shm_segment(rank)
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    if accel.device_name() == "cuda":
        accel.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device)


DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0


def collective_timeout(timeout_s: float | None = None) -> datetime.timedelta:
    """How long a collective may wait for a peer: `timeout_s`, else DISTIL_DIST_TIMEOUT_S, else 30 minutes (long
    enough for rank 0 to checksum a large dataset while the others wait; the stall watchdog catches a stuck rank
    sooner)."""
    raw = timeout_s if timeout_s is not None else os.environ.get("DISTIL_DIST_TIMEOUT_S", DEFAULT_COLLECTIVE_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        from pipeline.training.config import ConfigError
        raise ConfigError("environment", [f"DISTIL_DIST_TIMEOUT_S: a positive number of seconds, got {raw!r}"])
    return datetime.timedelta(seconds=seconds)


def set_default_group_timeout(timeout: datetime.timedelta) -> None:
    """Make `timeout` the default of every process group created later without one.

    DeepSpeed creates its ZeRO data-parallel and other groups with `torch.distributed.new_group(ranks)`, no timeout,
    so they take torch's module-level default (30 min on gloo, 10 on NCCL) and a stuck peer holds a rank that long
    whatever the default group's timeout. torch reads that default when a group is created, so setting it before
    DeepSpeed builds its groups gives every group the same bound."""
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout


def stale_build_lock(op: str = "deepspeed_shm_comm", max_age_s: float = 900.0) -> str | None:
    """The path of `op`'s torch-extensions build lock when it is older than `max_age_s` (a build takes ~1 min)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    # TORCH_EXTENSIONS_DIR holds the op folders itself; torch's default root has a folder per Python/CUDA version
    for lock in glob.glob(os.path.join(root, op, "lock")) + glob.glob(os.path.join(root, "*", op, "lock")):
        try:
            if time.time() - os.path.getmtime(lock) > max_age_s:
                return lock
        except OSError:  # removed meanwhile: the build finished
            pass
    return None


SHM_SEGMENT = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def release_cpu_shm_segment(rank: int) -> str | None:
    """Unlink this rank's DeepSpeed CPU all-reduce segment once every rank has mapped it.

    On the CPU accelerator, DeepSpeed's shared-memory all-reduce gives each rank a ~66 MiB POSIX segment named after
    MASTER_ADDR, MASTER_PORT and the rank, and never unlinks it: every run leaves them in /dev/shm (RAM) for good,
    gigabytes after a few dozen runs, and a later run on the same port may map a stale one. The mappings stay valid
    after the unlink (the memory goes when the last process exits, even one killed with SIGKILL). Returns the path
    removed, or None when there was none (another DeepSpeed version, or the op not built)."""
    barrier()  # every rank has opened every peer's segment inside init_distributed
    path = SHM_SEGMENT.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                              port=os.environ.get("MASTER_PORT", ""), rank=rank)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    return path


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


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (a list of one outside a process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any: health decisions are taken together."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
