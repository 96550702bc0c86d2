"""Optimizer-step time and collectives per step of Lamb on FSDP2-sharded parameters.

Claim: running the step on the local shards with ONE all-reduce of the squared sums of every tensor
of every parameter group per step is exact and faster than DTensor ops and than a per-tensor
reduction (one collective per tensor).

Run (2 gloo processes on CPU):
    torchrun --standalone --nproc-per-node 2 benchmarks/sharded_norms.py --hidden 128 --layers 12
Prints a markdown table; rank 0 also writes it with the config to --out when given.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode

from largebatch import Lamb, param_groups
from largebatch.distributed import cleanup, init_from_env
from largebatch.optim._fused import fused_available
from largebatch.optim.lamb import lamb as lamb_functional


def transformer_like(hidden: int, layers: int, vocab: int) -> nn.Module:
    """A BERT-shaped parameter set: per layer q, k, v, o, two MLP matrices, their biases, two LayerNorms."""
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(hidden, hidden) for _ in range(4)]
        blocks += [nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden), nn.LayerNorm(hidden), nn.LayerNorm(hidden)]
    return nn.Sequential(nn.Embedding(vocab, hidden), *blocks, nn.LayerNorm(hidden))


def sharded_model(args, mesh) -> nn.Module:
    torch.manual_seed(0)
    model = transformer_like(args.hidden, args.layers, args.vocab)
    for m in model:
        fully_shard(m, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def set_grads(model) -> None:
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2


class DTensorLamb(Lamb):
    """The naive path: the same multi-tensor LAMB run on the DTensors themselves (DTensor ops:
    every norm is a DTensor reduction with its own collective), as torch.optim does under FSDP2."""

    def _group_updates(self, group, params, grads, states, ok, grad_scale):
        beta1, beta2 = group["betas"]
        norms = lamb_functional(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], adapt=group["adapt"], foreach=True,
        )  # fmt: skip
        return [(params, params, params, norms)]


class PerTensorReducer:
    """One all-reduce per tensor (two squared sums each): the per-tensor reduction of a step that
    otherwise runs the same multi-tensor code on local shards."""

    def __call__(self, sq):
        n = sq.numel() // 2
        out = sq.clone()
        for i in range(n):
            pair = torch.stack([sq[i], sq[n + i]])
            dist.all_reduce(pair)
            out[i], out[n + i] = pair[0], pair[1]
        return out


COMMON = dict(lr=1e-3, weight_decay=0.01, nonfinite="none")
# The first three and the DTensor path run the same multi-tensor (foreach) LAMB and differ only in
# how the norms are made whole; the last row adds the fused kernel where the machine has one.
PATHS = {
    "batched (largebatch, 1 all-reduce per step)": lambda groups: Lamb(groups, fused=False, **COMMON),
    "multi-tensor, 1 all-reduce per tensor": lambda groups: Lamb(groups, fused=False, norm_reducer=PerTensorReducer(), **COMMON),
    "local norms only (no reduction: wrong, the floor)": lambda groups: Lamb(
        groups, fused=False, norm_reducer=lambda sq: sq, **COMMON
    ),
    "single-tensor reference (foreach=False)": lambda groups: Lamb(groups, foreach=False, **COMMON),
    "plain DTensor ops": lambda groups: DTensorLamb(groups, fused=False, **COMMON),
    "batched, fused=None (fused kernel where available)": lambda groups: Lamb(groups, **COMMON),
}


def setup_path(make_opt, args, mesh):
    model = sharded_model(args, mesh)
    opt = make_opt(param_groups(model, 0.01))
    set_grads(model)
    for _ in range(args.warmup):
        opt.step()
    with CommDebugMode() as counter:
        opt.step()
    return model, opt, counter.get_total_counts()


def timed_step(opt) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    opt.step()
    dist.barrier()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    info = init_from_env()
    mesh = init_device_mesh("cpu", (info.world_size,))
    setups = {name: setup_path(make_opt, args, mesh) for name, make_opt in PATHS.items()}
    times = {name: [] for name in PATHS}
    for _ in range(args.steps):  # the paths take turns, so that drift in machine load hits all alike
        for name, (_, opt, _) in setups.items():
            times[name].append(timed_step(opt))
    rows = [(name, min(times[name]) * 1e3, statistics.median(times[name]) * 1e3, comms) for name, (_, _, comms) in setups.items()]
    finals = [[p.detach().full_tensor() for p in model.parameters()] for model, _, _ in setups.values()]
    some_opt = next(iter(setups.values()))[1]
    n_tensors, n_groups = sum(len(g["params"]) for g in some_opt.param_groups), len(some_opt.param_groups)
    n_params = sum(p.numel() for p in finals[0])
    exact = [f for (name, *_), f in zip(rows, finals) if "wrong" not in name]
    agree = max(float((a - b).abs().max()) for f in exact[1:] for a, b in zip(exact[0], f))
    base_min, base_median = rows[0][1], rows[0][2]
    lines = [
        f"{n_params / 1e6:.2f}M params in {n_tensors} tensors, {n_groups} groups, {info.world_size} gloo ranks, float32, "
        f"{args.steps} interleaved steps after {args.warmup + 1} warm-up",
        "",
        "| path | collectives / step | step min, ms | x batched | step median, ms | x batched |",
        "|---|---|---|---|---|---|",
        *(f"| {name} | {comms} | {lo:.1f} | {lo / base_min:.2f} | {med:.1f} | {med / base_median:.2f} |" for name, lo, med, comms in rows),
        "",
        f"fused kernel used in the last row: {fused_available([p.to_local() for p in some_opt.param_groups[0]['params']])}",
        f"max |difference| of the parameters between the exact paths after {args.warmup + 1 + args.steps} steps: {agree:.2e}",
    ]
    if info.is_main:
        print("\n".join(lines))
        if args.out:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
            env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(), "commit": commit}
            with open(args.out, "w") as f:
                json.dump({"config": vars(args), "env": env, "rows": rows, "max_abs_diff": agree, "table": lines}, f, indent=1)
    cleanup()


if __name__ == "__main__":
    main()
