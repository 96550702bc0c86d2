"""The interface between the training loop and a task (model + data + loss).

A task keeps its data in memory as tensors and hands out batches by index, so the loop owns the
data order (a seeded permutation per epoch) and a resumed run can continue at the exact sample.

The objective of one optimizer step is ``sum(loss_sum) / sum(weight)`` over every micro-batch of
the effective batch (and every rank). ``weight`` is known before the forward pass (examples for
classification, masked tokens for MLM), so the loop can scale each micro-batch's ``loss_sum`` by
the total weight and gradient accumulation equals one big batch exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Batch:
    """Tensors of one (micro-)batch plus its weight in the objective (examples or tokens)."""

    tensors: dict[str, torch.Tensor]
    weight: int

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        """Move to ``device``; with ``dtype``, floating tensors are also cast to it."""

        def move(v: torch.Tensor) -> torch.Tensor:
            return v.to(device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None, non_blocking=True)

        return Batch({k: move(v) for k, v in self.tensors.items()}, self.weight)


def example_generators(generator: torch.Generator | None, indices: torch.Tensor) -> list[torch.Generator | None]:
    """One generator per example, seeded from ``generator.initial_seed()`` and the example's index
    (not its position in the batch), so what an example draws does not depend on which
    micro-batch or rank it lands in. ``None`` (the global RNG) for every example without a generator."""
    if generator is None:
        return [None] * int(indices.numel())
    base = generator.initial_seed()
    return [
        torch.Generator().manual_seed((base * 0x9E3779B97F4A7C15 + (i + 1) * 0xBF58476D1CE4E5B9) % (1 << 63))
        for i in indices.tolist()
    ]


class Task(ABC):
    """A built-in or user task. Subclasses set ``name`` and ``metric`` (the headline eval metric)."""

    name: str = "task"
    metric: str = "accuracy"  # key of evaluate()'s result that studies report; higher is better

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (initialisation uses the global torch RNG)."""

    @abstractmethod
    def num_examples(self, split: str) -> int:
        """Number of examples in ``split`` ("train" or "eval")."""

    @abstractmethod
    def get_batch(self, split: str, indices: torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        """The examples at ``indices``. Random augmentation/masking must come only from ``generator``,
        and per example (see :func:`example_generators`): the training loop passes the same
        generator to every micro-batch and rank of a step, so that an example is augmented the same
        way however the effective batch is split (accumulation and data parallelism stay exact)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of per-item losses over the batch, extra metric *sums* such as correct counts)."""

    def evaluate(
        self, model: nn.Module, batch_size: int = 1024, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> dict[str, float]:
        """Mean loss and metrics over the whole eval split (deterministic)."""
        model.eval()
        totals: dict[str, float] = {}
        weight = 0
        gen = torch.Generator().manual_seed(1234)
        n = self.num_examples("eval")
        with torch.no_grad():
            for start in range(0, n, batch_size):
                idx = torch.arange(start, min(n, start + batch_size))
                batch = self.get_batch("eval", idx, gen).to(device, dtype)
                loss_sum, sums = self.loss(model, batch)
                totals["loss"] = totals.get("loss", 0.0) + float(loss_sum)
                for k, v in sums.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
                weight += batch.weight
        model.train()
        return {k: v / max(weight, 1) for k, v in totals.items()}
