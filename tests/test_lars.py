"""Lars, both modes: hand-computed steps, reductions to SGD, reference vs multi-tensor."""

import io
import itertools
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

from largebatch import Lars

F64 = torch.float64


def _norm(a):
    return math.sqrt(sum(t * t for t in a))


def hand_lars_paper(x, gs, lr, beta, wd, nesterov=False, coef=1.0, eps=0.0):
    m = [0.0] * len(x)
    x = list(x)
    for g in gs:
        d = [gi + wd * xi for gi, xi in zip(g, x)]
        m = [beta * mi + (1 - beta) * di for mi, di in zip(m, d)]
        n = [beta * mi + (1 - beta) * di for mi, di in zip(m, d)] if nesterov else m
        wn, nn = _norm(x), _norm(n)
        ratio = coef * wn / (nn + eps) if wn > 0 and nn > 0 else 1.0
        x = [xi - lr * ratio * ni for xi, ni in zip(x, n)]
    return x, m


def hand_lars_classic(x, gs, lr, mom, wd, coef, eps, nesterov=False, clip=False, denominator="sum",
                      lr_in_momentum=False):  # fmt: skip
    """``lr`` is a number or one value per step."""
    b = [0.0] * len(x)
    x = list(x)
    for k, g in enumerate(gs):
        lr_k = lr[k] if isinstance(lr, (list, tuple)) else lr
        wn = _norm(x)
        if denominator == "combined":  # ||g + wd x|| (optax, SimCLR)
            gn = _norm([gi + wd * xi for gi, xi in zip(g, x)])
            den = gn + eps
        else:
            gn = _norm(g)
            den = gn + wd * wn + eps
        local = coef * wn / den if wn > 0 and gn > 0 else 1.0
        if clip:
            local = min(local / lr_k, 1.0)
        d = [(gi + wd * xi) * local * (lr_k if lr_in_momentum else 1.0) for gi, xi in zip(g, x)]
        b = [mom * bi + di for bi, di in zip(b, d)]
        step = [di + mom * bi for di, bi in zip(d, b)] if nesterov else b
        x = [xi - (1.0 if lr_in_momentum else lr_k) * si for xi, si in zip(x, step)]
    return x, b


X0 = [1.0, -2.0, 0.5]
GS = [[0.3, -0.1, 2.0], [-0.2, 0.4, 1.0], [0.0, 0.1, -0.3]]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_paper_mode_by_hand(foreach, nesterov):
    p = torch.tensor(X0, dtype=F64, requires_grad=True)
    opt = Lars([p], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov, foreach=foreach)
    for k in range(3):
        p.grad = torch.tensor(GS[k], dtype=F64)
        opt.step()
        x, m = hand_lars_paper(X0, GS[: k + 1], 0.1, 0.9, 0.01, nesterov)
        torch.testing.assert_close(p.detach(), torch.tensor(x, dtype=F64), rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.tensor(m, dtype=F64), rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("nesterov,clip", list(itertools.product([False, True], [False, True])))
def test_classic_mode_by_hand(foreach, nesterov, clip):
    p = torch.tensor(X0, dtype=F64, requires_grad=True)
    opt = Lars([p], lr=0.5, momentum=0.9, weight_decay=0.01, mode="classic", nesterov=nesterov, clip=clip, foreach=foreach)
    for k in range(3):
        p.grad = torch.tensor(GS[k], dtype=F64)
        opt.step()
        x, b = hand_lars_classic(X0, GS[: k + 1], 0.5, 0.9, 0.01, 1e-3, 1e-8, nesterov, clip)
        torch.testing.assert_close(p.detach(), torch.tensor(x, dtype=F64), rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.tensor(b, dtype=F64), rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("denominator", ["sum", "combined"])
@pytest.mark.parametrize("lr_in_momentum,nesterov", [(False, False), (True, False), (True, True)])
def test_classic_conventions_by_hand(path, denominator, lr_in_momentum, nesterov):
    """The two classic denominators and the learning rate inside the buffer, under a changing lr
    (with a constant lr lr_in_momentum changes nothing)."""
    lrs = [0.5, 0.2, 0.8]
    wd = 0.3  # large, so that the three denominators differ clearly
    p = torch.tensor(X0, dtype=F64, requires_grad=True)
    opt = Lars([p], lr=lrs[0], momentum=0.9, weight_decay=wd, mode="classic", nesterov=nesterov,
               denominator=denominator, lr_in_momentum=lr_in_momentum, **path)  # fmt: skip
    for k in range(3):
        opt.param_groups[0]["lr"] = lrs[k]
        p.grad = torch.tensor(GS[k], dtype=F64)
        opt.step()
        x, b = hand_lars_classic(X0, GS[: k + 1], lrs, 0.9, wd, 1e-3, 1e-8, nesterov, False, denominator, lr_in_momentum)
        torch.testing.assert_close(p.detach(), torch.tensor(x, dtype=F64), rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.tensor(b, dtype=F64), rtol=1e-14, atol=1e-16)
    # The conventions do change the trajectory.
    default, _ = hand_lars_classic(X0, GS, lrs, 0.9, wd, 1e-3, 1e-8, nesterov)
    if (denominator, lr_in_momentum) != ("sum", False):
        assert max(abs(u - v) for u, v in zip(x, default)) > 1e-6


def test_paper_first_step_exact_numbers():
    # x = (3, 4), g = (1, 0), wd = 0: m = 0.1 * g, ratio = 5 / 0.1, x1 = x - lr * 5 * (1, 0)
    p = torch.tensor([3.0, 4.0], dtype=F64, requires_grad=True)
    p.grad = torch.tensor([1.0, 0.0], dtype=F64)
    Lars([p], lr=0.01, momentum=0.9).step()
    torch.testing.assert_close(p.detach(), torch.tensor([3.0 - 0.05, 4.0], dtype=F64), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_classic_without_adaptation_is_torch_sgd(foreach, nesterov):
    xs = [torch.randn(4, 3, dtype=F64), torch.randn(3, dtype=F64)]
    a, b = clone_params(xs), clone_params(xs)
    ours = Lars(a, lr=0.1, momentum=0.9, weight_decay=0.01, mode="classic", adapt=False, nesterov=nesterov, foreach=foreach)
    ref = torch.optim.SGD(b, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov, foreach=False)
    for _ in range(10):
        set_grads([a, b], [torch.randn_like(x) for x in xs])
        ours.step()
        ref.step()
    assert_same(a, b, rtol=1e-13, atol=1e-15)


OPTION_TABLE = [
    dict(mode="paper"),
    dict(mode="paper", nesterov=True),
    dict(mode="paper", clip=True),
    dict(mode="paper", phi=(0.1, 1.0)),
    dict(mode="paper", weight_decay=0.0, trust_coefficient=0.02, eps=1e-9),
    dict(mode="classic"),
    dict(mode="classic", nesterov=True),
    dict(mode="classic", clip=True),
    dict(mode="classic", max_grad_norm=0.5),
    dict(mode="paper", max_grad_norm=0.5, adapt=False),
    dict(mode="classic", nonfinite="none"),
    dict(mode="classic", denominator="combined"),
    dict(mode="classic", lr_in_momentum=True, nesterov=True),
    dict(mode="classic", denominator="combined", lr_in_momentum=True, clip=True, max_grad_norm=0.5),
]


@pytest.mark.parametrize("options", OPTION_TABLE, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_foreach_matches_reference(options):
    xs = [torch.randn(6, 5, dtype=F64), torch.randn(5, dtype=F64), torch.randn((), dtype=F64), torch.zeros(2, 3, dtype=F64)]
    a, b = clone_params(xs), clone_params(xs)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.01) | options

    def groups(ps):
        return [{"params": ps[:3]}, {"params": ps[3:], "weight_decay": 0.0, "adapt": False}]

    ref, fast = Lars(groups(a), foreach=False, **kw), Lars(groups(b), foreach=True, **kw)
    for step in range(10):
        gs = [torch.randn_like(x) for x in xs]
        if step == 5 and kw.get("nonfinite", "skip") == "skip":
            gs[0][1, 1] = float("inf")
        set_grads([a, b], gs)
        ref.step()
        fast.step()
        assert_same(a, b, rtol=1e-13, atol=1e-15)
        assert_states_equal(ref, a, fast, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("mode", ["paper", "classic"])
def test_nonfinite_skip_leaves_everything_unchanged(mode):
    p = torch.randn(4, 4, dtype=F64, requires_grad=True)
    opt = Lars([p], lr=0.1, weight_decay=0.01, mode=mode)
    p.grad = torch.randn(4, 4, dtype=F64)
    opt.step()
    snap, buf = p.detach().clone(), opt.state[p]["momentum_buffer"].clone()
    p.grad = torch.full((4, 4), float("nan"), dtype=F64)
    opt.step()
    assert torch.equal(p.detach(), snap) and torch.equal(opt.state[p]["momentum_buffer"], buf)
    assert int(opt.skipped_steps) == 1


def test_state_dict_round_trip_is_bit_identical():
    xs = [torch.randn(5, 4, dtype=F64), torch.randn(4, dtype=F64)]
    grads = [[torch.randn_like(x) for x in xs] for _ in range(8)]
    a = clone_params(xs)
    opt = Lars(a, lr=0.1, mode="classic", nesterov=True, weight_decay=0.01)
    for gs in grads:
        set_grads([a], gs)
        opt.step()
    b = clone_params(xs)
    opt_b = Lars(b, lr=0.1, mode="classic", nesterov=True, weight_decay=0.01)
    for gs in grads[:4]:
        set_grads([b], gs)
        opt_b.step()
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)
    buf.seek(0)
    opt_c = Lars(b, lr=0.1, mode="classic", nesterov=True, weight_decay=0.01)
    opt_c.load_state_dict(torch.load(buf, weights_only=True))
    for gs in grads[4:]:
        set_grads([b], gs)
        opt_c.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_rosenbrock_lars():
    xy = torch.tensor([-1.5, 2.0], dtype=F64, requires_grad=True)
    opt = Lars([xy], lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / 5000)
    for _ in range(5000):
        opt.zero_grad()
        x, y = xy
        ((1 - x) ** 2 + 100 * (y - x * x) ** 2).backward()
        opt.step()
        sched.step()
    torch.testing.assert_close(xy.detach(), torch.tensor([1.0, 1.0], dtype=F64), atol=5e-2, rtol=0)


def test_defaults_depend_on_mode():
    p = [torch.zeros(2, requires_grad=True)]
    g = Lars(p).param_groups[0]
    assert g["trust_coefficient"] == 1.0 and g["eps"] == 0.0
    c = Lars(p, mode="classic").param_groups[0]
    assert c["trust_coefficient"] == 1e-3 and c["eps"] == 1e-8
    assert Lars(p, mode="classic", trust_coefficient=0.02, eps=0.0).param_groups[0]["trust_coefficient"] == 0.02


@pytest.mark.parametrize("ctor_mode,group_mode", [("paper", "classic"), ("classic", "paper")])
def test_a_group_with_its_own_mode_gets_that_modes_defaults(ctor_mode, group_mode):
    """trust_coefficient/eps follow each group's mode, so a group {"mode": m} steps exactly as
    Lars(mode=m); a "paper" group does not inherit the constructor's classic-only options."""
    x0, grads = torch.randn(4, 3, dtype=F64), [torch.randn(4, 3, dtype=F64) for _ in range(3)]
    a, b = clone_params([x0]), clone_params([x0])
    ctor = dict(mode=ctor_mode, lr=0.5, weight_decay=0.01)
    if ctor_mode == "classic":
        ctor.update(lr_in_momentum=True, denominator="combined")
    grouped = Lars([{"params": a, "mode": group_mode}], **ctor)
    alone = Lars(b, mode=group_mode, lr=0.5, weight_decay=0.01)
    expected = dict(paper=(1.0, 0.0), classic=(1e-3, 1e-8))[group_mode]
    assert (grouped.param_groups[0]["trust_coefficient"], grouped.param_groups[0]["eps"]) == expected
    for g in grads:
        set_grads([a, b], [g])
        grouped.step()
        alone.step()
    assert_same(a, b)
    # a saved group without the two values (a state dict that predates them) takes its mode's
    again = Lars(clone_params([x0]), **ctor)
    saved = grouped.state_dict()
    for key in ("trust_coefficient", "eps"):
        del saved["param_groups"][0][key]
    again.load_state_dict(saved)
    assert (again.param_groups[0]["trust_coefficient"], again.param_groups[0]["eps"]) == expected


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(mode="classic", clip=True, max_grad_norm=1.0),
     dict(mode="classic", denominator="combined", lr_in_momentum=True, nesterov=True)],
    ids=["paper", "classic-larc-clipped", "classic-combined-lr-in-momentum"],
)  # fmt: skip
def test_torch_compile_step_matches_eager(kw):
    """The whole step compiles as ONE graph (fullgraph=True: no graph break, no host sync)."""
    assert_compiled_step_matches_eager(Lars, dict(lr=0.05, momentum=0.9, weight_decay=0.01) | kw)
