"""Fused (single-kernel-per-pass) LAMB/LARS steps. Placeholder until a fused backend is provided:
``fused_available`` answers False, so the optimizers use the multi-tensor path."""

from __future__ import annotations

from torch import Tensor


def fused_available(tensors: list[Tensor]) -> bool:
    return False


def fused_lamb(*args, **kwargs):
    raise RuntimeError("no fused LAMB backend is available for these tensors; use foreach=True")


def fused_lars(*args, **kwargs):
    raise RuntimeError("no fused LARS backend is available for these tensors; use foreach=True")
