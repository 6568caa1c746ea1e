"""Process-group set-up for ``torchrun`` (gloo on CPU, nccl on GPU) and small rank helpers.

Without the torchrun environment variables everything runs in one process and the helpers are
no-ops, so the same training code serves the CPU demo and multi-GPU runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files and logs progress)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the default process group from torchrun's environment, if present.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.

    Returns:
        The :class:`DistInfo` of this process.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = f"cuda:{local_rank}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend)
        log.info("process group: backend=%s rank=%d/%d", backend, rank, world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 in one process)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 in one process)."""
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait for all ranks (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_mean(value: float, device: str = "cpu") -> float:
    """Mean of a Python number over all ranks."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def any_rank(flag: bool | torch.Tensor, device: str = "cpu") -> bool:
    """True on every rank when any rank's ``flag`` is true (e.g. "this step is non-finite").

    ``flag`` may be a one-element tensor still on the device: it is then read once, after the
    reduction (a single host-device synchronisation).
    """
    if isinstance(flag, torch.Tensor):
        flag = flag.detach().reshape(1)
        if not is_distributed():
            return bool(flag)
        t = flag.to(device=device, dtype=torch.float32)
    elif not is_distributed():
        return bool(flag)
    else:
        t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def cleanup() -> None:
    """Destroy the process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
