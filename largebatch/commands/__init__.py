"""One module per ``largebatch`` sub-command (``largebatch/cli.py`` dispatches), and what they share."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def with_one_line_errors(body: Callable[[argparse.Namespace], int], args: argparse.Namespace, database: str) -> int:
    """``body(args)``, with what a user can get wrong printed as one ``error:`` line and exit code
    2: a ValueError or OSError (bad options, a missing or foreign file) or an sqlite3.Error (a
    damaged ``database``)."""
    import sqlite3

    try:
        return body(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except sqlite3.Error as err:
        print(f"error: sweep database {database}: {err}", file=sys.stderr)
        return 2
