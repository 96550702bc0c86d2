"""ZeRO-1 (ZeroRedundancyOptimizer over DDP) on 2 gloo ranks against one process with the whole batch.

Run: torchrun --standalone --nproc-per-node 2 tests/dist_scripts/zero_parity.py --out result.json
"""

from __future__ import annotations

import math

import torch
from _shared import GLOBAL_BATCH, STEPS, leave, loss_fn, make_data, make_model, max_abs_diff, out_path, write_json
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

from largebatch import Lamb, Lars, param_groups
from largebatch.distributed import ZeroNormReducer, init_from_env, shard_indices, zero_redundancy_optimizer

CLIP = dict(max_grad_norm=0.05)
CASES = {
    "lamb": (Lamb, dict(lr=0.02, weight_decay=0.1, **CLIP)),
    "lars_paper": (Lars, dict(lr=0.1, momentum=0.9, weight_decay=0.01, mode="paper", **CLIP)),
    "lars_classic": (Lars, dict(lr=0.5, momentum=0.9, weight_decay=0.01, mode="classic", trust_coefficient=0.02, **CLIP)),
    # an inf gradient at step 3 in the decayed group: that group's step is skipped on every rank
    "lamb_nonfinite_skip": (Lamb, dict(lr=0.02, weight_decay=0.1, nonfinite="skip")),
    # the control: ZeRO without zero_norm_reducer clips each rank by its own partial grad norm
    "lamb_without_reducer": (Lamb, dict(lr=0.02, weight_decay=0.1, **CLIP)),
}
INF_STEP = 3


class CountingZeroReducer(ZeroNormReducer):
    calls = 0

    def reduce_totals(self, local):
        CountingZeroReducer.calls += 1
        return super().reduce_totals(local)


def run_case(name, cls, kwargs, info, x, y):
    rows = shard_indices(torch.arange(GLOBAL_BATCH), info.rank, info.world_size)
    model, ref = DDP(make_model()), make_model()
    groups = param_groups(model.module, kwargs["weight_decay"], exclude_from_adaptation="none")
    if name == "lamb_without_reducer":
        opt = ZeroRedundancyOptimizer(groups, optimizer_class=cls, **kwargs)
    else:
        opt = zero_redundancy_optimizer(groups, cls, norm_reducer=CountingZeroReducer(), **kwargs)
    ref_opt = cls(param_groups(ref, kwargs["weight_decay"], exclude_from_adaptation="none"), **kwargs)
    CountingZeroReducer.calls = 0
    for step in range(1, STEPS + 1):
        for m, o, xb, yb in ((model, opt, x[rows], y[rows]), (ref, ref_opt, x, y)):
            o.zero_grad()
            loss_fn(m, xb, yb).backward()
            if name == "lamb_nonfinite_skip" and step == INF_STEP:
                next(m.parameters()).grad[0, 0] = math.inf
            o.step()
    owned = [list(p.shape) for g in opt.optim.param_groups for p in g["params"]]
    return {
        "param_diff": max_abs_diff(model.module.parameters(), ref.parameters()),
        "reducer_calls_per_step": CountingZeroReducer.calls / STEPS,
        "owned_shapes": owned,
        "skipped_steps_ref": int(ref_opt.skipped_steps),
        "skipped_steps_local": int(opt.optim.skipped_steps),
    }


def main():
    info = init_from_env()
    x, y = make_data()
    results = {name: run_case(name, cls, kw, info, x, y) for name, (cls, kw) in CASES.items()}
    import torch.distributed as dist

    everyone = [None] * info.world_size
    dist.all_gather_object(everyone, {k: v["owned_shapes"] for k, v in results.items()})
    for k in results:
        results[k]["owned_shapes"] = [e[k] for e in everyone]
    if info.is_main:
        write_json(out_path(), results)
    leave()


if __name__ == "__main__":
    main()
