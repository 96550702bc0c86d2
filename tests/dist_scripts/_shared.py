"""Model, data and comparisons shared by the distributed worker scripts (run under torchrun)."""

from __future__ import annotations

import io
import json
import sys

import torch
from torch import nn

GLOBAL_BATCH = 16
STEPS = 5


def make_model(seed: int = 0) -> nn.Sequential:
    """Float64 MLP with a dim-0 size of 9 and 5 (uneven over 2 ranks) and 1 (one rank holds nothing)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 9), nn.Tanh(), nn.LayerNorm(9), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 1)
    ).double()


def make_data(seed: int = 1, n: int = GLOBAL_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, y


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def full(t):
    """The whole logical tensor of a DTensor (a collective), the tensor itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def max_abs_diff(xs, ys) -> float:
    return max(float((full(x).detach() - y.detach()).abs().max()) for x, y in zip(xs, ys))


def state_diff(opt, params, ref_opt, ref_params) -> float:
    worst = 0.0
    for p, q in zip(params, ref_params):
        s, r = opt.state[p], ref_opt.state[q]
        if set(s) != set(r):
            raise AssertionError(f"state keys differ: {sorted(s)} vs {sorted(r)}")
        for k in s:
            worst = max(worst, float((full(s[k]).double() - full(r[k]).double()).abs().max()))
    return worst


def roundtrip(obj):
    """``obj`` written and read back as a checkpoint file would be (no aliasing of live tensors)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


def out_path() -> str:
    if len(sys.argv) != 3 or sys.argv[1] != "--out":
        raise SystemExit(f"usage: torchrun ... {sys.argv[0]} --out RESULT.json")
    return sys.argv[2]


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def leave() -> None:
    """Meet the other ranks, then destroy the process group: a rank tearing gloo down while another
    still works can abort ("terminate called without an active exception")."""
    from largebatch.distributed import barrier, cleanup

    barrier()
    cleanup()
