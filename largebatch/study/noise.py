"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018), from two batch sizes.

For a minibatch of B examples drawn from the training set, the squared norm of its mean gradient
has expectation ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``, where G is the full-batch gradient and Sigma
the per-example gradient covariance. Two batch sizes ``b_small < b_big`` give the unbiased
estimates of appendix A.1::

    |G|^2     ~ (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/b_small - 1/b_big)

and ``B_simple = tr(Sigma) / |G|^2``. Each estimate is noisy, and the ratio of noisy estimates
is biased, so (as the appendix advises) both squared norms are averaged over several batches
before the two estimates and their ratio are formed. ``B_simple`` approximates the critical batch
size B_crit: below it, doubling the batch nearly halves the steps needed; above it, extra
examples per step buy little.

What this code does that the paper does not: one "big" batch is cut into ``b_big / b_small``
disjoint "small" batches, so every forward/backward pass serves both estimates (the paper took
the small batch from one device and the big one from the all-reduce). Gradients of the summed
loss are divided by the batch's weight (examples, or masked tokens for MLM); batch sizes are
counted in examples (sequences).

References:
  McCandlish, Kaplan, Amodei and the OpenAI Dota Team, 2018. An Empirical Model of Large-Batch
  Training. https://arxiv.org/abs/1812.06162 (section 2.2 and appendix A.1).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from largebatch.train.task import Batch, Task


@dataclass(frozen=True)
class NoiseScale:
    """The averaged squared gradient norms at two batch sizes and the estimates they give."""

    b_small: int
    b_big: int
    g_small_sq: float  # mean over batches of |G_small|^2
    g_big_sq: float  # mean over batches of |G_big|^2
    grad_sq: float  # estimate of |G|^2
    trace: float  # estimate of tr(Sigma)
    b_simple: float  # trace / grad_sq (inf when the |G|^2 estimate is <= 0)
    batches: int  # number of big batches averaged

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def noise_scale_from_norms(g_small_sq: float, g_big_sq: float, b_small: int, b_big: int, batches: int = 1) -> NoiseScale:
    """B_simple from the (averaged) squared gradient norms at batch sizes ``b_small < b_big``.

    Example:
      With |G|^2 = 1 and tr(Sigma) = 41 the expected norms at 8 and 256 are 1 + 41/8 and 1 + 41/256:

      >>> round(noise_scale_from_norms(1 + 41 / 8, 1 + 41 / 256, 8, 256).b_simple, 6)
      41.0
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    grad_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    b_simple = trace / grad_sq if grad_sq > 0 else math.inf
    return NoiseScale(b_small, b_big, g_small_sq, g_big_sq, grad_sq, trace, b_simple, batches)


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double() for p, g in zip(params, grads)])


def measure_noise_scale(
    model: nn.Module,
    task: Task,
    b_small: int,
    b_big: int,
    batches: int = 4,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> NoiseScale:
    """Estimate B_simple of ``task``'s training objective at ``model``'s current parameters.

    Draws ``batches`` big batches of ``b_big`` training examples (each without replacement, from
    a generator seeded by ``seed``), cuts each into small batches of ``b_small``, and averages
    ``|G_small|^2`` over all small batches and ``|G_big|^2`` over the big ones. The model runs in
    training mode (dropout included: it is part of the training gradient's noise) under a forked
    RNG, so the caller's random state is unchanged; parameters' ``.grad`` are not touched.
    """
    if b_big % b_small:
        raise ValueError(f"b_big ({b_big}) must be a multiple of b_small ({b_small})")
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    n = task.num_examples("train")
    if b_big > n:
        raise ValueError(f"b_big ({b_big}) is larger than the {n} training examples")
    params = [p for p in model.parameters() if p.requires_grad]
    device = torch.device(device) if device is not None else params[0].device
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    small_sq, big_sq, n_small = 0.0, 0.0, 0
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model.train()
        try:
            for _ in range(batches):
                idx = torch.randperm(n, generator=gen)[:b_big]
                total = None
                weight = 0
                for chunk in idx.split(b_small):
                    batch: Batch = task.get_batch("train", chunk, gen).to(device)
                    loss_sum, _ = task.loss(model, batch)
                    g = _flat_grad(loss_sum, params)
                    small_sq += float(g.square().sum()) / batch.weight**2
                    n_small += 1
                    total = g if total is None else total.add_(g)
                    weight += batch.weight
                big_sq += float(total.square().sum()) / weight**2
        finally:
            model.train(was_training)
    return noise_scale_from_norms(small_sq / n_small, big_sq / batches, b_small, b_big, batches)


def _digest(model: nn.Module) -> int:
    """A 62-bit integer determined by the bytes of the model's parameters (not by how many
    measurements this process has taken: a counter restarts at 0 in a resumed run)."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 2


class NoiseProbe(Task):
    """A task that is ``inner`` in every respect, except that ``evaluate`` also measures the
    gradient noise scale of the training objective at the model's current parameters.

    The training loop evaluates at its eval points and at the end, so wrapping a task with this
    probe adds ``noise_b_simple``, ``noise_grad_sq`` and ``noise_trace`` to those eval records,
    with no change to the loop and none to the training trajectory (the measurement runs under a
    forked RNG and never touches ``.grad``). The batches of a measurement are drawn from ``seed`` and
    a digest of the parameters it is taken at, so a run that was interrupted and resumed (to the
    same parameters) measures what an uninterrupted one does.
    """

    def __init__(self, inner: Task, b_small: int, b_big: int, batches: int = 4, seed: int = 0):
        self.inner = inner
        self.name = inner.name
        self.metric = inner.metric
        self.b_small, self.b_big, self.batches, self.seed = int(b_small), int(b_big), int(batches), int(seed)

    def build_model(self) -> nn.Module:
        return self.inner.build_model()

    def num_examples(self, split: str) -> int:
        return self.inner.num_examples(split)

    def get_batch(self, split: str, indices: torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        return self.inner.get_batch(split, indices, generator)

    def loss(self, model: nn.Module, batch: Batch):
        return self.inner.loss(model, batch)

    def evaluate(self, model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, float]:
        metrics = dict(self.inner.evaluate(model, *args, **kwargs))
        device = next(model.parameters()).device
        est = measure_noise_scale(model, self.inner, self.b_small, self.b_big, self.batches,
                                  seed=(self.seed * 7919 + _digest(model)) % (1 << 63), device=device)  # fmt: skip
        metrics.update(noise_b_simple=est.b_simple, noise_grad_sq=est.grad_sq, noise_trace=est.trace)
        return metrics


class LinearRegressionTask(Task):
    """Linear regression with Gaussian inputs and label noise: a problem whose gradient noise
    scale is known in closed form (used to test the estimator).

    Data: ``x ~ N(0, I_d)``, ``y = x . w_star + noise_std * eps`` with ``eps ~ N(0, 1)``; per-example
    loss ``(x . w - y)^2 / 2``; the model is ``nn.Linear(d, 1, bias=False)``. At parameters
    ``w = w_star + delta`` the per-example gradient is ``x (x . delta - noise_std * eps)``, so over
    the population (Isserlis' theorem for the fourth moments of a Gaussian)::

        G         = delta
        tr(Sigma) = d (|delta|^2 + noise_std^2) + |delta|^2
    """

    name = "linear-regression"
    metric = "neg_loss"

    def __init__(self, dim: int = 20, n_train: int = 200_000, n_eval: int = 1000, noise_std: float = 1.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.dim, self.noise_std = dim, noise_std
        self.w_star = torch.randn(dim, generator=g, dtype=torch.float64)
        self._x, self._y = {}, {}
        for split, n in (("train", n_train), ("eval", n_eval)):
            x = torch.randn(n, dim, generator=g, dtype=torch.float64)
            self._x[split], self._y[split] = x, x @ self.w_star + noise_std * torch.randn(n, generator=g, dtype=torch.float64)

    def build_model(self) -> nn.Module:
        return nn.Linear(self.dim, 1, bias=False).double()

    def num_examples(self, split: str) -> int:
        return self._y[split].shape[0]

    def get_batch(self, split: str, indices: torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        return Batch({"x": self._x[split][indices], "y": self._y[split][indices]}, int(indices.numel()))

    def loss(self, model: nn.Module, batch: Batch):
        r = model(batch.tensors["x"]).squeeze(-1) - batch.tensors["y"]
        loss_sum = 0.5 * r.square().sum()
        return loss_sum, {"neg_loss": -loss_sum.detach()}

    def closed_form(self, w: torch.Tensor) -> dict[str, float]:
        """|G|^2, tr(Sigma) and B_simple over the population at parameters ``w``."""
        delta_sq = float((w.detach().double().reshape(-1) - self.w_star).square().sum())
        trace = self.dim * (delta_sq + self.noise_std**2) + delta_sq
        return {"grad_sq": delta_sq, "trace": trace, "b_simple": trace / delta_sq}
