"""Pieces shared by the layer-wise optimizers: validation, the trust ratio, norms, non-finite checks.

Everything here works on tensors and never reads a value back to the host, so the optimizers that
use it run under ``torch.compile`` and on accelerators without a synchronisation per step.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from largebatch.optim._fused import fused_all_finite, unscale_grads_, wide_dtype

NONFINITE_POLICIES = ("skip", "raise", "none")
NESTEROV_MODES = (None, "first", "both")

# A reducer receives a 1-d float tensor of *local* squared sums (one entry per logical tensor, or
# several such vectors concatenated) and returns the global sums. The identity when nothing is
# sharded; an all-reduce over the shard group under FSDP/ZeRO (see largebatch.distributed).
# Sums over all tensors of the optimizer (global grad norm, non-finite flags) go through the
# reducer's ``reduce_totals`` attribute when it has one (ZeRO-1: per-tensor sums are already
# global, totals are not), else through the reducer itself.
SquaredSumReducer = Callable[[Tensor], Tensor]


def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters), without importing it."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The shard of a DTensor held by this rank (updates to it write through); ``t`` otherwise."""
    return t.to_local() if is_dtensor(t) else t


def check_nonneg(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name} value: {value!r}; it must be a finite number >= 0")


def check_betas(betas: Sequence[float]) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}; it must be a pair (beta1, beta2) with 0 <= beta < 1")
    for i, b in enumerate(betas):
        if not isinstance(b, (int, float)) or isinstance(b, bool) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b!r}; it must be in [0, 1)")


def _check_bounds(option: str, pair, lo_name: str, hi_name: str, allowed: str) -> None:
    """``pair`` is two numbers with 0 <= lo < hi; else a ValueError naming ``option`` and what is allowed."""
    ok = isinstance(pair, (tuple, list)) and len(pair) == 2
    if not ok or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in pair):
        raise ValueError(f"Invalid {option}: {pair!r}; it must be {allowed}")
    lo, hi = pair
    if not (0 <= lo < hi):
        raise ValueError(
            f"Invalid {option} bounds: ({lo_name}={lo!r}, {hi_name}={hi!r}); they must satisfy 0 <= {lo_name} < {hi_name}"
        )


def check_phi(phi: tuple[float, float] | None) -> None:
    if phi is not None:
        _check_bounds("phi", phi, "gamma_l", "gamma_u", "None (identity) or a pair (gamma_l, gamma_u)")


def check_trust_clip(trust_clip) -> None:
    if not isinstance(trust_clip, bool):
        _check_bounds(
            "trust_clip", trust_clip, "lo", "hi", "True (ratio capped at 1), False, or a pair (lo, hi) that bounds the ratio"
        )


def clip_bounds(trust_clip: bool | tuple[float, float]) -> tuple[float, float] | None:
    """The (lo, hi) bounds of the trust ratio: True means (0, 1) (LAMBC), False None."""
    if trust_clip is True:
        return (0.0, 1.0)
    if trust_clip is False:
        return None
    lo, hi = trust_clip
    return (float(lo), float(hi))


def check_choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r}; allowed values are {', '.join(repr(a) for a in allowed)}")


def check_max_grad_norm(value: float | None) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"Invalid max_grad_norm value: {value!r}; it must be None (no clipping) or a finite number > 0")


def check_grad(p: Tensor, name: str) -> None:
    if p.grad is not None and p.grad.is_sparse:
        raise RuntimeError(f"{name} does not support sparse gradients; use a dense gradient (e.g. nn.Embedding(sparse=False))")


def compute_dtype(p: Tensor) -> torch.dtype:
    """The dtype in which state is kept and arithmetic is done: float32 for 16-bit parameters."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def apply_phi(w_norm: Tensor, phi: tuple[float, float] | None) -> Tensor:
    """phi(z) = z, or the paper's clipped phi(z) = min(max(z, gamma_l), gamma_u)."""
    if phi is None:
        return w_norm
    return w_norm.clamp(min=phi[0], max=phi[1])


def trust_ratio(
    w_norm: Tensor,
    u_norm: Tensor,
    *,
    phi: tuple[float, float] | None = None,
    trust_clip: bool | tuple[float, float] = False,
    coefficient: float = 1.0,
    denominator_extra: Tensor | float = 0.0,
) -> Tensor:
    """``coefficient * phi(||w||) / (||u|| + denominator_extra)``, and 1 where either norm is 0.

    Works elementwise on tensors of norms (one entry per parameter tensor). The "either norm is 0"
    rule is applied to the raw norms, before phi, as every reference implementation does.
    ``trust_clip`` bounds the computed ratio: True caps it at 1 (LAMBC), a pair ``(lo, hi)`` clamps
    it to [lo, hi] (DeepSpeed's min_coeff/max_coeff); a ratio of 1 from a zero norm is not clamped.
    """
    denom = u_norm + denominator_extra
    ratio = coefficient * apply_phi(w_norm, phi) / torch.where(denom > 0, denom, torch.ones_like(denom))
    bounds = clip_bounds(trust_clip)
    if bounds is not None:
        ratio = ratio.clamp(min=bounds[0], max=bounds[1])
    return torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))


class Pending:
    """A step paused until the global squared sums ``reduce(sums)`` are known; ``then(global_sums)``
    continues it (returning its result, or another Pending). See :func:`run_together`."""

    __slots__ = ("reduce", "sums", "then")

    def __init__(self, reduce: SquaredSumReducer, sums: Tensor, then: Callable[[Tensor], object]) -> None:
        self.reduce, self.sums, self.then = reduce, sums, then


def with_global_sums(reduce: SquaredSumReducer | None, sums: Tensor, then: Callable[[Tensor], object]):
    """``then(sums)`` at once when nothing is sharded (``reduce`` None), else a :class:`Pending`."""
    return then(sums) if reduce is None else Pending(reduce, sums, then)


def with_layer_norms(xs: list[Tensor], us: list[Tensor], reduce: SquaredSumReducer | None, then: Callable):
    """``then(w_norms, u_norms)``: two 1-d tensors holding ||xs[i]|| and ||us[i]|| for each tensor i.

    With a ``reduce`` (sharded parameters) the local squared sums of all tensors make ONE request,
    answered with the global sums (one collective, shared with the other groups' requests by
    :func:`run_together`), and the norms are their square roots.
    The norms are computed in float64 (see :func:`largebatch.optim._fused.wide_dtype`) and returned
    in the tensors' dtype.
    """
    if not xs:
        return then(torch.zeros(0), torch.zeros(0))
    dt = functools.reduce(torch.promote_types, [x.dtype for x in xs])
    wide = wide_dtype(xs[0].device)
    w = torch.stack(torch._foreach_norm(xs, 2, dtype=wide))
    u = torch.stack(torch._foreach_norm(us, 2, dtype=wide))
    if reduce is None:
        return then(w.to(dt), u.to(dt))
    return Pending(reduce, torch.cat([w, u]).square(), lambda sq: then(*sq.sqrt().to(dt).chunk(2)))


def run(step):
    """The result of one step (a result, or a :class:`Pending` answered by its own reducer)."""
    return run_together([step])[0]


def run_together(steps: list) -> list:
    """Finish several steps (e.g. one per parameter group), answering their requests in rounds.

    Each round, the :class:`Pending` requests that share a reducer and a device are concatenated
    and answered by ONE call of that reducer (one collective for all of them), each step getting its
    own slice back in the dtype it asked in. Fast paths ask once per step, so a whole optimizer step
    costs one collective. Returns each step's result.
    """
    steps = list(steps)
    while True:
        batches: dict[tuple, list[int]] = {}
        for i, step in enumerate(steps):
            if isinstance(step, Pending):
                batches.setdefault((id(step.reduce), step.sums.device), []).append(i)
        if not batches:
            return steps
        for indices in batches.values():
            parts = [steps[i].sums for i in indices]
            total = steps[indices[0]].reduce(torch.cat(parts))  # cat promotes to the widest dtype asked for
            for i, part, got in zip(indices, parts, total.split([p.numel() for p in parts])):
                steps[i] = steps[i].then(got.to(part.dtype))


def all_finite(tensors: list[Tensor]) -> Tensor:
    """0-d bool tensor: every element of every tensor is finite (no host sync)."""
    tensors = [t for t in tensors if t.numel() > 0]  # the inf-norm of an empty tensor is undefined
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    fast = fused_all_finite(tensors)  # one pass at memory speed on CPU tensors; None elsewhere
    if fast is not None:
        return fast
    # the largest magnitude of each tensor, in a dtype that holds it (float64 values may exceed
    # float32's range); all of them finite, not their sum, which may overflow
    dt = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf"), dtype=dt))).all()


def global_grad_norm(grads: list[Tensor], reduce: SquaredSumReducer | None = None) -> Tensor:
    """The l2 norm of all gradients together, as a 0-d tensor (non-finite if any is).

    Accumulated in float64 when any gradient is float64, else in float32.
    """
    if not grads:
        return torch.zeros(())
    dt = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    # per-tensor norms computed in dt: 16-bit norms (8 mantissa bits for bf16) would lose ~0.1-0.4%
    sq = torch.stack(torch._foreach_norm(grads, 2, dtype=dt)).square().sum().reshape(1)
    if reduce is not None:
        sq = reduce(sq)
    return sq.sqrt().reshape(())


def clip_coefficient(total_norm: Tensor, max_norm: float, eps: float = 1e-6) -> Tensor:
    """min(1, max_norm / (total_norm + eps)): with eps = 1e-6 torch.nn.utils.clip_grad_norm_'s factor
    (and DeepSpeed's); with eps = 0 apex's, timm's and Keras's (1 also for a zero norm)."""
    return (max_norm / (total_norm + eps)).clamp(max=1.0)


class Telemetry:
    """Per-parameter weight norm, update norm and trust ratio of the last step, kept as tensors.

    Nothing is copied to the host until ``read()`` is called, so recording costs no sync.
    """

    def __init__(self) -> None:
        self._records: list[tuple[list[Tensor], Tensor, Tensor, Tensor]] = []

    def clear(self) -> None:
        self._records = []

    def record(self, params: list[Tensor], w_norm: Tensor, u_norm: Tensor, ratio: Tensor) -> None:
        self._records.append((list(params), w_norm.detach(), u_norm.detach(), ratio.detach()))

    def read(self) -> dict[Tensor, dict[str, float]]:
        """{parameter: {"weight_norm", "update_norm", "trust_ratio"}} for the last step (host sync)."""
        out: dict[Tensor, dict[str, float]] = {}
        for params, w, u, r in self._records:
            w, u, r = (t.double().cpu().tolist() for t in (w, u, r))
            for i, p in enumerate(params):
                out[p] = {"weight_norm": w[i], "update_norm": u[i], "trust_ratio": r[i]}
        return out
