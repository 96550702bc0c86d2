"""FSDP2 (fully_shard, DTensor parameters) on 2 gloo ranks against one unsharded process.

Run: torchrun --standalone --nproc-per-node 2 tests/dist_scripts/fsdp_parity.py --out result.json
Rank 0 writes, per case, the max |sharded - single-process| over parameters and optimizer state
after STEPS steps and the collectives each optimizer step issued (counted by CommDebugMode).
"""

from __future__ import annotations

import torch
from _shared import (
    GLOBAL_BATCH, STEPS, full, leave, loss_fn, make_data, make_model, max_abs_diff, out_path, roundtrip, state_diff, write_json,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode

from largebatch import Lamb, Lars, param_groups
from largebatch.distributed import init_from_env, shard_indices, zero_norm_reducer

CLIP = dict(max_grad_norm=0.05)  # below the initial gradient norm (~0.5): clipping is active
# fused=None (default) takes the fused kernel where the machine has one; fused=False the multi-tensor path
CASES = {
    "lamb": (Lamb, dict(lr=0.02, weight_decay=0.1, **CLIP)),
    "lamb_multi_tensor": (Lamb, dict(lr=0.02, weight_decay=0.1, fused=False, **CLIP)),
    "lars_paper_multi_tensor": (Lars, dict(lr=0.1, momentum=0.9, weight_decay=0.01, mode="paper", fused=False, **CLIP)),
    "lars_classic_multi_tensor": (
        Lars, dict(lr=0.5, momentum=0.9, weight_decay=0.01, mode="classic", trust_coefficient=0.02, fused=False, **CLIP)
    ),
    "lamb_nesterov_no_clip": (Lamb, dict(lr=0.02, weight_decay=0.1, nesterov="both")),
    "lamb_nonfinite_none": (Lamb, dict(lr=0.02, weight_decay=0.1, nonfinite="none")),
    "lamb_decay_first_bounds": (Lamb, dict(lr=0.02, weight_decay=0.1, decay_in_ratio=False, trust_clip=(0.5, 2.0))),
    "lars_classic_combined_lr_in_momentum": (
        Lars, dict(lr=0.5, momentum=0.9, weight_decay=0.01, mode="classic", trust_coefficient=0.02,
                   denominator="combined", lr_in_momentum=True)
    ),
    "lamb_decay_first_bounds_multi_tensor": (
        Lamb, dict(lr=0.02, weight_decay=0.1, decay_in_ratio=False, trust_clip=(0.5, 2.0), fused=False)
    ),
    "lamb_update_in_grad": (Lamb, dict(lr=0.02, weight_decay=0.1, nesterov="first", update_in_grad=True, **CLIP)),
    "lars_paper_nonfinite_none": (Lars, dict(lr=0.1, momentum=0.9, weight_decay=0.01, nonfinite="none")),
    "lamb_reference_path": (Lamb, dict(lr=0.02, weight_decay=0.1, foreach=False, **CLIP)),
    "lars_paper": (Lars, dict(lr=0.1, momentum=0.9, weight_decay=0.01, mode="paper", **CLIP)),
    "lars_classic": (Lars, dict(lr=0.5, momentum=0.9, weight_decay=0.01, mode="classic", trust_coefficient=0.02, **CLIP)),
    # the control: per-tensor norms of the local shards only (totals still reduced): must differ
    "lamb_local_norms": (Lamb, dict(lr=0.02, weight_decay=0.1, norm_reducer=zero_norm_reducer(), **CLIP)),
}


def shard(model, mesh):
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def run_case(cls, kwargs, mesh, info, x, y):
    rows = shard_indices(torch.arange(GLOBAL_BATCH), info.rank, info.world_size)
    model, ref = shard(make_model(), mesh), make_model()
    opt = cls(param_groups(model, kwargs["weight_decay"], exclude_from_adaptation="none"), **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "norm_reducer"}
    ref_opt = cls(param_groups(ref, kwargs["weight_decay"], exclude_from_adaptation="none"), **ref_kwargs)
    comms = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss_fn(model, x[rows], y[rows]).backward()
        with CommDebugMode() as counter:
            opt.step()
        comms.append(counter.get_total_counts())
        ref_opt.zero_grad()
        loss_fn(ref, x, y).backward()
        ref_opt.step()
    params, ref_params = list(model.parameters()), list(ref.parameters())
    return {
        "param_diff": max_abs_diff(params, ref_params),
        "state_diff": state_diff(opt, params, ref_opt, ref_params),
        "grad_diff": max_abs_diff([p.grad for p in params], [q.grad for q in ref_params]),
        "comms_per_step": comms,
        "n_tensors": len(params),
        "n_groups": len(opt.param_groups),
        "reducer": type(opt.norm_reducer).__name__,
        "path": "reference" if opt.foreach is False else "fused" if opt._use_fused([p.to_local() for p in params]) else "multi_tensor",
        "local_shapes": _gather_shapes(params),
        "first_grad_norm": None if ref_opt.last_grad_norm is None else float(ref_opt.last_grad_norm),
    }, model, opt


def bf16_case(mesh):
    """bfloat16 parameters with float32 master weights (DTensor state). Both sides get the same
    bfloat16 gradients, so the only difference left is float32 rounding in the norms."""
    from torch.distributed.tensor import distribute_tensor

    model, ref = shard(make_model().bfloat16(), mesh), make_model().bfloat16()
    opt = Lamb(param_groups(model, 0.1, exclude_from_adaptation="none"), lr=0.02, weight_decay=0.1, **CLIP)
    ref_opt = Lamb(param_groups(ref, 0.1, exclude_from_adaptation="none"), lr=0.02, weight_decay=0.1, **CLIP)
    gen = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        for p, q in zip(model.parameters(), ref.parameters()):
            g = torch.randn(q.shape, generator=gen, dtype=torch.float64).bfloat16()
            q.grad = g
            p.grad = distribute_tensor(g, mesh, p.placements)
        opt.step()
        ref_opt.step()
    params, ref_params = list(model.parameters()), list(ref.parameters())
    masters = [opt.state[p]["master"] for p in params]
    return {
        "param_diff": max_abs_diff(params, ref_params),
        "master_diff": max_abs_diff(masters, [ref_opt.state[q]["master"] for q in ref_params]),
        "state_diff": state_diff(opt, params, ref_opt, ref_params),
        "master_type": type(masters[0]).__name__,
        "param_dtype": str(params[0].dtype),
    }


def _gather_shapes(params):
    """Every rank's local shard shapes (to show the uneven and empty shards the test covers)."""
    import torch.distributed as dist

    mine = [list(p.to_local().shape) for p in params]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def checkpoint_case(mesh, info, x, y):
    """opt.state_dict() (DTensor state) and DCP's full state dict both resume exactly."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

    rows = shard_indices(torch.arange(GLOBAL_BATCH), info.rank, info.world_size)

    def fresh():
        m = shard(make_model(), mesh)
        return m, Lamb(param_groups(m, 0.1, exclude_from_adaptation="none"), lr=0.02, weight_decay=0.1, **CLIP)

    def train(m, o, steps):
        for _ in range(steps):
            o.zero_grad()
            loss_fn(m, x[rows], y[rows]).backward()
            o.step()

    model, opt = fresh()
    train(model, opt, 3)
    sd = roundtrip(opt.state_dict())
    state_types = sorted({f"{k}:{type(v).__name__}" for s in sd["state"].values() for k, v in s.items()})
    full_sd = roundtrip(get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True)))
    full_types = sorted({f"{k}:{type(v).__name__}" for s in full_sd["state"].values() for k, v in s.items()})

    resumed = []
    for how in ("load_state_dict", "dcp_full"):
        m2, o2 = fresh()
        m2.load_state_dict(roundtrip(model.state_dict()))
        if how == "load_state_dict":
            o2.load_state_dict(sd)
        else:
            set_optimizer_state_dict(m2, o2, optim_state_dict=full_sd, options=StateDictOptions(full_state_dict=True))
        resumed.append((m2, o2))
    train(model, opt, 2)
    out = {"state_types": state_types, "full_state_types": full_types}
    for how, (m2, o2) in zip(("load_state_dict", "dcp_full"), resumed):
        train(m2, o2, 2)
        p1, p2 = list(model.parameters()), list(m2.parameters())
        out[how] = {
            "param_diff": max(float((full(a) - full(b)).abs().max()) for a, b in zip(p1, p2)),
            "state_diff": state_diff(o2, p2, opt, p1),
        }
    return out


def error_cases(mesh):
    """Layouts the automatic reducer refuses, with their messages."""
    sharded = shard(make_model(), mesh)
    plain = torch.nn.Linear(2, 2).double()
    out = {}
    for name, params in {"mixed_dtensor_and_plain": [*sharded.parameters(), *plain.parameters()]}.items():
        try:
            Lamb(params)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def main():
    info = init_from_env()
    mesh = init_device_mesh("cpu", (info.world_size,))
    x, y = make_data()
    results = {}
    for name, (cls, kwargs) in CASES.items():
        results[name], _, _ = run_case(cls, kwargs, mesh, info, x, y)
    # HSDP placements (Replicate, Shard): the reducer sums over the shard dimension's group only
    hsdp_mesh = init_device_mesh("cpu", (1, info.world_size), mesh_dim_names=("replicate", "shard"))
    results["lamb_hsdp_mesh"], model, _ = run_case(Lamb, CASES["lamb"][1], hsdp_mesh, info, x, y)
    results["lamb_hsdp_mesh"]["placements"] = str(next(model.parameters()).placements)
    results["lamb_bf16_master_weights"] = bf16_case(mesh)
    results["checkpoint"] = checkpoint_case(mesh, info, x, y)
    results["errors"] = error_cases(mesh)
    if info.is_main:
        write_json(out_path(), results)
    leave()


if __name__ == "__main__":
    main()
