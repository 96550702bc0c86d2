"""The convergence theory in one picture: layers whose smoothness constants differ by 1e5.

The paper's analysis (section 3, Theorems 2 and 3) bounds LARS/LAMB by the *average* per-layer
smoothness L_avg = mean_i L_i, where SGD's bound needs the *maximum* L_inf = max_i L_i: SGD's
step must stay below 2 / L_inf for stability, so a layer of curvature L_i moves at the rate
L_i / L_inf, and flat layers barely move. A layer-wise normalised step moves every layer by a
fixed fraction of its weight norm whatever its curvature.

:class:`LayeredQuadratic` is the smallest problem with that structure: ``K`` blocks ("layers"),
block i a quadratic ``(x_i - x*_i)^T H_i (x_i - x*_i) / 2`` whose Hessian has eigenvalues log-spaced in
``[L_i / spread, L_i]`` (so L_i is block i's smoothness constant) and random eigenvectors. Block i starts at distance
``1 / sqrt(L_i)`` from its optimum (every block holds the same share of the initial loss) and its
optimum has norm ``1 / sqrt(L_i)`` too, so flat layers have large weights, as in networks
whose layers differ in scale. :func:`run_synthetic` trains it with each optimizer over a small
learning-rate grid (same step budget and linear-decay schedule for all; the best final loss of
each grid is kept) and records the loss and, for LARS/LAMB, the per-layer trust ratios.

With exact gradients by default (``noise=0``); ``noise > 0`` adds Gaussian gradient noise with
covariance ``noise^2 * diag(h)`` (noise shaped like the curvature, as for a least-squares loss).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from largebatch.optim.registry import create_optimizer


@dataclass(frozen=True)
class LayeredQuadratic:
    """A multi-block quadratic with per-block smoothness ``curvatures`` (see the module doc)."""

    curvatures: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    dim: int = 32
    spread: float = 10.0
    noise: float = 0.0
    rotate: bool = True
    seed: int = 0

    def setup(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """(initial points, optima, Hessians), one float64 tensor per block; a Hessian is a vector
        (the diagonal) when ``rotate`` is False, else a dense ``Q diag(h) Q^T`` with a random
        orthogonal Q (so no per-coordinate method sees the curvatures on its axes)."""
        g = torch.Generator().manual_seed(self.seed)
        x0, xstar, hs = [], [], []
        for L in self.curvatures:
            r = 1.0 / math.sqrt(L)
            u = torch.randn(self.dim, generator=g, dtype=torch.float64)
            v = torch.randn(self.dim, generator=g, dtype=torch.float64)
            opt = r * u / u.norm()
            x0.append(opt + r * v / v.norm())
            xstar.append(opt)
            h = torch.logspace(math.log10(L / self.spread), math.log10(L), self.dim, dtype=torch.float64)
            if self.rotate:
                q, _ = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=g, dtype=torch.float64))
                h = q @ torch.diag(h) @ q.T
            hs.append(h)
        return x0, xstar, hs

    @property
    def l_max(self) -> float:
        return max(self.curvatures)

    @property
    def l_avg(self) -> float:
        return sum(self.curvatures) / len(self.curvatures)


@dataclass
class SyntheticRun:
    label: str
    optimizer: str
    lr: float
    final_loss: float  # relative to the initial loss
    loss: list[float]  # relative loss after each step (index 0: initial)
    block_loss: list[list[float]]  # relative loss of each block at the end, per block
    trust_ratio: list[list[float]]  # per step, per block (empty for optimizers without one)
    diverged: bool = False


@dataclass
class SyntheticResult:
    problem: dict[str, Any]
    steps: int
    best: dict[str, SyntheticRun]  # label -> best run of its grid
    grid: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # label -> [(lr, final loss)]


# label -> (registry name, learning rates, options). SGD's grid is in units of 1 / L_max: with
# momentum 0.9 (no dampening) it is stable for lr < 2 (1 + 0.9) / L_max = 3.8 / L_max.
DEFAULT_OPTIMIZERS: dict[str, tuple[str, tuple[float, ...], dict[str, Any]]] = {
    "momentum (SGD)": ("momentum", (0.1, 0.3, 1.0, 2.0, 3.0, 3.5), {"lr_unit": "1/L_max"}),
    "lars": ("lars", (0.003, 0.01, 0.03, 0.1), {}),
    "lamb": ("lamb", (0.003, 0.01, 0.03, 0.1), {}),
    "adam": ("adam", (0.01, 0.1, 0.3, 1.0), {}),
}


def _train(problem: LayeredQuadratic, name: str, lr: float, steps: int, options: dict[str, Any]) -> SyntheticRun:
    x0, xstar, hs = problem.setup()
    params = [x.clone().requires_grad_(True) for x in x0]
    opt = create_optimizer(name, params, lr=lr, **options)
    gen = torch.Generator().manual_seed(problem.seed + 1)

    def hess_times(h: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return h @ d if h.dim() == 2 else h * d

    def block_losses() -> list[float]:
        with torch.no_grad():
            return [float(0.5 * (p - s).dot(hess_times(h, p - s))) for p, s, h in zip(params, xstar, hs)]

    init = block_losses()
    total0 = sum(init)
    losses, ratios = [1.0], []
    diverged = False
    for t in range(steps):
        for group in opt.param_groups:  # linear decay to zero over the run, the same for every optimizer
            group["lr"] = lr * (1.0 - t / steps)
        with torch.no_grad():
            for p, s, h in zip(params, xstar, hs):
                g = hess_times(h, p - s)
                if problem.noise:  # covariance noise^2 * H
                    z = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                    g = g + problem.noise * (torch.linalg.cholesky(h) @ z if h.dim() == 2 else h.sqrt() * z)
                p.grad = g
        opt.step()
        telemetry = getattr(opt, "telemetry", None)
        if telemetry is not None:
            stats = telemetry.read()
            ratios.append([stats[p]["trust_ratio"] for p in params])
        loss = sum(block_losses()) / total0
        losses.append(loss)
        if not math.isfinite(loss) or loss > 1e6:
            diverged = True
            break
    final_blocks = [b / i for b, i in zip(block_losses(), init)]
    final = losses[-1] if not diverged else math.inf
    return SyntheticRun("", name, lr, final, losses, [final_blocks], ratios, diverged)


def run_synthetic(
    problem: LayeredQuadratic | None = None,
    steps: int = 500,
    optimizers: dict[str, tuple[str, tuple[float, ...], dict[str, Any]]] | None = None,
) -> SyntheticResult:
    """Train ``problem`` with each optimizer over its learning-rate grid; keep each grid's best.

    Example:
      >>> res = run_synthetic(steps=100)
      >>> res.best["lamb"].final_loss < res.best["momentum (SGD)"].final_loss
      True
    """
    problem = problem or LayeredQuadratic()
    optimizers = DEFAULT_OPTIMIZERS if optimizers is None else optimizers
    best: dict[str, SyntheticRun] = {}
    grid: dict[str, list[tuple[float, float]]] = {}
    for label, (name, lrs, options) in optimizers.items():
        options = dict(options)
        unit = 1.0 / problem.l_max if options.pop("lr_unit", None) == "1/L_max" else 1.0
        for c in lrs:
            run = _train(problem, name, c * unit, steps, options)
            run.label = label
            grid.setdefault(label, []).append((run.lr, run.final_loss))
            if label not in best or run.final_loss < best[label].final_loss:
                best[label] = run
    return SyntheticResult(asdict(problem), steps, best, grid)
