"""Fused LAMB/LARS steps: two passes over each tensor, no tensor-sized temporaries.

A layer-wise step needs each tensor's update norm before the tensor may change, so it is done in
two passes per tensor: pass 1 updates the moments and accumulates ||x||^2 and ||u||^2, pass 2
applies ``x += -lr * ratio * u``. That moves about 40 bytes per float32 parameter (LAMB), against
28 for an Adam step.

Two backends implement the same passes with the semantics of ``_multi_tensor_lamb`` and
``_multi_tensor_lars`` (skipping with ``ok``, ``grad_scale``, one request for the global squared sums):

* CPU: ``csrc/layerwise_step.cpp``, a vectorised OpenMP loop called through ctypes. It is compiled
  with the system C++ compiler on first use, one small build per optimizer and dtype (a few
  seconds, once per machine), into ``$LARGEBATCH_CACHE_DIR`` (default ``~/.cache/largebatch``).
  Without a reduction both passes of a tensor run back to back; the ``ok`` flag and
  ``grad_scale`` of CPU tensors are read on the host, which costs no device synchronisation.
  ``LARGEBATCH_FUSED_CPU=0`` turns it off; ``CXX`` chooses the compiler.
* Any other device, and CPU under ``torch.compile``: the passes written once as torch functions
  (``_lamb_pass1`` ...), compiled with ``torch.compile`` (Inductor emits Triton on GPUs) over
  chunks of ``_CHUNK`` tensors per call, or traced into the caller's graph. Every per-tensor
  scalar stays in a tensor: no host sync.

Where neither backend applies (no compiler, non-contiguous CPU tensors, 16-bit parameters without
master weights), ``fused_available`` answers False and the optimizers use the multi-tensor path;
a call that still reaches ``fused_lamb``/``fused_lars`` with CPU tensors the kernel cannot take
(e.g. after a failed build) falls back to that path too.

``fused_all_finite`` is the non-finite check of ``nonfinite="skip"`` for CPU gradients in one
pass at memory speed.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = [
    "fused_available", "fused_unavailable_reason", "fused_lamb", "fused_lars", "fused_all_finite", "cpu_kernel_info",
    "load_cpu_kernel",
]  # fmt: skip

_SOURCE = Path(__file__).with_name("csrc") / "layerwise_step.cpp"
_CXXFLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp",
    "-fno-math-errno",  # lets sqrt vectorise; results are unchanged
    "-ffp-contract=off",  # no fused multiply-adds: the same rounding as the torch ops it mirrors
    "-std=c++17",
    "-shared",
    "-fPIC",
]
_FLOAT_DTYPES = (torch.float32, torch.float64)
_GRAD_TYPES = {torch.bfloat16: 1, torch.float16: 2}  # of float32 parameters; 0 = the parameter's dtype


# -- the CPU kernel: build, cache, load ---------------------------------------------------------


class _StepArgs(ctypes.Structure):
    """Mirror of ``struct StepArgs`` in csrc/layerwise_step.cpp."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("x", ctypes.POINTER(ctypes.c_void_p)),
        ("g", ctypes.POINTER(ctypes.c_void_p)),
        ("s1", ctypes.POINTER(ctypes.c_void_p)),
        ("s2", ctypes.POINTER(ctypes.c_void_p)),
        ("step", ctypes.POINTER(ctypes.c_void_p)),
        ("numel", ctypes.POINTER(ctypes.c_int64)),
        ("w_norm", ctypes.c_void_p),
        ("d_norm", ctypes.c_void_p),
        ("ratio", ctypes.c_void_p),
        ("sq", ctypes.c_void_p),
        ("grad_type", ctypes.c_int32),
        ("stage", ctypes.c_int32),
        ("num_threads", ctypes.c_int32),
        ("nesterov", ctypes.c_int32),
        ("classic", ctypes.c_int32),
        ("bias_correction", ctypes.c_int32),
        ("adapt", ctypes.c_int32),
        ("trust_clip", ctypes.c_int32),
        ("lr_clip", ctypes.c_int32),
        ("has_phi", ctypes.c_int32),
        ("lr", ctypes.c_double),
        ("beta1", ctypes.c_double),
        ("beta2", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("weight_decay", ctypes.c_double),
        ("grad_scale", ctypes.c_double),
        ("coefficient", ctypes.c_double),
        ("ratio_eps", ctypes.c_double),
        ("ratio_wd", ctypes.c_double),
        ("phi_lo", ctypes.c_double),
        ("phi_hi", ctypes.c_double),
        ("clip_lo", ctypes.c_double),
        ("clip_hi", ctypes.c_double),
        ("decay", ctypes.c_double),
        ("norm_wd", ctypes.c_double),
        ("lr_in_momentum", ctypes.c_int32),
        ("beta3", ctypes.c_double),
        ("eps_root", ctypes.c_double),
        ("update_to_grad", ctypes.c_int32),
        ("grad_unscale", ctypes.c_double),
    ]


_ABI_VERSION = 8
_lock = threading.Lock()
_kernels: dict[tuple, ctypes.CDLL | None] = {}  # (optimizer, dtype, grad code) -> library, None: failed
_kernel_info: dict[tuple, dict] = {}


def _cache_dir() -> Path:
    root = os.environ.get("LARGEBATCH_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "largebatch"


def _cpu_signature() -> str:
    """Model and feature flags of this CPU: a -march=native build is only valid where they match."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        import platform

        return platform.processor() + platform.machine()


_compiler_path: list[str | None] = []


def _compiler() -> str | None:
    if not _compiler_path:
        cxx = os.environ.get("CXX", "c++")
        _compiler_path.append(shutil.which(cxx) or shutil.which("g++"))
    return _compiler_path[0]


def _cpu_kernel_possible() -> bool:
    return os.environ.get("LARGEBATCH_FUSED_CPU", "1") != "0" and _compiler() is not None


def load_cpu_kernel(
    optimizer: str = "lamb",
    dtype: torch.dtype = torch.float32,
    grad_dtype: torch.dtype | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> ctypes.CDLL | None:
    """The CPU kernel of ``optimizer`` ("lamb"/"lars") for ``dtype`` parameters and ``grad_dtype``
    gradients (default: ``dtype``), built on first use and cached per machine; None if unavailable.

    Each combination is a separate small build (a few seconds, once per machine). ``cache_dir``
    overrides the cache location (a fresh directory measures a cold build). What happened, including
    the compile time, is reported by :func:`cpu_kernel_info`.
    """
    gcode = 0 if grad_dtype is None or grad_dtype == dtype else _GRAD_TYPES.get(grad_dtype)
    if optimizer not in ("lamb", "lars") or dtype not in _FLOAT_DTYPES or gcode is None:
        return None
    if gcode and dtype != torch.float32:
        return None
    key = (optimizer, dtype, gcode)
    if cache_dir is None and key in _kernels:
        return _kernels[key]
    with _lock:
        if cache_dir is None and key in _kernels:
            return _kernels[key]
        lib, info = _build_and_load(key, Path(cache_dir) if cache_dir is not None else _cache_dir())
        if cache_dir is None or _kernels.get(key) is None:
            _kernels[key], _kernel_info[key] = lib, info
        return lib


def cpu_kernel_info(optimizer: str = "lamb", dtype: torch.dtype = torch.float32, grad_dtype=None) -> dict:
    """How that CPU kernel was obtained: {"path", "cached", "compile_s", "load_s", "error"} ({} if never asked)."""
    gcode = 0 if grad_dtype is None or grad_dtype == dtype else _GRAD_TYPES.get(grad_dtype)
    return dict(_kernel_info.get((optimizer, dtype, gcode), {}))


def _build_and_load(key: tuple, cache: Path) -> tuple[ctypes.CDLL | None, dict]:
    optimizer, dtype, gcode = key
    info: dict = {"path": None, "cached": False, "compile_s": 0.0, "load_s": 0.0, "error": None}
    if os.environ.get("LARGEBATCH_FUSED_CPU", "1") == "0":
        info["error"] = "disabled by LARGEBATCH_FUSED_CPU=0"
        return None, info
    cxx = _compiler()
    if cxx is None:
        info["error"] = "no C++ compiler found (set CXX)"
        return None, info
    scalar = "float" if dtype == torch.float32 else "double"
    defines = [f"-DLB_{optimizer.upper()}", f"-DLB_SCALAR={scalar}", f"-DLB_GRAD={gcode}"]
    flags = _CXXFLAGS + defines
    try:
        source = _SOURCE.read_bytes()
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
        digest = hashlib.sha256(
            b"\0".join([source, version.encode(), " ".join(flags).encode(), _cpu_signature().encode()])
        ).hexdigest()[:16]
        path = cache / f"layerwise_step-{optimizer}-{scalar}-g{gcode}-{digest}.so"
        info["path"] = str(path)
        if path.exists():
            info["cached"] = True
        else:
            cache.mkdir(parents=True, exist_ok=True)
            log.info("largebatch: compiling a fused CPU kernel (once per machine) into %s", path)
            t0 = time.perf_counter()
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(fd)
            try:
                done = subprocess.run([cxx, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600)
                if done.returncode != 0:
                    raise RuntimeError(f"{cxx} failed: {done.stderr.strip()[-2000:]}")
                os.replace(tmp, path)  # atomic: concurrent builders each install a complete file
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            info["compile_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lib = ctypes.CDLL(str(path))
        if lib.lb_abi_version() != _ABI_VERSION or lib.lb_scalar_bytes() != dtype.itemsize:
            raise RuntimeError(f"{path} does not match this version of largebatch")
        lib.lb_step.argtypes = [ctypes.POINTER(_StepArgs)]
        lib.lb_step.restype = ctypes.c_int
        lib.lb_all_finite.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
        lib.lb_all_finite.restype = ctypes.c_int
        info["load_s"] = time.perf_counter() - t0
        return lib, info
    except Exception as err:  # noqa: BLE001 - any failure means: no CPU kernel, use the fallback
        info["error"] = f"{type(err).__name__}: {err}"
        log.info("largebatch: fused CPU kernel unavailable (%s); using the multi-tensor path", info["error"])
        return None, info


# -- availability and dispatch ------------------------------------------------------------------


def fused_available(tensors: list[Tensor]) -> bool:
    """Whether fused_lamb/fused_lars support this bucket (one device and dtype) of parameters."""
    if not tensors:
        return True
    first = tensors[0]
    if first.dtype not in _FLOAT_DTYPES:
        return False
    if first.device.type != "cpu" or torch.compiler.is_compiling():
        return True  # the torch-function backend
    return _cpu_kernel_possible() and all(t.is_contiguous() for t in tensors)


def fused_unavailable_reason(tensors: list[Tensor]) -> str:
    """Why :func:`fused_available` answers False for these tensors, in words."""
    if tensors and tensors[0].dtype not in _FLOAT_DTYPES:
        return f"{tensors[0].dtype} tensors (it takes float32 and float64; 16-bit parameters need master_weights=True)"
    if not _cpu_kernel_possible():
        return "CPU tensors, and the CPU kernel is turned off (LARGEBATCH_FUSED_CPU=0) or has no C++ compiler (set CXX)"
    return "non-contiguous CPU tensors (e.g. transposed views; the CPU kernel takes contiguous ones)"


def _use_torch_backend(params: list[Tensor]) -> bool:
    """The torch-function backend for every device but the CPU, and for the CPU under torch.compile."""
    return params[0].device.type != "cpu" or torch.compiler.is_compiling()


_FINITE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def fused_all_finite(tensors: list[Tensor]) -> Tensor | None:
    """0-d bool tensor: every element of every tensor is finite, checked in one pass at memory speed.

    For contiguous CPU tensors of float32/float64/bfloat16/float16 (the compiled kernel tests the
    exponent bits, two threads per pass); None where it does not apply (another device, layout or
    dtype, under torch.compile, no kernel), so that the caller uses its own check.
    """
    if not tensors or torch.compiler.is_compiling() or not _cpu_kernel_possible():
        return None
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in _FINITE_CODES or not t.is_contiguous():
            return None
    lib = next((k for k in _kernels.values() if k is not None), None) or load_cpu_kernel("lamb", torch.float32)
    if lib is None:
        return None
    n = len(tensors)
    ok = lib.lb_all_finite(
        n, _pointers(tensors), (ctypes.c_int64 * n)(*[t.numel() for t in tensors]),
        (ctypes.c_int32 * n)(*[_FINITE_CODES[t.dtype] for t in tensors]), torch.get_num_threads(),
    )  # fmt: skip
    return torch.tensor(bool(ok))


def _empty_result(n: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor, Tensor]:
    zero = torch.zeros(n, dtype=dtype, device=device)
    return zero, zero.clone(), torch.ones(n, dtype=dtype, device=device)


def _cpu_kernel_for(optimizer: str, params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]]):
    """(kernel, gradient type code) if the CPU kernel can take these tensors, else (None, None)."""
    dt = params[0].dtype
    gdt = grads[0].dtype
    if dt not in _FLOAT_DTYPES or not _cpu_kernel_possible():
        return None, None
    for i, x in enumerate(params):
        g = grads[i]
        if x.dtype != dt or x.device.type != "cpu" or not x.is_contiguous():
            return None, None
        if g.dtype != gdt or g.device.type != "cpu" or not g.is_contiguous() or g.shape != x.shape:
            return None, None
        for s in states:
            if s[i].dtype != dt or not s[i].is_contiguous() or s[i].shape != x.shape:
                return None, None
    lib = load_cpu_kernel(optimizer, dt, gdt)
    return (lib, 0 if gdt == dt else _GRAD_TYPES[gdt]) if lib is not None else (None, None)


def _pointers(tensors: list[Tensor]):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _host_scalars(ok: Tensor | None, grad_scale: Tensor | None, dt: torch.dtype) -> tuple[bool, float]:
    """(step ok?, gradient factor) read from CPU tensors (no device involved, so no sync)."""
    skip = ok is not None and not bool(ok)
    scale = 1.0 if grad_scale is None else float(grad_scale.to(dt))
    return skip, scale


def unscale_grads_(grads: list[Tensor], unscale: Tensor | None) -> None:
    """Multiply the gradients in place by ``unscale`` (a GradScaler's 1 / scale), as
    ``GradScaler.unscale_`` does; nothing when it is None."""
    if unscale is not None and grads:
        torch._foreach_mul_(grads, unscale.to(grads[0].device))


def _kernel_unscale(grads: list[Tensor], unscale: Tensor | None, gcode: int, skip: bool) -> float:
    """The kernel's grad_unscale: 1 / scale, which its pass 1 applies and stores back into gradients
    of the parameters' dtype; 0 when there is none or when it was applied here, in place, because
    the kernel will not run (a skipped step) or cannot store it (16-bit gradients)."""
    if unscale is None:
        return 0.0
    if skip or gcode != 0:
        unscale_grads_(grads, unscale)
        return 0.0
    return float(unscale)


def _run_cpu(lib: ctypes.CDLL, args: _StepArgs) -> None:
    if lib.lb_step(ctypes.byref(args)) != 0:  # pragma: no cover - guarded by _cpu_kernel_for
        raise RuntimeError("the fused CPU kernel rejected its arguments")


def fused_lamb(
    params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, eps_root, weight_decay, decay_in_ratio,
    bias_correction, grad_averaging, adapt, phi, trust_clip, nesterov, update_in_grad, ok, grad_scale, reduce,
    unscale=None,
):  # fmt: skip
    """LAMB on one bucket, in place, with the semantics of ``_multi_tensor_lamb``."""
    kw = dict(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, eps_root=eps_root, weight_decay=weight_decay,
        decay_in_ratio=decay_in_ratio, bias_correction=bias_correction, grad_averaging=grad_averaging,
        adapt=adapt, phi=phi, trust_clip=trust_clip, nesterov=nesterov, update_in_grad=update_in_grad, ok=ok,
        grad_scale=grad_scale, reduce=reduce, unscale=unscale,
    )  # fmt: skip
    if not params:
        return torch.zeros(0), torch.zeros(0), torch.zeros(0)
    if _use_torch_backend(params):
        return _torch_lamb(params, grads, exp_avgs, exp_avg_sqs, steps, **kw)
    lib, gcode = _cpu_kernel_for("lamb", params, grads, [exp_avgs, exp_avg_sqs])
    if update_in_grad and gcode not in (None, 0):  # the callers check the dtypes; no u in 16 bits
        raise ValueError("update_in_grad needs gradients of the parameters' dtype")
    if lib is None or any(s.dtype != torch.float32 or s.numel() != 1 or s.device.type != "cpu" for s in steps):
        from largebatch.optim.lamb import _multi_tensor_lamb

        return _multi_tensor_lamb(params, grads, exp_avgs, exp_avg_sqs, steps, **kw)

    dt = params[0].dtype
    n = len(params)
    skip, gs = _host_scalars(ok, grad_scale, dt)
    unscale_in_kernel = _kernel_unscale(grads, unscale, gcode, skip)
    if skip:  # nothing changes, as in the reference path
        return _empty_result(n, dt, "cpu")
    w_norm, u_norm, ratio = (torch.empty(n, dtype=dt) for _ in range(3))
    wd_in, shrink = _decay_split(lr, weight_decay, decay_in_ratio)
    args = _StepArgs(
        n=n, x=_pointers(params), g=_pointers(grads), s1=_pointers(exp_avgs), s2=_pointers(exp_avg_sqs),
        step=_pointers(steps), numel=(ctypes.c_int64 * n)(*[x.numel() for x in params]),
        w_norm=w_norm.data_ptr(), d_norm=u_norm.data_ptr(), ratio=ratio.data_ptr(), sq=None,
        grad_type=gcode, stage=0, num_threads=torch.get_num_threads(),
        nesterov={None: 0, "first": 1, "both": 2}[nesterov], classic=0,
        bias_correction=int(bias_correction), adapt=int(adapt), **_clip_fields(trust_clip), lr_clip=0,
        has_phi=int(phi is not None), lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd_in,
        grad_scale=gs, coefficient=1.0, ratio_eps=0.0, ratio_wd=0.0,
        phi_lo=phi[0] if phi is not None else 0.0, phi_hi=phi[1] if phi is not None else 0.0,
        decay=shrink, beta3=first_moment_factor(beta1, grad_averaging), eps_root=eps_root,
        update_to_grad=int(update_in_grad), grad_unscale=unscale_in_kernel,
    )  # fmt: skip
    if reduce is None:
        _run_cpu(lib, args)
        return w_norm, u_norm, ratio
    ratio_fn = lambda w, u: _lamb_ratio(w, u, adapt, phi, trust_clip)  # noqa: E731
    return _cpu_two_stage(args, lib, n, dt, reduce, ratio_fn, ratio)


def _cpu_two_stage(args, lib, n, dt, reduce, ratio_fn, ratio_out):
    """Pass 1 on every tensor, a request for the global squared sums, then pass 2 on every tensor."""
    from largebatch.optim._common import Pending
    sq = torch.empty(2 * n, dtype=torch.float64)
    args.sq = sq.data_ptr()
    args.stage = 1
    _run_cpu(lib, args)

    def pass2(total: Tensor):  # the norms in dt, as the kernel's unsharded step has them
        w_norm, d_norm = total.sqrt().to(dt).chunk(2)
        ratio_out.copy_(ratio_fn(w_norm, d_norm).to(dt))
        args.stage = 2
        args.ratio = ratio_out.data_ptr()
        _run_cpu(lib, args)
        return w_norm, d_norm, ratio_out

    return Pending(reduce, sq, pass2)  # the sums cross ranks in float64


def _clip_fields(trust_clip) -> dict:
    """The kernel's trust_clip, clip_lo, clip_hi for a ``trust_clip`` option (see _common.clip_bounds)."""
    from largebatch.optim._common import clip_bounds

    bounds = clip_bounds(trust_clip)
    lo, hi = bounds if bounds is not None else (0.0, 0.0)
    return dict(trust_clip=int(bounds is not None), clip_lo=lo, clip_hi=hi)


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64, for squared sums and per-tensor coefficients of any parameter dtype (float32 on
    MPS, which has no float64): float32 squares underflow below 1e-19 and overflow above 1e19."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _sq_sum(t: Tensor) -> Tensor:
    """sum(t * t) in the wide dtype."""
    t = t.to(wide_dtype(t.device))
    return (t * t).sum()


def first_moment_factor(beta1: float, grad_averaging: bool) -> float:
    """The factor of g in LAMB's m_t = beta1 * m_{t-1} + factor * g_t: 1 - beta1, or 1 without averaging."""
    return 1 - beta1 if grad_averaging else 1.0


def _decay_split(lr: float, weight_decay: float, decay_in_ratio: bool) -> tuple[float, float]:
    """(lambda added to the direction, factor x is multiplied by first): (wd, 1) or (0, 1 - lr * wd)."""
    if decay_in_ratio or weight_decay == 0:
        return weight_decay, 1.0
    return 0.0, 1 - lr * weight_decay


def _lamb_ratio(w_norm, u_norm, adapt, phi, trust_clip):
    from largebatch.optim._common import trust_ratio

    if not adapt:
        return torch.ones_like(w_norm)
    return trust_ratio(w_norm, u_norm, phi=phi, trust_clip=trust_clip)


def fused_lars(
    params, grads, momentum_buffers, *, lr, momentum, weight_decay, trust_coefficient, eps,
    nesterov, mode, clip, denominator, lr_in_momentum, phi, adapt, ok, grad_scale, reduce, unscale=None,
):  # fmt: skip
    """LARS on one bucket, in place, with the semantics of ``_multi_tensor_lars``."""
    kw = dict(
        lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps,
        nesterov=nesterov, mode=mode, clip=clip, denominator=denominator, lr_in_momentum=lr_in_momentum, phi=phi,
        adapt=adapt, ok=ok, grad_scale=grad_scale, reduce=reduce, unscale=unscale,
    )  # fmt: skip
    if not params:
        return torch.zeros(0), torch.zeros(0), torch.zeros(0)
    if _use_torch_backend(params):
        return _torch_lars(params, grads, momentum_buffers, **kw)
    lib, gcode = _cpu_kernel_for("lars", params, grads, [momentum_buffers])
    if lib is None:
        from largebatch.optim.lars import _multi_tensor_lars

        return _multi_tensor_lars(params, grads, momentum_buffers, **kw)

    dt = params[0].dtype
    n = len(params)
    skip, gs = _host_scalars(ok, grad_scale, dt)
    unscale_in_kernel = _kernel_unscale(grads, unscale, gcode, skip)
    if skip:
        return _empty_result(n, dt, "cpu")
    classic = mode == "classic"
    w_norm, d_norm, ratio = (torch.empty(n, dtype=dt) for _ in range(3))
    args = _StepArgs(
        n=n, x=_pointers(params), g=_pointers(grads), s1=_pointers(momentum_buffers), s2=None, step=None,
        numel=(ctypes.c_int64 * n)(*[x.numel() for x in params]),
        w_norm=w_norm.data_ptr(), d_norm=d_norm.data_ptr(), ratio=ratio.data_ptr(), sq=None,
        grad_type=gcode, stage=0, num_threads=torch.get_num_threads(), nesterov=int(nesterov),
        classic=int(classic), bias_correction=0, adapt=int(adapt), **_clip_fields(clip and not classic),
        lr_clip=int(clip and classic), has_phi=int(phi is not None), lr=lr, beta1=momentum, beta2=0.0, eps=eps,
        weight_decay=weight_decay, grad_scale=gs, coefficient=trust_coefficient,
        ratio_eps=eps, ratio_wd=weight_decay if classic and denominator == "sum" else 0.0,
        phi_lo=phi[0] if phi is not None else 0.0, phi_hi=phi[1] if phi is not None else 0.0,
        norm_wd=weight_decay if classic and denominator == "combined" else 0.0, lr_in_momentum=int(lr_in_momentum),
        grad_unscale=unscale_in_kernel,
    )  # fmt: skip
    if reduce is None:
        _run_cpu(lib, args)
        return w_norm, d_norm, ratio
    ratio_fn = lambda w, d: _lars_ratio(w, d, **kw)  # noqa: E731
    return _cpu_two_stage(args, lib, n, dt, reduce, ratio_fn, ratio)


def _lars_ratio(w_norm, d_norm, *, lr, weight_decay, trust_coefficient, eps, mode, clip, denominator, phi, adapt,
                **_):  # fmt: skip
    from largebatch.optim._common import trust_ratio
    from largebatch.optim.lars import _classic_ratio

    if mode == "classic":
        return _classic_ratio(
            w_norm, d_norm, lr=lr, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
            eps=eps, clip=clip, adapt=adapt, denominator=denominator,
        )  # fmt: skip
    if not adapt:
        return torch.ones_like(w_norm)
    return trust_ratio(w_norm, d_norm, phi=phi, trust_clip=clip, coefficient=trust_coefficient, denominator_extra=eps)


# -- the torch-function backend (GPUs; CPU under torch.compile) ---------------------------------
# The passes below are the same element formulas as the CPU kernel, one tensor per call. On a GPU
# they are compiled with dynamic shapes over chunks of tensors (one call per chunk: a compiled call
# costs tens of microseconds on the host, benchmarks/host_overhead.py); under an enclosing
# torch.compile they are traced into the caller's graph. Skipping is arithmetic: the gradient is
# zeroed and every write is a torch.where(ok, new, old), so nothing is read on the host.


def _effective_grad(g: Tensor, dt: torch.dtype, ok: Tensor | None, grad_scale: Tensor | None) -> Tensor:
    g = g.to(dt)
    if ok is not None:
        g = torch.where(ok, g, torch.zeros((), dtype=dt, device=g.device))
    if grad_scale is not None:
        g = g * grad_scale
    return g


def _keep_unless(ok: Tensor | None, new: Tensor, old: Tensor) -> Tensor:
    return new if ok is None else torch.where(ok, new, old)


def _lamb_direction(x, g, m, v, coef, eps: float, eps_root: float, weight_decay: float, nesterov: int) -> Tensor:
    """u = m_hat / (sqrt(v_hat + eps_root) + eps) + weight_decay * x, with coef = (am, ag, bv, bg) of the tensor.

    ``x`` is the parameter as the ratio sees it: already multiplied by ``shrink`` (1 - lr * lambda)
    when the decay is applied first (``decay_in_ratio=False``; ``weight_decay`` is then 0)."""
    m_hat = m * coef[0]
    if nesterov >= 1:
        m_hat = m_hat + g * coef[1]
    v_hat = v * coef[2]
    if nesterov == 2:
        v_hat = v_hat + (g * g) * coef[3]
    den = (v_hat + eps_root if eps_root else v_hat).sqrt() + eps
    u = m_hat / den
    if eps == 0:
        u = torch.where(den > 0, u, torch.zeros_like(u))
    return u + x * weight_decay


def _lamb_pass1(x, g, m, v, coef, ok, grad_scale, beta1: float, beta3: float, beta2: float, eps: float,
                eps_root: float, weight_decay: float, nesterov: int, shrink: float, store: bool) -> Tensor:  # fmt: skip
    grad = g
    g = _effective_grad(g, x.dtype, ok, grad_scale)
    if shrink != 1.0:
        x = x * shrink
    m_new = _keep_unless(ok, m * beta1 + g * beta3, m)
    v_new = _keep_unless(ok, v * beta2 + ((1 - beta2) * g) * g, v)
    m.copy_(m_new)
    v.copy_(v_new)
    u = _lamb_direction(x, g, m_new, v_new, coef, eps, eps_root, weight_decay, nesterov)
    if store:  # update_in_grad: pass 2 reads u from the gradient
        grad.copy_(_keep_unless(ok, u, grad))
    return torch.stack([_sq_sum(x), _sq_sum(u)])


def _lamb_pass2(x, g, m, v, coef, scale, ok, grad_scale, eps: float, eps_root: float, weight_decay: float,
                nesterov: int, shrink: float, stored: bool) -> None:  # fmt: skip
    xs = x * shrink if shrink != 1.0 else x
    if stored:  # u is in the gradient (it is the gradient itself where ok is False; x is kept there)
        u = g
    else:
        if nesterov >= 1:
            g = _effective_grad(g, x.dtype, ok, grad_scale)
        u = _lamb_direction(xs, g, m, v, coef, eps, eps_root, weight_decay, nesterov)
    x.copy_(_keep_unless(ok, xs + u * scale, x))


def _lars_paper_pass1(x, g, b, ok, grad_scale, momentum: float, weight_decay: float, nesterov: bool) -> Tensor:
    d = _effective_grad(g, x.dtype, ok, grad_scale) + x * weight_decay
    b_new = _keep_unless(ok, b * momentum + d * (1 - momentum), b)
    b.copy_(b_new)
    n = b_new * momentum + d * (1 - momentum) if nesterov else b_new
    return torch.stack([_sq_sum(x), _sq_sum(n)])


def _lars_paper_pass2(x, g, b, scale, ok, grad_scale, momentum: float, weight_decay: float, nesterov: bool) -> None:
    n = b
    if nesterov:
        n = b * momentum + (_effective_grad(g, x.dtype, ok, grad_scale) + x * weight_decay) * (1 - momentum)
    x.copy_(_keep_unless(ok, x + n * scale, x))


def _lars_classic_pass1(x, g, ok, grad_scale, norm_wd: float) -> Tensor:
    g = _effective_grad(g, x.dtype, ok, grad_scale)
    if norm_wd != 0:  # denominator="combined": the norm of g + wd x
        g = g + x * norm_wd
    return torch.stack([_sq_sum(x), _sq_sum(g)])


def _lars_classic_pass2(x, g, b, ratio, ok, grad_scale, lr: float, momentum: float, weight_decay: float,
                        nesterov: bool, lr_in_momentum: bool) -> None:  # fmt: skip
    d = (_effective_grad(g, x.dtype, ok, grad_scale) + x * weight_decay) * ratio
    if lr_in_momentum:
        d = d * lr
    b_new = b * momentum + d
    n = d + b_new * momentum if nesterov else b_new
    x_new = x - n if lr_in_momentum else x + n * -lr
    b.copy_(_keep_unless(ok, b_new, b))
    x.copy_(_keep_unless(ok, x_new, x))


_PASSES = {
    f.__name__: f
    for f in (_lamb_pass1, _lamb_pass2, _lars_paper_pass1, _lars_paper_pass2, _lars_classic_pass1, _lars_classic_pass2)
}
_CHUNK = 16  # tensors per compiled call: one call per tensor would cost more on the host than on a GPU
_COMPILE_ON_CPU = False  # compile the passes for CPU tensors too (tests use this to check the compiled form)


def _over_tensors(fn):
    """``fn`` applied to every tensor of a chunk in one call: ``many(lists, stacked, shared)`` calls
    ``fn(*lists[:][i], *stacked[:][i], *shared)`` for each i and stacks what it returns (None if nothing)."""

    def many(lists, stacked, shared):
        out = [fn(*ts, *[s[i] for s in stacked], *shared) for i, ts in enumerate(zip(*lists))]
        return None if out[0] is None else torch.stack(out)

    # a code object of its own per pass: torch.compile caches (and limits recompilations) per code object
    many.__code__ = many.__code__.replace(co_name=fn.__name__ + "_many")
    return many


_MANY = {name: _over_tensors(f) for name, f in _PASSES.items()}
_compiled_passes: dict[str, object] = {}


def _no_duck_shapes():
    """Sizes that happen to be equal get symbols of their own: a chunk whose tensors' sizes match in
    another pattern then needs no new graph (torch's private switch; without it, only more graphs)."""
    try:
        from torch.fx.experimental import _config
    except ImportError:  # pragma: no cover - older or newer torch
        return contextlib.nullcontext()
    return _config.patch(use_duck_shape=False) if hasattr(_config, "use_duck_shape") else contextlib.nullcontext()


def _run_pass(name: str, device: torch.device, lists: list[list[Tensor]], stacked=(), shared=()):
    """The pass ``name`` over every tensor (see :func:`_over_tensors`): on accelerators compiled with
    dynamic shapes, ``_CHUNK`` tensors per call (the last ones one at a time, so that a bucket needs at
    most two graphs); plain torch functions (traced into the caller's graph) under torch.compile, on
    the CPU and on the meta device. Returns the stacked per-tensor results, or None."""
    if torch.compiler.is_compiling() or device.type == "meta" or (device.type == "cpu" and not _COMPILE_ON_CPU):
        return _MANY[name](lists, stacked, shared)
    fn = _compiled_passes.get(name)
    if fn is None:
        fn = _compiled_passes[name] = torch.compile(_MANY[name], dynamic=True, fullgraph=True)
    n, full = len(lists[0]), len(lists[0]) - len(lists[0]) % _CHUNK
    bounds = [(i, i + _CHUNK) for i in range(0, full, _CHUNK)] + [(i, i + 1) for i in range(full, n)]
    with _no_duck_shapes():
        out = [fn([t[a:b] for t in lists], [s[a:b] for s in stacked], shared) for a, b in bounds]
    return None if out[0] is None else torch.cat(out)


def _flat(*lists: list[Tensor]) -> list[list[Tensor]]:
    """The lists with each tensor viewed as 1-d where all of its counterparts are contiguous, so
    that one compiled graph serves tensors of every rank and size."""
    out: list[list[Tensor]] = [[] for _ in lists]
    for group in zip(*lists):
        flat = all(t.is_contiguous() for t in group)
        for dst, t in zip(out, group):
            dst.append(t.view(-1) if flat else t)
    return out


def _lamb_coefficients(steps, dt, beta1, beta3, beta2, bias_correction, nesterov) -> Tensor:
    """[n, 4] per-tensor (am, ag, bv, bg); see csrc/layerwise_step.cpp."""
    from largebatch.optim.lamb import _bias_correction

    t = torch.stack(steps)
    bc1 = _bias_correction(beta1, t, bias_correction)  # float64: cast to dt only when finished
    bc2 = _bias_correction(beta2, t, bias_correction)
    zero = torch.zeros_like(bc1)
    am, ag, bv, bg = 1 / bc1, zero, 1 / bc2, zero
    if nesterov is not None:
        am = beta1 / _bias_correction(beta1, t + 1, bias_correction)
        ag = beta3 / bc1
    if nesterov == "both":
        bv = beta2 / _bias_correction(beta2, t + 1, bias_correction)
        bg = (1 - beta2) / bc2
    return torch.stack([am, ag, bv, bg], dim=1).to(dt)


def _stacked_sums(sums: Tensor) -> Tensor:
    """[n, 2] rows of (w_sq, d_sq) per tensor -> [w_sq..., d_sq...]: the layout that ``reduce`` receives."""
    return sums.t().reshape(-1)


def _torch_lamb(
    params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, eps_root, weight_decay, decay_in_ratio,
    bias_correction, grad_averaging, adapt, phi, trust_clip, nesterov, update_in_grad, ok, grad_scale, reduce,
    unscale=None,
):  # fmt: skip
    unscale_grads_(grads, unscale)
    dt, device = params[0].dtype, params[0].device
    weight_decay, shrink = _decay_split(lr, weight_decay, decay_in_ratio)
    beta3 = first_moment_factor(beta1, grad_averaging)
    if ok is None:
        torch._foreach_add_(steps, 1)
    else:  # a list of 0-d tensors: never read on the host
        torch._foreach_add_(steps, [ok.to(steps[0].dtype)] * len(steps))
    coef = _lamb_coefficients(steps, dt, beta1, beta3, beta2, bias_correction, nesterov)
    gs = None if grad_scale is None else grad_scale.to(dt)
    nest = {None: 0, "first": 1, "both": 2}[nesterov]
    flat = _flat(params, grads, exp_avgs, exp_avg_sqs)
    shared = (ok, gs, beta1, beta3, beta2, eps, eps_root, weight_decay, nest, shrink, update_in_grad)
    sums = _run_pass("_lamb_pass1", device, flat, [coef], shared)

    def pass2_all(sq: Tensor):
        w_norm, u_norm = sq.sqrt().to(dt).chunk(2)
        ratio = _lamb_ratio(w_norm, u_norm, adapt, phi, trust_clip)
        shared = (ok, gs, eps, eps_root, weight_decay, nest, shrink, update_in_grad)
        _run_pass("_lamb_pass2", device, flat, [coef, -lr * ratio], shared)
        return w_norm, u_norm, ratio

    from largebatch.optim._common import with_global_sums

    return with_global_sums(reduce, _stacked_sums(sums), pass2_all)


def _torch_lars(
    params, grads, momentum_buffers, *, lr, momentum, weight_decay, trust_coefficient, eps,
    nesterov, mode, clip, denominator, lr_in_momentum, phi, adapt, ok, grad_scale, reduce, unscale=None,
):  # fmt: skip
    unscale_grads_(grads, unscale)
    dt, device = params[0].dtype, params[0].device
    gs = None if grad_scale is None else grad_scale.to(dt)
    flat = _flat(params, grads, momentum_buffers)
    if mode == "paper":
        sums = _run_pass("_lars_paper_pass1", device, flat, (), (ok, gs, momentum, weight_decay, nesterov))
    else:
        norm_wd = weight_decay if denominator == "combined" else 0.0
        sums = _run_pass("_lars_classic_pass1", device, flat[:2], (), (ok, gs, norm_wd))

    def pass2_all(sq: Tensor):
        w_norm, d_norm = sq.sqrt().to(dt).chunk(2)
        ratio = _lars_ratio(
            w_norm, d_norm, lr=lr, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps,
            mode=mode, clip=clip, denominator=denominator, phi=phi, adapt=adapt,
        )  # fmt: skip
        if mode == "paper":
            _run_pass("_lars_paper_pass2", device, flat, [-lr * ratio], (ok, gs, momentum, weight_decay, nesterov))
        else:
            shared = (ok, gs, lr, momentum, weight_decay, nesterov, lr_in_momentum)
            _run_pass("_lars_classic_pass2", device, flat, [ratio], shared)
        return w_norm, d_norm, ratio

    from largebatch.optim._common import with_global_sums

    return with_global_sums(reduce, _stacked_sums(sums), pass2_all)
