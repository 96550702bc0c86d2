"""Named hyperparameter grids: the paper's learning-rate and weight-decay grids, by name.

A sweep config may give any grid as a list of numbers or as one of these names::

    lrs = "paper-mnist"            # {1e-4, 1e-3, 1e-2, 1e-1}
    weight_decays = "paper-adamw"  # {1e-4, 1e-3, 1e-2, 0.1, 1.0}

References:
  You et al., 2020. Large Batch Optimization for Deep Learning: Training BERT in 76 minutes.
  ICLR 2020, appendix (MNIST LeNet comparison and the tuning grid of Adam/AdamW/Adagrad/LAMB).
  https://arxiv.org/abs/1904.00962
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

# The learning rates tried for every optimizer in the paper's MNIST LeNet table (batch 1024).
PAPER_MNIST_LRS = (1e-4, 1e-3, 1e-2, 1e-1)

# The paper's large tuning grid for Adam, AdamW, Adagrad and LAMB.
PAPER_TUNING_LRS = (
    0.0001, 0.0002, 0.0004, 0.0006, 0.0008, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.02, 0.04,
    0.06, 0.08, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 15.0, 20.0, 25.0, 30.0,
    35.0, 40.0, 45.0, 50.0,
)  # fmt: skip

# The weight decays tried for AdamW in the paper's tuning.
PAPER_ADAMW_WEIGHT_DECAYS = (0.0001, 0.001, 0.01, 0.1, 1.0)

GRIDS: MappingProxyType = MappingProxyType(
    {
        "paper-mnist": PAPER_MNIST_LRS,
        "paper-tuning": PAPER_TUNING_LRS,
        "paper-adamw": PAPER_ADAMW_WEIGHT_DECAYS,
        "half-decades": tuple(float(f"{10 ** (e / 2):.3g}") for e in range(-10, 3)),  # 1e-5 .. 10
    }
)


def resolve_grid(value: Any, name: str = "grid") -> tuple[float, ...]:
    """A grid from a preset name, a list of numbers or one number.

    Raises:
        ValueError: an unknown preset name (the message lists the known ones), an empty list, or
            a value that is not a finite non-negative number.
    """
    if isinstance(value, str):
        if value not in GRIDS:
            raise ValueError(f"unknown {name} preset {value!r}; known presets: {', '.join(GRIDS)}")
        return tuple(GRIDS[value])
    values: Sequence[Any] = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError(f"{name} must not be empty")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} values must be finite numbers >= 0, got {v!r}")
        out.append(float(v))
    return tuple(out)


def describe_grid(values: Sequence[float]) -> str:
    """``{1e-4, 1e-3, ...}``, or the preset's name when the values are exactly a preset."""
    for name, grid in GRIDS.items():
        if tuple(values) == tuple(grid):
            return f"`{name}` ({len(grid)} values, {min(grid):g} .. {max(grid):g})"
    return "{" + ", ".join(f"{v:g}" for v in values) + "}"
