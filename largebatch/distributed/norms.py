"""Reducers that turn local squared sums into global ones, for sharded parameters.

The layer-wise optimizers compute, for each parameter tensor, ``sum(x**2)`` of what this rank holds
and pass the vector of all such sums of a parameter group to a *reducer* in one call (see
``largebatch.optim._common.SquaredSumReducer``). The reducer returns the sums over the whole logical
tensors. A reducer may also have a ``reduce_totals`` attribute: the callable used for quantities
summed over *all* tensors of the optimizer (the global gradient norm of ``max_grad_norm`` and the
non-finite flags); without it the reducer itself is used for those too.

==================================  ==========================  ==============================
layout                              per-tensor squared sums     totals (grad norm, flags)
==================================  ==========================  ==============================
FSDP2 / DTensor ``Shard``, flat     all-reduce over the shard   all-reduce over the shard
buffers (:class:`FlatShard`)        group                       group
ZeRO-1 (each rank owns whole        already global (identity)   all-reduce over the group
tensors)
==================================  ==========================  ==============================
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.distributed as dist
from torch import Tensor

__all__ = ["ShardNormReducer", "ZeroNormReducer", "shard_norm_reducer", "zero_norm_reducer", "dtensor_norm_reducer"]


def _all_reduce_sum(local: Tensor, group) -> Tensor:
    out = local.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


class ShardNormReducer:
    """Sum local squared sums over ``group`` with one all-reduce per call (tensors sharded over it)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    def __call__(self, local: Tensor) -> Tensor:
        return _all_reduce_sum(local, self.group)

    def reduce_totals(self, local: Tensor) -> Tensor:
        return _all_reduce_sum(local, self.group)

    def __repr__(self) -> str:
        return f"ShardNormReducer(group={self.group!r})"


class ZeroNormReducer:
    """ZeRO-1: each rank owns whole tensors, so per-tensor sums are already global (returned as
    they are); only the totals over all tensors (grad norm, non-finite flags) are summed over ``group``."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    def __call__(self, local: Tensor) -> Tensor:
        return local

    def reduce_totals(self, local: Tensor) -> Tensor:
        return _all_reduce_sum(local, self.group)

    def __repr__(self) -> str:
        return f"ZeroNormReducer(group={self.group!r})"


def shard_norm_reducer(process_group: dist.ProcessGroup | None = None) -> ShardNormReducer:
    """The reducer for tensors sharded over ``process_group`` (None: the default group)."""
    return ShardNormReducer(process_group)


def zero_norm_reducer(process_group: dist.ProcessGroup | None = None) -> ZeroNormReducer:
    """The reducer for ZeRO-1 (``torch.distributed.optim.ZeroRedundancyOptimizer``) over ``process_group``."""
    return ZeroNormReducer(process_group)


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def dtensor_norm_reducer(params: Iterable[Tensor]) -> ShardNormReducer | None:
    """The reducer implied by the placements of DTensor parameters (FSDP2, HSDP), or None.

    All parameters must be DTensors on one device mesh with ``Shard`` on the same mesh dimension and
    ``Replicate`` on the others (FSDP2: a 1-d mesh; HSDP: ``(Replicate(), Shard(0))``). The squared
    sums are then summed over the process group of the sharded mesh dimension. None when no mesh
    dimension is sharded (nothing to reduce). Other layouts (several sharded mesh dimensions, e.g.
    FSDP + tensor parallelism; ``Partial``; DTensors mixed with plain tensors) raise ValueError:
    pass ``norm_reducer=`` explicitly for them.
    """
    DTensor = _dtensor_type()
    params = list(params)
    dts = [p for p in params if isinstance(p, DTensor)]
    if not dts:
        return None
    if len(dts) != len(params):
        raise ValueError(
            f"{len(dts)} of {len(params)} parameters are DTensors and the others plain tensors; the optimizer "
            "cannot tell which squared sums to reduce. Shard all parameters (e.g. fully_shard the root "
            "module too) or pass norm_reducer= explicitly"
        )
    mesh = dts[0].device_mesh

    def sharded_dims(p) -> tuple[int, ...]:
        for pl in p.placements:
            if pl.is_partial():
                raise ValueError(f"a parameter has a Partial placement {p.placements}; norms need Shard or Replicate")
        return tuple(i for i, pl in enumerate(p.placements) if pl.is_shard())

    dims = sharded_dims(dts[0])
    for p in dts[1:]:
        if p.device_mesh != mesh or sharded_dims(p) != dims:
            raise ValueError(
                f"DTensor parameters differ in mesh or sharded mesh dimensions ({mesh}, {dts[0].placements} vs "
                f"{p.device_mesh}, {p.placements}); put them in separate optimizers or pass norm_reducer= explicitly"
            )
    if not dims:
        return None
    if len(dims) > 1:
        raise ValueError(
            f"parameters are sharded over {len(dims)} mesh dimensions {dims} of {mesh}; pass "
            "norm_reducer=shard_norm_reducer(group) with a process group spanning those dimensions"
        )
    return ShardNormReducer(mesh.get_group(dims[0]))
