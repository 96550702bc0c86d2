"""Small helpers for data-parallel training launched by ``torchrun`` (or not launched at all).

The same script runs as one plain process (``python train.py``: no process group, every helper
is a no-op) and as N processes under ``torchrun`` (one process group, gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DistInfo", "init_from_env", "shard_indices", "all_reduce_sum", "barrier", "cleanup", "no_sync_if"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its global rank, the number of processes, its rank on this node,
    the device it computes on, and whether it is the main process (rank 0: logs, checkpoints)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        """True when a process group is initialised (launched by torchrun), even with one process."""
        return dist.is_available() and dist.is_initialized()


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_from_env(
    backend: str | None = None, device: str | torch.device | None = None, timeout: timedelta | None = None
) -> DistInfo:
    """Read torchrun's environment and initialise the default process group.

    Without torchrun's variables (``RANK`` and ``WORLD_SIZE`` unset) this is a single process:
    nothing is initialised and ``DistInfo(0, 1, 0, device, True)`` is returned. Under torchrun it
    reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` and
    calls ``torch.distributed.init_process_group`` (once; an existing group is reused).

    Args:
        backend: None picks "nccl" when the device is CUDA and "gloo" otherwise.
        device: None picks ``cuda:LOCAL_RANK`` when CUDA is available (and makes it the current
            device), else the CPU.
        timeout: passed to ``init_process_group`` (None: torch's default).
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if not launched:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device, is_main=True)

    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"RANK and WORLD_SIZE are set but {', '.join(missing)} are not; launch with torchrun "
            "(it sets all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)"
        )
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        kwargs = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_main=rank == 0)


def shard_indices(global_batch_indices: Sequence | Tensor, rank: int, world_size: int):
    """This rank's contiguous slice of a global batch: ``[rank * B/W, (rank + 1) * B/W)``.

    With mean-reduced losses, DDP averages the W per-rank gradients, which equals the gradient of
    the whole batch only when every rank has the same number of examples, so B must be divisible
    by W. Returns the same kind of object (list, range, tensor, array) sliced.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Invalid rank {rank!r} for world_size {world_size!r}; need 0 <= rank < world_size")
    n = len(global_batch_indices)
    if n % world_size != 0:
        raise ValueError(
            f"a global batch of {n} examples does not split evenly over {world_size} ranks; use a global "
            f"batch size divisible by the world size (e.g. drop the last incomplete batch)"
        )
    per_rank = n // world_size
    return global_batch_indices[rank * per_rank : (rank + 1) * per_rank]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum ``tensor`` over all ranks, in place, and return it (unchanged in a single process)."""
    if _initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _initialized():
        dist.barrier()


def cleanup() -> None:
    """Destroy the default process group, if any."""
    if _initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def no_sync_if(model: nn.Module, cond: bool) -> Iterator[None]:
    """Skip the gradient all-reduce while ``cond`` holds (the non-final micro-steps of gradient
    accumulation); gradients then accumulate locally and the final micro-step reduces their sum.

    Works with ``DistributedDataParallel`` (``model.no_sync()``), FSDP2 modules
    (``set_requires_gradient_sync(False)``, restored afterwards) and plain modules (no-op).
    """
    if not cond:
        yield
        return
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 (torch.distributed.fsdp.FSDPModule)
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield
