"""Optimizer-step benchmark; the same as ``largebatch bench`` (see docs/bench.md).

    python benchmarks/bench_step.py --sizes 25M 110M --json benchmarks/results/bench.json
"""

import sys

from largebatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
