"""What the non-finite check of ``Lamb(nonfinite="skip")`` (the default) adds to a step.

Times, interleaved so that a drift of the machine's speed reaches each alike (caches flushed before
each): the check alone (``fused_all_finite`` over every gradient), the default step, the step with
``nonfinite="none"``, and the check followed by that step. Prints medians in ms.

  python benchmarks/check_cost.py              # 25M BERT-shaped float32 parameters
  python benchmarks/check_cost.py --size 110M --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import largebatch
from largebatch.bench import SIZES, _Flusher, make_tensors, size_shapes
from largebatch.optim._fused import fused_all_finite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="25M", choices=tuple(SIZES))
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    params = make_tensors(size_shapes(args.size))
    grads = [p.grad for p in params]
    flush = _Flusher()
    default = largebatch.Lamb(params, lr=1e-3, weight_decay=0.01)
    nocheck = largebatch.Lamb(params, lr=1e-3, weight_decay=0.01, nonfinite="none")
    for opt in (default, nocheck):  # state allocated, kernel built
        opt.step()
    runs = {
        "check alone": lambda: fused_all_finite(grads),
        "Lamb() step": default.step,
        "Lamb(nonfinite='none') step": nocheck.step,
        "check, then Lamb(nonfinite='none') step": lambda: (fused_all_finite(grads), nocheck.step()),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            flush()
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    gbytes = sum(g.numel() * g.element_size() for g in grads) / 1e9
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        extra = f" ({gbytes / ms * 1e3:.1f} GB/s of gradients)" if name == "check alone" else ""
        print(f"{args.size} {name}: {ms:.2f} ms{extra}")


if __name__ == "__main__":
    main()
