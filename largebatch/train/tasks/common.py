"""Pieces shared by the built-in tasks: option parsing, subset sizes and the classification loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..task import Batch


def int_option(value, option: str) -> int:
    """``value`` as an int: an int, an integral float or the text of one (a CLI value); anything
    else is refused with a message that names the option."""
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise ValueError(f"{option} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        isinstance(value, float) and not value.is_integer()
    ):
        raise ValueError(f"{option} must be an integer, got {value!r}")
    return int(value)


def float_option(value, option: str) -> float:
    """``value`` as a finite float (a number or the text of one), else a message naming the option."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{option} must be a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{option} must be a finite number, got {value!r}")
    return number


_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")


def bool_option(value, option: str) -> bool:
    """``value`` as a bool: a bool, 0 or 1, or (any case) true/false, 1/0, yes/no, on/off (a CLI
    value); anything else is refused with a message that names the option."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    allowed = ", ".join(f"{t}/{f}" for t, f in zip(_TRUE_WORDS, _FALSE_WORDS))
    raise ValueError(f"{option} must be a boolean: {allowed} (any case), got {value!r}")


def subset_size(value: int | str | None, n: int, option: str) -> int:
    """``n`` when ``value`` is None, else ``min(value, n)``; ``value`` must be a positive int."""
    if value is None:
        return n
    try:
        value = int_option(value, option)
    except ValueError:
        raise ValueError(f"{option} must be a positive number of examples, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{option} must be a positive number of examples, got {value}")
    return min(value, n)


def check_split(split: str, task_name: str) -> str:
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; {task_name} has 'train' and 'eval'")
    return split


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """16-bit logits in float32 for the loss; float32 and float64 ones as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def classification_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed cross-entropy of ``model(x)`` against ``y`` and the number of correct top-1
    predictions (a float tensor, summed like the loss)."""
    logits = model(batch.tensors["x"])
    target = batch.tensors["y"]
    loss_sum = F.cross_entropy(_at_least_float32(logits), target, reduction="sum")
    correct = (logits.argmax(dim=1) == target).sum().to(loss_sum.dtype)
    return loss_sum, {"accuracy": correct}
