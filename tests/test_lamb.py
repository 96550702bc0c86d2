"""Lamb: hand-computed steps, the paper's reductions, reference vs multi-tensor, conventions."""

import io
import math

import pytest
import torch
from conftest import (
    PATH_IDS,
    PATHS,
    assert_compiled_step_matches_eager,
    assert_same,
    assert_states_equal,
    clone_params,
    set_grads,
)

from largebatch import Lamb

F64 = torch.float64


def hand_lamb(x, gs, lr, b1, b2, eps, wd, bias_correction=True):
    """LAMB on a list of floats (one tensor), written out with Python floats."""
    m = [0.0] * len(x)
    v = [0.0] * len(x)
    x = list(x)
    for t, g in enumerate(gs, start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        c1 = 1 - b1**t if bias_correction else 1.0
        c2 = 1 - b2**t if bias_correction else 1.0
        u = [(mi / c1) / (math.sqrt(vi / c2) + eps) + wd * xi for mi, vi, xi in zip(m, v, x)]
        wn = math.sqrt(sum(xi * xi for xi in x))
        un = math.sqrt(sum(ui * ui for ui in u))
        ratio = wn / un if wn > 0 and un > 0 else 1.0
        x = [xi - lr * ratio * ui for xi, ui in zip(x, u)]
    return x, m, v


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_first_and_second_step_by_hand(foreach, bias_correction):
    x0 = [1.0, -2.0, 0.5]
    gs = [[0.3, -0.1, 2.0], [-0.2, 0.4, 1.0]]
    p = torch.tensor(x0, dtype=F64, requires_grad=True)
    opt = Lamb([p], lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05, bias_correction=bias_correction, foreach=foreach)
    for k in range(2):
        p.grad = torch.tensor(gs[k], dtype=F64)
        opt.step()
        x, m, v = hand_lamb(x0, gs[: k + 1], 0.1, 0.9, 0.99, 1e-6, 0.05, bias_correction)
        torch.testing.assert_close(p.detach(), torch.tensor(x, dtype=F64), rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor(m, dtype=F64), rtol=1e-14, atol=0)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], torch.tensor(v, dtype=F64), rtol=1e-14, atol=0)
        assert float(opt.state[p]["step"]) == k + 1


def first_step(**kw):
    """One Lamb(**kw) step from x = (3, 4) with g = (1, -2), float64: (the parameter, the optimizer)."""
    p = torch.tensor([3.0, 4.0], dtype=F64, requires_grad=True)
    p.grad = torch.tensor([1.0, -2.0], dtype=F64)
    opt = Lamb([p], **kw)
    opt.step()
    return p, opt


def test_first_step_exact_numbers():
    # x = (3, 4), g = (1, -2); beta1=0.9, beta2=0.999, eps=0, wd=0, bias correction on:
    # m_hat = g, v_hat = g^2, r = sign(g) = (1, -1), ||x|| = 5, ||r|| = sqrt(2),
    # x1 = x - 0.1 * 5/sqrt(2) * (1, -1).
    p, _ = first_step(lr=0.1, eps=0.0)
    d = 0.5 / math.sqrt(2)
    torch.testing.assert_close(p.detach(), torch.tensor([3.0 - d, 4.0 + d], dtype=F64), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_decay_outside_the_ratio_first_step_exact_numbers(path):
    # decay_in_ratio=False: x' = x * (1 - lr*wd) = (3, 4) * 0.95 = (2.85, 3.8), ||x'|| = 4.75;
    # r = sign(g) = (1, -1) (eps = 0, first step), ||r|| = sqrt(2); x1 = x' - 0.1 * 4.75/sqrt(2) * (1, -1).
    p, opt = first_step(lr=0.1, eps=0.0, weight_decay=0.5, decay_in_ratio=False, **path)
    d = 0.475 / math.sqrt(2)
    torch.testing.assert_close(p.detach(), torch.tensor([2.85 - d, 3.8 + d], dtype=F64), rtol=1e-15, atol=1e-15)
    t = opt.telemetry.read()[p]
    assert t["weight_norm"] == pytest.approx(4.75, rel=1e-15) and t["update_norm"] == pytest.approx(math.sqrt(2), rel=1e-15)
    # The paper's placement for comparison: u = (1, -1) + 0.5 * (3, 4) = (2.5, 1), ||u|| = sqrt(7.25).
    q, _ = first_step(lr=0.1, eps=0.0, weight_decay=0.5, **path)
    e = 0.1 * 5 / math.sqrt(7.25)
    torch.testing.assert_close(q.detach(), torch.tensor([3.0 - 2.5 * e, 4.0 - e], dtype=F64), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("decay_in_ratio", [True, False])
def test_update_in_grad_first_step_exact_numbers(path, decay_in_ratio):
    # update_in_grad: the gradient holds u after the step. x = (3, 4), g = (1, -2), eps = 0, wd = 0.5:
    # r = sign(g) = (1, -1); u = r + 0.5 * (3, 4) = (2.5, 1) in the paper's placement, u = r otherwise.
    # The parameter moves exactly as without the option.
    p, _ = first_step(lr=0.1, eps=0.0, weight_decay=0.5, decay_in_ratio=decay_in_ratio, update_in_grad=True, **path)
    q, _ = first_step(lr=0.1, eps=0.0, weight_decay=0.5, decay_in_ratio=decay_in_ratio, **path)
    u = [2.5, 1.0] if decay_in_ratio else [1.0, -1.0]
    torch.testing.assert_close(p.grad, torch.tensor(u, dtype=F64), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(q.grad, torch.tensor([1.0, -2.0], dtype=F64), rtol=0, atol=0)  # default: untouched
    assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_without_grad_averaging_first_step_exact_numbers(path):
    # grad_averaging=False: m = g = (1, -2), m_hat = m / 0.1 = (10, -20), v_hat = g^2, r = (10, -10);
    # u = r + 0.5 * (3, 4) = (11.5, -8), ||u|| = sqrt(196.25); x1 = x - 0.1 * 5/sqrt(196.25) * u.
    p, opt = first_step(lr=0.1, eps=0.0, weight_decay=0.5, grad_averaging=False, **path)
    e = 0.1 * 5 / math.sqrt(196.25)
    torch.testing.assert_close(p.detach(), torch.tensor([3.0 - 11.5 * e, 4.0 + 8 * e], dtype=F64), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([1.0, -2.0], dtype=F64), rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_eps_root_first_step_exact_numbers(path):
    # eps = 0, eps_root = 3: v_hat = g^2 = (1, 4), denominators sqrt(4) = 2 and sqrt(7);
    # r = (1/2, -2/sqrt(7)); x1 = x - 0.1 * 5/||r|| * r.
    p, _ = first_step(lr=0.1, eps=0.0, eps_root=3.0, **path)
    r = torch.tensor([0.5, -2 / math.sqrt(7)], dtype=F64)
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 4.0], dtype=F64) - 0.5 / r.norm() * r, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_trust_clip_bounds_by_hand(path):
    # First step, eps = 0, wd = 0: u = sign(g), ||u|| = 2 for 4 elements; ratio = ||x|| / 2.
    # ||x|| = 200 -> 100, clamped to hi = 10; ||x|| = 2e-4 -> 1e-4, clamped to lo = 0.01;
    # ||x|| = 0 -> 1 (a zero norm's ratio is not clamped, even though 1 > hi for the last group).
    xs = [torch.full((4,), 100.0, dtype=F64), torch.full((4,), 1e-4, dtype=F64), torch.zeros(4, dtype=F64)]
    ps = clone_params(xs)
    g = torch.tensor([1.0, -1.0, 2.0, -0.5], dtype=F64)
    set_grads([ps], [g.clone() for _ in ps])
    groups = [{"params": ps[:2]}, {"params": ps[2:], "trust_clip": (0.01, 0.3)}]
    opt = Lamb(groups, lr=0.1, eps=0.0, trust_clip=(0.01, 10.0), **path)
    opt.step()
    for p, x, expected_ratio in zip(ps, xs, (10.0, 0.01, 1.0)):
        torch.testing.assert_close(p.detach(), x - 0.1 * expected_ratio * g.sign(), rtol=1e-15, atol=1e-18)
        assert opt.telemetry.read()[p]["trust_ratio"] == pytest.approx(expected_ratio, rel=1e-15)
    # trust_clip=True is (0, 1): the first tensor's ratio 100 becomes 1, the second stays 1e-4.
    ps = clone_params(xs)
    set_grads([ps], [g.clone() for _ in ps])
    opt = Lamb(ps, lr=0.1, eps=0.0, trust_clip=True, **path)
    opt.step()
    for p, expected_ratio in zip(ps, (1.0, 1e-4, 1.0)):
        assert opt.telemetry.read()[p]["trust_ratio"] == pytest.approx(expected_ratio, rel=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
def test_reduces_to_layer_scaled_sign_sgd(foreach):
    """beta1 = beta2 = eps = wd = 0: each tensor moves by lr*||x|| along sign(g)/sqrt(d)."""
    shapes = [(4, 3), (7,), (2, 2, 2)]
    xs = [torch.randn(s, dtype=F64) for s in shapes]
    ps = clone_params(xs)
    opt = Lamb(ps, lr=0.01, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0, foreach=foreach)
    for _ in range(3):
        gs = [torch.randn(s, dtype=F64) for s in shapes]
        before = [p.detach().clone() for p in ps]
        set_grads([ps], gs)
        opt.step()
        for p, x, g in zip(ps, before, gs):
            expected = x - 0.01 * x.norm() * g.sign() / math.sqrt(g.numel())
            torch.testing.assert_close(p.detach(), expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("decay_in_ratio", [True, False])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("wd,betas,eps", [(0.0, (0.9, 0.999), 1e-8), (0.1, (0.8, 0.95), 1e-6), (0.01, (0.0, 0.5), 1e-3)])
def test_equals_adamw_without_trust_ratio(foreach, wd, betas, eps, decay_in_ratio):
    shapes = [(5, 3), (3,), ()]
    xs = [torch.randn(s, dtype=F64) for s in shapes]
    a, b = clone_params(xs), clone_params(xs)
    ours = Lamb(a, lr=0.02, betas=betas, eps=eps, weight_decay=wd, adapt=False, foreach=foreach,
                decay_in_ratio=decay_in_ratio)  # fmt: skip
    ref = torch.optim.AdamW(b, lr=0.02, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    for _ in range(10):
        set_grads([a, b], [torch.randn(s, dtype=F64) for s in shapes])
        ours.step()
        ref.step()
    assert_same(a, b, rtol=1e-12, atol=1e-14)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(ours.state[pa]["exp_avg"], ref.state[pb]["exp_avg"], rtol=1e-13, atol=0)
        torch.testing.assert_close(ours.state[pa]["exp_avg_sq"], ref.state[pb]["exp_avg_sq"], rtol=1e-13, atol=0)


@pytest.mark.parametrize("nesterov", [None, "first", "both"])
@pytest.mark.parametrize("path", [*PATHS, "torch-backend"], ids=[*PATH_IDS, "torch-backend"])
def test_float32_steps_are_as_accurate_as_torch_adamw(path, nesterov, monkeypatch):
    """The bias corrections are computed in float64: in float32, 1 - 0.999**t loses five digits
    and the step was 7e-6 off. Zero weights (ratio 1, as for biases) and adapt=False (ratio 1
    everywhere) show it directly; the float32 steps must agree with the float64 run as closely as
    torch's AdamW(fused) does (3e-7 relative on this problem)."""
    if path == "torch-backend":  # the passes written as torch functions (GPUs, torch.compile)
        from largebatch.optim import _fused

        monkeypatch.setattr(_fused, "_use_torch_backend", lambda params: True)
        path = {}
    shapes = [(64, 32), (32,)]
    x0 = [torch.zeros(s, dtype=F64) for s in shapes]
    grads = [[torch.randn(s, dtype=F64) for s in shapes] for _ in range(3)]

    def run(dtype, make):
        ps = [x.to(dtype, copy=True).requires_grad_() for x in x0]
        opt = make(ps)
        for gs in grads:
            set_grads([ps], [g.to(dtype) for g in gs])
            opt.step()
        return [p.detach().to(F64) for p in ps]

    def rel_error(a, b):  # of the change from x0 = 0
        return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))

    kw = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    for adapt in (True, False):
        lamb = lambda ps, **over: Lamb(ps, **kw, nesterov=nesterov, adapt=adapt, **over)  # noqa: E731
        assert rel_error(run(torch.float32, lambda ps: lamb(ps, **path)), run(F64, lambda ps: lamb(ps, foreach=False))) < 1e-6
    adamw = lambda ps, **over: torch.optim.AdamW(ps, **kw, **over)  # noqa: E731
    ours = lambda ps, **over: Lamb(ps, **kw, adapt=False, decay_in_ratio=False, **over)  # noqa: E731
    if nesterov is None:
        torch_error = rel_error(run(torch.float32, lambda ps: adamw(ps, fused=True)), run(F64, adamw))
        assert rel_error(run(torch.float32, lambda ps: ours(ps, **path)), run(F64, adamw)) < 2 * torch_error


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_float32_layer_norms_are_accurate_on_large_layers(path):
    """||x|| and ||u|| of a 4M-element float32 layer agree with float64 to 1e-6 on every path
    (the torch paths sum squares in float64, the kernel sums float squares per block in double)."""
    x, g = torch.randn(1 << 22) + 3.0, torch.randn(1 << 22)
    p = x.clone().requires_grad_()
    p.grad = g.clone()
    opt = Lamb([p], lr=0.01, **path)
    opt.step()
    stats = opt.telemetry.read()[p]
    u = g.double() / (g.double().abs() + 1e-6)  # the first step's direction: m_hat / (sqrt(v_hat) + eps)
    assert stats["weight_norm"] == pytest.approx(x.double().norm().item(), rel=1e-6)
    assert stats["update_norm"] == pytest.approx(u.norm().item(), rel=1e-6)


@pytest.mark.parametrize("path", PATHS[:2], ids=PATH_IDS[:2])
def test_norms_of_tiny_float32_layers_do_not_underflow(path):
    """Squares of 1e-24 underflow in float32; the reference and multi-tensor paths sum them in
    float64, so the ratio stays ||x|| / ||u|| instead of the zero-norm ratio of 1."""
    p = torch.full((4,), 1e-24, requires_grad=True)
    p.grad = torch.ones(4)
    Lamb([p], lr=0.01, **path).step()
    torch.testing.assert_close(p.detach(), torch.full((4,), 0.99e-24), rtol=1e-5, atol=0)


# Options whose combinations matter for the multi-tensor path (table-driven).
OPTION_TABLE = [
    dict(),
    dict(bias_correction=False),
    dict(weight_decay=0.0),
    dict(nesterov="first"),
    dict(nesterov="both"),
    dict(nesterov="both", bias_correction=False),
    dict(phi=(0.5, 2.0)),
    dict(trust_clip=True),
    dict(adapt=False),
    dict(max_grad_norm=0.5),
    dict(max_grad_norm=0.5, nesterov="first", trust_clip=True),
    dict(nonfinite="none"),
    dict(betas=(0.0, 0.0), eps=0.0),
    dict(decay_in_ratio=False),
    dict(decay_in_ratio=False, nesterov="first", max_grad_norm=0.5),
    dict(trust_clip=(0.01, 10.0)),
    dict(trust_clip=(0.9, 1.1), phi=(0.5, 2.0)),
    dict(grad_averaging=False),
    dict(grad_averaging=False, nesterov="first"),
    dict(eps_root=1e-8),
    dict(eps=0.0, eps_root=1e-6, nesterov="both"),
]


def _params_for_equivalence():
    return [
        torch.randn(6, 5, dtype=F64),
        torch.randn(5, dtype=F64),
        torch.randn((), dtype=F64),
        torch.zeros(3, 2, dtype=F64),  # zero weight norm: ratio 1
        torch.randn(2, 3, 4, dtype=F64),
    ]


@pytest.mark.parametrize("options", OPTION_TABLE, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_foreach_matches_reference(options):
    xs = _params_for_equivalence()
    a, b = clone_params(xs), clone_params(xs)
    kw = dict(lr=0.05, weight_decay=0.02) | options

    def groups(ps):  # two groups: second one excluded from decay and adaptation
        return [{"params": ps[:3] + ps[4:]}, {"params": [ps[3]], "weight_decay": 0.0, "adapt": False}]

    ref = Lamb(groups(a), foreach=False, **kw)
    fast = Lamb(groups(b), foreach=True, **kw)
    for step in range(10):
        gs = [torch.randn_like(x) for x in xs]
        gs[2] = torch.zeros_like(gs[2]) if step == 4 else gs[2]  # a zero gradient
        if step == 6 and kw.get("nonfinite", "skip") == "skip":
            gs[1][0] = float("nan")  # non-finite: the step must be skipped exactly
        set_grads([a, b], gs)
        ref.step()
        fast.step()
        assert_same(a, b, rtol=1e-13, atol=1e-15)
        assert_states_equal(ref, a, fast, b, rtol=1e-13, atol=1e-15)
    if kw.get("nonfinite", "skip") == "skip":
        assert int(fast.skipped_steps) == int(ref.skipped_steps) >= 1


@pytest.mark.parametrize("foreach", [False, True])
def test_nonfinite_gradient_skips_and_changes_nothing(foreach):
    p = torch.randn(4, 3, dtype=F64, requires_grad=True)
    q = torch.randn(3, dtype=F64, requires_grad=True)
    opt = Lamb([{"params": [p]}, {"params": [q]}], lr=0.1, weight_decay=0.01, foreach=foreach)
    set_grads([[p, q]], [torch.randn(4, 3, dtype=F64), torch.randn(3, dtype=F64)])
    opt.step()
    snap_p, snap_q = p.detach().clone(), q.detach().clone()
    snap_state = {k: v.clone() for k, v in opt.state[p].items()}
    bad = torch.randn(4, 3, dtype=F64)
    bad[1, 1] = float("inf")
    set_grads([[p, q]], [bad, torch.randn(3, dtype=F64)])
    opt.step()
    assert torch.equal(p.detach(), snap_p)  # the bad group is untouched ...
    for k, v in snap_state.items():
        assert torch.equal(opt.state[p][k], v)
    assert not torch.equal(q.detach(), snap_q)  # ... the other group stepped
    assert int(opt.skipped_steps) == 1


def test_nonfinite_raise_policy():
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    with pytest.raises(FloatingPointError, match="non-finite gradient in parameter group 0"):
        Lamb([p], nonfinite="raise").step()


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_nonfinite_none_with_clipping_skips_and_counts(path):
    """With max_grad_norm the global norm is a check at no cost: even nonfinite="none" skips a
    step whose norm is not finite, and counts it."""
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt = Lamb([p], nonfinite="none", max_grad_norm=1.0, **path)
    before = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), before) and int(opt.skipped_steps) == 1


def test_nonfinite_raise_changes_no_group():
    """Every group is checked before any changes: the good group before the bad one is untouched too."""
    good, bad = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
    good.grad, bad.grad = torch.ones(3), torch.tensor([1.0, float("inf")])
    opt = Lamb([{"params": [good]}, {"params": [bad]}], lr=0.1, nonfinite="raise")
    before = good.detach().clone()
    with pytest.raises(FloatingPointError, match="parameter group 1 .*nothing was updated"):
        opt.step()
    assert torch.equal(good.detach(), before)
    assert len(opt.state) == 2 and all(float(s["step"]) == 0 for s in opt.state.values())


@pytest.mark.parametrize("clip_eps", [1e-6, 0.0])
@pytest.mark.parametrize("foreach", [False, True])
def test_max_grad_norm_clips_globally(foreach, clip_eps):
    """With clipping, Lamb sees g * min(1, c/(||g|| + clip_eps)) for ALL tensors together."""
    xs = [torch.randn(4, 4, dtype=F64), torch.randn(4, dtype=F64)]
    gs = [torch.randn(4, 4, dtype=F64) * 10, torch.randn(4, dtype=F64) * 10]
    total = torch.sqrt(sum(g.square().sum() for g in gs))
    coef = min(1.0, 1.0 / (float(total) + clip_eps))
    a, b = clone_params(xs), clone_params(xs)
    Lamb_a = Lamb([{"params": [a[0]]}, {"params": [a[1]]}], lr=0.1, max_grad_norm=1.0, clip_eps=clip_eps,
                  foreach=foreach)  # fmt: skip
    Lamb_b = Lamb(b, lr=0.1, foreach=foreach)
    set_grads([a], gs)
    set_grads([b], [g * coef for g in gs])
    Lamb_a.step()
    Lamb_b.step()
    assert_same(a, b, rtol=1e-13, atol=1e-15)
    assert torch.equal(a[0].grad, gs[0])  # the user's gradients are not modified
    torch.testing.assert_close(Lamb_a.last_grad_norm.double(), total, rtol=1e-6, atol=0)


def test_phi_bounds_and_trust_clip():
    p = torch.full((4,), 100.0, dtype=F64, requires_grad=True)  # ||x|| = 200
    p.grad = torch.ones(4, dtype=F64)
    opt = Lamb([p], lr=0.1, eps=0.0, phi=(0.0, 10.0))
    opt.step()
    # r = (1,1,1,1), ||r|| = 2, ratio = min(200, 10)/2 = 5
    torch.testing.assert_close(p.detach(), torch.full((4,), 100.0 - 0.1 * 5, dtype=F64))
    assert opt.telemetry.read()[p]["trust_ratio"] == pytest.approx(5.0)
    p2 = torch.full((4,), 100.0, dtype=F64, requires_grad=True)
    p2.grad = torch.ones(4, dtype=F64)
    opt2 = Lamb([p2], lr=0.1, eps=0.0, trust_clip=True)
    opt2.step()
    torch.testing.assert_close(p2.detach(), torch.full((4,), 100.0 - 0.1, dtype=F64))


def test_nesterov_first_step_by_hand():
    # t = 1: m = (1-b1) g, m_hat = b1 m/(1-b1^2) + (1-b1) g/(1-b1) = g (b1(1-b1)/(1-b1^2) + 1)
    b1, b2 = 0.9, 0.99
    g = torch.tensor([0.5, -1.0], dtype=F64)
    x = torch.tensor([2.0, 1.0], dtype=F64)
    for mode in ("first", "both"):
        p = x.clone().requires_grad_()
        p.grad = g.clone()
        Lamb([p], lr=0.1, betas=(b1, b2), eps=0.0, nesterov=mode).step()
        m_hat = g * (b1 * (1 - b1) / (1 - b1**2) + 1)
        v_hat = g * g if mode == "first" else g * g * (b2 * (1 - b2) / (1 - b2**2) + 1)
        u = m_hat / v_hat.sqrt()
        expected = x - 0.1 * x.norm() / u.norm() * u
        torch.testing.assert_close(p.detach(), expected, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_is_bit_identical(foreach):
    xs = _params_for_equivalence()
    grads = [[torch.randn_like(x) for x in xs] for _ in range(10)]

    def make(ps):
        return Lamb(ps, lr=0.05, weight_decay=0.01, nesterov="first", max_grad_norm=1.0, foreach=foreach)

    a = clone_params(xs)
    opt = make(a)
    for gs in grads:
        set_grads([a], gs)
        opt.step()

    b = clone_params(xs)
    opt_b = make(b)
    for gs in grads[:5]:
        set_grads([b], gs)
        opt_b.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in b], "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    c = clone_params(saved["params"])
    opt_c = make(c)
    opt_c.load_state_dict(saved["opt"])
    for gs in grads[5:]:
        set_grads([c], gs)
        opt_c.step()
    for x, y in zip(a, c):
        assert torch.equal(x, y)


def test_skipped_steps_survive_a_state_dict_round_trip():
    p = torch.nn.Parameter(torch.randn(3, dtype=F64))
    opt = Lamb([p], lr=0.1)
    p.grad = torch.tensor([1.0, float("inf"), 0.0], dtype=F64)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = Lamb([p], lr=0.1)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert int(fresh.skipped_steps) == 1
    fresh.step()  # the same non-finite gradient: counted on top of the saved count
    assert int(fresh.skipped_steps) == 2
    old = opt.state_dict()
    del old["skipped_steps"]  # as written before the count was saved
    fresh.load_state_dict(old)
    assert int(fresh.skipped_steps) == 2


def test_a_state_dict_of_other_parameters_is_refused_before_anything_changes():
    """torch.optim would load it and fail at the next step with a broadcasting error."""
    a = torch.nn.Parameter(torch.randn(2, 3, dtype=F64))
    a.grad = torch.randn(2, 3, dtype=F64)
    src = Lamb([a], lr=0.1)
    src.step()
    b = torch.nn.Parameter(torch.randn(3, 2, dtype=F64))  # as many elements, another shape
    b.grad = torch.randn(3, 2, dtype=F64)
    dst = Lamb([b], lr=0.5)
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(3, 2\) but its saved 'exp_avg' has shape \(2, 3\)"):
        dst.load_state_dict(src.state_dict())
    assert dst.param_groups[0]["lr"] == 0.5 and not dst.state  # nothing was loaded
    from largebatch import Lars

    lars = Lars([a], lr=0.1)
    lars.step()
    with pytest.raises(ValueError, match=r"without \['step', 'exp_avg', 'exp_avg_sq'\].*another optimizer"):
        Lamb([a], lr=0.1).load_state_dict(lars.state_dict())
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        Lamb([a], lr=0.1).load_state_dict({"param_groups": []})


def test_nonfinite_raise_with_clipping_names_the_group_at_fault():
    """With max_grad_norm the check is the global norm; the message still names the bad group."""
    p, q = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
    p.grad, q.grad = torch.ones(3), torch.tensor([1.0, float("nan")])
    opt = Lamb([{"params": [p]}, {"params": [q]}], nonfinite="raise", max_grad_norm=1.0)
    with pytest.raises(FloatingPointError, match="non-finite gradient in parameter group 1 "):
        opt.step()
    q.grad = torch.tensor([3e38, 3e38])  # finite, but the squared norm overflows float32
    with pytest.raises(FloatingPointError, match="non-finite gradient norm .*the norm overflowed"):
        opt.step()
    assert all(not opt.state[x] or int(opt.state[x]["step"]) == 0 for x in (p, q))


def test_a_state_dict_without_a_newer_option_loads_with_its_default():
    p = torch.nn.Parameter(torch.randn(3, dtype=F64))
    p.grad = torch.randn(3, dtype=F64)
    opt = Lamb([p], lr=0.1, weight_decay=0.01)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["decay_in_ratio"], group["update_in_grad"]  # as saved before the options existed
    fresh = Lamb([p], lr=0.1, weight_decay=0.01)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["decay_in_ratio"] is True
    assert fresh.param_groups[0]["update_in_grad"] is False
    fresh.step()


def test_zero_params_and_zero_grads_stay_finite():
    p = torch.zeros(3, 3, requires_grad=True)
    q = torch.randn(3, requires_grad=True)
    opt = Lamb([p, q], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        p.grad = torch.randn(3, 3)
        q.grad = torch.zeros(3)
        opt.step()
    assert torch.isfinite(p).all() and torch.isfinite(q).all()
    t = opt.telemetry.read()
    assert t[q]["trust_ratio"] > 0 and math.isfinite(t[q]["trust_ratio"])
    # the zero tensor took a first step with ratio 1 (its norm was 0): exactly lr * sign-like update
    r = Lamb([torch.zeros(2, requires_grad=True)], lr=0.1)
    r.param_groups[0]["params"][0].grad = torch.tensor([1.0, -1.0])
    r.step()
    assert r.telemetry.read()[r.param_groups[0]["params"][0]]["trust_ratio"] == 1.0


def test_empty_group_and_params_without_grad():
    p = torch.randn(3, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    opt = Lamb([{"params": [p, unused]}, {"params": []}], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    assert unused not in opt.state or len(opt.state[unused]) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_params_use_float32_state_and_master_weights(dtype):
    x = torch.randn(8, 8)
    p = x.to(dtype).requires_grad_()
    ref = x.to(dtype).float().requires_grad_()
    opt = Lamb([p], lr=1e-3, weight_decay=0.01)
    opt_ref = Lamb([ref], lr=1e-3, weight_decay=0.01)
    for _ in range(5):
        g = torch.randn(8, 8)
        p.grad = g.to(dtype)
        ref.grad = g.to(dtype).float()
        opt.step()
        opt_ref.step()
    st = opt.state[p]
    assert st["exp_avg"].dtype == torch.float32 and st["master"].dtype == torch.float32
    torch.testing.assert_close(st["master"], ref.detach(), rtol=1e-6, atol=1e-6)  # updates are not lost to rounding
    assert torch.equal(p.detach(), st["master"].to(dtype))
    # the master copy survives a state_dict round trip
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = Lamb([p], lr=1e-3)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(opt2.state[p]["master"], st["master"])


def test_mixed_dtypes_in_one_group():
    a = torch.randn(4, dtype=F64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float32, requires_grad=True)
    opt = Lamb([a, b], lr=0.1)
    a.grad, b.grad = torch.randn(4, dtype=F64), torch.randn(4)
    opt.step()
    assert opt.state[a]["exp_avg"].dtype == F64 and opt.state[b]["exp_avg"].dtype == torch.float32


def test_closure_is_called_and_returned():
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    opt = Lamb([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) == pytest.approx(5.0)


def test_telemetry_matches_definition():
    p = torch.randn(5, 4, dtype=F64, requires_grad=True)
    x0 = p.detach().clone()
    p.grad = torch.randn(5, 4, dtype=F64)
    opt = Lamb([p], lr=0.1, weight_decay=0.1, eps=0.0)
    opt.step()
    t = opt.telemetry.read()[p]
    u = p.grad.sign() + 0.1 * x0  # first step, bias-corrected, eps 0: r = sign(g)
    assert t["weight_norm"] == pytest.approx(float(x0.norm()), rel=1e-12)
    assert t["update_norm"] == pytest.approx(float(u.norm()), rel=1e-12)
    assert t["trust_ratio"] == pytest.approx(float(x0.norm() / u.norm()), rel=1e-12)


@pytest.mark.parametrize("optimizer", ["lamb", "lars"])
def test_quadratic_with_layer_curvatures_converges(optimizer):
    """Per-layer quadratic 0.5 * L_i * ||x_i - c_i||^2 with L_i over four orders of magnitude."""
    from largebatch import create_optimizer

    curv = [1e-2, 1.0, 1e2]
    xs = [torch.randn(10, dtype=F64, requires_grad=True) for _ in curv]
    cs = [torch.randn(10, dtype=F64) for _ in curv]

    def loss():
        return sum(0.5 * L * (x - c).square().sum() for L, x, c in zip(curv, xs, cs))

    start = float(loss())
    lr = 0.05 if optimizer == "lamb" else 0.05
    opt = create_optimizer(optimizer, xs, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / 600)
    for _ in range(600):
        opt.zero_grad()
        loss().backward()
        opt.step()
        sched.step()
    assert float(loss()) < 1e-3 * start


def test_rosenbrock():
    xy = torch.tensor([-1.5, 2.0], dtype=F64, requires_grad=True)
    opt = Lamb([xy], lr=0.02, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / 4000)
    for _ in range(4000):
        opt.zero_grad()
        x, y = xy
        ((1 - x) ** 2 + 100 * (y - x * x) ** 2).backward()
        opt.step()
        sched.step()
    torch.testing.assert_close(xy.detach(), torch.tensor([1.0, 1.0], dtype=F64), atol=2e-2, rtol=0)


@pytest.mark.parametrize(
    "trust_clip,nesterov,decay_in_ratio", [(False, None, True), (True, "both", True), ((0.01, 10.0), None, False)]
)
def test_torch_compile_step_matches_eager(trust_clip, nesterov, decay_in_ratio):
    """The whole step compiles as ONE graph (fullgraph=True: no graph break, no host sync)."""
    kw = dict(lr=1e-2, weight_decay=0.01, max_grad_norm=1.0, trust_clip=trust_clip, nesterov=nesterov,
              decay_in_ratio=decay_in_ratio)  # fmt: skip
    assert_compiled_step_matches_eager(Lamb, kw)


def test_torch_compile_step_with_update_in_grad():
    """Writing the update into the gradients compiles into the same single graph."""
    assert_compiled_step_matches_eager(Lamb, dict(lr=1e-2, weight_decay=0.01, nesterov="first", update_in_grad=True))
