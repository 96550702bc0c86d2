"""`largebatch demo`: LAMB vs AdamW on the bundled MNIST at batch B and 32B, same epochs."""

from __future__ import annotations

import argparse
import shlex
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", default="runs/demo", help="where runs, the table and the plot go")
    p.add_argument("--base-batch", type=int, default=128)
    p.add_argument("--scale", type=int, default=32, help="the large batch is scale x base batch")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from largebatch.study.demo import plot_results, results_table, run_demo

    t = time.perf_counter()
    print(f"largebatch demo: MNIST LeNet-5, LAMB vs AdamW, batch {args.base_batch} and {args.base_batch * args.scale}, "
          f"{args.epochs:g} epochs each, sqrt LR rule, linear-epoch warmup, poly decay")  # fmt: skip
    try:
        results = run_demo(args.out_dir, args.base_batch, args.scale, args.epochs, args.train_subset, not args.no_progress)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = results_table(results)
    out = Path(args.out_dir)
    command = " ".join(["largebatch", "demo", "--out-dir", shlex.quote(args.out_dir), "--base-batch", str(args.base_batch),
                        "--scale", str(args.scale), "--epochs", f"{args.epochs:g}"]
                       + (["--train-subset", str(args.train_subset)] if args.train_subset else []))  # fmt: skip
    (out / "results.md").write_text(f"{table}\n\nTable and accuracy.png written by `{command}`.\n")
    plot_results(results, out / "accuracy.png")
    print()
    print(table)
    print(f"\nplot: {out / 'accuracy.png'}; table: {out / 'results.md'}; total {time.perf_counter() - t:.0f} s")
    return 0
