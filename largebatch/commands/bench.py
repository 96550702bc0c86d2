"""``largebatch bench``: time optimizer steps against baselines and the memory-bandwidth floor.

Examples::

  largebatch bench                                   # 25M and 110M, every implementation
  largebatch bench --sizes 110M --impl lamb adamw-fused --repeats 30
  largebatch bench --quick --json bench.json         # small and fast (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import sys

from largebatch import bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", nargs="+", default=None, choices=tuple(bench.SIZES), metavar="SIZE",
                        help=f"parameter sets ({', '.join(f'{k}: {v[0]}' for k, v in bench.SIZES.items())}); "
                             "default: 25M 110M")
    parser.add_argument("--impl", nargs="+", default=None, choices=bench.IMPL_NAMES, metavar="NAME",
                        help=f"implementations to time (default: all): {', '.join(bench.IMPL_NAMES)}")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per implementation (default 20)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="the timed steps are split over this many rounds in rotating order, so that a "
                             "drift of the machine's speed reaches every implementation alike (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before each block (default 2)")
    parser.add_argument("--reference", action="store_true",
                        help=f"also time the single-tensor reference paths above {bench.SLOW_LIMIT // 10**6}M parameters")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="measure each step's extra peak memory in a subprocess (default: on, off with --quick)")
    parser.add_argument("--flush", action=argparse.BooleanOptionalAction, default=None,
                        help="flush the caches before every timed step (default: on, off with --quick)")
    parser.add_argument("--compile-cost", action=argparse.BooleanOptionalAction, default=None,
                        help="measure a cold build of the fused CPU kernels (default: on, off with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--quick", action="store_true",
                        help="size 2M, 3 steps, 1 round, 1 warm-up step, no memory/flush/compile measurement")
    parser.add_argument("--json", metavar="PATH", help="write the full results here")


def run(args: argparse.Namespace) -> int:
    quick = args.quick

    def pick(value, normal, fast):
        return value if value is not None else (fast if quick else normal)

    try:
        result = bench.run_benchmark(
            pick(args.sizes, ["25M", "110M"], ["2M"]),
            args.impl,
            repeats=pick(args.repeats, 20, 3),
            rounds=pick(args.rounds, 5, 1),
            warmup=pick(args.warmup, 2, 1),
            reference=args.reference,
            memory=pick(args.memory, True, False),
            flush=pick(args.flush, True, False),
            compile_cost=pick(args.compile_cost, True, False),
            threads=args.threads,
            log=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    bench.add_ratios(result)
    result["command"] = "largebatch bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None
    meta = result["meta"]
    print(f"{meta['date']}; {meta['cpu']}, {meta['torch_threads']} threads; torch {meta['torch']}; commit {meta['commit']}")
    for size, info in result["sizes"].items():
        other = info.get("cpu_share_of_other_processes")
        print(f"{size}: {info['description']}: {info['params'] / 1e6:.1f}M parameters, {info['tensors']} tensors, "
              f"bandwidth {info['bandwidth_GBps']} GB/s"
              + (f" before the timing, {info['bandwidth_after_GBps']} GB/s after" if "bandwidth_after_GBps" in info else "")
              + (f"; other processes used {other:.0%} of the CPU time meanwhile" if other is not None else ""))
    for opt, info in result.get("compile", {}).items():
        print(f"fused CPU kernel ({opt}, float32): cold build {info['cold_build_s']} s"
              + (f" ({info['error']})" if info.get("error") else ""))
    print()
    print(bench.format_table(result))
    result["targets"] = bench.check_targets(result)
    if result["targets"]:
        print("\nTargets (ratios of this run):")
        print(bench.format_targets(result["targets"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0
