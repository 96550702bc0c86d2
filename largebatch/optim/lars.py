"""LARS in two forms: the paper's Algorithm 1 ("paper") and You et al. 2017's local-LR LARS ("classic").

Same four layers as :mod:`largebatch.optim.lamb`: the :class:`Lars` class, the functional
:func:`lars`, the single-tensor reference and the multi-tensor path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from largebatch.optim._common import (
    SquaredSumReducer,
    check_choice,
    check_nonneg,
    check_phi,
    compute_dtype,
    run,
    trust_ratio,
    unscale_grads_,
    with_layer_norms,
)
from largebatch.optim._fused import fused_lars
from largebatch.optim._layerwise import LayerwiseOptimizer

__all__ = ["Lars", "lars", "LARS_MODES", "LARS_DENOMINATORS"]

LARS_MODES = ("paper", "classic")
LARS_DENOMINATORS = ("sum", "combined")
# trust_coefficient / eps left as None take the value of the group's own mode.
MODE_DEFAULTS = {"paper": dict(trust_coefficient=1.0, eps=0.0), "classic": dict(trust_coefficient=1e-3, eps=1e-8)}
# options of "classic" mode only: a "paper" group does not inherit them from the constructor.
CLASSIC_ONLY = dict(denominator="sum", lr_in_momentum=False)


class Lars(LayerwiseOptimizer):
    r"""LARS: momentum with a per-tensor (layer-wise) learning rate.

    ``mode="paper"`` is Algorithm 1 of You et al. 2020 (momentum of the decayed gradient, then the
    momentum is normalised per tensor)::

        d_t = g_t + weight_decay * x_t
        m_t = momentum * m_{t-1} + (1 - momentum) * d_t
        n_t = m_t, or momentum * m_t + (1 - momentum) * d_t        (nesterov=True)
        x_{t+1} = x_t - lr * ratio * n_t,  ratio = trust_coefficient * phi(||x_t||) / (||n_t|| + eps)

    ``mode="classic"`` is LARS as in You et al. 2017 and most libraries (timm, LARC): the gradient
    is scaled by a local learning rate and momentum is applied after::

        local_lr = trust_coefficient * ||x_t|| / (||g_t|| + weight_decay * ||x_t|| + eps)
        local_lr = min(local_lr / lr, 1)                               (clip=True, LARC)
        d_t = (g_t + weight_decay * x_t) * local_lr
        b_t = momentum * b_{t-1} + d_t                                  (torch.optim.SGD's buffer)
        x_{t+1} = x_t - lr * (b_t, or d_t + momentum * b_t with nesterov=True)

    In both modes the ratio (local lr) is 1 when ``||x||`` or the other norm is 0 (with
    ``clip=True`` in "classic" mode that 1 is then clipped like any local lr, to ``min(1 / lr, 1)``,
    as timm does; apex's LARC leaves such a layer unscaled), and when the group has ``adapt=False`` (then "classic" is SGD with momentum and "paper" is SGD with momentum
    dampening ``1 - momentum``). In "paper" mode ``clip=True`` caps the ratio at 1.

    Two conventions of "classic" LARS differ between implementations and are options:

    * ``denominator``: "sum" is ``||g|| + weight_decay * ||x||`` as above (You et al. 2017, LARC,
      timm, TensorFlow's TPU LARS); "combined" is ``||g + weight_decay * x||`` (optax ``lars``,
      SimCLR's LARS).
    * ``lr_in_momentum``: False keeps torch SGD's buffer of unscaled steps, ``x -= lr * b``; True
      puts the learning rate inside the buffer, ``b = momentum * b + lr * d``, ``x -= b`` (or
      ``x -= lr * d + momentum * b`` with nesterov), as TensorFlow's TPU LARS, SimCLR's and optax's
      do. The two differ only when the learning rate changes between steps.

    Args:
        params: parameters or parameter groups (see :func:`largebatch.param_groups`).
        lr: learning rate (>= 0).
        momentum: beta1 in [0, 1).
        weight_decay: lambda (>= 0), added to the gradient (inside the norm) in both modes.
        trust_coefficient: eta of You et al. 2017. Default (None): by each group's mode, 1.0 in
            "paper" mode (Algorithm 1 has none) and 0.001 in "classic" mode (timm, LARC, NVIDIA's
            LARS); a parameter group with its own ``mode`` gets its own mode's default.
        eps: added to the denominator of the ratio. Default (None): by each group's mode, 0.0 in
            "paper" mode, 1e-8 in "classic".
        nesterov: Nesterov momentum (see the equations above).
        mode: "paper" or "classic".
        clip: LARC clipping (classic) or ratio <= 1 (paper).
        denominator: "sum" (default) or "combined": what the "classic" ratio divides by.
        lr_in_momentum: "classic" only: the learning rate multiplies each step before the momentum
            buffer (TensorFlow, SimCLR, optax) instead of the buffer (torch.optim.SGD, timm).
        phi: None, or (gamma_l, gamma_u) for the clipped phi of the paper ("paper" mode only).
        adapt: per-group switch of the layer-wise ratio.
        max_grad_norm, clip_eps, nonfinite, foreach, fused, master_weights, norm_reducer: as in
            :class:`largebatch.Lamb`.

    References: Y. You, I. Gitman, B. Ginsburg, "Large Batch Training of Convolutional Networks",
    2017, https://arxiv.org/abs/1708.03888; Y. You et al., ICLR 2020, https://arxiv.org/abs/1904.00962
    """

    def __init__(
        self,
        params,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float | None = None,
        eps: float | None = None,
        nesterov: bool = False,
        mode: str = "paper",
        clip: bool = False,
        *,
        denominator: str = "sum",
        lr_in_momentum: bool = False,
        phi: tuple[float, float] | None = None,
        adapt: bool = True,
        max_grad_norm: float | None = None,
        clip_eps: float = 1e-6,
        nonfinite: str = "skip",
        foreach: bool | None = None,
        fused: bool | None = None,
        master_weights: bool = True,
        norm_reducer: SquaredSumReducer | None = None,
    ) -> None:
        check_choice("mode", mode, LARS_MODES)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            nesterov=nesterov,
            mode=mode,
            clip=clip,
            denominator=denominator,
            lr_in_momentum=lr_in_momentum,
            phi=phi,
            adapt=adapt,
        )
        super().__init__(
            params,
            defaults,
            max_grad_norm=max_grad_norm,
            clip_eps=clip_eps,
            nonfinite=nonfinite,
            foreach=foreach,
            fused=fused,
            master_weights=master_weights,
            norm_reducer=norm_reducer,
        )

    @staticmethod
    def _resolve_group(group: dict, defaults: dict) -> dict:
        """trust_coefficient and eps left as None take the defaults of the group's own mode, and a
        "paper" group does not inherit the constructor's classic-only options."""
        mode = group.get("mode", defaults["mode"])
        if mode not in LARS_MODES:
            return group  # _check_group names the bad mode
        filled = dict(group)
        for key, value in MODE_DEFAULTS[mode].items():
            if filled.get(key, defaults[key]) is None:
                filled[key] = value
        if mode == "paper":
            for key, value in CLASSIC_ONLY.items():
                filled.setdefault(key, value)
        return filled

    @staticmethod
    def _check_group(group: dict) -> None:
        check_choice("mode", group["mode"], LARS_MODES)  # first: eps and trust_coefficient default by mode
        check_nonneg("learning rate", group["lr"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_nonneg("epsilon", group["eps"])
        check_nonneg("trust_coefficient", group["trust_coefficient"])
        m = group["momentum"]
        if not isinstance(m, (int, float)) or isinstance(m, bool) or not 0.0 <= m < 1.0:
            raise ValueError(f"Invalid momentum value: {m!r}; it must be in [0, 1)")
        check_phi(group["phi"])
        if group["phi"] is not None and group["mode"] != "paper":
            raise ValueError(f"Invalid phi: {group['phi']!r} with mode='classic'; phi bounds exist only in mode='paper'")
        check_choice("denominator", group["denominator"], LARS_DENOMINATORS)
        for flag in ("nesterov", "clip", "adapt", "lr_in_momentum"):
            if not isinstance(group[flag], bool):
                raise ValueError(f"Invalid {flag}: {group[flag]!r}; it must be True or False")
        if group["mode"] == "paper":
            wrong = [f"{k}={group[k]!r}" for k, v in CLASSIC_ONLY.items() if group[k] != v]
            if wrong:
                raise ValueError(
                    f"Invalid {' and '.join(wrong)} with mode='paper'; "
                    f"{'it exists' if len(wrong) == 1 else 'they exist'} only in mode='classic' "
                    "(paper mode normalises the momentum)"
                )

    _STATE_KEYS = ("momentum_buffer",)

    def _init_state(self, p: Tensor, state: dict) -> None:
        state["momentum_buffer"] = torch.zeros_like(p, dtype=compute_dtype(p), memory_format=torch.preserve_format)

    def _update(self, group, xs, grads, states, ok, grad_scale, unscale, use_foreach):
        impl = _lars_impl(fused=self._use_fused(xs), foreach=use_foreach)
        return impl(  # a result, or a Pending request: the base class runs all groups together
            xs,
            grads,
            [s["momentum_buffer"] for s in states],
            lr=group["lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            trust_coefficient=group["trust_coefficient"],
            eps=group["eps"],
            nesterov=group["nesterov"],
            mode=group["mode"],
            clip=group["clip"],
            denominator=group["denominator"],
            lr_in_momentum=group["lr_in_momentum"],
            phi=group["phi"],
            adapt=group["adapt"],
            ok=ok,
            grad_scale=grad_scale,
            unscale=unscale,
            reduce=self.norm_reducer,
        )


def lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    mode: str,
    clip: bool,
    denominator: str = "sum",
    lr_in_momentum: bool = False,
    phi: tuple[float, float] | None = None,
    adapt: bool = True,
    ok: Tensor | None = None,
    grad_scale: Tensor | None = None,
    unscale: Tensor | None = None,
    reduce: SquaredSumReducer | None = None,
    foreach: bool = True,
    fused: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Functional LARS step, in place. Returns (weight norms, direction norms, ratios) per tensor.

    The "direction norm" is ||n_t|| in "paper" mode and, in "classic" mode, ||g_t|| (||g_t +
    weight_decay * x_t|| with denominator="combined"). ``ok``, ``grad_scale``, ``unscale`` and
    ``reduce`` are as in :func:`largebatch.optim.lamb.lamb`.
    """
    return run(
        _lars_impl(fused=fused, foreach=foreach)(
            params, grads, momentum_buffers, lr=lr, momentum=momentum, weight_decay=weight_decay,
            trust_coefficient=trust_coefficient, eps=eps, nesterov=nesterov, mode=mode, clip=clip,
            denominator=denominator, lr_in_momentum=lr_in_momentum, phi=phi, adapt=adapt, ok=ok, grad_scale=grad_scale,
            unscale=unscale, reduce=reduce,
        )
    )  # fmt: skip


def _lars_impl(*, fused: bool, foreach: bool):
    """The implementation (returning a result or a Pending request, as largebatch.optim.lamb._lamb_impl)."""
    return fused_lars if fused else _multi_tensor_lars if foreach else _single_tensor_lars


def _classic_ratio(w_norm, g_norm, *, lr, weight_decay, trust_coefficient, eps, clip, adapt, denominator):
    """The classic local lr from ||x|| and the measured norm (||g||, or ||g + wd x|| when "combined")."""
    if not adapt:
        return torch.ones_like(w_norm)
    extra = weight_decay * w_norm + eps if denominator == "sum" else eps
    ratio = trust_ratio(w_norm, g_norm, coefficient=trust_coefficient, denominator_extra=extra)
    if clip:
        ratio = (ratio / lr).clamp(max=1.0) if lr > 0 else torch.ones_like(ratio)
    return ratio


def _single_tensor_lars(
    params, grads, momentum_buffers, *, lr, momentum, weight_decay, trust_coefficient, eps,
    nesterov, mode, clip, denominator, lr_in_momentum, phi, adapt, ok, grad_scale, reduce, unscale=None,
):  # fmt: skip
    """The reference, one tensor at a time: what each mode measures for every tensor, the norms of
    every tensor (one request when sharded), then each tensor's update."""
    unscale_grads_(grads, unscale)
    n = len(params)
    if n == 0 or (ok is not None and not bool(ok)):  # skip (the reference may sync)
        zero = torch.zeros(n)
        return zero, zero, torch.ones(n)
    gs, measured = [], []
    for x, grad, buf in zip(params, grads, momentum_buffers):
        g = grad.to(x.dtype)
        if grad_scale is not None:
            g = g * grad_scale.to(x.dtype)
        gs.append(g)
        if mode == "paper":  # the ratio measures the momentum direction n_t
            d = torch.add(g, x, alpha=weight_decay) if weight_decay != 0 else g
            buf.mul_(momentum).add_(d * (1 - momentum))
            measured.append(buf * momentum + d * (1 - momentum) if nesterov else buf)
        elif denominator == "combined":  # "classic": the ratio measures the decayed gradient
            measured.append(torch.add(g, x, alpha=weight_decay) if weight_decay != 0 else g)
        else:  # "classic": the ratio measures the gradient
            measured.append(g)

    def apply(w_norms: Tensor, d_norms: Tensor):
        ratios = []
        for x, g, buf, direction, w_norm, d_norm in zip(params, gs, momentum_buffers, measured, w_norms, d_norms):
            if mode == "paper":
                if adapt:
                    ratio = trust_ratio(
                        w_norm, d_norm, phi=phi, trust_clip=clip, coefficient=trust_coefficient, denominator_extra=eps
                    )
                else:
                    ratio = torch.ones_like(w_norm)
                x.add_(direction * (-lr * ratio))
            else:
                ratio = _classic_ratio(
                    w_norm, d_norm, lr=lr, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                    eps=eps, clip=clip, adapt=adapt, denominator=denominator,
                )  # fmt: skip
                d = torch.add(g, x, alpha=weight_decay) if weight_decay != 0 else g
                d = d * ratio
                if lr_in_momentum:  # the buffer holds lr-scaled steps (TensorFlow, optax)
                    d = d * lr
                buf.mul_(momentum).add_(d)
                step = d + buf * momentum if nesterov else buf
                x.add_(-step if lr_in_momentum else step * -lr)
            ratios.append(ratio)
        return w_norms, d_norms, torch.stack(ratios)

    return with_layer_norms(params, measured, reduce, apply)


def _multi_tensor_lars(
    params, grads, momentum_buffers, *, lr, momentum, weight_decay, trust_coefficient, eps,
    nesterov, mode, clip, denominator, lr_in_momentum, phi, adapt, ok, grad_scale, reduce, unscale=None,
):  # fmt: skip
    """The same math on ``torch._foreach_*``; skipping is arithmetic (see _multi_tensor_lamb)."""
    unscale_grads_(grads, unscale)
    if not params:
        return torch.zeros(0), torch.zeros(0), torch.zeros(0)
    dt = params[0].dtype
    device = params[0].device
    g = [gr if gr.dtype == dt else gr.to(dt) for gr in grads]
    one = torch.ones((), dtype=dt, device=device)
    if ok is not None:
        g = [torch.where(ok, gi, torch.zeros((), dtype=dt, device=device)) for gi in g]
        okf = ok.to(dt)
    if grad_scale is not None:
        g = torch._foreach_mul(g, grad_scale.to(dt))

    # momentum factor that becomes 1 (keep the buffer) when the step is skipped
    mom = momentum if ok is None else torch.where(ok, momentum * one, one)

    def move(direction: list[Tensor], scale: Tensor) -> None:
        if ok is not None:
            scale = scale * okf
        torch._foreach_mul_(direction, scale.unbind())
        torch._foreach_add_(params, direction)

    if mode == "paper":
        d = torch._foreach_add(g, params, alpha=weight_decay) if weight_decay != 0 else g
        torch._foreach_mul_(momentum_buffers, mom)
        # the new term vanishes when the step is skipped
        torch._foreach_add_(momentum_buffers, torch._foreach_mul(d, 1 - momentum if ok is None else (1 - momentum) * okf))
        if nesterov:
            direction = torch._foreach_mul(momentum_buffers, momentum)
            torch._foreach_add_(direction, torch._foreach_mul(d, 1 - momentum))
        else:
            direction = [b.clone() for b in momentum_buffers]

        def apply_paper(w_norm: Tensor, d_norm: Tensor):
            if adapt:
                ratio = trust_ratio(
                    w_norm, d_norm, phi=phi, trust_clip=clip, coefficient=trust_coefficient, denominator_extra=eps
                )
            else:
                ratio = torch.ones_like(w_norm)
            move(direction, -lr * ratio)
            return w_norm, d_norm, ratio

        return with_layer_norms(params, direction, reduce, apply_paper)

    def apply_classic(w_norm: Tensor, g_norm: Tensor):
        ratio = _classic_ratio(
            w_norm, g_norm, lr=lr, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
            eps=eps, clip=clip, adapt=adapt, denominator=denominator,
        )  # fmt: skip
        d = torch._foreach_add(g, params, alpha=weight_decay) if weight_decay != 0 else [gi.clone() for gi in g]
        torch._foreach_mul_(d, (ratio if ok is None else ratio * okf).unbind())
        if lr_in_momentum:  # the buffer holds lr-scaled steps (TensorFlow, optax)
            torch._foreach_mul_(d, lr)
        torch._foreach_mul_(momentum_buffers, mom)
        torch._foreach_add_(momentum_buffers, d)
        if nesterov:
            direction = d
            torch._foreach_add_(direction, torch._foreach_mul(momentum_buffers, momentum))
        else:
            direction = [b.clone() for b in momentum_buffers]
        move(direction, torch.full_like(ratio, -1.0 if lr_in_momentum else -lr))
        return w_norm, g_norm, ratio

    if denominator == "combined":  # the ratio measures the decayed gradient
        measured = torch._foreach_add(g, params, alpha=weight_decay) if weight_decay != 0 else g
        return with_layer_norms(params, measured, reduce, apply_classic)
    return with_layer_norms(params, g, reduce, apply_classic)
