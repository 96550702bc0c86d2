"""Optimizer-step benchmark: our Lamb/Lars paths against torch's AdamW/SGD and other LAMBs.

An optimizer step is memory-bound, so every time is also stated against the memory-bandwidth
floor measured in the same run: an Adam-type step must read the parameter, gradient and two moments
and write three of them back (28 bytes per float32 parameter), an SGD-momentum-type step 20 bytes.

Method (the claim is about ratios measured in one run, since absolute times on shared machines
drift by 15-25% between runs):

* Parameter sets of BERT shapes (:data:`SIZES`), float32, on CPU, all parameters in one group with
  weight decay 0.01 and gradients drawn once; every implementation steps the same tensors (the
  ``update-in-grad`` rows replace the gradients with the update at each step and step on that from
  the second step on: other finite values, none subnormal, so the same work).
* Each implementation is built, warmed up (its state allocated, kernels built), timed for a block of
  steps and then deleted, in ``rounds`` rounds whose order rotates; the time is the median of all
  timed steps. Before every timed step the caches are flushed by reading a buffer larger than the
  last-level cache, as after a backward pass, so no implementation profits from the loop.
* Bandwidth: the median time of an in-place ``a += alpha * b`` over two buffers of the largest size
  (12 bytes per element moved), in the same run, before the timing (the floor's) and after it (a
  change shows that the memory traffic of other machines on a shared host drifted meanwhile).
* Extra peak memory: in a subprocess per implementation, with glibc's ``mmap`` threshold fixed at
  64 KiB (so that freed temporaries leave the resident set at once). After a tiny instance of the
  optimizer has run (imports, kernels, thread pools), the resident set is read; the optimizer is
  built and takes two steps; the resident set is read again and the peak (``VmHWM``) is reset
  through ``/proc/self/clear_refs``; one more step runs and the peak is read. "held" is what the
  optimizer keeps between steps beyond its state tensors (e.g. scratch buffers), "transient" what
  a step allocates and frees; the extra is their sum, stated as a fraction of the parameter bytes
  (Linux only).
* Compile cost of the fused CPU kernel is reported apart: a cold build into a fresh directory and
  the load from the cache the optimizers use.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from collections.abc import Callable

import torch

# name -> (description, layers, vocabulary); hidden 768, FFN 3072 and 512 positions as BERT-base.
SIZES: dict[str, tuple[str, int, int]] = {
    "2M": ("BERT shapes, hidden 256/FFN 1024, 2 layers, vocab 4096 (quick runs)", 2, 4096),
    "25M": ("BERT-base shapes, 2 layers, vocab 12800", 2, 12800),
    "110M": ("BERT-base: 12 layers, vocab 30522", 12, 30522),
}
FLOOR_BYTES = {"adam": 28, "sgd": 20}  # bytes per float32 parameter that a step must move
LR, WEIGHT_DECAY = 1e-3, 0.01


def bert_shapes(layers: int, vocab: int, hidden: int = 768, ffn: int = 3072, positions: int = 512) -> list[tuple]:
    """Parameter shapes of a BERT encoder with pooler (no MLM head): embeddings, then per layer
    Q, K, V, O (hidden x hidden + bias), LayerNorm, FFN in/out (+ biases), LayerNorm."""
    shapes: list[tuple] = [(vocab, hidden), (positions, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4
        shapes += [(hidden,), (hidden,), (ffn, hidden), (ffn,), (hidden, ffn), (hidden,), (hidden,), (hidden,)]
    shapes += [(hidden, hidden), (hidden,)]
    return shapes


def size_shapes(size: str) -> list[tuple]:
    if size not in SIZES:
        raise ValueError(f"Invalid size: {size!r}; allowed values are {', '.join(SIZES)}")
    _, layers, vocab = SIZES[size]
    if size == "2M":
        return bert_shapes(layers, vocab, hidden=256, ffn=1024)
    return bert_shapes(layers, vocab)


# -- implementations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Impl:
    name: str
    family: str  # "adam" or "sgd": the floor it is compared with
    make: Callable[[list], torch.optim.Optimizer]
    note: str = ""
    slow: bool = False  # skipped at sizes above SLOW_LIMIT unless asked for


SLOW_LIMIT = 30_000_000


def _largebatch(cls_name: str, **kw):
    def make(params):
        import largebatch

        return getattr(largebatch, cls_name)(params, lr=LR, weight_decay=WEIGHT_DECAY, **kw)

    return make


def _load_timm(module: str):
    """timm's optimizer module loaded from its file (timm itself may not import without torchvision)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("timm is not installed")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "optim")
    pkg_name = "_largebatch_timm_optim"
    if pkg_name not in sys.modules:
        pkg = types.ModuleType(pkg_name)
        pkg.__path__ = [folder]
        sys.modules[pkg_name] = pkg
    return importlib.import_module(f"{pkg_name}.{module}")


def _peer(module: str, attr: str, **kw):
    def make(params):
        if module.startswith("timm."):
            cls = getattr(_load_timm(module.split(".", 1)[1]), attr)
        else:
            cls = getattr(importlib.import_module(module), attr)
        return cls(params, lr=LR, weight_decay=WEIGHT_DECAY, **kw)

    return make


def _with_fast_check(cls_name: str, **kw):
    """Our optimizer whose per-group non-finite check is ``_fused.fused_all_finite`` (one pass over
    the gradients at memory speed) instead of ``_common.all_finite``; equal to the plain optimizer
    wherever ``all_finite`` already uses it."""

    def make(params):
        import largebatch
        from largebatch.optim._fused import fused_all_finite

        base = getattr(largebatch, cls_name)

        class FastCheck(base):
            def _groups_ok(self, grads_per_group):
                oks = [fused_all_finite(grads) if grads else None for grads in grads_per_group]
                if self._totals_reducer() is None and all(ok is not None for ok in oks):
                    return oks
                return super()._groups_ok(grads_per_group)

        return FastCheck(params, lr=LR, weight_decay=WEIGHT_DECAY, **kw)

    return make


def _under_grad_scaler(make_opt: Callable, fused_scaling: bool = True):
    """The optimizer ``make_opt(params)`` whose ``step()`` is ``torch.amp.GradScaler.step`` then
    ``update`` (scale fixed at 1, so the gradients keep their values from step to step).

    ``fused_scaling=True``: the scaler hands the step its scale and inf flag (the optimizer's
    ``_step_supports_amp_scaling``); False: the scaler's ordinary protocol, an in-place ``unscale_``
    of every gradient and a host read of the inf flag before the step."""

    def make(params):
        opt = make_opt(params)
        base = type(opt)

        class Scaled(base):
            def step(self, closure=None):
                if self._in_scaler:  # called back by the scaler
                    return base.step(self, closure)
                self._in_scaler = True
                try:
                    self._scaler.step(self)
                    self._scaler.update()
                finally:
                    self._in_scaler = False

        opt.__class__ = Scaled
        opt._in_scaler = False
        opt._scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1 << 30)
        opt._scaler.scale(torch.zeros(()))  # as scaler.scale(loss) would: creates the scale tensor
        opt._step_supports_amp_scaling = fused_scaling and getattr(opt, "_step_supports_amp_scaling", False)
        return opt

    return make


IMPLS: list[Impl] = [
    Impl("lamb", "adam", _largebatch("Lamb"), "largebatch Lamb, defaults (fused kernel, nonfinite='skip')"),
    Impl("lamb+fastcheck", "adam", _with_fast_check("Lamb"), "largebatch Lamb, defaults, finiteness check by fused_all_finite"),
    Impl("lamb-nocheck", "adam", _largebatch("Lamb", nonfinite="none"), "largebatch Lamb, nonfinite='none'"),
    Impl("lamb-update-in-grad", "adam", _largebatch("Lamb", update_in_grad=True), "largebatch Lamb, defaults with update_in_grad=True (u kept in the gradient)"),
    Impl("lamb-nocheck-update-in-grad", "adam", _largebatch("Lamb", nonfinite="none", update_in_grad=True), "largebatch Lamb, nonfinite='none', update_in_grad=True"),
    Impl("lamb+gradscaler", "adam", _under_grad_scaler(_largebatch("Lamb")), "largebatch Lamb stepped by torch.amp.GradScaler: scale and inf flag passed to the step"),
    Impl("lamb+gradscaler-unscale", "adam", _under_grad_scaler(_largebatch("Lamb"), fused_scaling=False), "largebatch Lamb stepped by torch.amp.GradScaler's ordinary protocol (in-place unscale_)"),
    Impl("lamb-foreach", "adam", _largebatch("Lamb", fused=False), "largebatch Lamb, multi-tensor path"),
    Impl("lamb-reference", "adam", _largebatch("Lamb", foreach=False), "largebatch Lamb, single-tensor reference", slow=True),
    Impl("lars", "sgd", _largebatch("Lars"), "largebatch Lars, defaults (fused kernel, nonfinite='skip')"),
    Impl("lars+fastcheck", "sgd", _with_fast_check("Lars"), "largebatch Lars, defaults, finiteness check by fused_all_finite"),
    Impl("lars-foreach", "sgd", _largebatch("Lars", fused=False), "largebatch Lars, multi-tensor path"),
    Impl("lars-reference", "sgd", _largebatch("Lars", foreach=False), "largebatch Lars, single-tensor reference", slow=True),
    Impl("adamw-fused", "adam", lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, fused=True), "torch AdamW(fused=True)"),
    Impl("adamw-fused+gradscaler", "adam", _under_grad_scaler(lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)), "torch AdamW(fused=True) stepped by torch.amp.GradScaler (scale and inf flag passed to the step)"),
    Impl("adamw-foreach", "adam", lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True), "torch AdamW(foreach=True)"),
    Impl("sgd-foreach", "sgd", lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9, weight_decay=WEIGHT_DECAY, foreach=True), "torch SGD(momentum=0.9, foreach=True)"),
    Impl("torch_optimizer.Lamb", "adam", _peer("torch_optimizer", "Lamb"), "torch-optimizer 0.3 Lamb"),
    Impl("pytorch_optimizer.Lamb", "adam", _peer("pytorch_optimizer", "Lamb", foreach=True), "pytorch_optimizer Lamb(foreach=True)"),
    Impl("timm.Lamb", "adam", _peer("timm.lamb", "Lamb", foreach=True), "timm Lamb(foreach=True), loaded by file"),
    Impl("timm.Lars", "sgd", _peer("timm.lars", "Lars", momentum=0.9, foreach=True), "timm Lars(foreach=True), loaded by file"),
]
IMPL_NAMES = [i.name for i in IMPLS]


def _impl(name: str) -> Impl:
    for impl in IMPLS:
        if impl.name == name:
            return impl
    raise ValueError(f"Invalid implementation: {name!r}; allowed values are {', '.join(IMPL_NAMES)}")


def _available(impl: Impl) -> str | None:
    """None if the implementation can be built here, else why not."""
    try:
        opt = impl.make([torch.zeros(2, requires_grad=True)])
        del opt
        return None
    except Exception as err:  # noqa: BLE001 - a missing or broken optional peer is skipped
        return f"{type(err).__name__}: {err}".splitlines()[0][:200]


# -- measurements -------------------------------------------------------------------------------


def make_tensors(shapes: list[tuple], seed: int = 0) -> list[torch.Tensor]:
    """Parameters (std 0.02, as BERT's init) with gradients (std 1e-3) set."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = (torch.randn(s, generator=gen) * 0.02).requires_grad_()
        p.grad = torch.randn(s, generator=gen) * 1e-3
        params.append(p)
    return params


class _Flusher:
    """Reads a buffer twice the size of the last-level cache, leaving the caches cold (and clean)."""

    def __init__(self, nbytes: int | None = None) -> None:
        nbytes = nbytes or max(2 * _llc_bytes(), 64 << 20)
        self.buf = torch.ones(nbytes // 4)

    def __call__(self) -> None:
        self.buf.sum()


def _llc_bytes() -> int:
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            with open(os.path.join(base, idx, "size")) as f:
                text = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or (64 << 20)


def measure_bandwidth(numel: int, repeats: int = 10) -> float:
    """GB/s of an in-place a += 0.5 * b over float32 buffers (reads a, b; writes a: 12 B/element)."""
    a, b = torch.ones(numel), torch.ones(numel)
    a.add_(b, alpha=0.5)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.add_(b, alpha=0.5)
        times.append(time.perf_counter() - t0)
    return 12 * numel / statistics.median(times) / 1e9


class _OtherLoad:
    """Share of all CPU time used by other processes between start() and stop() (Linux; else None).

    Absolute times on a shared machine depend on it; it is recorded next to them."""

    @staticmethod
    def _snap():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        t = os.times()
        return sum(fields), fields[3] + fields[4], t.user + t.system + t.children_user + t.children_system

    def start(self) -> None:
        try:
            self.t0 = self._snap()
        except (OSError, ValueError):
            self.t0 = None

    def stop(self) -> float | None:
        if self.t0 is None:
            return None
        try:
            total, idle, own = (b - a for a, b in zip(self.t0, self._snap()))
        except (OSError, ValueError):
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        other = (total - idle) / ticks - own
        return round(max(0.0, other / max(total / ticks, 1e-9)), 3)


def _time_steps(opt, steps: int, flush: _Flusher | None) -> list[float]:
    times = []
    for _ in range(steps):
        if flush is not None:
            flush()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def _fused_path_used(opt) -> str | None:
    """'fused' or 'foreach'/'reference' for our optimizers, None for others."""
    from largebatch.optim._layerwise import LayerwiseOptimizer

    if not isinstance(opt, LayerwiseOptimizer):
        return None
    if opt.foreach is False:
        return "reference"
    params = [p for g in opt.param_groups for p in g["params"]]
    return "fused" if opt._use_fused(params) else "foreach"


def compile_report() -> dict:
    """Cold compile time of the fused CPU kernels (a fresh cache directory) and their normal load."""
    from largebatch.optim import _fused

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for opt in ("lamb", "lars"):
            t0 = time.perf_counter()
            lib = _fused.load_cpu_kernel(opt, torch.float32, cache_dir=tmp)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            _fused.load_cpu_kernel(opt, torch.float32)
            warm = time.perf_counter() - t0
            info = _fused.cpu_kernel_info(opt, torch.float32)
            out[opt] = {
                "available": lib is not None,
                "cold_build_s": round(cold, 3),
                "first_use_in_this_process_s": round(warm, 4),
                "was_cached": info.get("cached"),
                "error": info.get("error"),
            }
    return out


def peak_memory(impl_name: str, size: str, timeout: float = 900) -> dict:
    """Extra peak resident memory of one step, measured in a subprocess (see the module docstring)."""
    code = f"from largebatch.bench import _memory_probe; _memory_probe({impl_name!r}, {size!r})"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536", MALLOC_TOP_PAD_="0")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode != 0 or not lines:
            return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:300]}
        return json.loads(lines[-1])
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def _memory_probe(impl_name: str, size: str) -> None:
    impl = _impl(impl_name)
    params = make_tensors(size_shapes(size))
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    tiny = impl.make(make_tensors([(4, 4), (4,)]))  # imports, kernels and thread pools, outside the measure
    tiny.step()
    tiny.step()
    del tiny
    gc.collect()
    rss0 = _status_kib("VmRSS")
    opt = impl.make(params)
    for _ in range(2):
        opt.step()
    gc.collect()
    rss1 = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    opt.step()
    peak = _status_kib("VmHWM")
    state = _state_bytes(opt)
    held = max(0, rss1 * 1024 - rss0 * 1024 - state)  # kept between steps beyond the optimizer state
    transient = max(0, peak - rss1) * 1024  # allocated during a step and freed by its end
    print(json.dumps({
        "param_bytes": param_bytes,
        "state_bytes": state,
        "held_bytes": held,
        "transient_bytes": transient,
        "extra_bytes": held + transient,
        "extra_vs_params": (held + transient) / param_bytes,
    }))


@dataclass
class Row:
    size: str
    impl: str
    family: str
    times_s: list[float] = field(default_factory=list)
    path: str | None = None
    skipped: str | None = None
    memory: dict | None = None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_s) * 1e3 if self.times_s else None


def run_benchmark(
    sizes: list[str],
    impls: list[str] | None = None,
    *,
    repeats: int = 10,
    rounds: int = 5,
    warmup: int = 2,
    reference: bool = False,
    memory: bool = True,
    flush: bool = True,
    compile_cost: bool = True,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Time every implementation at every size; returns the JSON-ready result (see format_table)."""
    if threads is not None:
        torch.set_num_threads(threads)
    names = list(impls) if impls else IMPL_NAMES
    chosen = [_impl(n) for n in names]
    result: dict = {
        "meta": _meta(),
        "settings": dict(repeats=repeats, rounds=rounds, warmup=warmup, flush=flush, lr=LR, weight_decay=WEIGHT_DECAY),
        "sizes": {},
        "rows": [],
    }
    if compile_cost:
        log("compiling the fused CPU kernels in a fresh directory (cold build cost) ...")
        result["compile"] = compile_report()
    unavailable = {impl.name: why for impl in chosen if (why := _available(impl))}
    flusher = _Flusher() if flush else None
    for size in sizes:
        shapes = size_shapes(size)
        numel = sum(torch.Size(s).numel() for s in shapes)
        bandwidth = measure_bandwidth(max(numel, 16 << 20))
        result["sizes"][size] = {
            "description": SIZES[size][0],
            "params": numel,
            "tensors": len(shapes),
            "bandwidth_GBps": round(bandwidth, 2),
        }
        log(f"[{size}] {numel / 1e6:.1f}M parameters in {len(shapes)} tensors; bandwidth {bandwidth:.1f} GB/s")
        rows = {impl.name: Row(size, impl.name, impl.family) for impl in chosen}
        for impl in chosen:
            if impl.name in unavailable:
                rows[impl.name].skipped = unavailable[impl.name]
            elif impl.slow and numel > SLOW_LIMIT and not reference:
                rows[impl.name].skipped = f"slow; skipped above {SLOW_LIMIT // 10**6}M (use --reference)"
        active = [impl for impl in chosen if rows[impl.name].skipped is None]
        params = make_tensors(shapes)
        load = _OtherLoad()
        load.start()
        per_round = max(1, -(-repeats // rounds))
        for r in range(rounds):
            order = active[r % len(active):] + active[: r % len(active)] if active else []
            for impl in order:
                opt = impl.make(params)
                for _ in range(warmup):
                    opt.step()
                rows[impl.name].path = _fused_path_used(opt)
                rows[impl.name].times_s += _time_steps(opt, per_round, flusher)
                del opt
                gc.collect()
            log(f"[{size}] round {r + 1}/{rounds} done")
        result["sizes"][size]["cpu_share_of_other_processes"] = load.stop()
        # Memory traffic of other machines on the same host does not show as CPU time here; the
        # bandwidth measured again after the timing shows whether it drifted meanwhile.
        result["sizes"][size]["bandwidth_after_GBps"] = round(measure_bandwidth(max(numel, 16 << 20)), 2)
        del params
        gc.collect()
        if memory:
            for impl in active:
                rows[impl.name].memory = peak_memory(impl.name, size)
        result["rows"] += [_row_json(rows[impl.name], result["sizes"][size]) for impl in chosen]
    return result


def _row_json(row: Row, size_info: dict) -> dict:
    out = {"size": row.size, "impl": row.impl, "family": row.family, "path": row.path, "skipped": row.skipped}
    if row.times_s:
        floor_ms = FLOOR_BYTES[row.family] * size_info["params"] / (size_info["bandwidth_GBps"] * 1e9) * 1e3
        out.update(
            median_ms=round(row.median_ms, 3),
            min_ms=round(min(row.times_s) * 1e3, 3),
            steps_timed=len(row.times_s),
            floor_ms=round(floor_ms, 3),
            x_floor=round(row.median_ms / floor_ms, 3),
        )
    if row.memory is not None:
        out["memory"] = row.memory
    return out


def _meta() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    commit = None
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "cpus_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit,
    }


def add_ratios(result: dict) -> dict:
    """Each row's time over the same size's AdamW(fused) and SGD(foreach) times (when measured)."""
    base = {}
    for row in result["rows"]:
        if row.get("median_ms") and row["impl"] in ("adamw-fused", "sgd-foreach"):
            base[(row["size"], row["impl"])] = row["median_ms"]
    for row in result["rows"]:
        if row.get("median_ms"):
            for ref in ("adamw-fused", "sgd-foreach"):
                if (row["size"], ref) in base:
                    row[f"vs_{ref}"] = round(row["median_ms"] / base[(row["size"], ref)], 3)
    return result


# The targets this benchmark exists to check: (what, bound, "max" or "min").
TARGETS = {
    "vs_adamw": ("step time / torch AdamW(fused=True)", 1.5, "max"),
    "peer_speedup": ("fastest installed peer LAMB's step time / this step time", 5.0, "min"),
    "vs_sgd": ("step time / torch SGD(momentum, foreach=True)", 1.5, "max"),
    "memory": ("extra peak memory / parameter bytes", 0.25, "max"),
}
PEER_LAMBS = ("torch_optimizer.Lamb", "pytorch_optimizer.Lamb", "timm.Lamb")


def check_targets(result: dict) -> list[dict]:
    """Each of our fused-path rows judged against :data:`TARGETS`, from the times of the same run.

    LAMB rows are compared with AdamW(fused) (rows stepped by a GradScaler with AdamW(fused) stepped
    by the same scaler, when that row was measured) and with the fastest peer LAMB of their size,
    LARS rows with SGD(momentum, foreach); each row with the memory bound. Scaler rows are not
    compared with the peers (no scaler steps those). Our explicitly slow paths
    (``-foreach``, ``-reference``) are not judged. A comparison whose baseline was not measured in
    the run is left out. Returns one dict per judgement:
    ``{"size", "impl", "target", "value", "bound", "met", "baseline"}``."""
    out: list[dict] = []
    timed = [r for r in result["rows"] if r.get("median_ms")]
    times = {(r["size"], r["impl"]): r["median_ms"] for r in timed}
    for row in timed:
        size, impl = row["size"], row["impl"]
        if row.get("path") is None or impl.endswith(("-foreach", "-reference")):  # not ours, or not the fast path
            continue

        def judge(key: str, value: float | None, baseline: str | None = None) -> None:
            if value is None:
                return
            _, bound, kind = TARGETS[key]
            met = value <= bound if kind == "max" else value >= bound
            out.append({"size": size, "impl": impl, "target": key, "value": round(value, 3), "bound": bound,
                        "met": met, "baseline": baseline})

        adam = row["family"] == "adam"
        base = ("adamw-fused+gradscaler" if "+gradscaler" in impl else "adamw-fused") if adam else "sgd-foreach"
        if (size, base) in times:
            judge("vs_adamw" if adam else "vs_sgd", row["median_ms"] / times[(size, base)], base)
        peers = [r for r in timed if r["size"] == size and r["impl"] in PEER_LAMBS]
        if adam and peers and "+gradscaler" not in impl:  # the peers are not stepped by a scaler
            fastest = min(peers, key=lambda r: r["median_ms"])
            judge("peer_speedup", fastest["median_ms"] / row["median_ms"], fastest["impl"])
        mem = row.get("memory") or {}
        judge("memory", mem.get("extra_vs_params"))
    return out


def format_targets(judgements: list[dict]) -> str:
    """One line per judgement: the measured value, the bound and whether it is met."""
    lines = []
    for j in judgements:
        what, bound, kind = TARGETS[j["target"]]
        sign = "<=" if kind == "max" else ">="
        shown = j["target"] == "peer_speedup" or j["baseline"] == "adamw-fused+gradscaler"
        base = f" ({j['baseline']})" if shown else ""
        verdict = "met" if j["met"] else "NOT met"
        lines.append(f"{j['size']} {j['impl']}: {what}{base} = {j['value']:.3f}, target {sign} {bound:g}: {verdict}")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """A Markdown table: ms (median), x floor, ratio to AdamW(fused) / SGD(foreach), extra memory."""
    lines = [
        "| size | implementation | path | ms (median) | x floor | / AdamW fused | / SGD foreach | extra peak memory / param bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if row.get("skipped"):
            lines.append(f"| {row['size']} | {row['impl']} | | skipped: {row['skipped']} | | | | |")
            continue
        mem = row.get("memory") or {}
        mem_text = f"{mem['extra_vs_params']:.3f}" if "extra_vs_params" in mem else (mem.get("error", "") or "")
        lines.append(
            f"| {row['size']} | {row['impl']} | {row.get('path') or ''} | {row['median_ms']:.1f} | {row['x_floor']:.2f} "
            f"| {_fmt(row.get('vs_adamw-fused'))} | {_fmt(row.get('vs_sgd-foreach'))} | {mem_text} |"
        )
    return "\n".join(lines)


def _fmt(x) -> str:
    return "" if x is None else f"{x:.2f}"
