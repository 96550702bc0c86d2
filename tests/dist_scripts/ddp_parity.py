"""DDP with the torchrun helpers: 2 ranks with half of a global batch each (and 2 accumulation
micro-steps, the first under no_sync) against one process with the whole batch.

Run: torchrun --standalone --nproc-per-node 2 tests/dist_scripts/ddp_parity.py --out result.json
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from _shared import GLOBAL_BATCH, STEPS, leave, loss_fn, make_data, make_model, max_abs_diff, out_path, write_json
from torch.nn.parallel import DistributedDataParallel as DDP

from largebatch import Lamb
from largebatch.distributed import all_reduce_sum, barrier, init_from_env, no_sync_if, shard_indices

ACCUM = 2


def grads_differ_across_ranks(model) -> bool:
    local = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return any(not torch.equal(gathered[0], g) for g in gathered[1:])


def main():
    info = init_from_env()
    x, y = make_data()
    rows = shard_indices(torch.arange(GLOBAL_BATCH), info.rank, info.world_size)
    model, ref = DDP(make_model()), make_model()
    opt = Lamb(model.parameters(), lr=0.02, weight_decay=0.1, max_grad_norm=0.05)
    ref_opt = Lamb(ref.parameters(), lr=0.02, weight_decay=0.1, max_grad_norm=0.05)
    local_after_no_sync, synced_after_last = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        for micro, part in enumerate(rows.chunk(ACCUM)):
            last = micro == ACCUM - 1
            with no_sync_if(model, not last):
                (loss_fn(model, x[part], y[part]) / ACCUM).backward()
            (synced_after_last if last else local_after_no_sync).append(grads_differ_across_ranks(model))
        opt.step()
        ref_opt.zero_grad()
        loss_fn(ref, x, y).backward()
        ref_opt.step()
    total = all_reduce_sum(torch.tensor([float(info.rank + 1)]))
    barrier()
    result = {
        "param_diff": max_abs_diff(model.module.parameters(), ref.parameters()),
        "info": {"rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
                 "device": str(info.device), "is_main": info.is_main, "distributed": info.distributed,
                 "backend": dist.get_backend()},
        "env_world_size": os.environ["WORLD_SIZE"],
        "all_reduce_sum": float(total),
        "grads_differ_after_no_sync_microstep": local_after_no_sync,
        "grads_differ_after_final_microstep": synced_after_last,
    }  # fmt: skip
    if info.is_main:
        write_json(out_path(), result)
    leave()


if __name__ == "__main__":
    main()
