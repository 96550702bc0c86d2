"""`largebatch report DB --out DIR`: Markdown tables and PNG plots from a sweep database."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("db", nargs="?", default=None, help="sweep database written by `largebatch sweep`")
    p.add_argument("--out", required=True, help="folder for report.md and the PNGs")
    p.add_argument("--sweep", action="append", default=None, metavar="NAME", help="report only this sweep (repeatable)")
    p.add_argument("--synthetic", action="store_true",
                   help="add the synthetic layer-curvature study (LARS/LAMB vs SGD; runs in well under a minute)")
    p.add_argument("--title", default=None, help="report title")


def run(args: argparse.Namespace) -> int:
    from largebatch.commands import with_one_line_errors

    # a missing, foreign or damaged database, an unknown --sweep, a bad --out: one line each
    return with_one_line_errors(_run, args, str(args.db))


def _run(args: argparse.Namespace) -> int:
    from largebatch.study.report import write_report

    if args.db is None and not args.synthetic:
        print("error: give a sweep database, --synthetic, or both", file=sys.stderr)
        return 2
    import shlex

    parts = ["largebatch", "report"] + ([args.db] if args.db else []) + ["--out", args.out]
    for name in args.sweep or []:
        parts += ["--sweep", name]
    if args.synthetic:
        parts.append("--synthetic")
    if args.title:
        parts += ["--title", args.title]
    path = write_report(args.out, db=args.db, sweeps=args.sweep, synthetic=args.synthetic, title=args.title,
                        command=" ".join(shlex.quote(p) for p in parts))  # fmt: skip
    print(f"report: {path}")
    return 0
