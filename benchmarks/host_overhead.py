"""Host time per step of the torch-function (GPU) backend: one compiled call per chunk of tensors.

On a GPU, Lamb and Lars run their two passes as torch functions compiled with torch.compile. Each
call of a compiled function costs tens of microseconds on the host (guards, wrappers, launches),
which for a BERT-base bucket (199 tensors, two passes) is more than the GPU needs for the step. The
backend therefore compiles each pass over ``_CHUNK`` tensors at a time. This script measures that
host cost where it can be measured without a GPU: the same compiled passes on CPU tensors so small
(16 elements) that the time is the calls, not the arithmetic. It compares one call per tensor
(``--chunks 1``) with chunked calls, and prints both against torch's AdamW(foreach=True) on the same
tensors in the same run (a multi-tensor step, a handful of host calls per step).

    python benchmarks/host_overhead.py                   # 199 tensors, chunks of 1 and 16
    python benchmarks/host_overhead.py --optimizer lars --chunks 1 4 16 32

The first step of each setting compiles (Inductor's C++ here, Triton on a GPU); that time is
printed apart ("first step") and is cached on disk by torch for later processes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from largebatch import Lamb, Lars
from largebatch.optim import _fused


def _median_ms(step, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizer", choices=["lamb", "lars"], default="lamb")
    ap.add_argument("--tensors", type=int, default=199, help="tensors in the bucket (BERT-base: 199)")
    ap.add_argument("--numel", type=int, default=16, help="elements per tensor (small: the calls dominate)")
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 16], help="tensors per compiled call")
    ap.add_argument("--steps", type=int, default=30, help="timed steps (median)")
    args = ap.parse_args(argv)
    if args.tensors < 1 or args.numel < 1 or args.steps < 1 or min(args.chunks) < 1:
        ap.error("--tensors, --numel, --steps and --chunks must be positive integers")

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(args.numel)) for _ in range(args.tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    baseline = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    baseline.step()
    base_ms = _median_ms(baseline.step, args.steps)
    print(f"{args.tensors} tensors of {args.numel} elements, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"torch AdamW(foreach=True): {base_ms:.2f} ms per step")
    print("| tensors per compiled call | first step (s) | ms per step | us per tensor and pass | / AdamW foreach |")
    print("|---|---|---|---|---|")
    cls = Lamb if args.optimizer == "lamb" else Lars
    old = (_fused._use_torch_backend, _fused._COMPILE_ON_CPU, _fused._CHUNK)
    _fused._use_torch_backend = lambda params: True  # the GPU backend, on CPU tensors
    _fused._COMPILE_ON_CPU = True
    try:
        for chunk in args.chunks:
            _fused._CHUNK = chunk
            _fused._compiled_passes.clear()
            torch._dynamo.reset()
            opt = cls(params, lr=1e-3, weight_decay=0.01, fused=True)
            t = time.perf_counter()
            opt.step()
            first = time.perf_counter() - t
            opt.step()
            ms = _median_ms(opt.step, args.steps)
            per = ms * 1e3 / (2 * args.tensors)
            print(f"| {chunk} | {first:.1f} | {ms:.2f} | {per:.1f} | {ms / base_ms:.2f} |")
    finally:
        _fused._use_torch_backend, _fused._COMPILE_ON_CPU, _fused._CHUNK = old
        _fused._compiled_passes.clear()


if __name__ == "__main__":
    main()
