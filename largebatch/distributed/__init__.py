"""Distributed training with the layer-wise optimizers: exact trust ratios on sharded parameters
(FSDP2 / DTensor, ZeRO-1, flat sharded buffers) and small helpers for torchrun + DDP.

Per-layer norms are computed on what each rank holds and summed across ranks in ONE all-reduce per
parameter group per step. Lamb and Lars detect DTensor parameters (FSDP2) and set their
``norm_reducer`` themselves; see docs/distributed.md.
"""

from largebatch.distributed.ddp import DistInfo, all_reduce_sum, barrier, cleanup, init_from_env, no_sync_if, shard_indices
from largebatch.distributed.flat import FlatLayout, FlatShard, flat_layer_norms, flat_squared_sums
from largebatch.distributed.norms import (
    ShardNormReducer,
    ZeroNormReducer,
    dtensor_norm_reducer,
    shard_norm_reducer,
    zero_norm_reducer,
)
from largebatch.distributed.zero import zero_redundancy_optimizer

__all__ = [
    "DistInfo",
    "init_from_env",
    "shard_indices",
    "all_reduce_sum",
    "barrier",
    "cleanup",
    "no_sync_if",
    "shard_norm_reducer",
    "zero_norm_reducer",
    "dtensor_norm_reducer",
    "ShardNormReducer",
    "ZeroNormReducer",
    "zero_redundancy_optimizer",
    "FlatLayout",
    "FlatShard",
    "flat_layer_norms",
    "flat_squared_sums",
]
