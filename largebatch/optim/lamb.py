"""LAMB (You et al., ICLR 2020, Algorithm 2) and its Nesterov variants N-LAMB and NN-LAMB.

Layers: the :class:`Lamb` optimizer validates and gathers; :func:`lamb` is the functional entry
point that dispatches to ``_single_tensor_lamb`` (the readable reference, one tensor at a time) or
``_multi_tensor_lamb`` (the same math on ``torch._foreach_*`` with per-tensor scalars kept in
tensors, so no host sync and no graph break under ``torch.compile``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from largebatch.optim._common import (
    NESTEROV_MODES,
    SquaredSumReducer,
    check_betas,
    check_choice,
    check_nonneg,
    check_phi,
    check_trust_clip,
    compute_dtype,
    run,
    trust_ratio,
    unscale_grads_,
    with_layer_norms,
)
from largebatch.optim._fused import _decay_split, first_moment_factor, fused_lamb, wide_dtype
from largebatch.optim._layerwise import LayerwiseOptimizer

__all__ = ["Lamb", "lamb"]


class Lamb(LayerwiseOptimizer):
    r"""LAMB: Adam's direction, decoupled weight decay, then a per-tensor trust ratio.

    For each parameter tensor ``x`` (one "layer") with gradient ``g`` at step ``t`` (Algorithm 2)::

        m_t = beta1 * m_{t-1} + (1 - beta1) * g_t
        v_t = beta2 * v_{t-1} + (1 - beta2) * g_t**2
        m_hat = m_t / (1 - beta1**t),  v_hat = v_t / (1 - beta2**t)     (if bias_correction)
        r_t = m_hat / (sqrt(v_hat + eps_root) + eps)                     (eps_root: 0 by default)
        u_t = r_t + weight_decay * x_t                                   (decay inside the ratio)
        x_{t+1} = x_t - lr * ratio * u_t,  ratio = phi(||x_t||) / ||u_t||

    With ``decay_in_ratio=False`` the decay is applied first, as AdamW does, and the ratio sees the
    Adam direction alone (Keras 3's Lamb; pytorch_optimizer's ``weight_decouple=True``)::

        x'_t = x_t * (1 - lr * weight_decay)
        x_{t+1} = x'_t - lr * ratio * r_t,  ratio = phi(||x'_t||) / ||r_t||

    With ``eps = 0``, ``r_t`` is taken as 0 where its denominator is 0 (instead of 0/0 = NaN).

    ``ratio = 1`` when ``||x_t||`` or ``||u_t||`` is 0, or when the group has ``adapt=False``; with
    ``adapt=False`` everywhere Lamb is exactly ``torch.optim.AdamW``.

    Nesterov variants (the paper's appendix, in the simplified Nadam form with constant beta1;
    Dozat's original also schedules beta1, which is not done here)::

        nesterov="first" (N-LAMB):  m_hat = beta1 * m_t / (1 - beta1**(t+1)) + (1 - beta1) * g_t / (1 - beta1**t)
                                    v_hat = v_t / (1 - beta2**t)
        nesterov="both" (NN-LAMB):  m_hat as N-LAMB,
                                    v_hat = beta2 * v_t / (1 - beta2**(t+1)) + (1 - beta2) * g_t**2 / (1 - beta2**t)

    With ``bias_correction=False`` every ``1 - beta**k`` denominator above is replaced by 1. With
    ``grad_averaging=False`` every ``(1 - beta1) * g_t`` term above is ``g_t`` instead (apex, timm and
    pytorch_optimizer's ``grad_averaging`` flag); the bias correction stays ``1 - beta1**t``.
    Every per-tensor coefficient built from ``1 - beta**k`` is computed in float64 and rounded to
    the parameter dtype once (as torch's Adam does): in float32, ``1 - 0.999**t`` would lose five
    digits to cancellation.

    Args:
        params: parameters or parameter groups (see :func:`largebatch.param_groups`).
        lr: learning rate eta (>= 0).
        betas: (beta1, beta2), each in [0, 1).
        eps: added to sqrt(v_hat) (>= 0). Default 1e-6 (BERT practice).
        eps_root: added to v_hat inside the square root (>= 0; default 0): optax's ``eps_root``;
            ``eps=0, eps_root=e`` with ``bias_correction=False`` is DeepSpeed's ``eps_inside_sqrt``.
        weight_decay: decoupled weight decay lambda (>= 0), added to the direction before the ratio.
        decay_in_ratio: True (the paper, TF Addons, timm, apex, optax): lambda * x is part of the
            update whose norm the ratio divides by; False: x is first shrunk by (1 - lr * lambda) and
            the ratio uses the shrunk x and the Adam direction alone (Keras 3, pytorch_optimizer).
        bias_correction: divide the moments by (1 - beta**t). True as in TF Addons; the original
            TensorFlow/ALBERT code uses False.
        grad_averaging: True: m_t = beta1 * m_{t-1} + (1 - beta1) * g_t (the paper); False: m_t =
            beta1 * m_{t-1} + g_t (the non-default of apex FusedLAMB, timm and pytorch_optimizer).
        adapt: per-group switch of the trust ratio (False: ratio = 1, as for biases/norms in BERT).
        phi: None for phi(z) = z, or (gamma_l, gamma_u) for phi(z) = min(max(z, gamma_l), gamma_u).
        trust_clip: False; True caps the ratio at 1 ("LAMBC", timm's trust_clip); a pair (lo, hi)
            clamps it to [lo, hi] (DeepSpeed FusedLamb: min_coeff=0.01, max_coeff=10). The ratio of
            1 taken when a norm is 0 is not clamped.
        nesterov: None, "first" (N-LAMB) or "both" (NN-LAMB).
        update_in_grad: False (default): gradients are left as they are. True: a step that is taken
            writes each tensor's direction ``u`` (before the ratio and the learning rate; ``r`` with
            ``decay_in_ratio=False``) into its gradient, as apex's FusedLAMB does. The fused paths then
            read ``u`` back instead of recomputing it from the moments, saving a read per element
            (about 4% of a CPU step). Gradients must have the dtype of the tensors updated (not
            bfloat16/float16 gradients of float32 master weights). A skipped step leaves them as they were.
        max_grad_norm: if set, all gradients of the optimizer are scaled together by
            min(1, max_grad_norm / (||g||_2 + clip_eps)) before the moments (BERT practice: 1.0).
            The gradients themselves are not modified.
        clip_eps: the epsilon of that factor: 1e-6 (default) as torch.nn.utils.clip_grad_norm_ and
            DeepSpeed; 0 as apex FusedLAMB, timm and Keras.
        nonfinite: what a non-finite (inf/nan) gradient does. "skip" (default): that group's step
            is skipped, neither parameters nor state change, and ``skipped_steps`` counts it (with
            ``max_grad_norm`` the whole step is skipped, because the global norm is non-finite).
            "raise": FloatingPointError before any group changes (this policy reads a flag on the host
            every step).
            "none": no check (fastest; a non-finite gradient then corrupts the state). With
            ``max_grad_norm`` the global norm is computed anyway and is a check at no cost: a
            non-finite norm skips the whole step under every policy, counted in ``skipped_steps``.
        foreach: False selects the single-tensor reference path (and no fused backend); True or
            None (default) allow the multi-tensor path, which runs where the fused backend does not
            (``fused=False``, or tensors it cannot take).
        fused: None (default) uses the fused backend where it supports the tensors, else the
            multi-tensor path; True requires it; False never uses it.
        master_weights: keep a float32 copy of 16-bit parameters in the state and update that
            (saved in the state dict, so it survives checkpoints). Moments of 16-bit parameters
            are float32 in any case; float32/float64 parameters keep state in their own dtype.
        norm_reducer: callable summing squared norms over a shard group (see largebatch.distributed);
            None when parameters are not sharded (DTensor parameters imply theirs). It is called
            once per step for the norms of all groups together.

    With ``torch.amp.GradScaler``, ``scaler.step(opt)`` passes its scale and inf flag to the step,
    which unscales inside the update and skips an overflowing step (see
    ``LayerwiseOptimizer._amp_scaling``) instead of the scaler unscaling the gradients in place.

    After a step, ``telemetry.read()`` gives each parameter's weight norm ``||x||``, update norm
    ``||u||`` and trust ratio (kept as tensors until read, so recording costs no host sync).

    Reference: Y. You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes", ICLR 2020, https://arxiv.org/abs/1904.00962

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Lamb(model.parameters(), lr=1e-3, weight_decay=0.01)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        *,
        eps_root: float = 0.0,
        grad_averaging: bool = True,
        decay_in_ratio: bool = True,
        adapt: bool = True,
        phi: tuple[float, float] | None = None,
        trust_clip: bool | tuple[float, float] = False,
        nesterov: str | None = None,
        update_in_grad: bool = False,
        max_grad_norm: float | None = None,
        clip_eps: float = 1e-6,
        nonfinite: str = "skip",
        foreach: bool | None = None,
        fused: bool | None = None,
        master_weights: bool = True,
        norm_reducer: SquaredSumReducer | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            eps=eps,
            eps_root=eps_root,
            weight_decay=weight_decay,
            decay_in_ratio=decay_in_ratio,
            bias_correction=bias_correction,
            grad_averaging=grad_averaging,
            adapt=adapt,
            phi=phi,
            trust_clip=trust_clip,
            nesterov=nesterov,
            update_in_grad=update_in_grad,
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
    def _check_group(group: dict) -> None:
        check_nonneg("learning rate", group["lr"])
        check_nonneg("epsilon", group["eps"])
        check_nonneg("eps_root", group["eps_root"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_betas(group["betas"])
        check_phi(group["phi"])
        check_trust_clip(group["trust_clip"])
        check_choice("nesterov", group["nesterov"], NESTEROV_MODES)
        for flag in ("bias_correction", "grad_averaging", "decay_in_ratio", "adapt", "update_in_grad"):
            if not isinstance(group[flag], bool):
                raise ValueError(f"Invalid {flag}: {group[flag]!r}; it must be True or False")

    @staticmethod
    def _check_grads(group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict]) -> None:
        if not group["update_in_grad"]:
            return
        for p, g, s in zip(params, grads, states):
            x = s.get("master", p)  # the tensor updated
            if g.dtype != x.dtype:
                raise ValueError(
                    f"Lamb(update_in_grad=True) writes the update into the gradients, so they must have the "
                    f"dtype of the tensors updated: a {g.dtype} gradient of a {x.dtype} tensor (float32 master "
                    f"weights of a 16-bit parameter) cannot hold it; use update_in_grad=False for this group"
                )

    _STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")

    def _init_state(self, p: Tensor, state: dict) -> None:
        dt = compute_dtype(p)
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)

    def _update(self, group, xs, grads, states, ok, grad_scale, unscale, use_foreach):
        beta1, beta2 = group["betas"]
        impl = _lamb_impl(fused=self._use_fused(xs), foreach=use_foreach)
        return impl(  # a result, or a Pending request: the base class runs all groups together
            xs,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            eps_root=group["eps_root"],
            weight_decay=group["weight_decay"],
            decay_in_ratio=group["decay_in_ratio"],
            bias_correction=group["bias_correction"],
            grad_averaging=group["grad_averaging"],
            adapt=group["adapt"],
            phi=group["phi"],
            trust_clip=group["trust_clip"],
            nesterov=group["nesterov"],
            update_in_grad=group["update_in_grad"],
            ok=ok,
            grad_scale=grad_scale,
            unscale=unscale,
            reduce=self.norm_reducer,
        )


def lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    eps_root: float = 0.0,
    decay_in_ratio: bool = True,
    bias_correction: bool = True,
    grad_averaging: bool = True,
    adapt: bool = True,
    phi: tuple[float, float] | None = None,
    trust_clip: bool | tuple[float, float] = False,
    nesterov: str | None = None,
    update_in_grad: bool = False,
    ok: Tensor | None = None,
    grad_scale: Tensor | None = None,
    unscale: Tensor | None = None,
    reduce: SquaredSumReducer | None = None,
    foreach: bool = True,
    fused: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Functional LAMB step on lists of tensors, updated in place. See :class:`Lamb` for the math.

    ``params`` are the tensors to update (float32 masters of 16-bit parameters); ``ok`` is a 0-d bool
    tensor (False: leave everything unchanged); ``grad_scale`` a 0-d tensor multiplying the
    gradients (global clipping); ``reduce`` turns local squared sums into global ones (called once);
    ``update_in_grad`` writes each direction u into ``grads`` (which must have the dtype of ``params``);
    ``unscale`` (a GradScaler's 1 / scale) multiplies ``grads`` in place first, as ``GradScaler.unscale_``.
    Returns (weight norms, update norms, trust ratios), one entry per tensor, as tensors.
    """
    return run(
        _lamb_impl(fused=fused, foreach=foreach)(
            params, grads, exp_avgs, exp_avg_sqs, steps,
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, eps_root=eps_root, weight_decay=weight_decay,
            decay_in_ratio=decay_in_ratio,
            bias_correction=bias_correction, grad_averaging=grad_averaging, adapt=adapt, phi=phi, trust_clip=trust_clip,
            nesterov=nesterov, update_in_grad=update_in_grad, ok=ok, grad_scale=grad_scale, unscale=unscale, reduce=reduce,
        )
    )  # fmt: skip


def _lamb_impl(*, fused: bool, foreach: bool):
    """The implementation: fused kernels, ``torch._foreach_*``, or the single-tensor reference.

    Each returns its result, or with a ``reduce`` a :class:`~largebatch.optim._common.Pending`
    request for the global squared sums that finishes the step (see ``run_together``).
    """
    return fused_lamb if fused else _multi_tensor_lamb if foreach else _single_tensor_lamb


def _single_tensor_lamb(
    params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, eps_root, weight_decay, decay_in_ratio,
    bias_correction, grad_averaging, adapt, phi, trust_clip, nesterov, update_in_grad, ok, grad_scale, reduce,
    unscale=None,
):  # fmt: skip
    """The reference: Algorithm 2 written out for one tensor at a time.

    Lines 6-9 of the algorithm (moments, bias correction, the direction u) for every tensor, then
    the norms of every tensor (one request when sharded), then line 10: x -= lr * ratio * u.
    """
    unscale_grads_(grads, unscale)
    n = len(params)
    beta3 = first_moment_factor(beta1, grad_averaging)
    if n == 0 or (ok is not None and not bool(ok)):  # skip: nothing changes (this may sync; it is the reference)
        zero = torch.zeros(n)
        return zero, zero, torch.ones(n)
    us = []
    for x, grad, m, v, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        g = grad.to(x.dtype)
        if grad_scale is not None:
            g = g * grad_scale.to(x.dtype)
        step_t += 1
        t = step_t

        m.mul_(beta1).add_(g, alpha=beta3)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)

        def bc(beta: float, k: Tensor) -> Tensor:  # in float64; a coefficient is cast once it is finished
            return _bias_correction(beta, k, bias_correction)

        def in_dt(c: Tensor) -> Tensor:
            return c.to(x.dtype)

        if nesterov is None:
            m_hat = m / in_dt(bc(beta1, t))
        else:
            m_hat = m * in_dt(beta1 / bc(beta1, t + 1)) + g * in_dt(beta3 / bc(beta1, t))
        if nesterov == "both":
            v_hat = v * in_dt(beta2 / bc(beta2, t + 1)) + (g * g) * in_dt((1 - beta2) / bc(beta2, t))
        else:
            v_hat = v / in_dt(bc(beta2, t))

        denom = (v_hat + eps_root if eps_root else v_hat).sqrt() + eps
        u = m_hat / denom
        if eps == 0:  # 0/0 where the second moment is 0: the direction is 0 there, not NaN
            u = torch.where(denom > 0, u, torch.zeros_like(u))
        if weight_decay != 0 and decay_in_ratio:
            u = u + weight_decay * x
        elif weight_decay != 0:  # AdamW's decay first; the ratio then sees the decayed x
            x.mul_(1 - lr * weight_decay)
        us.append(u)

    def apply(w_norms: Tensor, u_norms: Tensor):
        ratios = []
        for x, grad, u, w_norm, u_norm in zip(params, grads, us, w_norms, u_norms):
            ratio = trust_ratio(w_norm, u_norm, phi=phi, trust_clip=trust_clip) if adapt else torch.ones_like(w_norm)
            x.add_(u * (-lr * ratio))
            if update_in_grad:
                grad.copy_(u)
            ratios.append(ratio)
        return w_norms, u_norms, torch.stack(ratios)

    return with_layer_norms(params, us, reduce, apply)


def _bias_correction(beta: float, t: Tensor, enabled: bool) -> Tensor:
    """1 - beta**t per tensor, and 1 where t == 0 (a first step that was skipped) or when disabled.

    Computed in float64 (float32 on devices without it, such as MPS), whatever ``t``'s dtype:
    in float32, 1 - 0.999**t loses five digits to cancellation (beta2 itself rounds by 1e-8) and
    the step would be off by ~7e-6 relative; callers cast the finished coefficient to the
    parameter dtype, as torch's Adam does with its Python-float bias corrections.
    """
    t = t.to(wide_dtype(t.device))
    if not enabled:
        return torch.ones_like(t)
    return torch.where(t > 0, 1 - beta**t, torch.ones_like(t))


def _multi_tensor_lamb(
    params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, eps_root, weight_decay, decay_in_ratio,
    bias_correction, grad_averaging, adapt, phi, trust_clip, nesterov, update_in_grad, ok, grad_scale, reduce,
    unscale=None,
):  # fmt: skip
    """Algorithm 2 on lists of tensors with ``torch._foreach_*``; per-tensor scalars live in tensors.

    Skipping is done arithmetically so that nothing is read on the host: gradients are zeroed
    where ``ok`` is False and the decay factors become 1, which leaves every tensor bit-identical.
    """
    unscale_grads_(grads, unscale)
    if not params:
        return torch.zeros(0), torch.zeros(0), torch.zeros(0)
    dt = params[0].dtype
    device = params[0].device
    beta3 = first_moment_factor(beta1, grad_averaging)
    g = [gr if gr.dtype == dt else gr.to(dt) for gr in grads]
    if ok is not None:
        g = [torch.where(ok, gi, torch.zeros((), dtype=dt, device=device)) for gi in g]
        okf = ok.to(dt)
    if grad_scale is not None:
        g = torch._foreach_mul(g, grad_scale.to(dt))

    torch._foreach_add_(steps, 1 if ok is None else ok.to(steps[0].dtype))
    t = torch.stack(steps)

    if ok is None:
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
    else:  # a decay of exactly 1 keeps the moments when the (zeroed) gradient is skipped
        one = torch.ones((), dtype=dt, device=device)
        torch._foreach_mul_(exp_avgs, torch.where(ok, beta1 * one, one))
        torch._foreach_mul_(exp_avg_sqs, torch.where(ok, beta2 * one, one))
    torch._foreach_add_(exp_avgs, g, alpha=beta3)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1 - beta2)

    bc1 = _bias_correction(beta1, t, bias_correction)  # float64; each coefficient is cast when finished
    bc2 = _bias_correction(beta2, t, bias_correction)

    def in_dt(c: Tensor) -> list[Tensor]:
        return c.to(dt).unbind()

    if nesterov is None:
        m_hat = torch._foreach_div(exp_avgs, in_dt(bc1))
    else:
        m_hat = torch._foreach_mul(exp_avgs, in_dt(beta1 / _bias_correction(beta1, t + 1, bias_correction)))
        torch._foreach_add_(m_hat, torch._foreach_mul(g, in_dt(beta3 / bc1)))
    if nesterov == "both":
        v_hat = torch._foreach_mul(exp_avg_sqs, in_dt(beta2 / _bias_correction(beta2, t + 1, bias_correction)))
        g2 = torch._foreach_mul(g, g)
        torch._foreach_add_(v_hat, torch._foreach_mul(g2, in_dt((1 - beta2) / bc2)))
    else:
        v_hat = torch._foreach_div(exp_avg_sqs, in_dt(bc2))

    if eps_root:
        torch._foreach_add_(v_hat, eps_root)
    torch._foreach_sqrt_(v_hat)
    torch._foreach_add_(v_hat, eps)
    u = torch._foreach_div(m_hat, v_hat)
    if eps == 0:  # 0/0 where the second moment is 0: the direction is 0 there, not NaN
        u = [torch.where(d > 0, ui, torch.zeros((), dtype=dt, device=device)) for ui, d in zip(u, v_hat)]
    del m_hat, v_hat
    wd_in, shrink = _decay_split(lr, weight_decay, decay_in_ratio)
    if wd_in != 0:
        torch._foreach_add_(u, torch._foreach_mul(params, wd_in))
    elif shrink != 1.0:  # AdamW's decay first (a factor of 1 when skipped); the ratio sees the decayed x
        torch._foreach_mul_(params, shrink if ok is None else torch.where(ok, shrink * one, one))


    def apply(w_norm: Tensor, u_norm: Tensor):
        if update_in_grad:  # u into the gradients, which a skipped step leaves as they were
            torch._foreach_copy_(grads, u if ok is None else [torch.where(ok, ui, gi) for ui, gi in zip(u, grads)])
        ratio = trust_ratio(w_norm, u_norm, phi=phi, trust_clip=trust_clip) if adapt else torch.ones_like(w_norm)
        scale = -lr * ratio
        if ok is not None:
            scale = scale * okf
        torch._foreach_mul_(u, scale.unbind())
        torch._foreach_add_(params, u)
        return w_norm, u_norm, ratio

    return with_layer_norms(params, u, reduce, apply)
