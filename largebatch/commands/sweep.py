"""`largebatch sweep CONFIG.toml`: run a grid of training runs into a SQLite results database."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="sweep config (TOML); see largebatch/study/sweep.py for the layout")
    p.add_argument("--db", default=None, help="results database (default: runs/<sweep name>.sqlite)")
    p.add_argument("--runs-dir", default=None, help="per-run folders with checkpoints (default: <db>-runs beside the db)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (spawned); 1 = this process")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cpus / workers)")
    p.add_argument("--only", nargs="*", default=[], metavar="LABEL", help="run only these optimizer labels")
    p.add_argument("--retry-failed", action="store_true", help="also re-run runs recorded as failed")
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether each is done, run nothing")
    p.add_argument("--grids", action="store_true", help="list the named LR / weight-decay grids and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from largebatch.commands import with_one_line_errors

    # a bad config (TOMLDecodeError is a ValueError) or --db: one line each
    return with_one_line_errors(_run, args, args.db or "runs/<sweep name>.sqlite")


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from largebatch.study.grids import GRIDS
    from largebatch.study.store import ResultStore
    from largebatch.study.sweep import SweepSpec, run_sweep

    if args.grids:
        for name, values in GRIDS.items():
            print(f"{name}: {', '.join(f'{v:g}' for v in values)}")
        return 0
    if not args.config:
        print("error: give a sweep config (TOML), or --grids", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    spec = SweepSpec.from_toml(args.config)
    unknown = sorted(set(args.only) - {o.label for o in spec.optimizers})
    if unknown:
        raise ValueError(f"--only {' '.join(unknown)}: not optimizer labels of {spec.name!r}; they are: "
                         f"{', '.join(o.label for o in spec.optimizers)}")  # fmt: skip
    db = Path(args.db or f"runs/{spec.name}.sqlite")
    if args.dry_run:
        planned = [r for r in spec.expand() if not args.only or r.label in args.only]
        statuses = {}
        if db.exists():
            with ResultStore(db, readonly=True) as store:  # a dry run writes nothing
                statuses = {r.key: store.status(r.key) for r in planned}
        for r in planned:
            c = r.spec["config"]
            lr = f"lr {c['lr']:g}" if c.get("lr") is not None else f"base_lr {c['base_lr']:g} ({c.get('lr_rule', 'sqrt')})"
            print(f"{r.key}  {r.label:14s} B={c['batch_size']:<6d} {lr:26s} wd {c.get('weight_decay', 0):<8g} "
                  f"seed {c['seed']}  {','.join(r.tags):14s} {statuses.get(r.key) or 'new'}")  # fmt: skip
        print(f"{len({r.key for r in planned})} runs")
        return 0
    summary = run_sweep(spec, db, runs_dir=args.runs_dir, workers=args.workers, threads=args.threads,
                        progress=not args.no_progress, retry_failed=args.retry_failed, only=tuple(args.only),
                        command=command_line(args, db))  # fmt: skip
    print(f"sweep {summary.name}: {summary.planned} runs, {summary.skipped} already done, {summary.executed} executed "
          f"in {summary.wall_time:.0f} s; status: {', '.join(f'{n} {s}' for s, n in sorted(summary.statuses.items()))}")  # fmt: skip
    if summary.busy:
        print(f"{summary.busy} run(s) left alone: another process of this database is executing them now (a run "
              f"never executes twice at once; run this command again after that process ends if it stops early)")  # fmt: skip
    if summary.dropped:
        print(f"the config of sweep {summary.name!r} changed: {summary.dropped} run(s) it no longer asks for left the "
              f"sweep (they stay in the database, and come back if the config asks for them again)")  # fmt: skip
    print(f"database: {summary.db}  (report: largebatch report {summary.db} --out docs/results/{summary.name})")
    return 0


def command_line(args: argparse.Namespace, db) -> str:
    """The invocation as a command a user can paste (every option that changes what runs)."""
    import shlex

    parts = ["largebatch", "sweep", args.config, "--db", str(db)]
    if args.runs_dir:
        parts += ["--runs-dir", args.runs_dir]
    if args.workers != 1:
        parts += ["--workers", str(args.workers)]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    if args.only:
        parts += ["--only", *args.only]
    if args.retry_failed:
        parts.append("--retry-failed")
    return " ".join(shlex.quote(p) for p in parts)
