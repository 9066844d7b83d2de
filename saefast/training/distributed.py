"""Data-parallel helpers over torch.distributed (launched by ``torchrun``; gloo on CPU, NCCL on GPU).

Semantics chosen for saefast (documented in docs/training.md):

* each process reads its own slice of the data and computes the loss on its local batch;
  gradients are averaged by ``torch.nn.parallel.DistributedDataParallel``;
* BatchTopK selects the top ``B_local * k`` activations of each process's local batch (not of the
  global batch): selection over the global batch would need the whole pre-activation matrix in
  one place. TopK, ReLU and JumpReLU are per-token, so for them the gradients equal those of one
  process on the concatenated batch;
* dead-latent statistics are all-reduced (a latent fired if it fired on any process) and
  BatchTopK's inference threshold is updated with the mean over processes of their smallest
  kept activation, so every process holds identical SAE buffers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DistInfo", "init_distributed", "dist_info", "all_reduce_sum", "broadcast_object", "barrier",
           "parse_device", "resolve_device"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Rank and world size of the initialised process group (rank 0 of 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1).

    Uses NCCL when ``device`` is CUDA and gloo otherwise. A no-op for single-process runs or
    when a group is already initialised.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and dist.is_available() and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist_info()


def all_reduce_sum(t: Tensor) -> Tensor:
    """In-place sum over processes (identity without a process group); returns ``t``."""
    if dist_info().enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process (identity without a process group)."""
    if not dist_info().enabled:
        return obj
    box: List[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist_info().enabled:
        dist.barrier()


def parse_device(device: str) -> torch.device:
    """``torch.device(device)``, or a ValueError naming the option (``--device``) and the choices."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device={device!r} (--device) is not a device name: use cpu, cuda or cuda:N "
                         "(or leave it unset: CUDA when available, else cpu)") from None


def resolve_device(device: Optional[str], info: Optional[DistInfo] = None) -> torch.device:
    """``device`` or the default (CUDA when available); under torchrun, CUDA uses cuda:<LOCAL_RANK>.
    A device this machine does not have raises a ValueError naming ``--device`` and the fix."""
    info = info or dist_info()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = parse_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} (--device): this machine has no usable CUDA device (or torch was "
                             "built without CUDA); pass --device cpu, or leave --device unset")
        if info.enabled:
            dev = torch.device("cuda", info.local_rank)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(dev)!r} (--device): this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), numbered from 0")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as err:
            raise ValueError(f"device={device!r} (--device) is not available here ({' '.join(str(err).split())[:120]}); "
                             "pass --device cpu or cuda") from None
    return dev
