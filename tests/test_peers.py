"""Parity of largebatch.Lamb / Lars with other LAMB and LARS implementations (docs/conventions.md).

Two kinds of peer:

* the installed ``torch_optimizer.Lamb`` (0.3.0) and ``pytorch_optimizer.Lamb`` (4.1.0), run directly;
* short float64 re-implementations, in plain torch, of peers that cannot run here (TF Addons, optax,
  SimCLR, NVIDIA apex, timm, DeepSpeed, Keras 3). Each follows the algorithm of the source file named in
  its docstring, written out in its own operation order.

Every test runs several steps with fresh random gradients on three tensors of different shapes and
scales (one of them a 1-D bias) and compares every parameter after every step, on each of our
paths: the default (fused kernel where available), the multi-tensor path and the single-tensor
reference. Where a convention cannot be reproduced, a test shows the difference numerically.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch_optimizer
import pytorch_optimizer

from largebatch import Lamb, Lars, param_groups

F64 = torch.float64
STEPS = 6

# Our three code paths: the default (fused CPU kernel when it can be built), the multi-tensor
# path, and the single-tensor reference.
PATHS = {"default": {}, "foreach": {"fused": False}, "reference": {"foreach": False}}

# Initial scales and gradient scales per tensor. dense.weight has ||x|| ~ 17 (> 10, so the clamps
# at 10 of torch-optimizer and pytorch_optimizer act) and a LAMB ratio > 1 (so trust_clip acts);
# proj.weight has a ratio well below 1; dense.bias is the 1-D tensor.
SHAPES = {"dense.weight": (16, 8), "dense.bias": (16,), "proj.weight": (3, 4, 2)}
INIT_SCALES = {"dense.weight": 1.5, "dense.bias": 0.3, "proj.weight": 0.05}
GRAD_SCALES = {"dense.weight": 0.02, "dense.bias": 0.3, "proj.weight": 1.0}


# --------------------------------------------------------------------------------------------
# Set-up: initial values, gradients, our optimizer's trajectory, a peer's trajectory
# --------------------------------------------------------------------------------------------


def initial_values(scales=None, zero_bias=False, seed=1):
    gen = torch.Generator().manual_seed(seed)
    scales = {**INIT_SCALES, **(scales or {})}
    x = {n: torch.randn(s, generator=gen, dtype=F64) * scales[n] for n, s in SHAPES.items()}
    if zero_bias:  # ||x|| = 0 at the first step: every implementation takes the ratio as 1
        x["dense.bias"].zero_()
    return x


def gradients(scale=1.0, seed=2, steps=STEPS):
    gen = torch.Generator().manual_seed(seed)
    return [
        {n: torch.randn(s, generator=gen, dtype=F64) * GRAD_SCALES[n] * scale for n, s in SHAPES.items()}
        for _ in range(steps)
    ]


def global_norm(g: dict) -> float:
    return math.sqrt(sum(float(t.square().sum()) for t in g.values()))


class Net(torch.nn.Module):
    """Three named parameters: dense.weight, dense.bias, proj.weight (names as in real models)."""

    def __init__(self, init: dict):
        super().__init__()
        self.dense = torch.nn.Module()
        self.dense.weight = torch.nn.Parameter(init["dense.weight"].clone())
        self.dense.bias = torch.nn.Parameter(init["dense.bias"].clone())
        self.proj = torch.nn.Module()
        self.proj.weight = torch.nn.Parameter(init["proj.weight"].clone())


def named_groups(model, spec):
    """[{"params": [...], **options}] from [(names, options)]."""
    params = dict(model.named_parameters())
    return [{"params": [params[n] for n in names], **opts} for names, opts in spec]


def run_torch(make_opt, init, grads, before_step=None, with_grads=False):
    """Trajectory of a torch optimizer ``make_opt(model)``: the parameters after every step (and
    with ``with_grads`` the gradients after it, "grad:" + name)."""
    model = Net(init)
    opt = make_opt(model)
    trajectory = []
    for t, g in enumerate(grads, start=1):
        for n, p in model.named_parameters():
            p.grad = g[n].clone()
        if before_step is not None:
            before_step(opt, t)
        opt.step()
        trajectory.append({n: p.detach().clone() for n, p in model.named_parameters()})
        if with_grads:
            trajectory[-1] |= {f"grad:{n}": p.grad.clone() for n, p in model.named_parameters()}
    return trajectory


def run_peer(peer, init, grads, with_grads=False):
    """Trajectory of a re-implemented peer: ``peer(x, g)`` updates the dict ``x`` in place.
    ``with_grads``: each step's entry also holds the gradients after the step ("grad:" + name)."""
    x = {n: v.clone() for n, v in init.items()}
    trajectory = []
    for g in grads:
        g = {n: v.clone() for n, v in g.items()}
        peer(x, g)
        trajectory.append({n: v.clone() for n, v in x.items()} | ({f"grad:{n}": v for n, v in g.items()} if with_grads else {}))
    return trajectory


def max_rel_diff(ours, ref) -> float:
    """max over steps and tensors of max|a - b| / max|b|."""
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max()) for a, b in zip(ours, ref) for n in b)


def assert_trajectories(ours, ref, init, rtol):
    """Every parameter after every step agrees to ``rtol`` (relative to the tensor's largest entry),
    and every parameter has moved (so the agreement is not vacuous)."""
    assert len(ours) == len(ref) == STEPS
    for t, (a, b) in enumerate(zip(ours, ref), start=1):
        for n in b:
            torch.testing.assert_close(
                a[n], b[n], rtol=rtol, atol=rtol * float(b[n].abs().max()), msg=lambda m: f"step {t}, {n}: {m}"
            )
    for n in init:
        assert float((ref[-1][n] - init[n]).abs().max()) > 1e-6 * float(init[n].abs().max() + 1e-3), n


def lr_schedule(fn):
    """A before_step hook that sets every group's lr (and optionally weight_decay) for step t."""

    def hook(opt, t):
        for group in opt.param_groups:
            out = fn(t)
            if isinstance(out, tuple):
                group["lr"], group["weight_decay"] = out
            else:
                group["lr"] = out

    return hook


def ratio_of(w, u):
    """||w|| / ||u||, and 1 when either norm is 0 (the rule every peer here uses)."""
    wn, un = float(w.norm()), float(u.norm())
    return wn / un if wn > 0 and un > 0 else 1.0


# --------------------------------------------------------------------------------------------
# Re-implementations of the peers (float64, plain torch; one short function or class each)
# --------------------------------------------------------------------------------------------


class TFAddonsLamb:
    """tensorflow/addons, tensorflow_addons/optimizers/lamb.py (``LAMB._resource_apply_dense``).

    Moments bias-corrected (``1 - beta**t``), eps outside the square root; ``weight_decay_rate * var``
    is added to the update unless the variable name matches ``exclude_from_weight_decay``
    (``re.search``); the ratio ||var|| / ||update|| (1 if either is 0) multiplies the step unless the
    name matches ``exclude_from_layer_adaptation``, which defaults to the weight-decay list.
    """

    def __init__(self, learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-6, weight_decay_rate=0.0,
                 exclude_from_weight_decay=None, exclude_from_layer_adaptation=None):  # fmt: skip
        self.lr, self.b1, self.b2, self.eps, self.wd = learning_rate, beta_1, beta_2, epsilon, weight_decay_rate
        self.no_decay = exclude_from_weight_decay or []
        self.no_adapt = exclude_from_layer_adaptation or self.no_decay
        self.m, self.v, self.iterations = {}, {}, 0

    def __call__(self, x, g):
        t = self.iterations + 1
        for name, var in x.items():
            m = self.m.setdefault(name, torch.zeros_like(var))
            v = self.v.setdefault(name, torch.zeros_like(var))
            m.copy_(m * self.b1 + g[name] * (1 - self.b1))
            v.copy_(v * self.b2 + (g[name] * g[name]) * (1 - self.b2))
            m_hat = m / (1.0 - self.b1**t)
            v_hat = v / (1.0 - self.b2**t)
            update = m_hat / (v_hat.sqrt() + self.eps)
            if not any(re.search(r, name) for r in self.no_decay):
                update = update + self.wd * var
            ratio = 1.0
            if not any(re.search(r, name) for r in self.no_adapt):
                ratio = ratio_of(var, update)
            var.copy_(var - ratio * self.lr * update)
        self.iterations += 1


# optax (google-deepmind/optax, optax/_src/alias.py: lamb, lars; optax/_src/transform.py:
# scale_by_adam, add_decayed_weights, scale_by_trust_ratio, scale, trace; wrappers.masked). Each
# transformation maps (updates, params) to updates and keeps its own state; chain applies them in
# order and the result is added to the parameters (optax.apply_updates). Masks are predicates on
# the parameter name (optax takes a pytree of booleans).


def optax_scale_by_adam(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0):
    mu, nu, count = {}, {}, [0]

    def update(updates, params):
        count[0] += 1
        out = {}
        for n, g in updates.items():
            mu[n] = (1 - b1) * g + b1 * mu.get(n, torch.zeros_like(g))
            nu[n] = (1 - b2) * g * g + b2 * nu.get(n, torch.zeros_like(g))
            mu_hat = mu[n] / (1 - b1 ** count[0])
            nu_hat = nu[n] / (1 - b2 ** count[0])
            out[n] = mu_hat / ((nu_hat + eps_root).sqrt() + eps)
        return out

    return update


def optax_add_decayed_weights(weight_decay=0.0, mask=None):
    def update(updates, params):
        return {n: u + weight_decay * params[n] if mask is None or mask(n) else u for n, u in updates.items()}

    return update


def optax_scale_by_trust_ratio(min_norm=0.0, trust_coefficient=1.0, eps=0.0):
    def update(updates, params):
        out = {}
        for n, u in updates.items():
            param_norm = max(float(params[n].norm()), min_norm)
            update_norm = max(float(u.norm()), min_norm)
            trust_ratio = trust_coefficient * param_norm / (update_norm + eps)
            zero_norm = param_norm == 0.0 or update_norm == 0.0
            out[n] = u * (1.0 if zero_norm else trust_ratio)
        return out

    return update


def optax_masked(inner, mask):
    def update(updates, params):
        inner_out = inner({n: u for n, u in updates.items() if mask(n)}, params)
        return {n: inner_out.get(n, u) for n, u in updates.items()}

    return update


def optax_scale(step_size):
    return lambda updates, params: {n: step_size * u for n, u in updates.items()}


def optax_scale_by_schedule(schedule):
    """optax.scale_by_schedule: multiply by schedule(count), count = 0, 1, ... (one per update)."""
    count = [0]

    def update(updates, params):
        factor = schedule(count[0])
        count[0] += 1
        return {n: factor * u for n, u in updates.items()}

    return update


def optax_trace(decay, nesterov=False):
    trace = {}

    def update(updates, params):
        out = {}
        for n, g in updates.items():
            trace[n] = g + decay * trace.get(n, torch.zeros_like(g))
            out[n] = g + decay * trace[n] if nesterov else trace[n]
        return out

    return update


def optax_chain(*transforms):
    def step(x, g):
        updates = g
        for tx in transforms:
            updates = tx(updates, x)
        for n in x:
            x[n].add_(updates[n])

    return step


def optax_lamb(learning_rate, b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0, weight_decay=0.0, mask=None):
    """optax.lamb: Adam (bias-corrected), + weight_decay * params (where ``mask``), trust ratio on
    every parameter (no mask), times -learning_rate."""
    return optax_chain(
        optax_scale_by_adam(b1, b2, eps, eps_root),
        optax_add_decayed_weights(weight_decay, mask),
        optax_scale_by_trust_ratio(),
        optax_scale(-learning_rate),
    )


def optax_lars(learning_rate, weight_decay=0.0, weight_decay_mask=None, trust_coefficient=0.001, eps=0.0,
               trust_ratio_mask=None, momentum=0.9, nesterov=False):  # fmt: skip
    """optax.lars: + weight_decay * params (where weight_decay_mask), then the trust ratio
    trust_coefficient * ||x|| / (||g + wd x|| + eps) (where trust_ratio_mask), times
    -learning_rate, then momentum (optax.trace) of the scaled update. ``learning_rate`` may be a
    schedule (a function of the update count, from 0), as in optax."""
    everything = lambda n: True  # noqa: E731
    if callable(learning_rate):
        scale = optax_scale_by_schedule(lambda count: -learning_rate(count))
    else:
        scale = optax_scale(-learning_rate)
    return optax_chain(
        optax_add_decayed_weights(weight_decay, weight_decay_mask or everything),
        optax_masked(optax_scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps),
                     trust_ratio_mask or everything),  # fmt: skip
        scale,
        optax_trace(momentum, nesterov),
    )


class ApexFusedLamb:
    """NVIDIA/apex, apex/optimizers/fused_lamb.py and csrc/multi_tensor_lamb.cu (FusedLAMB).

    Global gradient norm over all groups; when it exceeds max_grad_norm every gradient is divided by
    norm / max_grad_norm (no epsilon). Stage 1 (adam_w_mode=True, MOMENT_MODE_1): m = beta1 m +
    beta3 g with beta3 = 1 - beta1 (grad_averaging) or 1, v = beta2 v + (1 - beta2) g^2, update =
    (m / bc1) / (sqrt(v / bc2) + eps) + decay * p. adam_w_mode=False (MOMENT_MODE_0) adds decay * p
    to the gradient instead. Stage 2: p -= lr * ||p|| / ||update|| * update where the group's decay
    is non-zero or use_nvlamb, else p -= lr * update (ratio 1 also when a norm is 0). Stage 1 stores
    the update in the gradient's memory ("We now in-place modify grad to store update"), so after a
    step every p.grad holds its update.

    ``clip_denominator_eps`` is not an apex option: it is 0 as in apex, and set to 1e-6 only to show
    that this epsilon is the one difference from largebatch's clipping factor.
    """

    def __init__(self, groups, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, grad_averaging=True,
                 max_grad_norm=1.0, use_nvlamb=False, adam_w_mode=True, clip_denominator_eps=0.0):  # fmt: skip
        self.groups = [{"names": names, "weight_decay": wd, "step": 0} for names, wd in groups]
        self.lr, self.bias_correction, self.betas, self.eps = lr, bias_correction, betas, eps
        self.grad_averaging, self.max_grad_norm, self.use_nvlamb = grad_averaging, max_grad_norm, use_nvlamb
        self.adam_w_mode, self.clip_eps = adam_w_mode, clip_denominator_eps
        self.m, self.v = {}, {}

    def __call__(self, x, g):
        norm = global_norm(g) + self.clip_eps
        clipped = norm / self.max_grad_norm if norm > self.max_grad_norm else 1.0
        b1, b2 = self.betas
        beta3 = 1 - b1 if self.grad_averaging else 1.0
        for group in self.groups:
            group["step"] += 1
            t, decay = group["step"], group["weight_decay"]
            bc1, bc2 = (1 - b1**t, 1 - b2**t) if self.bias_correction else (1.0, 1.0)
            for n in group["names"]:
                p = x[n]
                m = self.m.setdefault(n, torch.zeros_like(p))
                v = self.v.setdefault(n, torch.zeros_like(p))
                param_norm = p.norm()
                scaled_grad = g[n] / clipped
                if not self.adam_w_mode:
                    scaled_grad = scaled_grad + decay * p
                m.copy_(m * b1 + beta3 * scaled_grad)
                v.copy_(v * b2 + (1 - b2) * scaled_grad * scaled_grad)
                update = (m / bc1) / ((v / bc2).sqrt() + self.eps)
                if self.adam_w_mode:
                    update = update + decay * p
                g[n].copy_(update)
                ratio = self.lr
                if self.use_nvlamb or decay != 0.0:
                    update_norm = update.norm()
                    if update_norm != 0 and param_norm != 0:
                        ratio = self.lr * float(param_norm / update_norm)
                p.copy_(p - ratio * update)


class TimmLamb:
    """huggingface/pytorch-image-models, timm/optim/lamb.py (``Lamb.step``, ``_single_tensor_lamb``;
    caution=False, corrected_weight_decay=False).

    Global clipping: gradients divided by max(||g|| / max_grad_norm, 1). m updated with lerp
    (grad_averaging; without it m = beta1 m + g), v = beta2 v + (1 - beta2) g^2; update = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps).
    decoupled_decay=False: update += wd * p; True: p -= lr * wd * p first. The ratio ||p|| / ||update||
    (1 if either is 0; capped at 1 with trust_clip) is applied where the group's wd != 0 or
    always_adapt. Then p -= lr * update.
    """

    def __init__(self, groups, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=1.0,
                 trust_clip=False, always_adapt=False, decoupled_decay=False, grad_averaging=True):  # fmt: skip
        self.groups = [{"names": names, "weight_decay": wd, "step": 0} for names, wd in groups]
        self.grad_averaging = grad_averaging
        self.lr, self.bias_correction, self.betas, self.eps = lr, bias_correction, betas, eps
        self.max_grad_norm, self.trust_clip, self.always_adapt = max_grad_norm, trust_clip, always_adapt
        self.decoupled_decay = decoupled_decay
        self.m, self.v = {}, {}

    def __call__(self, x, g):
        clip = None if self.max_grad_norm is None else max(global_norm(g) / self.max_grad_norm, 1.0)
        b1, b2 = self.betas
        for group in self.groups:
            group["step"] += 1
            t, wd = group["step"], group["weight_decay"]
            bc1, bc2 = (1 - b1**t, 1 - b2**t) if self.bias_correction else (1.0, 1.0)
            for n in group["names"]:
                p = x[n]
                grad = g[n] if clip is None else g[n] / clip
                m = self.m.setdefault(n, torch.zeros_like(p))
                v = self.v.setdefault(n, torch.zeros_like(p))
                if self.grad_averaging:
                    m.lerp_(grad, 1 - b1)
                else:
                    m.mul_(b1).add_(grad)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = v.sqrt() / bc2**0.5 + self.eps
                update = (m / bc1) / denom
                if wd != 0:
                    if self.decoupled_decay:
                        p.add_(p, alpha=-self.lr * wd)
                    else:
                        update = update + wd * p
                if wd != 0 or self.always_adapt:
                    ratio = ratio_of(p, update)
                    if self.trust_clip:
                        ratio = min(ratio, 1.0)
                    update = update * ratio
                p.add_(update, alpha=-self.lr)


class TimmLars:
    """huggingface/pytorch-image-models, timm/optim/lars.py (``Lars.step``): LARS/LARC on SGD.

    Where the group's wd != 0 or always_adapt: ratio = trust_coeff ||p|| / (||g|| + wd ||p|| + eps)
    (1 if a norm is 0), with trust_clip (LARC) min(ratio / lr, 1); grad = (g + wd p) * ratio. Then
    torch SGD momentum: buf = grad at the first step, else momentum * buf + (1 - dampening) grad;
    p -= lr * (grad + momentum * buf if nesterov else buf).
    """

    def __init__(self, groups, lr=1.0, momentum=0.0, dampening=0.0, nesterov=False, trust_coeff=0.001, eps=1e-8,
                 trust_clip=False, always_adapt=False):  # fmt: skip
        self.groups = [{"names": names, "weight_decay": wd} for names, wd in groups]
        self.lr, self.momentum, self.dampening, self.nesterov = lr, momentum, dampening, nesterov
        self.trust_coeff, self.eps, self.trust_clip, self.always_adapt = trust_coeff, eps, trust_clip, always_adapt
        self.buf = {}

    def __call__(self, x, g):
        for group in self.groups:
            wd = group["weight_decay"]
            for n in group["names"]:
                p, grad = x[n], g[n]
                if wd != 0 or self.always_adapt:
                    w_norm, g_norm = float(p.norm()), float(grad.norm())
                    ratio = self.trust_coeff * w_norm / (g_norm + w_norm * wd + self.eps)
                    if w_norm == 0 or g_norm == 0:
                        ratio = 1.0
                    if self.trust_clip:
                        ratio = min(ratio / self.lr, 1.0)
                    grad = (grad + wd * p) * ratio
                if self.momentum != 0:
                    if n not in self.buf:
                        self.buf[n] = grad.clone()
                    else:
                        self.buf[n].mul_(self.momentum).add_(grad, alpha=1 - self.dampening)
                    grad = grad + self.momentum * self.buf[n] if self.nesterov else self.buf[n]
                p.add_(grad, alpha=-self.lr)


class SimCLRLars:
    """google-research/simclr, lars_optimizer.py (``LARSOptimizer``; TF1 ``apply_gradients`` and TF2
    ``_resource_apply_dense`` do the same).

    grad += weight_decay * param where the name is not excluded. classic_momentum=True: ratio =
    eeta ||param|| / ||grad|| (1 if a norm is 0) where adapted; v = momentum v + lr ratio grad;
    param -= v (nesterov: momentum v + lr ratio grad). classic_momentum=False: v = momentum v + grad,
    update = v (nesterov: momentum v + grad); param -= lr eeta ||param|| / ||update|| * update.
    ``lr`` is a function of the step count from 0 (a schedule), as a TF learning-rate tensor.
    """

    def __init__(self, lr, momentum=0.9, weight_decay=0.0, eeta=0.001, exclude=(), classic_momentum=True,
                 nesterov=False):  # fmt: skip
        self.lr, self.momentum, self.wd, self.eeta = lr, momentum, weight_decay, eeta
        self.exclude, self.classic, self.nesterov = exclude, classic_momentum, nesterov
        self.v, self.count = {}, 0

    def __call__(self, x, g):
        lr = self.lr(self.count)
        self.count += 1
        for n, param in x.items():
            excluded = any(re.search(r, n) for r in self.exclude)
            grad = g[n] if excluded else g[n] + self.wd * param
            v = self.v.setdefault(n, torch.zeros_like(param))
            if self.classic:
                ratio = 1.0 if excluded else self.eeta * ratio_of(param, grad)
                v.copy_(self.momentum * v + lr * ratio * grad)
                update = self.momentum * v + lr * ratio * grad if self.nesterov else v.clone()
                param.copy_(param - update)
            else:
                v.copy_(self.momentum * v + grad)
                update = self.momentum * v + grad if self.nesterov else v.clone()
                ratio = 1.0 if excluded else self.eeta * ratio_of(param, update)
                param.copy_(param - lr * ratio * update)


class DeepSpeedFusedLamb:
    """microsoft/DeepSpeed, deepspeed/ops/lamb/fused_lamb.py and csrc/lamb/fused_lamb_cuda_kernel.cu
    (eps_inside_sqrt=False is ADAM_MODE_1, sqrt(v) + eps; True is ADAM_MODE_0, sqrt(v + eps)).

    Clipping: clip = (grad_norm + 1e-6) / max_grad_norm, gradients divided by clip when it exceeds 1
    (grad_norm is the global norm the caller passes). Moments without bias correction: m = b1 m +
    (1 - b1) g, v = b2 v + (1 - b2) g^2; update = m / (sqrt(v) + eps) + decay * p; lamb_coeff =
    ||p|| / ||update|| clamped to [min_coeff, max_coeff], and 1 (unclamped) when a norm is 0;
    p -= step_size * lamb_coeff * update with step_size = lr * sqrt(1 - b2^t) / (1 - b1^t) when
    bias_correction, else lr.
    """

    def __init__(self, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, eps_inside_sqrt=False,
                 weight_decay=0.0, max_grad_norm=0.0, max_coeff=10.0, min_coeff=0.01):  # fmt: skip
        self.lr, self.bias_correction, self.betas, self.eps, self.decay = lr, bias_correction, betas, eps, weight_decay
        self.eps_inside_sqrt = eps_inside_sqrt
        self.max_grad_norm, self.max_coeff, self.min_coeff = max_grad_norm, max_coeff, min_coeff
        self.m, self.v, self.step = {}, {}, 0
        self.coeffs = []

    def __call__(self, x, g):
        combined_scale = 1.0
        if self.max_grad_norm > 0:
            clip = (global_norm(g) + 1e-6) / self.max_grad_norm
            if clip > 1:
                combined_scale = clip
        self.step += 1
        b1, b2 = self.betas
        if self.bias_correction:
            step_size = self.lr * math.sqrt(1 - b2**self.step) / (1 - b1**self.step)
        else:
            step_size = self.lr
        coeffs = {}
        for n, p in x.items():
            m = self.m.setdefault(n, torch.zeros_like(p))
            v = self.v.setdefault(n, torch.zeros_like(p))
            scaled_grad = g[n] / combined_scale
            m.copy_(b1 * m + (1 - b1) * scaled_grad)
            v.copy_(b2 * v + (1 - b2) * scaled_grad * scaled_grad)
            denom = (v + self.eps).sqrt() if self.eps_inside_sqrt else v.sqrt() + self.eps
            update = m / denom + self.decay * p
            w, u = float(p.norm()), float(update.norm())
            coeff = 1.0
            if w != 0 and u != 0:
                coeff = min(max(w / u, self.min_coeff), self.max_coeff)
            coeffs[n] = (coeff, w / u if w != 0 and u != 0 else 1.0)
            p.copy_(p - step_size * coeff * update)
        self.coeffs.append(coeffs)


class Keras3Lamb:
    """keras-team/keras, keras/src/optimizers/lamb.py (``Lamb.update_step``) with
    keras/src/optimizers/base_optimizer.py (``_apply_weight_decay`` runs before ``update_step``).

    Weight decay first: var = var - var * wd * lr for variables not excluded. Then m += (g - m)(1 - b1),
    v += (g^2 - v)(1 - b2), update = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps), ratio
    ||var|| / ||update|| (1 if either is 0) for every variable, var -= ratio * lr * update.
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=None,
                 exclude_from_weight_decay=()):  # fmt: skip
        self.lr, self.b1, self.b2, self.eps = learning_rate, beta_1, beta_2, epsilon
        self.wd, self.exclude = weight_decay, exclude_from_weight_decay
        self.m, self.v, self.iterations = {}, {}, 0

    def __call__(self, x, g):
        if self.wd is not None:
            for n, var in x.items():
                if n not in self.exclude:
                    var.copy_(var - var * self.wd * self.lr)
        t = self.iterations + 1
        for n, var in x.items():
            m = self.m.setdefault(n, torch.zeros_like(var))
            v = self.v.setdefault(n, torch.zeros_like(var))
            m.add_((g[n] - m) * (1 - self.b1))
            v.add_((g[n].square() - v) * (1 - self.b2))
            m_t_hat = m / (1.0 - self.b1**t)
            v_sqrt = (v / (1.0 - self.b2**t)).sqrt() + self.eps
            update = m_t_hat / v_sqrt
            var.sub_(ratio_of(var, update) * self.lr * update)
        self.iterations += 1


# --------------------------------------------------------------------------------------------
# Installed peers, run directly
# --------------------------------------------------------------------------------------------

TORCH_OPTIMIZER_CASES = {
    # name: (torch_optimizer.Lamb options, our options besides lr/betas/eps/wd, per-step lr factor or None)
    "defaults": (dict(), dict(bias_correction=False, phi=(0.0, 10.0)), None),
    "weight_decay": (dict(weight_decay=0.01), dict(bias_correction=False, phi=(0.0, 10.0)), None),
    # debias=True folds sqrt(1 - b2^t) / (1 - b1^t) into the step size, with moments uncorrected
    "debias": (
        dict(weight_decay=0.01, debias=True),
        dict(bias_correction=False, phi=(0.0, 10.0)),
        lambda t, b1, b2: math.sqrt(1 - b2**t) / (1 - b1**t),
    ),
    # adam=True: the ratio is forced to 1
    "adam": (dict(weight_decay=0.01, adam=True), dict(bias_correction=False, adapt=False), None),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", TORCH_OPTIMIZER_CASES)
def test_torch_optimizer_lamb(case, path):
    """torch_optimizer.Lamb (0.3.0): no bias correction by default (debias=False) and ||w|| clamped
    at clamp_value=10 -> bias_correction=False, phi=(0, 10); debias=True -> a per-step lr."""
    peer_opts, our_opts, factor = TORCH_OPTIMIZER_CASES[case]
    lr, betas, eps = 0.02, (0.9, 0.999), 1e-6
    wd = peer_opts.get("weight_decay", 0.0)
    init, grads = initial_values(zero_bias=True), gradients()
    assert init["dense.weight"].norm() > 10  # the clamp at 10 acts
    ref = run_torch(lambda m: torch_optimizer.Lamb(m.parameters(), lr=lr, betas=betas, eps=eps, **peer_opts),
                    init, grads)  # fmt: skip
    hook = None if factor is None else lr_schedule(lambda t: lr * factor(t, *betas))
    ours = run_torch(
        lambda m: Lamb(m.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd, **our_opts, **PATHS[path]),
        init, grads, before_step=hook,
    )  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=1e-12)


def pytorch_optimizer_mapping(lr, b1, wd, weight_decouple, adam_debias):
    """Our per-step (lr, weight_decay) for pytorch_optimizer.Lamb: its step size is lr / (1 - b1^t)
    (unless adam_debias=True) while its decoupled decay uses lr itself, so with weight_decouple our
    weight_decay is scaled by (1 - b1^t) to keep lr_t * weight_decay_t = lr * wd."""

    def at(t):
        bc1 = 1.0 if adam_debias else 1 - b1**t
        return lr / bc1, (wd * bc1 if weight_decouple else wd)

    return at


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("peer_foreach", [False, True], ids=["peer-loop", "peer-foreach"])
@pytest.mark.parametrize("adam_debias", [False, True], ids=["step-debiased", "adam_debias"])
@pytest.mark.parametrize("weight_decouple", [True, False], ids=["decoupled", "in-ratio"])
def test_pytorch_optimizer_lamb_with_eps_zero(weight_decouple, adam_debias, peer_foreach, path):
    """pytorch_optimizer.Lamb (4.1.0) with eps=0, reproduced exactly.

    Its moments are not bias-corrected, its step size is lr / (1 - b1^t) (lr with adam_debias=True),
    ||w|| is clamped at 10, and weight_decouple=True shrinks w by (1 - lr wd) before the ratio ->
    bias_correction=False, phi=(0, 10), decay_in_ratio=not weight_decouple, and the per-step lr and
    weight_decay of ``pytorch_optimizer_mapping``. eps must be 0 because it also adds eps to ||update||
    in the ratio's denominator, which no option of ours does (see the next test).
    """
    lr, betas, wd = 0.02, (0.9, 0.999), 0.01
    init, grads = initial_values(zero_bias=True), gradients()
    peer_kwargs = dict(lr=lr, betas=betas, eps=0.0, weight_decay=wd, weight_decouple=weight_decouple,
                       foreach=peer_foreach)  # fmt: skip
    if adam_debias:
        peer_kwargs["adam_debias"] = True  # a group option read by its step()
    ref = run_torch(lambda m: pytorch_optimizer.Lamb(m.parameters(), **peer_kwargs), init, grads)
    at = pytorch_optimizer_mapping(lr, betas[0], wd, weight_decouple, adam_debias)
    ours = run_torch(
        lambda m: Lamb(m.parameters(), lr=lr, betas=betas, eps=0.0, weight_decay=wd, bias_correction=False,
                       phi=(0.0, 10.0), **({"decay_in_ratio": False} if weight_decouple else {}), **PATHS[path]),
        init, grads, before_step=lr_schedule(at),
    )  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_pytorch_optimizer_ratio_eps_is_not_reproducible(path):
    """pytorch_optimizer.Lamb divides by ||update|| + eps in the ratio: with its default eps=1e-6
    each step is ours times ||u|| / (||u|| + eps), exactly, and no option of ours gives that factor.

    Both optimizers are put at the same point before every step (their moments depend on the
    gradients only), so the two displacements can be compared step by step.
    """
    lr, betas, eps, wd = 0.02, (0.9, 0.999), 1e-6, 0.01
    init, grads = initial_values(scales={"proj.weight": 1e-4}), gradients()
    model_peer, model_ours = Net(init), Net(init)
    peer = pytorch_optimizer.Lamb(model_peer.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd,
                                  weight_decouple=False)  # fmt: skip
    ours = Lamb(model_ours.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd, bias_correction=False,
                phi=(0.0, 10.0), **PATHS[path])  # fmt: skip
    smallest_gap = math.inf
    for t, g in enumerate(grads, start=1):
        ours.param_groups[0]["lr"] = lr / (1 - betas[0] ** t)
        for (n, pp), po in zip(model_peer.named_parameters(), model_ours.parameters()):
            po.data.copy_(pp.data)
            pp.grad, po.grad = g[n].clone(), g[n].clone()
        before = {n: p.detach().clone() for n, p in model_peer.named_parameters()}
        peer.step()
        ours.step()
        norms = ours.telemetry.read()
        for (n, pp), po in zip(model_peer.named_parameters(), model_ours.parameters()):
            d_peer, d_ours = pp.detach() - before[n], po.detach() - before[n]
            u_norm = norms[po]["update_norm"]
            # a displacement is a difference of two parameters, so their rounding (1e-16 |x|) is
            # larger relative to |d| than to |x|: 1e-10 here instead of 1e-12
            torch.testing.assert_close(d_peer, d_ours * (u_norm / (u_norm + eps)), rtol=1e-10, atol=0)
            gap = float((d_peer - d_ours).abs().max() / d_ours.abs().max())
            assert gap == pytest.approx(eps / (u_norm + eps), rel=1e-3)
            smallest_gap = min(smallest_gap, gap)
    assert smallest_gap > 1e-9  # far above rounding: the conventions differ


# --------------------------------------------------------------------------------------------
# TF Addons and optax
# --------------------------------------------------------------------------------------------

TFA_MASKS = {
    # TF Addons regexes (decay, adaptation) and our fnmatch patterns for largebatch.param_groups
    "same-list": (["bias"], None, ["*bias*"], "same"),
    "decayed-not-adapted": (["bias"], ["proj"], ["*bias*"], ["*proj*"]),
    "adapted-not-decayed": (["bias", "proj"], ["bias"], ["*bias*", "*proj*"], ["*bias*"]),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("masks", TFA_MASKS)
def test_tf_addons_lamb(masks, path):
    """TF Addons LAMB: bias-corrected moments, eps outside the sqrt, decay inside the ratio;
    exclude_from_weight_decay and exclude_from_layer_adaptation are two lists (the second defaults to
    the first) -> largebatch.param_groups(exclude_from_weight_decay=..., exclude_from_adaptation=...)."""
    no_decay_re, no_adapt_re, no_decay_pat, no_adapt_pat = TFA_MASKS[masks]
    lr, wd = 0.02, 0.01
    init, grads = initial_values(zero_bias=True), gradients()
    ref = run_peer(TFAddonsLamb(lr, epsilon=1e-6, weight_decay_rate=wd, exclude_from_weight_decay=no_decay_re,
                                exclude_from_layer_adaptation=no_adapt_re), init, grads)  # fmt: skip
    ours = run_torch(
        lambda m: Lamb(param_groups(m, wd, exclude_from_weight_decay=no_decay_pat,
                                    exclude_from_adaptation=no_adapt_pat), lr=lr, eps=1e-6, **PATHS[path]),
        init, grads,
    )  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("eps_root", [0.0, 1e-4])
def test_optax_lamb(eps_root, path):
    """optax.lamb: Adam, then add_decayed_weights with a mask, then the trust ratio on every
    parameter (optax.lamb has no trust-ratio mask) -> param_groups(..., exclude_from_adaptation="none");
    its eps_root (inside the square root) -> eps_root."""
    lr, wd = 0.02, 0.01
    init, grads = initial_values(zero_bias=True), gradients()
    ref = run_peer(optax_lamb(lr, eps=1e-6, eps_root=eps_root, weight_decay=wd, mask=lambda n: "bias" not in n),
                   init, grads)  # fmt: skip
    ours = run_torch(
        lambda m: Lamb(param_groups(m, wd, exclude_from_weight_decay=["*bias"], exclude_from_adaptation="none"),
                       lr=lr, eps=1e-6, eps_root=eps_root, **PATHS[path]),
        init, grads,
    )  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=1e-12)
    if eps_root:  # it matters at this gradient scale
        without = run_torch(lambda m: Lamb(param_groups(m, wd, exclude_from_weight_decay=["*bias"],
                                                        exclude_from_adaptation="none"), lr=lr, eps=1e-6),
                            init, grads)  # fmt: skip
        assert max_rel_diff(without, ref) > 1e-4


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_optax_lars_without_weight_decay(nesterov, path):
    """optax.lars with weight_decay=0: trust_coefficient ||x|| / (||g|| + eps), then momentum of
    the scaled step -> Lars(mode="classic", eps=0) (optax's eps default); the trust-ratio mask ->
    a group with adapt=False."""
    lr, tc, mom = 0.5, 0.001, 0.9
    init, grads = initial_values(zero_bias=True), gradients()
    ref = run_peer(optax_lars(lr, trust_coefficient=tc, trust_ratio_mask=lambda n: "bias" not in n, momentum=mom,
                              nesterov=nesterov), init, grads)  # fmt: skip
    ours = run_torch(
        lambda m: Lars(param_groups(m, 0.0, exclude_from_weight_decay="none", exclude_from_adaptation=["*bias"]),
                       lr=lr, momentum=mom, trust_coefficient=tc, eps=0.0, nesterov=nesterov, mode="classic",
                       **PATHS[path]),
        init, grads,
    )  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_optax_lars_without_momentum(path):
    """optax.lars with momentum=0 and weight decay: trust_coefficient ||x|| / (||g + wd x|| + eps)
    times (g + wd x) -> Lars(mode="paper", momentum=0) with the same trust_coefficient and eps;
    both masks -> a group with weight_decay=0 and adapt=False."""
    lr, tc, wd, eps = 0.5, 0.01, 0.01, 1e-9
    init, grads = initial_values(), gradients()
    not_bias = lambda n: "bias" not in n  # noqa: E731
    ref = run_peer(optax_lars(lr, weight_decay=wd, weight_decay_mask=not_bias, trust_coefficient=tc, eps=eps,
                              trust_ratio_mask=not_bias, momentum=0.0), init, grads)  # fmt: skip
    ours = run_torch(
        lambda m: Lars(param_groups(m, wd), lr=lr, momentum=0.0, trust_coefficient=tc, eps=eps, mode="paper",
                       **PATHS[path]),
        init, grads,
    )  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_optax_lars_with_decay_momentum_and_a_schedule(nesterov, path):
    """optax.lars in general: trust_coefficient ||x|| / (||g + wd x|| + eps) -> denominator="combined";
    the learning rate applied before the momentum (optax.trace of the scaled step) -> lr_in_momentum=True,
    which matters under a schedule (here a linear decay, evaluated at the update count from 0)."""
    tc, wd, mom, eps = 0.01, 0.05, 0.9, 1e-9
    schedule = lambda count: 0.5 * (1 - count / (2 * STEPS))  # noqa: E731
    init, grads = initial_values(zero_bias=True), gradients()
    ref = run_peer(optax_lars(schedule, weight_decay=wd, trust_coefficient=tc, eps=eps, momentum=mom,
                              nesterov=nesterov), init, grads)  # fmt: skip
    ours = run_torch(
        lambda m: Lars(m.parameters(), lr=schedule(0), momentum=mom, weight_decay=wd, trust_coefficient=tc, eps=eps,
                       nesterov=nesterov, mode="classic", denominator="combined", lr_in_momentum=True,
                       **PATHS[path]),
        init, grads, before_step=lr_schedule(lambda t: schedule(t - 1)),
    )  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=1e-12)


def test_optax_lars_differs_from_the_default_conventions():
    """With weight decay, momentum and a schedule, our defaults (You et al. 2017's ||g|| + wd ||x||,
    torch SGD's lr outside the buffer) and the paper mode are far from optax.lars: the options
    above are needed."""
    tc, wd, mom = 0.01, 0.05, 0.9
    schedule = lambda count: 0.5 * (1 - count / (2 * STEPS))  # noqa: E731
    init, grads = initial_values(), gradients()
    ref = run_peer(optax_lars(schedule, weight_decay=wd, trust_coefficient=tc, momentum=mom), init, grads)
    hook = lr_schedule(lambda t: schedule(t - 1))
    variants = [dict(mode="classic"), dict(mode="paper"), dict(mode="classic", denominator="combined"),
                dict(mode="classic", lr_in_momentum=True)]  # fmt: skip
    for kw in variants:
        ours = run_torch(lambda m: Lars(m.parameters(), lr=schedule(0), momentum=mom, weight_decay=wd,
                                        trust_coefficient=tc, eps=0.0, **kw), init, grads, before_step=hook)  # fmt: skip
        assert max_rel_diff(ours, ref) > 1e-4, kw


# --------------------------------------------------------------------------------------------
# NVIDIA apex and timm
# --------------------------------------------------------------------------------------------

WEIGHTS, BIAS = ["dense.weight", "proj.weight"], ["dense.bias"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bias_correction", [True, False])
def test_apex_fused_lamb(bias_correction, path):
    """apex FusedLAMB (adam_w_mode=True, grad_averaging=True, use_nvlamb=False, max_grad_norm=1.0
    not reached): decay inside the ratio, and no adaptation where the group's weight_decay is 0 ->
    groups with adapt=(weight_decay != 0); bias_correction maps one to one."""
    lr, wd, mgn = 0.02, 0.01, 1.0
    init, grads = initial_values(), gradients(scale=0.1)
    assert max(global_norm(g) for g in grads) < mgn  # apex's clipping and ours both leave g as is
    ref = run_peer(ApexFusedLamb([(WEIGHTS, wd), (BIAS, 0.0)], lr=lr, bias_correction=bias_correction, eps=1e-6,
                                 max_grad_norm=mgn), init, grads)  # fmt: skip
    ours = run_torch(
        lambda m: Lamb(named_groups(m, [(WEIGHTS, dict(weight_decay=wd)), (BIAS, dict(weight_decay=0.0, adapt=False))]),
                       lr=lr, eps=1e-6, bias_correction=bias_correction, max_grad_norm=mgn, **PATHS[path]),
        init, grads,
    )  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_apex_gradients_hold_the_update(path):
    """apex FusedLAMB leaves each step's update (clipped gradient's Adam direction + decay * p) in
    p.grad: update_in_grad=True reproduces the gradients after every step too, with clipping acting
    (clip_eps=0, as apex) and in a group without decay or adaptation."""
    lr, wd, mgn = 0.02, 0.01, 1.0
    init, grads = initial_values(), gradients(scale=0.3)
    assert min(global_norm(g) for g in grads) > mgn  # clipping acts at every step
    ref = run_peer(ApexFusedLamb([(WEIGHTS, wd), (BIAS, 0.0)], lr=lr, eps=1e-6, max_grad_norm=mgn), init, grads,
                   with_grads=True)  # fmt: skip
    groups = lambda m: named_groups(m, [(WEIGHTS, dict(weight_decay=wd)), (BIAS, dict(weight_decay=0.0, adapt=False))])  # noqa: E731
    ours = run_torch(lambda m: Lamb(groups(m), lr=lr, eps=1e-6, max_grad_norm=mgn, clip_eps=0.0, update_in_grad=True,
                                    **PATHS[path]), init, grads, with_grads=True)  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=1e-12)
    plain = run_torch(lambda m: Lamb(groups(m), lr=lr, eps=1e-6, max_grad_norm=mgn, clip_eps=0.0, **PATHS[path]),
                      init, grads, with_grads=True)  # fmt: skip
    assert max_rel_diff(plain, ref) > 0.1  # by default the gradients are left as they were


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("peer", ["apex", "timm"])
def test_global_clipping_epsilon(peer, path):
    """apex and timm scale the gradients by max_grad_norm / ||g|| when ||g|| > max_grad_norm: our
    clip_eps=0. Our default is torch.nn.utils.clip_grad_norm_'s max_grad_norm / (||g|| + 1e-6) (as
    DeepSpeed's); with clipping active at every step the default differs from the peer by more than
    rounding but by less than 1e-6 relative, and clip_eps=0 matches it to rounding."""
    lr, wd, mgn = 0.02, 0.01, 1.0
    init, grads = initial_values(scales={"proj.weight": 1e-3}), gradients(scale=0.3)
    assert min(global_norm(g) for g in grads) > mgn  # clipping acts at every step
    groups = [(WEIGHTS, wd), (BIAS, 0.0)]

    def ours(clip_eps):
        return run_torch(
            lambda m: Lamb(named_groups(m, [(WEIGHTS, dict(weight_decay=wd)),
                                            (BIAS, dict(weight_decay=0.0, adapt=False))]),
                           lr=lr, eps=1e-6, max_grad_norm=mgn, clip_eps=clip_eps, **PATHS[path]),
            init, grads,
        )  # fmt: skip

    if peer == "apex":
        ref = run_peer(ApexFusedLamb(groups, lr=lr, eps=1e-6, max_grad_norm=mgn, clip_denominator_eps=0.0), init, grads)
        # the re-implementation given the epsilon reproduces our default
        with_eps = run_peer(ApexFusedLamb(groups, lr=lr, eps=1e-6, max_grad_norm=mgn, clip_denominator_eps=1e-6),
                            init, grads)  # fmt: skip
        assert_trajectories(ours(1e-6), with_eps, init, rtol=1e-12)
    else:  # timm divides by max(||g|| / max_grad_norm, 1); it has no epsilon to set
        ref = run_peer(TimmLamb(groups, lr=lr, eps=1e-6, max_grad_norm=mgn), init, grads)
    assert 1e-11 < max_rel_diff(ours(1e-6), ref) < 1e-6
    assert_trajectories(ours(0.0), ref, init, rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("nvlamb", [False, True])
def test_apex_without_grad_averaging(nvlamb, path):
    """apex grad_averaging=False accumulates m = beta1 m + g (bias correction unchanged) ->
    grad_averaging=False; use_nvlamb=True adapts every parameter -> adapt=True everywhere."""
    lr, wd = 0.02, 0.01
    init, grads = initial_values(), gradients(scale=0.1)
    ref = run_peer(ApexFusedLamb([(WEIGHTS, wd), (BIAS, 0.0)], lr=lr, eps=1e-6, grad_averaging=False,
                                 use_nvlamb=nvlamb), init, grads)  # fmt: skip
    spec = [(WEIGHTS, dict(weight_decay=wd)), (BIAS, dict(weight_decay=0.0, adapt=nvlamb))]
    ours = run_torch(
        lambda m: Lamb(named_groups(m, spec), lr=lr, eps=1e-6, grad_averaging=False, **PATHS[path]), init, grads,
    )  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_apex_l2_mode_through_the_gradient(path):
    """apex adam_w_mode=False adds decay * p to the (clipped) gradient, inside the moments, and not to
    the update. Lamb has no such mode, but while global clipping does not act, adding
    weight_decay * p to p.grad before the step (an L2 term; the group's own weight_decay 0 and
    adapt=True, since apex adapts where its decay is non-zero) reproduces it to rounding. When
    clipping acts it does not: apex clips the gradient before adding the decay, we would clip the sum.
    The default configuration (decay in the update) is far from it."""
    lr, wd, mgn = 0.02, 0.01, 1.0
    init, grads = initial_values(), gradients(scale=0.1)
    assert max(global_norm(g) for g in grads) < mgn  # with the L2 term too, or the first match below would fail

    def add_l2(opt, t):
        for group in opt.param_groups:
            if group["adapt"]:
                for p in group["params"]:
                    p.grad.add_(p.detach(), alpha=wd)

    def l2_groups(m):
        return named_groups(m, [(WEIGHTS, dict(weight_decay=0.0)), (BIAS, dict(weight_decay=0.0, adapt=False))])

    ref = run_peer(ApexFusedLamb([(WEIGHTS, wd), (BIAS, 0.0)], lr=lr, eps=1e-6, max_grad_norm=mgn, adam_w_mode=False),
                   init, grads)  # fmt: skip
    ours = run_torch(lambda m: Lamb(l2_groups(m), lr=lr, eps=1e-6, max_grad_norm=mgn, **PATHS[path]), init, grads,
                     before_step=add_l2)  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=1e-12)
    default = run_torch(
        lambda m: Lamb(named_groups(m, [(WEIGHTS, dict(weight_decay=wd)), (BIAS, dict(weight_decay=0.0, adapt=False))]),
                       lr=lr, eps=1e-6, max_grad_norm=mgn),
        init, grads,
    )  # fmt: skip
    assert max_rel_diff(default, ref) > 1e-4
    # with clipping active (gradients 10x larger than max_grad_norm) the two orders differ
    big = [{n: 30 * v for n, v in g.items()} for g in grads]
    assert min(global_norm(g) for g in big) > mgn
    ref = run_peer(ApexFusedLamb([(WEIGHTS, wd), (BIAS, 0.0)], lr=lr, eps=1e-6, max_grad_norm=mgn, adam_w_mode=False),
                   init, big)  # fmt: skip
    ours = run_torch(lambda m: Lamb(l2_groups(m), lr=lr, eps=1e-6, max_grad_norm=mgn), init, big, before_step=add_l2)
    assert max_rel_diff(ours, ref) > 1e-9


# timm's Lamb divides sqrt(v) by sqrt(bias_correction2) separately and updates m with lerp: the same
# formulas in another floating-point order. The differences stay at a few 1e-16 in float64 over
# these steps, so the common rtol of 1e-12 is kept.
TIMM_LAMB_RTOL = 1e-12

TIMM_LAMB_CASES = {
    "defaults": dict(bias_correction=True, trust_clip=False, always_adapt=False),
    "trust_clip": dict(bias_correction=True, trust_clip=True, always_adapt=False),
    "no-bias-correction-always-adapt": dict(bias_correction=False, trust_clip=False, always_adapt=True),
    "no-grad-averaging": dict(bias_correction=True, trust_clip=False, always_adapt=False, grad_averaging=False),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", TIMM_LAMB_CASES)
def test_timm_lamb(case, path):
    """timm Lamb: bias_correction, max_grad_norm=1.0 (not reached here), trust_clip (ratio <= 1),
    and no adaptation where the group's weight_decay is 0 unless always_adapt -> our groups with
    adapt=(weight_decay != 0 or always_adapt), trust_clip=True, max_grad_norm=1.0."""
    opts = TIMM_LAMB_CASES[case]
    lr, wd, mgn = 0.02, 0.01, 1.0
    init, grads = initial_values(zero_bias=opts["always_adapt"]), gradients(scale=0.1)
    assert max(global_norm(g) for g in grads) < mgn
    peer = TimmLamb([(WEIGHTS, wd), (BIAS, 0.0)], lr=lr, eps=1e-6, max_grad_norm=mgn, **opts)
    ref = run_peer(peer, init, grads)
    spec = [(WEIGHTS, dict(weight_decay=wd)), (BIAS, dict(weight_decay=0.0, adapt=opts["always_adapt"]))]
    ours = run_torch(
        lambda m: Lamb(named_groups(m, spec), lr=lr, eps=1e-6, bias_correction=opts["bias_correction"],
                       trust_clip=opts["trust_clip"], grad_averaging=opts.get("grad_averaging", True),
                       max_grad_norm=mgn, **PATHS[path]),
        init, grads,
    )  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=TIMM_LAMB_RTOL)
    if opts["trust_clip"]:  # the cap acted: without it the trajectory differs
        unclipped = run_torch(lambda m: Lamb(named_groups(m, spec), lr=lr, eps=1e-6, max_grad_norm=mgn), init, grads)
        assert max_rel_diff(unclipped, ref) > 1e-4


@pytest.mark.parametrize("path", PATHS)
def test_timm_lamb_decoupled_decay(path):
    """timm Lamb(decoupled_decay=True): p -= lr wd p first, then the ratio of the decayed p and the
    Adam direction alone -> decay_in_ratio=False."""
    lr, wd = 0.02, 0.05
    init, grads = initial_values(), gradients(scale=0.1)
    ref = run_peer(TimmLamb([(WEIGHTS, wd), (BIAS, 0.0)], lr=lr, eps=1e-6, decoupled_decay=True), init, grads)
    ours = run_torch(
        lambda m: Lamb(named_groups(m, [(WEIGHTS, dict(weight_decay=wd)), (BIAS, dict(weight_decay=0.0, adapt=False))]),
                       lr=lr, eps=1e-6, decay_in_ratio=False, max_grad_norm=1.0, **PATHS[path]),
        init, grads,
    )  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=TIMM_LAMB_RTOL)


TIMM_LARS_CASES = {
    "lars": dict(trust_clip=False, nesterov=False, always_adapt=False),
    "larc": dict(trust_clip=True, nesterov=False, always_adapt=False),
    "larc-nesterov-always-adapt": dict(trust_clip=True, nesterov=True, always_adapt=True),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", TIMM_LARS_CASES)
def test_timm_lars(case, path):
    """timm Lars: ratio trust_coeff ||p|| / (||g|| + wd ||p|| + eps), LARC min(ratio / lr, 1), torch
    SGD momentum after the scaling -> Lars(mode="classic", clip=trust_clip), groups with
    adapt=(weight_decay != 0 or always_adapt)."""
    opts = TIMM_LARS_CASES[case]
    lr, wd, mom = 0.01, 0.001, 0.9
    init = initial_values(zero_bias=opts["always_adapt"])
    grads = gradients()
    peer = TimmLars([(WEIGHTS, wd), (BIAS, 0.0)], lr=lr, momentum=mom, **opts)
    ref = run_peer(peer, init, grads)
    spec = [(WEIGHTS, dict(weight_decay=wd)), (BIAS, dict(weight_decay=0.0, adapt=opts["always_adapt"]))]
    ours = run_torch(
        lambda m: Lars(named_groups(m, spec), lr=lr, momentum=mom, nesterov=opts["nesterov"], mode="classic",
                       clip=opts["trust_clip"], **PATHS[path]),
        init, grads,
    )  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=1e-12)
    if opts["trust_clip"]:  # LARC's cap acted on dense.weight (small gradient, large weight)
        unclipped = run_torch(lambda m: Lars(named_groups(m, spec), lr=lr, momentum=mom, nesterov=opts["nesterov"],
                                             mode="classic"), init, grads)  # fmt: skip
        assert max_rel_diff(unclipped, ref) > 1e-4


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_simclr_lars_classic_momentum(nesterov, path):
    """SimCLR's LARS (classic_momentum=True, the default): the ratio of g + wd x, no epsilon, and
    the lr-scaled step in the buffer -> Lars(mode="classic", denominator="combined",
    lr_in_momentum=True, eps=0, trust_coefficient=eeta); its exclusion list (from decay and
    adaptation alike) -> a group with weight_decay=0 and adapt=False. Under a schedule."""
    wd, eeta, mom = 0.01, 0.01, 0.9
    schedule = lambda count: 0.5 * (1 - count / (2 * STEPS))  # noqa: E731
    init, grads = initial_values(), gradients()
    ref = run_peer(SimCLRLars(schedule, mom, wd, eeta, exclude=["bias"], nesterov=nesterov), init, grads)
    ours = run_torch(
        lambda m: Lars(param_groups(m, wd), lr=schedule(0), momentum=mom, trust_coefficient=eeta, eps=0.0,
                       nesterov=nesterov, mode="classic", denominator="combined", lr_in_momentum=True,
                       **PATHS[path]),
        init, grads, before_step=lr_schedule(lambda t: schedule(t - 1)),
    )  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_simclr_lars_without_classic_momentum(nesterov, path):
    """SimCLR's LARS with classic_momentum=False normalises the (undampened) momentum of g + wd x:
    the paper's Algorithm 1. Our "paper" mode dampens the buffer by 1 - momentum, a factor the
    ratio cancels when eps = 0, so Lars(mode="paper", eps=0, trust_coefficient=eeta) matches,
    with Nesterov too. Excluded (not adapted) parameters move by lr times the buffer itself, so
    their group takes lr / (1 - momentum)."""
    wd, eeta, mom = 0.01, 0.5, 0.9
    schedule = lambda count: 0.1 * (1 - count / (2 * STEPS))  # noqa: E731
    init, grads = initial_values(), gradients()
    ref = run_peer(SimCLRLars(schedule, mom, wd, eeta, exclude=["bias"], classic_momentum=False, nesterov=nesterov),
                   init, grads)  # fmt: skip

    def set_lr(opt, t):
        for group in opt.param_groups:
            group["lr"] = schedule(t - 1) if group["adapt"] else schedule(t - 1) / (1 - mom)

    ours = run_torch(
        lambda m: Lars(param_groups(m, wd), lr=schedule(0), momentum=mom, trust_coefficient=eeta, eps=0.0,
                       nesterov=nesterov, mode="paper", **PATHS[path]),
        init, grads, before_step=set_lr,
    )  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# DeepSpeed and Keras 3
# --------------------------------------------------------------------------------------------


def deepspeed_step_size(lr, betas, bias_correction):
    b1, b2 = betas
    return lambda t: lr * math.sqrt(1 - b2**t) / (1 - b1**t) if bias_correction else lr


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bias_correction", [True, False])
def test_deepspeed_fused_lamb(bias_correction, path):
    """DeepSpeed FusedLamb (eps outside the sqrt, min_coeff=0.01, max_coeff=10, max_grad_norm):
    moments never bias-corrected, the correction folded into the step size, the ratio clamped to
    [0.01, 10] -> bias_correction=False, trust_clip=(0.01, 10), lr_t = lr sqrt(1 - b2^t) / (1 - b1^t);
    its clipping factor max_grad_norm / (||g|| + 1e-6) is ours."""
    lr, betas, eps, wd, mgn = 0.02, (0.9, 0.999), 1e-8, 0.01, 1.0
    init = initial_values(scales={"dense.weight": 60.0, "proj.weight": 1e-3})
    grads = gradients()
    assert min(global_norm(g) for g in grads) > mgn  # clipping acts at every step
    peer = DeepSpeedFusedLamb(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=wd,
                              max_grad_norm=mgn)  # fmt: skip
    ref = run_peer(peer, init, grads)
    raw = [r for step in peer.coeffs for _, r in step.values()]
    assert max(raw) > 10 and min(raw) < 0.01  # both bounds act
    ours = run_torch(
        lambda m: Lamb(m.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd, bias_correction=False,
                       trust_clip=(0.01, 10.0), max_grad_norm=mgn, **PATHS[path]),
        init, grads, before_step=lr_schedule(deepspeed_step_size(lr, betas, bias_correction)),
    )  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_deepspeed_zero_norm_ratio_stays_one(path):
    """DeepSpeed takes lamb_coeff = 1 when a norm is 0 and clamps only a computed ratio: with
    bounds that exclude 1, a zero-initialised bias still moves with ratio 1 at the first step."""
    lr, betas, eps, wd = 0.02, (0.9, 0.999), 1e-8, 0.01
    init, grads = initial_values(zero_bias=True), gradients()
    peer = DeepSpeedFusedLamb(lr=lr, betas=betas, eps=eps, weight_decay=wd, min_coeff=0.01, max_coeff=0.5)
    ref = run_peer(peer, init, grads)
    assert peer.coeffs[0]["dense.bias"][0] == 1.0 and peer.coeffs[1]["dense.bias"][0] <= 0.5
    ours = run_torch(
        lambda m: Lamb(m.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd, bias_correction=False,
                       trust_clip=(0.01, 0.5), **PATHS[path]),
        init, grads, before_step=lr_schedule(deepspeed_step_size(lr, betas, True)),
    )  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_deepspeed_eps_inside_sqrt(path):
    """DeepSpeed FusedLamb(eps_inside_sqrt=True) divides by sqrt(v + eps) -> eps=0, eps_root=eps
    (with bias_correction=False, as its moments are never corrected); adding the same eps outside
    the square root instead differs by far more than rounding."""
    lr, betas, eps, wd = 0.02, (0.9, 0.999), 1e-8, 0.01
    init, grads = initial_values(), gradients()
    ref = run_peer(DeepSpeedFusedLamb(lr=lr, betas=betas, eps=eps, eps_inside_sqrt=True, weight_decay=wd), init, grads)

    def ours(**kw):
        return run_torch(
            lambda m: Lamb(m.parameters(), lr=lr, betas=betas, weight_decay=wd, bias_correction=False,
                           trust_clip=(0.01, 10.0), **kw, **PATHS[path]),
            init, grads, before_step=lr_schedule(deepspeed_step_size(lr, betas, True)),
        )  # fmt: skip

    assert_trajectories(ours(eps=0.0, eps_root=eps), ref, init, rtol=1e-12)
    assert max_rel_diff(ours(eps=eps), ref) > 1e-4


# Keras updates the moments as m += (g - m)(1 - beta) instead of beta m + (1 - beta) g and decays
# as var - var * wd * lr: the same formulas in another floating-point order. The differences stay
# at a few 1e-16 in float64 over these steps, so the common rtol of 1e-12 is kept.
KERAS_RTOL = 1e-12


@pytest.mark.parametrize("path", PATHS)
def test_keras3_lamb_without_weight_decay(path):
    """Keras 3 Lamb (epsilon=1e-7) without weight decay: bias-corrected Adam direction, ratio on
    every variable -> Lamb(eps=1e-7)."""
    lr = 0.02
    init, grads = initial_values(zero_bias=True), gradients()
    ref = run_peer(Keras3Lamb(lr), init, grads)
    ours = run_torch(lambda m: Lamb(m.parameters(), lr=lr, eps=1e-7, **PATHS[path]), init, grads)
    assert_trajectories(ours, ref, init, rtol=KERAS_RTOL)


@pytest.mark.parametrize("path", PATHS)
def test_keras3_lamb_with_weight_decay(path):
    """Keras 3 Lamb with weight_decay: the base optimizer shrinks var by (1 - lr wd) before
    update_step, and the ratio uses the shrunk var and the Adam direction alone -> decay_in_ratio=False;
    exclude_from_weight_decay -> a group with weight_decay=0 that is still adapted."""
    lr, wd = 0.02, 0.05
    init, grads = initial_values(zero_bias=True), gradients()
    ref = run_peer(Keras3Lamb(lr, weight_decay=wd, exclude_from_weight_decay=("dense.bias",)), init, grads)
    ours = run_torch(
        lambda m: Lamb(param_groups(m, wd, exclude_from_weight_decay=["*bias"], exclude_from_adaptation="none"),
                       lr=lr, eps=1e-7, decay_in_ratio=False, **PATHS[path]),
        init, grads,
    )  # fmt: skip
    assert_trajectories(ours, ref, init, rtol=KERAS_RTOL)
