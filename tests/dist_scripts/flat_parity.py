"""Flat sharded buffers on 2 gloo ranks: per-tensor norms and FlatShard + Lamb against unsharded.

Run: torchrun --standalone --nproc-per-node 2 tests/dist_scripts/flat_parity.py --out result.json
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from _shared import STEPS, leave, loss_fn, make_data, make_model, out_path, write_json
from torch.distributed.tensor.debug import CommDebugMode

from largebatch import Lamb, Lars
from largebatch.distributed import FlatLayout, FlatShard, flat_layer_norms, init_from_env


def flatten(tensors, layout: FlatLayout, world_size: int) -> torch.Tensor:
    flat = torch.zeros(layout.padded_numel(world_size), dtype=torch.float64)
    for t, start, n in zip(tensors, layout.starts, layout.numels):
        flat[start : start + n] = t.reshape(-1)
    return flat


def gather_flat(local: torch.Tensor, world_size: int) -> torch.Tensor:
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local)
    return torch.cat(parts)


def norms_case(info, layout: FlatLayout):
    model = make_model()
    params = [p.detach() for p in model.parameters()]
    updates = [torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) for p in params]
    start, stop = layout.shard_range(info.rank, info.world_size)
    w_flat, u_flat = flatten(params, layout, info.world_size), flatten(updates, layout, info.world_size)
    with CommDebugMode() as counter:
        w, u = flat_layer_norms([w_flat[start:stop], u_flat[start:stop]], layout, start)
    expect_w = torch.stack([p.norm() for p in params])
    expect_u = torch.stack([t.norm() for t in updates])
    straddling = [n for n, s, k in zip(layout.names, layout.starts, layout.numels) if s < stop <= s + k - 1]
    return {
        "diff": max(float((w - expect_w).abs().max()), float((u - expect_u).abs().max())),
        "collectives": counter.get_total_counts(),
        "shard": [start, stop],
        "straddling_my_end": straddling,
    }


def optimizer_case(info, layout: FlatLayout, cls, kwargs, reduce: bool):
    """Each rank optimises only its slice of the flat buffer; the reference optimises the model."""
    model, ref = make_model(), make_model()
    x, y = make_data()
    start, stop = layout.shard_range(info.rank, info.world_size)
    local = flatten([p.detach() for p in model.parameters()], layout, info.world_size)[start:stop].clone()
    shard = FlatShard(local, layout, start)
    decay = [p for _, shape, p in shard.named_pieces() if len(shape) > 1]
    no_decay = [p for _, shape, p in shard.named_pieces() if len(shape) <= 1]
    wd = kwargs.pop("weight_decay")
    reducer = shard.norm_reducer if reduce else None
    opt = cls([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}], norm_reducer=reducer, **kwargs)
    ref_params = list(ref.parameters())
    ref_opt = cls(
        [{"params": [p for p in ref_params if p.ndim > 1], "weight_decay": wd},
         {"params": [p for p in ref_params if p.ndim <= 1], "weight_decay": 0.0}], **kwargs,
    )  # fmt: skip
    comms = []
    for _ in range(STEPS):
        # the whole model from the shards, its gradient on the whole batch, this rank's slice of it
        full = gather_flat(local, info.world_size)
        with torch.no_grad():
            for p, s, n in zip(model.parameters(), layout.starts, layout.numels):
                p.copy_(full[s : s + n].view_as(p))
        model.zero_grad()
        loss_fn(model, x, y).backward()
        flat_grad = flatten([p.grad for p in model.parameters()], layout, info.world_size)
        shard.attach_grad(flat_grad[start:stop])
        with CommDebugMode() as counter:
            opt.step()
        comms.append(counter.get_total_counts())
        ref_opt.zero_grad()
        loss_fn(ref, x, y).backward()
        ref_opt.step()
    full = gather_flat(local, info.world_size)
    expect = flatten([p.detach() for p in ref_params], layout, info.world_size)
    return {"param_diff": float((full - expect).abs().max()), "comms_per_step": comms}


def main():
    info = init_from_env()
    named_shapes = [(n, tuple(p.shape)) for n, p in make_model().named_parameters()]
    packed = FlatLayout.from_shapes(named_shapes)
    aligned = FlatLayout.from_shapes(named_shapes, align=4)  # gaps between tensors never enter a norm
    offsets = [0]
    for _, shape in named_shapes:
        offsets.append(offsets[-1] + torch.Size(shape).numel())
    by_offsets = FlatLayout.from_boundaries(offsets)
    results = {
        "layout": {"numel": packed.numel, "padded": packed.padded_numel(info.world_size), "starts": list(packed.starts)},
        "norms_packed": norms_case(info, packed),
        "norms_aligned": norms_case(info, aligned),
        "norms_offsets": norms_case(info, by_offsets),
        "lamb": optimizer_case(info, packed, Lamb, dict(lr=0.02, weight_decay=0.1, max_grad_norm=0.05), True),
        "lars_paper": optimizer_case(info, aligned, Lars, dict(lr=0.1, momentum=0.9, weight_decay=0.01, max_grad_norm=0.05), True),
        "lamb_local_norms": optimizer_case(info, packed, Lamb, dict(lr=0.02, weight_decay=0.1), False),
    }
    if info.is_main:
        write_json(out_path(), results)
    leave()


if __name__ == "__main__":
    main()
