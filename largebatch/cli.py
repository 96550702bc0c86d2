"""The ``largebatch`` command line: it parses arguments and calls the library, nothing more.

Each sub-command lives in ``largebatch/commands/<name>.py`` and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported lazily so that
``largebatch --help`` stays fast and one sub-command's optional dependencies never break another.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> one-line help. The module largebatch.commands.<name> implements it.
COMMANDS = {
    "demo": "run the bundled demo study (what `make demo` runs)",
    "train": "train a built-in task with any optimizer at any effective batch size",
    "schedule": "print and plot a large-batch recipe's learning-rate schedule",
    "sweep": "run a grid of training runs into a SQLite results database",
    "report": "write a Markdown report (tables and plots) from a sweep database",
    "bench": "time optimizer steps against baselines and the memory-bandwidth floor",
}


def _module(name: str):
    return importlib.import_module(f"largebatch.commands.{name}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="largebatch",
        description="LAMB/LARS large-batch training: optimizers, recipes, training and studies.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen sub-command's module is imported (its options are needed to parse).
        if name == wanted:
            _module(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(_module(args.command).run(args) or 0)
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
