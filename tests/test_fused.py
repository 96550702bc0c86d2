"""The fused LAMB/LARS steps against the single-tensor reference, on params AND every state entry.

Both fused backends are checked on CPU: the compiled C++ kernel (what CPU tensors use) and the
torch-function backend (what GPUs use; here forced onto CPU tensors, eagerly and compiled).
Vectorised sums are reordered, so float32 is compared with rtol 1e-5 and float64 with rtol 1e-12.
"""

import json

import pytest
import torch
from conftest import clone_params, set_grads

from largebatch import Lamb, Lars
from largebatch.optim import _fused
from largebatch.optim._common import run

F32, F64 = torch.float32, torch.float64
TOL = {F32: dict(rtol=1e-5, atol=1e-6), F64: dict(rtol=1e-12, atol=1e-14)}

needs_kernel = pytest.mark.skipif(
    _fused.load_cpu_kernel("lamb", F32) is None, reason="no C++ compiler: the fused CPU kernel cannot be built"
)


def shapes():
    # 0-d, 1-d, a zero tensor (ratio 1), small n-d, and tensors large enough to be split over threads
    return [(6, 5), (5,), (), (3, 2), (2, 3, 4), (40_000,), (300, 200)]


def make_params(dtype):
    xs = [torch.randn(s, dtype=dtype) for s in shapes()]
    xs[3].zero_()
    return xs


def make_grads(dtype, steps=10, nonfinite_step=6):
    out = []
    for step in range(steps):
        gs = [torch.randn(s, dtype=dtype) for s in shapes()]
        if step == 4:
            gs[2] = torch.zeros_like(gs[2])  # a zero gradient
        if step == nonfinite_step:
            gs[5][123] = float("nan")  # the whole step must be skipped exactly
        out.append(gs)
    return out


def groups(ps):  # two groups; the second is excluded from decay and adaptation
    return [{"params": ps[:3] + ps[4:]}, {"params": [ps[3]], "weight_decay": 0.0, "adapt": False}]


def assert_match(opt_a, pa, opt_b, pb, tol):
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, **tol)
        # gradients too: unchanged, or the update where update_in_grad (NaN kept where a step was skipped)
        torch.testing.assert_close(x.grad, y.grad, **tol, equal_nan=True, msg=lambda m: f"grad: {m}")
        sa, sb = opt_a.state[x], opt_b.state[y]
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], **tol, msg=lambda m: f"state {k!r}: {m}")


def run_pair(cls, kw, dtype, fused_kw, steps=10, nonfinite_step=6):
    xs, grads = make_params(dtype), make_grads(dtype, steps, nonfinite_step)
    a, b = clone_params(xs), clone_params(xs)
    ref = cls(groups(a), foreach=False, **kw)
    fast = cls(groups(b), **fused_kw, **kw)
    for step, gs in enumerate(grads):
        set_grads([a, b], gs)
        ref.step()
        fast.step()
        if step in (nonfinite_step - 1, nonfinite_step, steps - 1):  # before/after the skipped step, and at the end
            assert_match(ref, a, fast, b, TOL[dtype])
    assert int(fast.skipped_steps) == int(ref.skipped_steps)
    return ref, fast, a, b


LAMB_OPTIONS = [
    dict(),
    dict(bias_correction=False),
    dict(weight_decay=0.0),
    dict(nesterov="first"),
    dict(nesterov="both"),
    dict(nesterov="both", bias_correction=False, weight_decay=0.1),
    dict(phi=(0.5, 2.0)),
    dict(trust_clip=True),
    dict(adapt=False),
    dict(max_grad_norm=0.5),
    dict(max_grad_norm=0.5, nesterov="first", trust_clip=True),
    dict(betas=(0.0, 0.0), eps=0.0),
    dict(eps=0.0, nesterov="both"),
    dict(decay_in_ratio=False),
    dict(decay_in_ratio=False, nesterov="both", max_grad_norm=0.5),
    dict(trust_clip=(0.01, 10.0)),
    dict(trust_clip=(0.9, 1.1), decay_in_ratio=False, phi=(0.5, 2.0)),
    dict(grad_averaging=False),
    dict(grad_averaging=False, nesterov="both"),
    dict(eps_root=1e-8),
    dict(eps=0.0, eps_root=1e-6, bias_correction=False, nesterov="first"),
    dict(update_in_grad=True),
    dict(update_in_grad=True, nesterov="both", max_grad_norm=0.5),
    dict(update_in_grad=True, decay_in_ratio=False, eps=0.0, nesterov="first"),
]
LARS_OPTIONS = [
    dict(),
    dict(nesterov=True),
    dict(clip=True, phi=(0.1, 5.0)),
    dict(weight_decay=0.0, trust_coefficient=0.02, eps=1e-3),
    dict(adapt=False),
    dict(max_grad_norm=0.5, nesterov=True),
    dict(mode="classic"),
    dict(mode="classic", nesterov=True, clip=True),
    dict(mode="classic", weight_decay=0.0, lr=0.0, clip=True),
    dict(mode="classic", max_grad_norm=0.5),
    dict(mode="classic", denominator="combined"),
    dict(mode="classic", lr_in_momentum=True, nesterov=True),
    dict(mode="classic", denominator="combined", lr_in_momentum=True, clip=True),
]


def ids(o):
    return ",".join(f"{k}={v}" for k, v in o.items()) or "defaults"


@needs_kernel
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("options", LAMB_OPTIONS, ids=ids)
def test_lamb_kernel_matches_reference(options, dtype):
    run_pair(Lamb, dict(lr=0.05, weight_decay=0.02) | options, dtype, dict(fused=True))


@needs_kernel
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("options", LARS_OPTIONS, ids=ids)
def test_lars_kernel_matches_reference(options, dtype):
    run_pair(Lars, dict(lr=0.1, weight_decay=0.01) | options, dtype, dict(fused=True))


# Every option of each optimizer with the values that change its arithmetic; random combinations
# of them catch interactions that the tables above do not list one by one.
LAMB_CHOICES = dict(
    bias_correction=[True, False], grad_averaging=[True, False], decay_in_ratio=[True, False],
    nesterov=[None, "first", "both"], eps=[1e-6, 0.0], eps_root=[0.0, 1e-4], phi=[None, (0.5, 3.0)],
    trust_clip=[False, True, (0.2, 5.0)], max_grad_norm=[None, 2.0], clip_eps=[1e-6, 0.0], weight_decay=[0.0, 0.05],
    update_in_grad=[False, True],
)  # fmt: skip
LARS_CHOICES = dict(
    mode=["paper", "classic"], nesterov=[False, True], clip=[False, True], weight_decay=[0.0, 0.01],
    max_grad_norm=[None, 2.0], denominator=["sum", "combined"], lr_in_momentum=[False, True],
)  # fmt: skip


def random_options(choices: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    kw = {k: v[int(torch.randint(len(v), (), generator=gen))] for k, v in choices.items()}
    if kw.get("mode") == "paper":  # the classic-only options keep their defaults
        kw.update(denominator="sum", lr_in_momentum=False)
    return kw


@needs_kernel
@pytest.mark.parametrize("seed", range(16))
def test_random_lamb_option_combinations_match_reference(seed):
    run_pair(Lamb, dict(lr=0.05) | random_options(LAMB_CHOICES, seed), F64, dict(fused=True), steps=5, nonfinite_step=3)


@needs_kernel
@pytest.mark.parametrize("seed", range(12))
def test_random_lars_option_combinations_match_reference(seed):
    run_pair(Lars, dict(lr=0.1) | random_options(LARS_CHOICES, seed), F64, dict(fused=True), steps=5, nonfinite_step=3)


@pytest.mark.parametrize("cls,choices", [(Lamb, LAMB_CHOICES), (Lars, LARS_CHOICES)], ids=["lamb", "lars"])
@pytest.mark.parametrize("seed", range(200, 206))
def test_random_option_combinations_multi_tensor(cls, choices, seed):
    run_pair(cls, dict(lr=0.05) | random_options(choices, seed), F64, dict(fused=False), steps=5, nonfinite_step=3)


@pytest.fixture
def torch_backend(monkeypatch):
    """Route CPU tensors to the torch-function backend (the one GPUs use)."""
    monkeypatch.setattr(_fused, "_use_torch_backend", lambda params: True)


@pytest.mark.parametrize("options", LAMB_OPTIONS, ids=ids)
def test_lamb_torch_backend_matches_reference(options, torch_backend):
    run_pair(Lamb, dict(lr=0.05, weight_decay=0.02) | options, F64, dict(fused=True))


@pytest.mark.parametrize("options", LARS_OPTIONS, ids=ids)
def test_lars_torch_backend_matches_reference(options, torch_backend):
    run_pair(Lars, dict(lr=0.1, weight_decay=0.01) | options, F64, dict(fused=True))


@pytest.mark.parametrize("seed", range(100, 108))
def test_random_lamb_option_combinations_torch_backend(seed, torch_backend):
    run_pair(Lamb, dict(lr=0.05) | random_options(LAMB_CHOICES, seed), F64, dict(fused=True), steps=5, nonfinite_step=3)


@pytest.mark.parametrize(
    "cls,kw",
    [(Lamb, dict(nesterov="both", max_grad_norm=1.0)), (Lamb, dict(decay_in_ratio=False, trust_clip=(0.5, 2.0), grad_averaging=False)),
     (Lamb, dict(update_in_grad=True, nesterov="first")),
     (Lars, dict(nesterov=True)),
     (Lars, dict(mode="classic", denominator="combined", lr_in_momentum=True, nesterov=True))],
)  # fmt: skip
def test_torch_backend_compiled_matches_reference(cls, kw, torch_backend, monkeypatch):
    """The passes compiled with torch.compile (Inductor's C++ here; Triton on a GPU)."""
    torch._dynamo.reset()
    monkeypatch.setattr(_fused, "_COMPILE_ON_CPU", True)
    monkeypatch.setattr(_fused, "_compiled_passes", {})
    monkeypatch.setattr(_fused, "_CHUNK", 3)  # graphs over 3 tensors and over 1
    run_pair(cls, dict(lr=0.05, weight_decay=0.01) | kw, F32, dict(fused=True), steps=4, nonfinite_step=2)
    assert _fused._compiled_passes  # the compiled form was used


def test_non_cpu_tensors_use_the_torch_backend_without_host_syncs():
    """Meta tensors have no data: any read on the host (bool(ok), .item()) would raise."""
    meta = torch.device("meta")
    xs = [torch.empty(s, device=meta) for s in shapes()]
    assert _fused.fused_available(xs)
    assert _fused._use_torch_backend(xs)
    ok = torch.ones((), dtype=torch.bool, device=meta)
    scale = torch.ones((), device=meta)
    like = lambda: [torch.empty_like(x) for x in xs]  # noqa: E731
    steps = [torch.zeros((), device=meta) for _ in xs]
    w, u, r = run(_fused.fused_lamb(
        xs, like(), like(), like(), steps, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-6, eps_root=1e-12, weight_decay=0.01,
        decay_in_ratio=False, bias_correction=True, grad_averaging=False, adapt=True, phi=None, trust_clip=(0.01, 10.0), nesterov="both",
        update_in_grad=True, ok=ok,
        grad_scale=scale, reduce=lambda t: t,
    ))  # fmt: skip
    assert w.device == meta and w.shape == (len(xs),)
    for mode in ("paper", "classic"):
        run(_fused.fused_lars(
            xs, like(), like(), lr=0.1, momentum=0.9, weight_decay=0.01, trust_coefficient=1.0, eps=0.0,
            nesterov=True, mode=mode, clip=True, denominator="combined" if mode == "classic" else "sum",
            lr_in_momentum=mode == "classic", phi=None, adapt=True, ok=ok, grad_scale=scale, reduce=None,
        ))  # fmt: skip
    assert not _fused._compiled_passes  # nothing compiled for the meta device


def test_accelerators_run_each_pass_compiled_over_chunks_of_tensors(monkeypatch):
    """On a GPU each pass is one compiled call per ``_CHUNK`` tensors (the remainder one at a time,
    so a bucket needs at most two graphs), and the chunked calls give what one call over all does."""
    calls, compiled = [], []

    def fake_compile(fn, **kw):
        compiled.append((fn.__code__.co_name, kw))

        def counted(lists, stacked, shared):
            calls.append(len(lists[0]))
            return fn(lists, stacked, shared)

        return counted

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(_fused, "_compiled_passes", {})
    monkeypatch.setattr(_fused, "_CHUNK", 4)
    torch.manual_seed(0)
    xs = [torch.randn(s) for s in (3, 5, 1, 8, 2, 7, 4, 6, 9, 2)]
    gs = [torch.randn_like(x) for x in xs]
    shared = (None, None, 0.5)
    sums = _fused._run_pass("_lars_classic_pass1", torch.device("cuda"), [xs, gs], (), shared)
    assert calls == [4, 4, 1, 1]
    assert compiled == [("_lars_classic_pass1_many", dict(dynamic=True, fullgraph=True))]
    want = torch.stack([torch.stack([(x * x).sum(), ((g + 0.5 * x) ** 2).sum()]) for x, g in zip(xs, gs)])
    torch.testing.assert_close(sums, want.double())  # squared sums are accumulated in float64
    assert torch.equal(sums, _fused._MANY["_lars_classic_pass1"]([xs, gs], (), shared))
    # a pass that returns nothing, with per-tensor scalars (stacked) sliced along with the chunks
    bs = [torch.randn_like(x) for x in xs]
    ratio = torch.rand(len(xs))
    x2, b2 = [x.clone() for x in xs], [b.clone() for b in bs]
    shared = (None, None, 0.1, 0.9, 0.01, True, False)
    calls.clear()
    assert _fused._run_pass("_lars_classic_pass2", torch.device("cuda"), [xs, gs, bs], [ratio], shared) is None
    assert calls == [4, 4, 1, 1]
    _fused._MANY["_lars_classic_pass2"]([x2, gs, b2], [ratio], shared)
    for a, b in zip(xs + bs, x2 + b2):
        assert torch.equal(a, b)
    # every pass is a code object of its own (torch.compile caches and limits recompiles per code object)
    assert len({f.__code__ for f in _fused._MANY.values()}) == len(_fused._PASSES)


@needs_kernel
def test_skipped_step_changes_nothing_bitwise():
    xs = make_params(F32)
    ps = clone_params(xs)
    opt = Lamb(ps, lr=0.1, weight_decay=0.01, fused=True)
    set_grads([ps], [torch.randn_like(x) for x in xs])
    opt.step()
    snap = [p.detach().clone() for p in ps]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    bad = [torch.randn_like(x) for x in xs]
    bad[6][5, 7] = float("inf")
    set_grads([ps], bad)
    opt.step()
    for p, s, st in zip(ps, snap, state):
        assert torch.equal(p.detach(), s)
        for k, v in st.items():
            assert torch.equal(opt.state[p][k], v)
    assert int(opt.skipped_steps) == 1


@needs_kernel
@pytest.mark.parametrize("gdtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_params_with_master_weights(gdtype):
    """16-bit parameters: float32 masters and state, 16-bit gradients read by the kernel directly."""
    x = torch.randn(300, 200)
    a, b = x.to(gdtype).requires_grad_(), x.to(gdtype).requires_grad_()
    ref = Lamb([a], lr=1e-3, weight_decay=0.01, foreach=False)
    fast = Lamb([b], lr=1e-3, weight_decay=0.01, fused=True)
    for _ in range(5):
        g = torch.randn(300, 200).to(gdtype)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        fast.step()
    assert_match(ref, [a], fast, [b], TOL[F32] | dict(atol=1e-5))
    assert _fused.cpu_kernel_info("lamb", F32, gdtype).get("error") is None


@pytest.mark.parametrize("sharded", [False, True], ids=["unsharded", "sharded"])
@pytest.mark.parametrize("value", [1e-24, 3e20], ids=["tiny", "huge"])
@pytest.mark.parametrize("cls,kw", [(Lamb, dict(weight_decay=0.01)), (Lars, dict(weight_decay=0.01)),
                                    (Lamb, dict(weight_decay=0.01, update_in_grad=True, nesterov="both")),
                                    (Lars, dict(mode="classic", weight_decay=0.01, nesterov=True))])  # fmt: skip
def test_float32_norms_of_tiny_and_huge_tensors(cls, kw, value, sharded):
    """Float32 squares underflow below ~1e-19 and overflow above ~1e19: the kernel takes such a
    tensor's sums again in double (whole tensors and tensors split over threads, with and without
    a reducer), so it steps as the reference, which sums in float64."""
    xs = [torch.full((4,), value), torch.full((200_000,), value) * torch.linspace(0.5, 1.5, 200_000)]
    grads = [torch.full((4,), value / 3), torch.full((200_000,), value / 3)]
    reduce = (lambda sq: sq) if sharded else None  # one shard: the identity stands for the all-reduce
    outs = []
    for path in (dict(fused=True), dict(foreach=False)):
        ps = clone_params(xs)
        set_grads([ps], grads)
        cls(ps, lr=0.01, norm_reducer=reduce, **kw, **path).step()
        outs.append(ps)
    for fast, ref in zip(*outs):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(fast.grad, ref.grad, rtol=1e-5, atol=0)  # the update where update_in_grad
        assert torch.isfinite(fast).all() and not torch.equal(fast, torch.zeros_like(fast))


@needs_kernel
@pytest.mark.parametrize("cls,kw", [(Lamb, dict(nesterov="first")), (Lamb, dict(update_in_grad=True)), (Lars, dict()),
                                    (Lars, dict(mode="classic"))])  # fmt: skip
def test_norm_reducer_is_called_once_per_step_with_all_sums(cls, kw):
    """Sharded parameters: [w_sq..., d_sq...] of every tensor goes through ONE reduce call."""
    calls = {"ref": [], "fused": []}

    def reducer(name):
        def reduce(sq):  # stands for an all-reduce over two identical shards
            calls[name].append(sq.shape)
            return sq * 2

        return reduce

    xs, grads = make_params(F64), make_grads(F64, steps=5, nonfinite_step=3)
    a, b = clone_params(xs), clone_params(xs)
    ref = cls(a, lr=0.05, weight_decay=0.01, foreach=False, norm_reducer=reducer("ref"), **kw)
    fast = cls(b, lr=0.05, weight_decay=0.01, fused=True, norm_reducer=reducer("fused"), **kw)
    for gs in grads:
        set_grads([a, b], gs)
        ref.step()
        fast.step()
        assert_match(ref, a, fast, b, TOL[F64])
    stepped = [c for c in calls["fused"] if c == (2 * len(xs),)]
    assert len(stepped) == 4  # one call per step that was not skipped


@needs_kernel
def test_results_are_deterministic_and_thread_count_only_reorders_sums():
    xs, grads = make_params(F32), make_grads(F32, steps=3, nonfinite_step=99)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (threads, threads, 1):
            torch.set_num_threads(n)
            ps = clone_params(xs)
            opt = Lamb(ps, lr=0.05, weight_decay=0.01, fused=True)
            for gs in grads:
                set_grads([ps], gs)
                opt.step()
            runs.append([p.detach().clone() for p in ps])
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(runs[0], runs[1]):
        assert torch.equal(x, y)
    for x, y in zip(runs[0], runs[2]):
        torch.testing.assert_close(x, y, **TOL[F32])


@needs_kernel
def test_fused_all_finite():
    for dtype in (F32, F64, torch.bfloat16, torch.float16):
        for bad in (float("nan"), float("inf"), -float("inf")):
            xs = [torch.randn(100_003).to(dtype), torch.randn(7).to(dtype), torch.randn(()).to(dtype)]
            assert bool(_fused.fused_all_finite(xs))
            xs[0][100_002] = bad
            assert not bool(_fused.fused_all_finite(xs))
            xs[0][100_002] = 0
            xs[2].fill_(bad)
            assert not bool(_fused.fused_all_finite(xs))
        assert bool(_fused.fused_all_finite([torch.full((33,), torch.finfo(dtype).max, dtype=dtype)]))
    assert _fused.fused_all_finite([torch.randn(4, 4).t()]) is None  # not contiguous: the caller's own check
    assert _fused.fused_all_finite([torch.zeros(3, dtype=torch.int64)]) is None


def test_generic_all_finite_takes_huge_finite_values_as_finite(monkeypatch):
    """The check used where the kernel's does not apply (GPUs, non-contiguous tensors): every
    tensor's largest magnitude is tested, not their sum (which overflows), and float64 maxima are
    not squeezed into float32."""
    from largebatch.optim import _common

    monkeypatch.setattr(_common, "fused_all_finite", lambda tensors: None)
    big = torch.finfo(F32).max
    xs = [torch.full((3,), big), torch.full((2,), -big), torch.ones(2, dtype=torch.bfloat16), torch.full((2,), 1e300, dtype=F64)]
    assert bool(_common.all_finite(xs))
    for i, bad in enumerate((float("nan"), float("inf"), float("nan"), -float("inf"))):
        ys = [x.clone() for x in xs]
        ys[i][1] = bad
        assert not bool(_common.all_finite(ys))


def test_availability():
    assert not _fused.fused_available([torch.zeros(3, dtype=torch.bfloat16)])
    assert not _fused.fused_available([torch.zeros(4, 4).t()])
    assert _fused.fused_available([torch.zeros(3, dtype=F64)]) == _fused._cpu_kernel_possible()


def test_without_compiler_optimizers_fall_back_silently(monkeypatch, tmp_path):
    monkeypatch.setattr(_fused, "_compiler_path", [None])
    monkeypatch.setattr(_fused, "_kernels", {})
    monkeypatch.setattr(_fused, "_kernel_info", {})
    xs = [torch.randn(3, 4)]
    assert not _fused.fused_available(xs)
    assert _fused.load_cpu_kernel("lamb", F32, cache_dir=tmp_path) is None
    assert "compiler" in _fused.cpu_kernel_info("lamb", F32)["error"]
    ps = clone_params(xs)
    ps[0].grad = torch.randn(3, 4)
    Lamb(ps, lr=0.1).step()  # fused=None: the multi-tensor path
    with pytest.raises(RuntimeError, match="no fused backend"):
        Lamb(ps, lr=0.1, fused=True).step()


def test_failed_build_is_reported_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setattr(_fused, "_compiler_path", [])
    monkeypatch.setattr(_fused, "_kernels", {})
    monkeypatch.setattr(_fused, "_kernel_info", {})
    monkeypatch.setenv("LARGEBATCH_CACHE_DIR", str(tmp_path))
    xs, grads = make_params(F32), make_grads(F32, steps=3, nonfinite_step=1)
    a, b = clone_params(xs), clone_params(xs)
    ref, fast = Lamb(a, lr=0.05, foreach=False), Lamb(b, lr=0.05, fused=True)
    for gs in grads:
        set_grads([a, b], gs)
        ref.step()
        fast.step()  # the build fails: the multi-tensor path takes over
    assert_match(ref, a, fast, b, TOL[F32])
    assert "failed" in _fused.cpu_kernel_info("lamb", F32)["error"]


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("LARGEBATCH_FUSED_CPU", "0")
    assert not _fused.fused_available([torch.zeros(3)])


def test_bench_quick_writes_json(tmp_path):
    from largebatch.cli import main

    out = tmp_path / "bench.json"
    impls = ["lamb", "lamb-foreach", "lars", "adamw-fused", "sgd-foreach", "torch_optimizer.Lamb", "timm.Lamb"]
    assert main(["bench", "--quick", "--impl", *impls, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["sizes"]) == {"2M"}
    assert result["sizes"]["2M"]["bandwidth_GBps"] > 0 and result["sizes"]["2M"]["bandwidth_after_GBps"] > 0
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == set(impls)
    for name in ("lamb", "lars", "adamw-fused", "sgd-foreach"):
        row = rows[name]
        assert row["median_ms"] > 0 and row["x_floor"] > 0 and row["steps_timed"] == 3
    assert rows["adamw-fused"]["vs_adamw-fused"] == 1.0
    assert rows["lamb"]["path"] in ("fused", "foreach")
    judged = {(t["impl"], t["target"]) for t in result["targets"]}
    assert judged == {("lamb", "vs_adamw"), ("lamb", "peer_speedup"), ("lars", "vs_sgd")}  # --quick: no memory


def test_bench_targets_judged_from_the_run():
    """The targets of the speed issue, judged from a run's own rows (numbers made up here)."""
    from largebatch import bench

    def row(impl, ms, path=None, family="adam", extra=None):
        r = {"size": "25M", "impl": impl, "median_ms": ms, "path": path, "family": family}
        if extra is not None:
            r["memory"] = {"extra_vs_params": extra}
        return r

    result = bench.add_ratios({"rows": [
        row("lamb", 30.0, "fused", extra=0.2),
        row("lamb-nocheck", 24.0, "fused", extra=0.3),
        row("lamb-foreach", 250.0, "foreach", extra=4.0),  # a slow path: not judged
        row("lamb+gradscaler", 28.0, "fused"),
        row("lars", 21.0, "fused", family="sgd"),
        row("adamw-fused", 20.0),
        row("adamw-fused+gradscaler", 20.0 * 1.4),
        row("sgd-foreach", 30.0, family="sgd"),
        row("torch_optimizer.Lamb", 150.0),
        row("pytorch_optimizer.Lamb", 120.0),
        {"size": "25M", "impl": "timm.Lamb", "skipped": "not installed"},
    ]})  # fmt: skip
    got = {(j["impl"], j["target"]): (j["value"], j["met"], j["baseline"]) for j in bench.check_targets(result)}
    assert got == {
        ("lamb", "vs_adamw"): (1.5, True, "adamw-fused"),  # the bound itself is met
        ("lamb", "peer_speedup"): (4.0, False, "pytorch_optimizer.Lamb"),  # the fastest peer
        ("lamb", "memory"): (0.2, True, None),
        ("lamb-nocheck", "vs_adamw"): (1.2, True, "adamw-fused"),
        ("lamb-nocheck", "peer_speedup"): (5.0, True, "pytorch_optimizer.Lamb"),
        ("lamb-nocheck", "memory"): (0.3, False, None),
        ("lamb+gradscaler", "vs_adamw"): (1.0, True, "adamw-fused+gradscaler"),  # like for like, no peer
        ("lars", "vs_sgd"): (0.7, True, "sgd-foreach"),
    }
    text = bench.format_targets(bench.check_targets(result))
    assert "25M lamb: step time / torch AdamW(fused=True) = 1.500, target <= 1.5: met" in text.splitlines()
    assert "(pytorch_optimizer.Lamb) = 4.000, target >= 5: NOT met" in text


@needs_kernel
def test_update_in_grad_with_gradients_the_kernel_cannot_take_falls_back():
    """A non-contiguous gradient sends the bucket to the multi-tensor path, which stores u as well."""
    xs = [torch.randn(6, 5, dtype=F64), torch.randn(40_000, dtype=F64)]
    grads = [torch.randn(5, 6, dtype=F64).t(), torch.randn(40_000, dtype=F64)]  # the first is not contiguous
    outs = []
    for path in (dict(fused=True), dict(foreach=False)):
        ps = clone_params(xs)
        for p, g in zip(ps, grads):
            p.grad = g.clone() if g.is_contiguous() else g.t().clone().t()
        assert not ps[0].grad.is_contiguous()
        Lamb(ps, lr=0.05, weight_decay=0.01, update_in_grad=True, **path).step()
        outs.append(ps)
    for fast, ref in zip(*outs):
        torch.testing.assert_close(fast, ref, **TOL[F64])
        torch.testing.assert_close(fast.grad, ref.grad, **TOL[F64])
