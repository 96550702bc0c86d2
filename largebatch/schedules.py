"""Learning-rate schedules, batch-size scaling rules and the large-batch recipes of You et al.

A schedule is a pure function ``step -> multiplier``: a small frozen dataclass whose
``__call__(step: int) -> float`` returns a plain Python float. Schedules compose
(:class:`WarmupDecay`, :class:`Phased`, :class:`Scaled`), are validated when built, and know
nothing about torch. :class:`ScheduleLR` is the thin adapter to ``torch.optim.lr_scheduler``.

Conventions shared by everything in this module:

* ``step`` counts the optimizer updates already taken: the first update is made at step 0 and
  uses ``peak_lr * schedule(0)``. This is the ``torch.optim.lr_scheduler`` convention (the
  scheduler is built before the first update and ``scheduler.step()`` is called after each
  ``optimizer.step()``), so ``ScheduleLR.last_epoch`` is exactly this ``step``.
* A run of ``total_steps`` updates uses steps ``0 .. total_steps - 1``; every schedule is also
  defined past the end (it clamps, it never raises) so that an extra evaluation is harmless.
* Linear warmup uses ``(step + warmup_offset) / warmup_steps`` with ``warmup_offset = 1`` by
  default: the first update gets ``1 / warmup_steps`` of the peak (it is not wasted at lr 0),
  the last warmup update (step ``warmup_steps - 1``) is the first at the peak, and a warmup of
  ``W`` steps is exactly ``W`` updates long. ``warmup_offset = 0`` gives the ``step / W`` form
  of the TensorFlow BERT code and of Hugging Face's ``get_linear_schedule_with_warmup`` (first
  update at lr 0, peak reached at step ``W``).
* Step counts derived from fractional epochs or ratios are rounded half up
  (``floor(x + 0.5)``), never with Python's half-to-even ``round``.
* Steps per epoch are ``ceil(dataset_size / batch_size)`` (the last, partial batch is an update)
  or, with ``drop_last=True``, ``floor(dataset_size / batch_size)``.

The recipes (:class:`Recipe`, :class:`MixedBatchRecipe`, :func:`preset`) turn a base
configuration stated at a reference batch size into a resolved :class:`Plan` for a target batch
size under the paper's protocol: the same number of epochs at every batch size, so a bigger
batch takes fewer steps.

References:
  You et al., 2020. Large Batch Optimization for Deep Learning: Training BERT in 76 minutes.
  ICLR 2020. https://arxiv.org/abs/1904.00962
  You et al., 2019. Large-Batch Training for LSTM and Beyond (linear-epoch gradual warmup).
  https://arxiv.org/abs/1901.08256
  Goyal et al., 2017. Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour.
  https://arxiv.org/abs/1706.02677
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "Schedule",
    "Constant",
    "LinearWarmup",
    "PolynomialDecay",
    "CosineDecay",
    "StepDecay",
    "Scaled",
    "WarmupDecay",
    "Phased",
    "join",
    "warmup_then_decay",
    "steps_per_epoch",
    "scale_lr",
    "scale_warmup",
    "LR_RULES",
    "WARMUP_RULES",
    "DECAYS",
    "DECAY_OVER",
    "Plan",
    "Recipe",
    "Stage",
    "MixedBatchRecipe",
    "BERT_UNTUNED_TABLE",
    "BertRow",
    "bert_two_phase",
    "PRESETS",
    "preset",
    "ScheduleLR",
    "plot_plans",
]


class Schedule(Protocol):
    """Anything that maps a step (updates taken so far) to a learning-rate multiplier."""

    def __call__(self, step: int) -> float: ...


# --------------------------------------------------------------------------------------------
# Validation helpers: every message names the argument, the value, and what is allowed.


def _int(name: str, value: Any, minimum: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _finite_number(value: Any, low: float | None = None, high: float | None = None, low_open: bool = False) -> bool:
    """``value`` is an int or float (not a bool, not a string), finite, and in the interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if low is not None and not (value > low if low_open else value >= low):
        return False
    return high is None or value <= high


def _real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    allowed = _interval(low, high, low_open)
    if isinstance(value, (bool, str, bytes)):  # True is not 1.0, and "0.1" would stay a string
        raise ValueError(f"{name} must be a real number {allowed}, got {value!r}")
    try:
        value = float(value)  # numpy and 0-d torch scalars too
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number {allowed}, got {value!r}") from None
    if not _finite_number(value, low, high, low_open):
        raise ValueError(f"{name} must be a real number {allowed}, got {value!r}")
    return value


def _interval(low: float | None, high: float | None, low_open: bool) -> str:
    if low is None and high is None:
        return "(finite)"
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"<= {high}"
    return f"in {'(' if low_open else '['}{low}, {high}]"


def _choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        options = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"unknown {name} {value!r}; allowed: {options}")
    return value


def _step(step: Any) -> int:
    try:
        if isinstance(step, bool):
            raise TypeError
        step = operator.index(step)
    except TypeError:
        raise ValueError(f"step must be a non-negative integer, got {step!r}") from None
    if step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step}")
    return step


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def _check_offset_and_drop_last(warmup_offset: Any, drop_last: Any) -> None:
    if warmup_offset not in (0, 1) or isinstance(warmup_offset, bool):
        raise ValueError(f"warmup_offset must be 0 or 1, got {warmup_offset!r}")
    if not isinstance(drop_last, bool):
        raise ValueError(f"drop_last must be True or False, got {drop_last!r}")


# --------------------------------------------------------------------------------------------
# Elementary schedules.


@dataclass(frozen=True)
class Constant:
    """A constant multiplier.

    Args:
      value: the multiplier returned at every step (>= 0).

    ``multiplier(t) = value``.

    Example:
      >>> Constant()(123)
      1.0
    """

    value: float = 1.0

    def __post_init__(self) -> None:
        _set(self, "value", _real("value", self.value, low=0.0))

    def __call__(self, step: int) -> float:
        _step(step)
        return self.value


@dataclass(frozen=True)
class LinearWarmup:
    """Linear warmup from ``init_value`` to 1, then 1 forever.

    Args:
      warmup_steps: W, the number of warmup updates (>= 0; 0 means no warmup).
      init_value: the multiplier the ramp starts from, in [0, 1] (0 for BERT; Goyal et al. start
        from the small-batch rate, i.e. ``base_lr / lr``).
      offset: 1 (default) or 0, see below.

    The multiplier at step t is::

      t <  W:  init_value + (1 - init_value) * min(t + offset, W) / W
      t >= W:  1

    With ``offset = 1`` the first update (t = 0) already gets ``1/W`` of the ramp and the peak
    is reached at t = W - 1, so the warmup is exactly W updates long; with ``offset = 0`` the
    first update is taken at ``init_value`` and the peak is reached at t = W (the TensorFlow BERT
    and Hugging Face convention).

    The "linear-epoch" warmup, whose length is given in epochs, is
    :meth:`LinearWarmup.from_epochs`: ``W = round_half_up(warmup_epochs * steps_per_epoch)``,
    so at a fixed number of warmup epochs the step count follows the batch size.

    References:
      Goyal et al., 2017, section 2.2 (gradual warmup). https://arxiv.org/abs/1706.02677

    Example:
      >>> w = LinearWarmup(4)
      >>> [w(t) for t in range(5)]
      [0.25, 0.5, 0.75, 1.0, 1.0]
    """

    warmup_steps: int
    init_value: float = 0.0
    offset: int = 1

    def __post_init__(self) -> None:
        _set(self, "warmup_steps", _int("warmup_steps", self.warmup_steps, 0))
        _set(self, "init_value", _real("init_value", self.init_value, low=0.0, high=1.0))
        if self.offset not in (0, 1) or isinstance(self.offset, bool):
            raise ValueError(f"offset must be 0 or 1, got {self.offset!r}")

    @classmethod
    def from_epochs(
        cls,
        warmup_epochs: float,
        steps_per_epoch: int,
        init_value: float = 0.0,
        offset: int = 1,
    ) -> LinearWarmup:
        """A warmup of ``round_half_up(warmup_epochs * steps_per_epoch)`` steps."""
        epochs = _real("warmup_epochs", warmup_epochs, low=0.0)
        spe = _int("steps_per_epoch", steps_per_epoch, 1)
        return cls(_round_half_up(epochs * spe), init_value=init_value, offset=offset)

    def __call__(self, step: int) -> float:
        t = _step(step)
        w = self.warmup_steps
        if t >= w:
            return 1.0
        frac = min(t + self.offset, w) / w
        return self.init_value + (1.0 - self.init_value) * frac


@dataclass(frozen=True)
class PolynomialDecay:
    """Polynomial decay from 1 to ``end_value`` over ``decay_steps`` steps, then constant.

    Args:
      decay_steps: T, the decay horizon (>= 1).
      power: the exponent p (> 0); 1.0 is the paper's BERT schedule (linear decay).
      end_value: the multiplier reached at t = T and kept afterwards, in [0, 1].

    The multiplier is the paper's ``eta_t = eta_0 * (1 - t/T)^p`` generalised with an end value
    (as in TensorFlow's ``polynomial_decay`` and optax's ``polynomial_schedule``)::

      t <  T:  end_value + (1 - end_value) * (1 - t/T) ** power
      t >= T:  end_value

    References:
      You et al., 2020, section 4 (BERT training). https://arxiv.org/abs/1904.00962

    Example:
      >>> PolynomialDecay(10)(5)
      0.5
    """

    decay_steps: int
    power: float = 1.0
    end_value: float = 0.0

    def __post_init__(self) -> None:
        _set(self, "decay_steps", _int("decay_steps", self.decay_steps, 1))
        _set(self, "power", _real("power", self.power, low=0.0, low_open=True))
        _set(self, "end_value", _real("end_value", self.end_value, low=0.0, high=1.0))

    def __call__(self, step: int) -> float:
        t = _step(step)
        if t >= self.decay_steps:
            return self.end_value
        remaining = 1.0 - t / self.decay_steps
        return self.end_value + (1.0 - self.end_value) * remaining**self.power


@dataclass(frozen=True)
class CosineDecay:
    """Half-cosine decay from 1 to ``end_value`` over ``decay_steps`` steps, then constant.

    Args:
      decay_steps: T, the decay horizon (>= 1).
      end_value: the multiplier reached at t = T and kept afterwards, in [0, 1].

    ::

      t <  T:  end_value + (1 - end_value) * (1 + cos(pi * t / T)) / 2
      t >= T:  end_value

    References:
      Loshchilov & Hutter, 2017. SGDR. https://arxiv.org/abs/1608.03983

    Example:
      >>> CosineDecay(10)(5)
      0.5
    """

    decay_steps: int
    end_value: float = 0.0

    def __post_init__(self) -> None:
        _set(self, "decay_steps", _int("decay_steps", self.decay_steps, 1))
        _set(self, "end_value", _real("end_value", self.end_value, low=0.0, high=1.0))

    def __call__(self, step: int) -> float:
        t = _step(step)
        if t >= self.decay_steps:
            return self.end_value
        cosine = 0.5 * (1.0 + math.cos(math.pi * t / self.decay_steps))
        return self.end_value + (1.0 - self.end_value) * cosine


@dataclass(frozen=True)
class StepDecay:
    """Piecewise-constant decay: the multiplier is multiplied by ``factor`` at each boundary.

    Args:
      boundaries: non-decreasing steps (>= 0) at which the decay happens; the step equal to
        a boundary already uses the decayed value, and a boundary given k times decays by
        ``factor ** k`` there (as when several decay epochs fall inside a warmup).
      factor: the multiplier applied at each boundary, in (0, 1] (0.1 for Goyal et al.).

    ``multiplier(t) = factor ** #{b in boundaries : t >= b}``.

    :meth:`StepDecay.from_epochs` places the boundaries at
    ``round_half_up(epoch * steps_per_epoch)``.

    References:
      Goyal et al., 2017, section 5.1: x0.1 at epochs 30, 60 and 80.
      https://arxiv.org/abs/1706.02677

    Example:
      >>> [StepDecay((2, 4), 0.5)(t) for t in range(6)]
      [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    """

    boundaries: tuple[int, ...]
    factor: float = 0.1

    def __post_init__(self) -> None:
        bounds = tuple(_int(f"boundaries[{i}]", b, 0) for i, b in enumerate(self.boundaries))
        for i in range(1, len(bounds)):
            if bounds[i] < bounds[i - 1]:
                raise ValueError(
                    f"boundaries must be non-decreasing, got {bounds} "
                    f"(boundaries[{i}]={bounds[i]} < boundaries[{i - 1}]={bounds[i - 1]})"
                )
        _set(self, "boundaries", bounds)
        _set(self, "factor", _real("factor", self.factor, low=0.0, high=1.0, low_open=True))

    @classmethod
    def from_epochs(
        cls, epochs: Sequence[float], steps_per_epoch: int, factor: float = 0.1
    ) -> StepDecay:
        """Boundaries at ``round_half_up(e * steps_per_epoch)`` for each epoch ``e``."""
        spe = _int("steps_per_epoch", steps_per_epoch, 1)
        bounds = tuple(
            _round_half_up(_real(f"epochs[{i}]", e, low=0.0) * spe) for i, e in enumerate(epochs)
        )
        return cls(bounds, factor)

    def __call__(self, step: int) -> float:
        t = _step(step)
        passed = sum(1 for b in self.boundaries if t >= b)
        return self.factor**passed


@dataclass(frozen=True)
class Scaled:
    """Another schedule multiplied by a constant.

    Args:
      schedule: the schedule to scale.
      factor: the constant (>= 0).

    ``multiplier(t) = factor * schedule(t)``. Used to give the phases of a :class:`Phased`
    schedule different peak learning rates.
    """

    schedule: Schedule
    factor: float

    def __post_init__(self) -> None:
        if not callable(self.schedule):
            raise ValueError(f"schedule must be callable, got {self.schedule!r}")
        _set(self, "factor", _real("factor", self.factor, low=0.0))

    def __call__(self, step: int) -> float:
        return self.factor * self.schedule(_step(step))


# --------------------------------------------------------------------------------------------
# Composition.

DECAY_OVER = ("remaining", "total")


@dataclass(frozen=True)
class WarmupDecay:
    """A linear warmup followed by a decay.

    Args:
      warmup: the :class:`LinearWarmup` used for steps ``t < warmup.warmup_steps``.
      decay: the schedule used afterwards.
      decay_over: how the decay's clock runs; one of

        * ``"remaining"`` (default): the decay starts at the end of the warmup and sees the
          local step ``t - W``. To end at T total steps (warmup included, BERT practice) give
          the decay a horizon of ``T - W``: the multiplier then rises linearly to 1 at the end of
          the warmup and decays linearly to ``end_value`` at ``t = T``
          (Hugging Face ``get_linear_schedule_with_warmup``). :func:`warmup_then_decay` does
          this for you.
        * ``"total"``: the decay sees the global step t, as if the warmup had not been there; the
          warmup only overrides the first W steps. This is the TensorFlow BERT code (the
          multiplier drops from the end of the ramp to ``1 - W/T`` at t = W) and the right clock
          for step decays placed at absolute epochs (Goyal et al.).

    ::

      t <  W:  warmup(t)
      t >= W:  decay(t - W)   if decay_over == "remaining"
               decay(t)       if decay_over == "total"

    Example:
      >>> s = WarmupDecay(LinearWarmup(2), PolynomialDecay(4))
      >>> [s(t) for t in range(7)]
      [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    """

    warmup: LinearWarmup
    decay: Schedule
    decay_over: str = "remaining"

    def __post_init__(self) -> None:
        if not isinstance(self.warmup, LinearWarmup):
            raise ValueError(f"warmup must be a LinearWarmup, got {self.warmup!r}")
        if not callable(self.decay):
            raise ValueError(f"decay must be callable, got {self.decay!r}")
        _choice("decay_over", self.decay_over, DECAY_OVER)
        horizon = getattr(self.decay, "decay_steps", None)
        if self.decay_over == "total" and horizon is not None and self.warmup_steps >= horizon:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must be less than the decay's "
                f"decay_steps={horizon} when decay_over='total' (warmup longer than training)"
            )

    @property
    def warmup_steps(self) -> int:
        return self.warmup.warmup_steps

    def __call__(self, step: int) -> float:
        t = _step(step)
        w = self.warmup.warmup_steps
        if t < w:
            return self.warmup(t)
        return self.decay(t - w if self.decay_over == "remaining" else t)


@dataclass(frozen=True)
class Phased:
    """Schedules run one after another, each on its own local clock.

    Args:
      phases: a sequence of ``(num_steps, schedule)``; phase i covers global steps
        ``[start_i, start_i + num_steps_i)`` with ``start_i = sum(num_steps_j for j < i)``.

    ``multiplier(t) = schedule_i(t - start_i)`` for the phase i containing t. Past the last phase
    the last schedule keeps running on its local clock (a decay stays at its end value). Each
    phase that starts with a warmup therefore re-warms from its own ``init_value``: the paper's
    mixed-batch BERT re-warms from zero at the switch from sequence length 128 to 512.

    This is optax's ``join_schedules`` with the phase lengths given instead of the boundaries.

    References:
      You et al., 2020, section 4 (mixed-batch training). https://arxiv.org/abs/1904.00962

    Example:
      >>> s = Phased(((2, LinearWarmup(2)), (2, LinearWarmup(2))))
      >>> [s(t) for t in range(4)]
      [0.5, 1.0, 0.5, 1.0]
    """

    phases: tuple[tuple[int, Schedule], ...]

    def __post_init__(self) -> None:
        phases = tuple(self.phases)
        if not phases:
            raise ValueError("phases must contain at least one (num_steps, schedule) pair, got ()")
        checked = []
        for i, phase in enumerate(phases):
            try:
                num_steps, schedule = phase
            except (TypeError, ValueError):
                raise ValueError(
                    f"phases[{i}] must be a (num_steps, schedule) pair, got {phase!r}"
                ) from None
            num_steps = _int(f"phases[{i}] num_steps", num_steps, 1)
            if not callable(schedule):
                raise ValueError(f"phases[{i}] schedule must be callable, got {schedule!r}")
            checked.append((num_steps, schedule))
        _set(self, "phases", tuple(checked))

    @property
    def starts(self) -> tuple[int, ...]:
        """The global step at which each phase begins."""
        starts, at = [], 0
        for num_steps, _ in self.phases:
            starts.append(at)
            at += num_steps
        return tuple(starts)

    @property
    def total_steps(self) -> int:
        return sum(n for n, _ in self.phases)

    def phase_at(self, step: int) -> tuple[int, int]:
        """``(phase index, local step)`` for a global step."""
        t = _step(step)
        start = 0
        for i, (num_steps, _) in enumerate(self.phases):
            if t < start + num_steps or i == len(self.phases) - 1:
                return i, t - start
            start += num_steps
        raise AssertionError("unreachable")

    def __call__(self, step: int) -> float:
        i, local = self.phase_at(step)
        return self.phases[i][1](local)


def join(phases: Sequence[tuple[int, Schedule]]) -> Phased:
    """Run schedules one after another; see :class:`Phased`."""
    return Phased(tuple(phases))


DECAYS = ("poly", "cosine", "step", "constant")


def warmup_then_decay(
    warmup_steps: int,
    total_steps: int,
    decay: str = "poly",
    *,
    power: float = 1.0,
    end_value: float = 0.0,
    boundaries: Sequence[int] = (),
    factor: float = 0.1,
    decay_over: str = "remaining",
    warmup_offset: int = 1,
    warmup_init: float = 0.0,
) -> WarmupDecay:
    """A linear warmup and a decay that together last ``total_steps`` steps.

    Args:
      warmup_steps: W (>= 0), counted inside ``total_steps``.
      total_steps: T (> W), the length of training in updates.
      decay: one of ``"poly"`` (:class:`PolynomialDecay`), ``"cosine"`` (:class:`CosineDecay`),
        ``"step"`` (:class:`StepDecay`) or ``"constant"``.
      power: the polynomial exponent (``"poly"`` only).
      end_value: the multiplier at t = T (``"poly"`` and ``"cosine"``).
      boundaries: the decay steps (``"step"`` only), on the clock chosen by ``decay_over``.
      factor: the per-boundary factor (``"step"`` only).
      decay_over: ``"remaining"`` (default): the decay runs over the ``T - W`` post-warmup steps,
        so the multiplier peaks at the end of the warmup and reaches ``end_value`` at T;
        ``"total"``: the decay runs over all T steps on the global clock. See
        :class:`WarmupDecay`.
      warmup_offset: see :class:`LinearWarmup`.
      warmup_init: the warmup's ``init_value``.

    With the defaults (BERT practice, ``warmup_offset=1``)::

      t <  W:  (t + 1) / W
      W <= t:  end_value + (1 - end_value) * max(0, 1 - (t - W) / (T - W)) ** power

    Example:
      >>> s = warmup_then_decay(2, 6)
      >>> [s(t) for t in range(7)]
      [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    """
    w = _int("warmup_steps", warmup_steps, 0)
    total = _int("total_steps", total_steps, 1)
    _choice("decay", decay, DECAYS)
    _choice("decay_over", decay_over, DECAY_OVER)
    if w >= total:
        raise ValueError(
            f"warmup_steps={w} must be less than total_steps={total} (warmup longer than training)"
        )
    horizon = total - w if decay_over == "remaining" else total
    schedule: Schedule
    if decay == "poly":
        schedule = PolynomialDecay(horizon, power=power, end_value=end_value)
    elif decay == "cosine":
        schedule = CosineDecay(horizon, end_value=end_value)
    elif decay == "step":
        schedule = StepDecay(tuple(boundaries), factor)
    else:
        schedule = Constant(1.0)
    warmup = LinearWarmup(w, init_value=warmup_init, offset=warmup_offset)
    return WarmupDecay(warmup, schedule, decay_over=decay_over)


# --------------------------------------------------------------------------------------------
# Scaling rules.

LR_RULES = {"sqrt": 0.5, "linear": 1.0, "none": 0.0}
WARMUP_RULES = {"constant": 0.0, "linear": 1.0}


def steps_per_epoch(dataset_size: int, batch_size: int, drop_last: bool = False) -> int:
    """Updates per epoch: ``ceil(dataset_size / batch_size)``, or ``floor`` with ``drop_last``.

    Args:
      dataset_size: examples per epoch (>= 1).
      batch_size: examples per update (>= 1).
      drop_last: drop the last, partial batch (then ``batch_size <= dataset_size`` is required).
    """
    n = _int("dataset_size", dataset_size, 1)
    b = _int("batch_size", batch_size, 1)
    if not isinstance(drop_last, bool):
        raise ValueError(f"drop_last must be True or False, got {drop_last!r}")
    if drop_last:
        if b > n:
            raise ValueError(
                f"batch_size={b} is larger than dataset_size={n}: with drop_last=True an epoch "
                "would have no update; allowed: batch_size <= dataset_size, or drop_last=False"
            )
        return n // b
    return -(-n // b)


def scale_lr(base_lr: float, base_batch: int, batch: int, rule: str = "sqrt") -> float:
    """The learning rate for ``batch`` given one tuned at ``base_batch``.

    Args:
      base_lr: the learning rate at the base batch size (>= 0).
      base_batch: B0 (>= 1).
      batch: B (>= 1).
      rule: ``"sqrt"`` (the paper's rule for LAMB), ``"linear"`` (Goyal et al.), ``"none"``.

    ``lr(B) = base_lr * (B / B0) ** e`` with e = 1/2, 1, 0 for sqrt, linear, none.

    References:
      You et al., 2020, section 4. https://arxiv.org/abs/1904.00962
      Goyal et al., 2017, section 2.1. https://arxiv.org/abs/1706.02677

    Example:
      >>> scale_lr(5e-3 / 8, 512, 32768)
      0.005
    """
    lr = _real("base_lr", base_lr, low=0.0)
    b0 = _int("base_batch", base_batch, 1)
    b = _int("batch", batch, 1)
    exponent = LR_RULES[_choice("rule", rule, tuple(LR_RULES))]
    if exponent == 0.0:
        return lr
    return lr * (b / b0) ** exponent


def scale_warmup(base_warmup: float, base_batch: int, batch: int, rule: str = "constant") -> float:
    """The warmup length (in epochs, or as a ratio of the total steps) for ``batch``.

    Args:
      base_warmup: the warmup at the base batch size, in epochs or as a fraction of the total
        steps (>= 0). At a fixed number of epochs both scale the same way.
      base_batch: B0 (>= 1).
      batch: B (>= 1).
      rule: how the warmup follows the batch size:

        * ``"constant"``: the warmup in epochs (or ratio) is the same at every batch size, so
          its number of steps shrinks as 1/B (Goyal et al.: 5 epochs at every batch size).
        * ``"linear"``: the warmup in epochs (or ratio) grows as B / B0, so its number of steps
          is the same at every batch size. This is the linear-epoch gradual warmup (LEGW) of
          You et al. 2019 and exactly the paper's untuned BERT table: ratio 1/320 at 512 up to
          1/5 at 32K, i.e. 3125 warmup steps in every row.

    ``warmup(B) = base_warmup * (B / B0) ** e`` with e = 0 for constant, 1 for linear.

    Example:
      >>> scale_warmup(1 / 320, 512, 32768, "linear")
      0.2
    """
    w = _real("base_warmup", base_warmup, low=0.0)
    b0 = _int("base_batch", base_batch, 1)
    b = _int("batch", batch, 1)
    exponent = WARMUP_RULES[_choice("warmup rule", rule, tuple(WARMUP_RULES))]
    if exponent == 0.0:
        return w
    return w * (b / b0)


# --------------------------------------------------------------------------------------------
# Recipes and resolved plans.


@dataclass(frozen=True)
class Plan:
    """A recipe resolved for one batch size: everything a training loop needs.

    Attributes:
      lr: the peak learning rate; the rate at step t is ``lr * schedule(t)``.
      warmup_steps: the warmup length in updates (of the first phase for a mixed-batch plan).
      total_steps: the number of updates (steps 0 .. total_steps - 1).
      steps_per_epoch: updates per epoch, or None when unknown (only total steps were given)
        or not a single number (mixed batch: see ``phases``).
      schedule: the multiplier, in [0, 1].
      batch_size: examples per update; None for a mixed-batch plan (see ``phases``).
      epochs: the number of epochs, when known.
      dataset_size: examples per epoch, when known.
      name: the recipe's name.
      seq_len: the sequence length of the phase, when the recipe states one.
      phases: for a mixed-batch plan, one Plan per phase with its own batch size, local
        steps and schedule; empty otherwise.
    """

    lr: float
    warmup_steps: int
    total_steps: int
    steps_per_epoch: int | None
    schedule: Schedule
    batch_size: int | None = None
    epochs: float | None = None
    dataset_size: int | None = None
    name: str = "custom"
    seq_len: int | None = None
    phases: tuple[Plan, ...] = ()

    def lr_at(self, step: int) -> float:
        """The learning rate at a step: ``lr * schedule(step)``."""
        return self.lr * self.schedule(step)

    def phase_at(self, step: int) -> tuple[Plan, int]:
        """The plan in force at a global step and the step local to it (itself for one phase)."""
        t = _step(step)
        if not self.phases:
            return self, t
        start = 0
        for i, phase in enumerate(self.phases):
            if t < start + phase.total_steps or i == len(self.phases) - 1:
                return phase, t - start
            start += phase.total_steps
        raise AssertionError("unreachable")

    def epoch_at(self, step: int) -> float | None:
        """Epochs completed after ``step`` updates, or None when steps per epoch are unknown."""
        t = _step(step)
        if not self.phases:
            return None if self.steps_per_epoch is None else t / self.steps_per_epoch
        done = 0.0
        for i, phase in enumerate(self.phases):
            if phase.steps_per_epoch is None:
                return None
            if t < phase.total_steps or i == len(self.phases) - 1:
                return done + t / phase.steps_per_epoch
            done += phase.total_steps / phase.steps_per_epoch
            t -= phase.total_steps
        raise AssertionError("unreachable")

    def landmarks(self) -> list[int]:
        """Steps worth printing: start, warmup end, phase switches, quarters, last, past end."""
        marks = {0, self.total_steps - 1, self.total_steps}
        start = 0
        for phase in self.phases or (self,):
            w = phase.warmup_steps
            marks.update({start - 1, start, start + max(w - 1, 0), start + w})
            start += phase.total_steps
        marks.update(self.total_steps * q // 4 for q in (1, 2, 3))
        return sorted(m for m in marks if 0 <= m <= self.total_steps)

    def describe(self, steps: Sequence[int] = ()) -> str:
        """A few lines: peak lr, warmup, total steps and the lr at the landmark steps.

        Args:
          steps: extra steps to list beside the landmarks.
        """
        lines = [f"{self.name}: " + self._summary()]
        for i, phase in enumerate(self.phases):
            lines.append(f"  phase {i + 1}: " + phase._summary())
        lines.append(f"  {'step':>10}  {'epoch':>9}  {'multiplier':>12}  {'lr':>12}")
        for t in sorted(set(self.landmarks()) | {_step(t) for t in steps}):
            epoch = self.epoch_at(t)
            e = "-" if epoch is None else f"{epoch:.4f}"
            m = self.schedule(t)
            lines.append(f"  {t:>10}  {e:>9}  {m:>12.6g}  {self.lr * m:>12.6g}")
        return "\n".join(lines)

    def _summary(self) -> str:
        parts = []
        if self.batch_size is not None:
            parts.append(f"batch {self.batch_size}")
        if self.seq_len is not None:
            parts.append(f"seq {self.seq_len}")
        parts.append(f"peak lr {self.lr:.6g}")
        parts.append(f"warmup {self.warmup_steps} steps")
        parts.append(f"total {self.total_steps} steps")
        if self.steps_per_epoch is not None:
            parts.append(f"{self.steps_per_epoch} steps/epoch")
        if self.epochs is not None:
            parts.append(f"{self.epochs:g} epochs")
        return ", ".join(parts)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> ScheduleLR:
        """A :class:`ScheduleLR` driving ``optimizer`` along this plan (peak lr = ``self.lr``)."""
        return ScheduleLR(optimizer, self.schedule, peak_lr=self.lr)


def _budget(
    batch_size: int,
    dataset_size: int | None,
    epochs: float | None,
    total_steps: int | None,
    drop_last: bool,
) -> tuple[int | None, int, float | None]:
    """(steps_per_epoch, total_steps, epochs) from the data budget."""
    spe = None
    if dataset_size is not None:
        spe = steps_per_epoch(dataset_size, batch_size, drop_last)
    if total_steps is not None:
        total = _int("total_steps", total_steps, 1)
        return spe, total, None if spe is None else total / spe  # total_steps overrides epochs
    if spe is None or epochs is None:
        raise ValueError(
            "the training length is unknown: pass dataset_size and epochs, or total_steps "
            f"(got dataset_size={dataset_size!r}, epochs={epochs!r}, total_steps=None)"
        )
    ep = _real("epochs", epochs, low=0.0, low_open=True)
    total = _round_half_up(ep * spe)
    if total < 1:
        raise ValueError(
            f"epochs={ep} at {spe} steps per epoch rounds to {total} steps; allowed: at least 1"
        )
    return spe, total, ep


@dataclass
class Recipe:
    """A large-batch recipe stated at a base batch size, resolved for any batch size.

    Args:
      base_lr: the peak learning rate at ``base_batch`` (> 0).
      base_batch: the batch size ``base_lr`` (and the warmup) are stated for (>= 1).
      rule: learning-rate scaling rule, see :func:`scale_lr`: ``"sqrt"``, ``"linear"``,
        ``"none"``.
      warmup_epochs: warmup length in epochs at ``base_batch``; exclusive with ``warmup_ratio``.
      warmup_ratio: warmup length as a fraction of the total steps at ``base_batch`` (the BERT
        convention); exclusive with ``warmup_epochs``. Neither: no warmup.
      warmup_rule: how the warmup follows the batch size, see :func:`scale_warmup`:
        ``"constant"`` (default: the given epochs/ratio at every batch size, the warmup steps
        shrink as the batch grows) or ``"linear"`` (linear-epoch warmup of the paper: the epochs
        or ratio grow with the batch, the warmup steps stay constant).
      decay: ``"poly"``, ``"cosine"``, ``"step"`` or ``"constant"``.
      power: polynomial exponent (1.0: the paper's BERT schedule).
      end_value: multiplier at the last step (poly, cosine).
      decay_epochs: epochs at which a ``"step"`` decay multiplies by ``decay_factor``.
      decay_factor: the step decay's factor.
      decay_over: ``"remaining"`` or ``"total"``, see :class:`WarmupDecay`.
      warmup_offset: 1 or 0, see :class:`LinearWarmup`.
      warmup_from: ``"zero"`` (the ramp starts at lr 0) or ``"base"`` (it starts at
        ``base_lr``, as in Goyal et al.; capped at the peak).
      drop_last: steps per epoch are ``floor(N / B)`` instead of ``ceil(N / B)``.
      dataset_size: default examples per epoch for :meth:`resolve`.
      epochs: default number of epochs for :meth:`resolve`.
      name: a label for printing and plots.

    :meth:`resolve` keeps the number of epochs fixed (the paper's protocol) and returns a
    :class:`Plan`::

      steps_per_epoch = ceil(dataset_size / B)        (floor with drop_last)
      total_steps     = round_half_up(epochs * steps_per_epoch)   (or total_steps if given)
      lr              = scale_lr(base_lr, base_batch, B, rule)
      warmup_steps    = round_half_up(scale_warmup(warmup_epochs, base_batch, B, warmup_rule)
                                      * steps_per_epoch)
                     or round_half_up(scale_warmup(warmup_ratio, base_batch, B, warmup_rule)
                                      * total_steps)
      schedule        = warmup_then_decay(warmup_steps, total_steps, decay, ...)

    Example:
      >>> recipe = Recipe(base_lr=1e-3, base_batch=128, rule="sqrt", warmup_epochs=1.0)
      >>> plan = recipe.resolve(batch_size=8192, dataset_size=60000, epochs=10)
      >>> plan.lr, plan.steps_per_epoch, plan.warmup_steps, plan.total_steps
      (0.008, 8, 8, 80)
    """

    base_lr: float
    base_batch: int
    rule: str = "sqrt"
    warmup_epochs: float | None = None
    warmup_ratio: float | None = None
    warmup_rule: str = "constant"
    decay: str = "poly"
    power: float = 1.0
    end_value: float = 0.0
    decay_epochs: tuple[float, ...] = ()
    decay_factor: float = 0.1
    decay_over: str = "remaining"
    warmup_offset: int = 1
    warmup_from: str = "zero"
    drop_last: bool = False
    dataset_size: int | None = None
    epochs: float | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        _real("base_lr", self.base_lr, low=0.0, low_open=True)
        _int("base_batch", self.base_batch, 1)
        _choice("rule", self.rule, tuple(LR_RULES))
        _choice("warmup rule", self.warmup_rule, tuple(WARMUP_RULES))
        _choice("decay", self.decay, DECAYS)
        _choice("decay_over", self.decay_over, DECAY_OVER)
        _choice("warmup_from", self.warmup_from, ("zero", "base"))
        if self.warmup_epochs is not None and self.warmup_ratio is not None:
            raise ValueError(
                f"give warmup_epochs or warmup_ratio, not both (got warmup_epochs="
                f"{self.warmup_epochs!r}, warmup_ratio={self.warmup_ratio!r})"
            )
        if self.warmup_epochs is not None:
            _real("warmup_epochs", self.warmup_epochs, low=0.0)
        if self.warmup_ratio is not None:
            _real("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        _real("power", self.power, low=0.0, low_open=True)
        _real("end_value", self.end_value, low=0.0, high=1.0)
        _real("decay_factor", self.decay_factor, low=0.0, high=1.0, low_open=True)
        self.decay_epochs = tuple(self.decay_epochs)
        for i, e in enumerate(self.decay_epochs):
            _real(f"decay_epochs[{i}]", e, low=0.0)
            if i and not e > self.decay_epochs[i - 1]:
                raise ValueError(
                    f"decay_epochs must be strictly increasing, got {self.decay_epochs} "
                    f"(decay_epochs[{i}]={e} <= decay_epochs[{i - 1}]={self.decay_epochs[i - 1]})"
                )
        if self.decay == "step" and not self.decay_epochs:
            raise ValueError("decay='step' needs decay_epochs, e.g. (30, 60, 80); got ()")
        if self.decay != "step" and self.decay_epochs:
            raise ValueError(
                f"decay_epochs={self.decay_epochs} is used only by decay='step', not by "
                f"decay={self.decay!r}; allowed: decay_epochs=() or decay='step'"
            )
        _check_offset_and_drop_last(self.warmup_offset, self.drop_last)
        if self.dataset_size is not None:
            _int("dataset_size", self.dataset_size, 1)
        if self.epochs is not None:
            _real("epochs", self.epochs, low=0.0, low_open=True)

    def resolve(
        self,
        batch_size: int,
        dataset_size: int | None = None,
        epochs: float | None = None,
        total_steps: int | None = None,
    ) -> Plan:
        """The plan for ``batch_size``.

        Args:
          batch_size: examples per update (>= 1).
          dataset_size: examples per epoch (default: the recipe's).
          epochs: training length in epochs (default: the recipe's).
          total_steps: training length in updates; overrides ``epochs`` (epochs are then
            ``total_steps / steps_per_epoch`` when the dataset size is known).
        """
        b = _int("batch_size", batch_size, 1)
        n = self.dataset_size if dataset_size is None else dataset_size
        ep = self.epochs if epochs is None else epochs
        spe, total, ep = _budget(b, n, ep, total_steps, self.drop_last)
        lr = scale_lr(self.base_lr, self.base_batch, b, self.rule)

        warmup = 0
        if self.warmup_epochs is not None:
            wep = scale_warmup(self.warmup_epochs, self.base_batch, b, self.warmup_rule)
            if spe is None:
                raise ValueError(
                    f"warmup_epochs={self.warmup_epochs} needs steps per epoch: pass dataset_size "
                    "(or state the warmup as warmup_ratio)"
                )
            warmup = _round_half_up(wep * spe)
            source = f"warmup_epochs={self.warmup_epochs} ({wep:g} epochs at batch {b})"
        elif self.warmup_ratio is not None:
            ratio = scale_warmup(self.warmup_ratio, self.base_batch, b, self.warmup_rule)
            warmup = _round_half_up(ratio * total)
            source = f"warmup_ratio={self.warmup_ratio} ({ratio:g} of the steps at batch {b})"
        if warmup >= total:
            raise ValueError(
                f"{source} gives warmup_steps={warmup}, not less than total_steps={total} "
                "(warmup longer than training); allowed: warmup_steps < total_steps"
            )

        boundaries: tuple[int, ...] = ()
        if self.decay == "step":
            if spe is None:
                raise ValueError(
                    f"decay_epochs={self.decay_epochs} needs steps per epoch: pass dataset_size"
                )
            boundaries = StepDecay.from_epochs(self.decay_epochs, spe).boundaries
            if self.decay_over == "remaining":
                # on the decay's clock; boundaries inside the warmup all act at its end (each one)
                boundaries = tuple(max(bd - warmup, 0) for bd in boundaries)
        init = 0.0 if self.warmup_from == "zero" else min(1.0, self.base_lr / lr)
        schedule = warmup_then_decay(
            warmup,
            total,
            self.decay,
            power=self.power,
            end_value=self.end_value,
            boundaries=boundaries,
            factor=self.decay_factor,
            decay_over=self.decay_over,
            warmup_offset=self.warmup_offset,
            warmup_init=init,
        )
        return Plan(
            lr=lr,
            warmup_steps=warmup,
            total_steps=total,
            steps_per_epoch=spe,
            schedule=schedule,
            batch_size=b,
            epochs=ep,
            dataset_size=n,
            name=self.name,
        )


@dataclass
class Stage:
    """One phase of a :class:`MixedBatchRecipe`.

    Args:
      batch_size: examples per update in this phase (>= 1).
      epoch_fraction: the fraction of the recipe's epochs spent in this phase, in (0, 1].
      lr: this phase's peak learning rate (> 0).
      warmup_ratio: the warmup as a fraction of this phase's steps, in [0, 1]; it must leave this phase
        at least one step after the warmup (checked when the plan is resolved).
      seq_len: the sequence length, for the record (a training loop reads it from the plan).
      num_steps: an explicit step count that overrides the one computed from the epochs.
    """

    batch_size: int
    epoch_fraction: float
    lr: float
    warmup_ratio: float = 0.0
    seq_len: int | None = None
    num_steps: int | None = None

    def __post_init__(self) -> None:
        _int("batch_size", self.batch_size, 1)
        _real("epoch_fraction", self.epoch_fraction, low=0.0, high=1.0, low_open=True)
        _real("lr", self.lr, low=0.0, low_open=True)
        _real("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        if self.seq_len is not None:
            _int("seq_len", self.seq_len, 1)
        if self.num_steps is not None:
            _int("num_steps", self.num_steps, 1)


@dataclass
class MixedBatchRecipe:
    """Training in phases with different batch sizes, re-warming the lr from zero in each.

    Args:
      stages: the phases, in order; their ``epoch_fraction`` must sum to 1.
      dataset_size: default examples per epoch for :meth:`resolve`.
      epochs: default number of epochs for :meth:`resolve`.
      decay, power, end_value, decay_over, warmup_offset: each phase's schedule, as in
        :func:`warmup_then_decay`.
      drop_last: steps per epoch are ``floor(N / B)`` instead of ``ceil(N / B)``.
      name: a label.

    Phase i runs ``num_steps_i = round_half_up(epoch_fraction_i * epochs * ceil(N / B_i))``
    updates (or its ``num_steps``), warms up over ``round_half_up(warmup_ratio_i * num_steps_i)``
    of them from zero and decays to ``end_value`` at its own end. The plan's peak lr is the
    largest stage lr; each phase's schedule is scaled by ``lr_i / peak`` so that the multiplier
    stays in [0, 1].

    References:
      You et al., 2020, section 4 (mixed-batch training). https://arxiv.org/abs/1904.00962
    """

    stages: tuple[Stage, ...]
    dataset_size: int | None = None
    epochs: float | None = 1.0
    decay: str = "poly"
    power: float = 1.0
    end_value: float = 0.0
    decay_over: str = "remaining"
    warmup_offset: int = 1
    drop_last: bool = False
    name: str = "mixed-batch"

    def __post_init__(self) -> None:
        self.stages = tuple(self.stages)
        if not self.stages:
            raise ValueError("stages must contain at least one Stage, got ()")
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, Stage):
                raise ValueError(f"stages[{i}] must be a Stage, got {stage!r}")
        total = sum(s.epoch_fraction for s in self.stages)
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"stage epoch_fraction values must sum to 1, got {total:g}")
        _choice("decay", self.decay, tuple(d for d in DECAYS if d != "step"))
        _choice("decay_over", self.decay_over, DECAY_OVER)
        _real("power", self.power, low=0.0, low_open=True)
        _real("end_value", self.end_value, low=0.0, high=1.0)
        _check_offset_and_drop_last(self.warmup_offset, self.drop_last)
        if self.dataset_size is not None:
            _int("dataset_size", self.dataset_size, 1)
        if self.epochs is not None:
            _real("epochs", self.epochs, low=0.0, low_open=True)

    def resolve(
        self,
        batch_size: int | None = None,
        dataset_size: int | None = None,
        epochs: float | None = None,
        total_steps: int | None = None,
    ) -> Plan:
        """The mixed-batch plan.

        Args:
          batch_size: None, or the first stage's batch size (the batch sizes are part of the
            recipe; build other stages to change them).
          dataset_size: examples per epoch (default: the recipe's).
          epochs: training length in epochs (default: the recipe's).
          total_steps: not supported (each phase's length follows from its batch size); must
            be None.
        """
        first = self.stages[0].batch_size
        if batch_size is not None and batch_size != first:
            sizes = tuple(s.batch_size for s in self.stages)
            raise ValueError(
                f"batch_size={batch_size!r} does not match this recipe's batch sizes {sizes}; "
                "allowed: None or the first stage's batch size (build new stages to change them)"
            )
        if total_steps is not None:
            raise ValueError(
                f"total_steps={total_steps!r} is not supported by a mixed-batch recipe; give "
                "dataset_size and epochs, or set each Stage's num_steps"
            )
        n = self.dataset_size if dataset_size is None else _int("dataset_size", dataset_size, 1)
        ep = self.epochs if epochs is None else _real("epochs", epochs, low=0.0, low_open=True)
        peak = max(s.lr for s in self.stages)
        phases: list[Plan] = []
        for i, stage in enumerate(self.stages):
            spe = None
            if n is not None:
                spe = steps_per_epoch(n, stage.batch_size, self.drop_last)
            if stage.num_steps is not None:
                steps = stage.num_steps
            elif spe is not None and ep is not None:
                steps = _round_half_up(stage.epoch_fraction * float(ep) * spe)
                if steps < 1:
                    raise ValueError(f"stages[{i}] rounds to {steps} steps; allowed: at least 1")
            else:
                raise ValueError(
                    f"stages[{i}] length is unknown: pass dataset_size and epochs, or set "
                    f"num_steps (got dataset_size={n!r}, epochs={ep!r})"
                )
            warmup = _round_half_up(stage.warmup_ratio * steps)
            if warmup >= steps:
                raise ValueError(
                    f"stages[{i}] warmup_ratio={stage.warmup_ratio} gives warmup_steps={warmup}, "
                    f"not less than its {steps} steps (warmup longer than training)"
                )
            local = warmup_then_decay(
                warmup,
                steps,
                self.decay,
                power=self.power,
                end_value=self.end_value,
                decay_over=self.decay_over,
                warmup_offset=self.warmup_offset,
            )
            phases.append(
                Plan(
                    lr=stage.lr,
                    warmup_steps=warmup,
                    total_steps=steps,
                    steps_per_epoch=spe,
                    schedule=local,
                    batch_size=stage.batch_size,
                    epochs=None if spe is None else steps / spe,
                    dataset_size=n,
                    name=f"{self.name} phase {i + 1}",
                    seq_len=stage.seq_len,
                )
            )
        schedule = Phased(
            tuple(
                (p.total_steps, p.schedule if p.lr == peak else Scaled(p.schedule, p.lr / peak))
                for p in phases
            )
        )
        return Plan(
            lr=peak,
            warmup_steps=phases[0].warmup_steps,
            total_steps=sum(p.total_steps for p in phases),
            steps_per_epoch=None,
            schedule=schedule,
            batch_size=None,
            epochs=self._epochs_covered(ep, phases),
            dataset_size=n,
            name=self.name,
            phases=tuple(phases),
        )


    def _epochs_covered(self, ep: float | None, phases: list[Plan]) -> float | None:
        """The epochs asked for; with explicit ``num_steps`` (which need not add up to them)
        the epochs the phases cover, or None when a phase's steps per epoch are unknown."""
        if all(s.num_steps is None for s in self.stages):
            return None if ep is None else float(ep)
        if any(p.epochs is None for p in phases):
            return None
        return sum(p.epochs for p in phases)


# --------------------------------------------------------------------------------------------
# Presets.


@dataclass(frozen=True)
class BertRow:
    """One row of the paper's untuned LAMB/BERT table."""

    batch_size: int
    lr: float
    warmup_ratio: float
    total_steps: int


# The paper's untuned BERT-Large pre-training table (LAMB, same number of epochs at every batch
# size): lr = 5 / (2**k * 10**3) with k = 3.0, 2.5, ..., 0 and a warmup ratio doubling with the
# batch. "1K" is 1024, ..., "32K" is 32768. The step counts (1M at 512 ... 15625 at 32K) are the
# fixed budget of 512M sequences.
BERT_UNTUNED_TABLE: tuple[BertRow, ...] = (
    BertRow(512, 5 / (2**3.0 * 10**3), 1 / 320, 1_000_000),
    BertRow(1024, 5 / (2**2.5 * 10**3), 1 / 160, 500_000),
    BertRow(2048, 5 / (2**2.0 * 10**3), 1 / 80, 250_000),
    BertRow(4096, 5 / (2**1.5 * 10**3), 1 / 40, 125_000),
    BertRow(8192, 5 / (2**1.0 * 10**3), 1 / 20, 62_500),
    BertRow(16384, 5 / (2**0.5 * 10**3), 1 / 10, 31_250),
    BertRow(32768, 5 / (2**0.0 * 10**3), 1 / 5, 15_625),
)

# One pass over this many sequences is the paper's budget: 1M steps at batch 512.
BERT_SEQUENCES = 512 * 1_000_000


def _overridden(
    config: dict[str, Any], overrides: dict[str, Any], cls: type, what: str = "recipe field(s)", own: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A preset's fields with ``overrides`` applied. A field that only makes sense beside one the
    user replaced goes with it: a given warmup_epochs drops the preset's warmup_ratio (and the
    reverse), a decay other than "step" drops the preset's decay_epochs. ``own``: the preset's
    own arguments, named first among the allowed ones when an override is unknown."""
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        allowed = [*own, *(n for n in names if n not in own)]
        raise ValueError(f"unknown {what} {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    config = dict(config)
    for given, other in (("warmup_epochs", "warmup_ratio"), ("warmup_ratio", "warmup_epochs")):
        if overrides.get(given) is not None and other not in overrides and other in config:
            config[other] = None
    if overrides.get("decay", "step") != "step" and "decay_epochs" not in overrides:
        config.pop("decay_epochs", None)
    config.update(overrides)
    return config


def _bert(**overrides: Any) -> Recipe:
    """The paper's untuned BERT recipe as a closed form (reproduces ``BERT_UNTUNED_TABLE``).

    lr = 6.25e-4 at batch 512 with the square-root rule, warmup ratio 1/320 at batch 512 growing
    linearly with the batch (linear-epoch warmup: 3125 warmup steps at every batch size), linear
    decay (power 1) to zero over the post-warmup steps, one pass over 512M sequences (1M steps
    at batch 512). The paper states the budget as steps, not as epochs of a named corpus.
    """
    config: dict[str, Any] = dict(
        base_lr=5 / (2**3 * 10**3),
        base_batch=512,
        rule="sqrt",
        warmup_ratio=1 / 320,
        warmup_rule="linear",
        decay="poly",
        power=1.0,
        end_value=0.0,
        dataset_size=BERT_SEQUENCES,
        epochs=1.0,
        name="bert",
    )
    return Recipe(**_overridden(config, overrides, Recipe))


def _goyal(**overrides: Any) -> Recipe:
    """Goyal et al. 2017 ImageNet/ResNet-50: lr 0.1 per 256 examples, linear rule, 5-epoch
    warmup from the base lr, x0.1 at epochs 30, 60 and 80 (absolute epochs), 90 epochs of the
    1,281,167 ImageNet-1k training images."""
    config: dict[str, Any] = dict(
        base_lr=0.1,
        base_batch=256,
        rule="linear",
        warmup_epochs=5.0,
        warmup_rule="constant",
        warmup_from="base",
        decay="step",
        decay_epochs=(30.0, 60.0, 80.0),
        decay_factor=0.1,
        decay_over="total",
        dataset_size=1_281_167,
        epochs=90.0,
        name="goyal",
    )
    return Recipe(**_overridden(config, overrides, Recipe))


def bert_two_phase(
    lrs: tuple[float, float] = (6e-3, 4e-3),
    warmup_ratios: tuple[float, float] = (0.2843, 0.128),
    num_steps: tuple[int, int] | None = None,
    batch_sizes: tuple[int, int] = (65536, 32768),
    seq_lens: tuple[int, int] = (128, 512),
    dataset_size: int = BERT_SEQUENCES,
    power: float = 1.0,
    **overrides: Any,
) -> MixedBatchRecipe:
    """The paper's 64K/32K mixed-batch BERT recipe.

    Args:
      lrs: peak lr of each phase. The paper's values are not in our copy; the defaults are
        those of NVIDIA's public LAMB BERT-Large scripts (6e-3 at 64K, 4e-3 at 32K).
      warmup_ratios: warmup as a fraction of each phase's steps; defaults from the same scripts
        (about 2000 and 200 steps).
      num_steps: explicit phase lengths; None computes them from the epochs (see below).
        NVIDIA's scripts use (7038, 1563) = 8601 steps.
      batch_sizes: phase 1 at 65536, phase 2 at 32768.
      seq_lens: phase 1 at sequence length 128, phase 2 at 512.
      dataset_size: sequences per epoch; one epoch in all, the budget of the untuned table.
      power: the decay exponent of each phase (1.0: linear, as in the paper).
      **overrides: other :class:`MixedBatchRecipe` fields.

    The first 9/10 of the epochs run at 64K, the last 1/10 at 32K; the lr is re-warmed from zero
    at the switch, then decays to zero again. With the default budget of 512M sequences (1M steps
    at batch 512) the step counts are computed, not copied::

      phase 1: round_half_up(0.9 * ceil(512e6 / 65536)) = round_half_up(0.9 * 7813) = 7032
      phase 2: round_half_up(0.1 * ceil(512e6 / 32768)) = round_half_up(0.1 * 15625) = 1563
      total 8595

    The paper reports 8599 iterations and the usual split is 7038 + 1563 = 8601; neither comes
    from one dataset size (1563 at 32K needs fewer than 512.2M sequences, 7038 at 64K more than
    512.4M), so those counts are available only as explicit ``num_steps``.
    """
    for name, pair in (("lrs", lrs), ("warmup_ratios", warmup_ratios), ("batch_sizes", batch_sizes),
                       ("seq_lens", seq_lens)):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"{name} must be two values, one per phase, got {pair!r}")
    if num_steps is not None and (not isinstance(num_steps, (tuple, list)) or len(num_steps) != 2):
        raise ValueError(f"num_steps must be None or two step counts, one per phase, got {num_steps!r}")
    steps = (None, None) if num_steps is None else tuple(num_steps)
    stages = []
    for i, fraction in enumerate((0.9, 0.1)):
        try:
            stages.append(Stage(batch_sizes[i], fraction, lrs[i], warmup_ratios[i], seq_lens[i], steps[i]))
        except ValueError as err:  # name the phase: "lr must be ..." alone does not say which
            raise ValueError(f"phase {i + 1} of 2: {err}") from None
    config: dict[str, Any] = dict(
        stages=tuple(stages),
        dataset_size=dataset_size,
        epochs=1.0,
        decay="poly",
        power=power,
        name="bert-two-phase",
    )
    own = ("lrs", "warmup_ratios", "num_steps", "batch_sizes", "seq_lens", "dataset_size", "power")
    return MixedBatchRecipe(**_overridden(config, overrides, MixedBatchRecipe, "bert-two-phase argument(s)", own))


PRESETS: dict[str, Callable[..., Recipe | MixedBatchRecipe]] = {
    "bert": _bert,
    "goyal": _goyal,
    "bert-two-phase": bert_two_phase,
}


def preset(name: str, **overrides: Any) -> Recipe | MixedBatchRecipe:
    """A named recipe, with any of its fields overridden.

    Args:
      name: ``"bert"`` (the untuned BERT table as a closed form), ``"goyal"`` (ImageNet,
        Goyal et al.) or ``"bert-two-phase"`` (the 64K/32K mixed-batch BERT,
        :func:`bert_two_phase`).
      **overrides: fields of the recipe (or arguments of :func:`bert_two_phase`).

    Example:
      >>> preset("bert").resolve(batch_size=32768).total_steps
      15625
    """
    _choice("preset", name, tuple(PRESETS))
    return PRESETS[name](**overrides)


# --------------------------------------------------------------------------------------------
# The torch adapter.


class ScheduleLR(LRScheduler):
    """Drives an optimizer's learning rates with a ``step -> multiplier`` schedule.

    Args:
      optimizer: the wrapped optimizer.
      schedule: a pure schedule (any callable ``int -> float``).
      peak_lr: the lr that multiplier 1 stands for: one float for every group, one per group,
        or None to use each group's ``initial_lr`` (its ``lr`` when the scheduler was built).
      last_epoch: as in ``torch.optim.lr_scheduler``; leave at -1 and use
        :meth:`load_state_dict` to resume.

    After ``t`` calls to :meth:`step` (i.e. after t optimizer updates), group g's lr is::

      lr_g = peak_g * schedule(t) * group_g.get("lr_scale", 1.0)

    written as a Python float (or in place into a tensor ``lr``). The ``lr_scale`` key lets a
    param-group helper give some groups a fixed fraction of the scheduled rate.

    ``state_dict()`` holds the step and the peaks but not the schedule, which is configuration:
    build the scheduler with the same schedule, then ``load_state_dict``; the groups' lrs are
    set for the restored step at once, so the run continues exactly as if it had not stopped.

    Example:
      >>> model = torch.nn.Linear(2, 1)
      >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
      >>> sched = ScheduleLR(opt, LinearWarmup(4))
      >>> opt.param_groups[0]["lr"]
      0.025
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        peak_lr: float | Sequence[float] | None = None,
        last_epoch: int = -1,
    ) -> None:
        if not callable(schedule):
            raise ValueError(f"schedule must be callable, got {schedule!r}")
        groups = len(optimizer.param_groups)
        peaks: list[float] | None = None
        if peak_lr is not None:
            one_value = isinstance(peak_lr, (int, float, str, bytes)) or (
                isinstance(peak_lr, torch.Tensor) and peak_lr.dim() == 0
            )
            if one_value:
                peaks = [_real("peak_lr", peak_lr, low=0.0)] * groups
            elif not isinstance(peak_lr, Iterable):
                raise ValueError(
                    f"peak_lr must be a real number >= 0 or one per param group, got {peak_lr!r}"
                )
            else:
                peaks = [_real(f"peak_lr[{i}]", p, low=0.0) for i, p in enumerate(peak_lr)]
                if len(peaks) != groups:
                    raise ValueError(
                        f"peak_lr has {len(peaks)} values for {groups} param groups; allowed: "
                        "one float, or one value per param group"
                    )
        self.schedule = schedule
        self.peak_lrs = peaks
        self.schedule_repr = repr(schedule)
        super().__init__(optimizer, last_epoch)

    def _peaks(self) -> list[float]:
        if self.peak_lrs is not None:
            return list(self.peak_lrs)
        return [float(b) for b in self.base_lrs]

    def _lrs_at(self, step: int) -> list[float]:
        multiplier = float(self.schedule(step))
        return [
            peak * multiplier * float(group.get("lr_scale", 1.0))
            for peak, group in zip(self._peaks(), self.optimizer.param_groups, strict=True)
        ]

    def get_lr(self) -> list[float]:
        return self._lrs_at(self.last_epoch)

    def _get_closed_form_lr(self) -> list[float]:
        return self._lrs_at(self.last_epoch)

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state without the optimizer and without the schedule itself."""
        state = super().state_dict()
        state.pop("schedule", None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step and peaks, then set every group's lr for the restored step."""
        state = dict(state_dict)
        state.pop("schedule", None)
        saved = state.get("schedule_repr")
        if saved is not None and saved != repr(self.schedule):
            warnings.warn(
                f"loading a ScheduleLR state saved with schedule {saved} into one built with "
                f"{self.schedule!r}",
                UserWarning,
                stacklevel=2,
            )
        self.__dict__.update(state)
        self.schedule_repr = repr(self.schedule)
        for group, lr in zip(self.optimizer.param_groups, self._lrs_at(self.last_epoch)):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [
            g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
            for g in self.optimizer.param_groups
        ]


# --------------------------------------------------------------------------------------------
# Plotting.


def _sample_steps(plan: Plan, points: int) -> list[int]:
    total = plan.total_steps
    spread = max(points - 1, 1)
    steps = {round(i * (total - 1) / spread) for i in range(points)}
    # log-spaced too, so that the warmup of a long run is drawn smoothly on the log axis
    steps.update(round(total ** (i / spread)) - 1 for i in range(points))
    steps.update(m for m in plan.landmarks() if m < total)
    return sorted(steps)


def plot_plans(
    plans: Sequence[Plan],
    path: str,
    *,
    title: str | None = None,
    points: int = 2000,
) -> None:
    """Write a PNG of several plans' learning rates, overlaid.

    Args:
      plans: the resolved plans to draw.
      path: the output file (its suffix picks the format).
      title: the figure title (default: the plans' names).
      points: steps sampled per plan, plus every landmark step (warmup end, phase switches).

    The left panel plots the lr against epochs (all plans cover the same epochs under the
    paper's protocol; against the fraction of training when a plan's epochs are unknown), the
    right panel against the update step on a log axis (a bigger batch takes fewer steps).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not plans:
        raise ValueError("plans must contain at least one Plan, got none")
    by_epoch = all(p.epoch_at(0) is not None for p in plans)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for plan in plans:
        steps = _sample_steps(plan, points)
        lrs = [plan.lr_at(t) for t in steps]
        if by_epoch:
            xs = [plan.epoch_at(t) for t in steps]
        else:
            xs = [t / plan.total_steps for t in steps]
        label = plan.name if plan.batch_size is None else f"{plan.name} B={plan.batch_size}"
        left.plot(xs, lrs, label=label)
        right.plot([t + 1 for t in steps], lrs, label=label)
    left.set_xlabel("epoch" if by_epoch else "fraction of training steps")
    right.set_xlabel("update (step + 1, log scale)")
    right.set_xscale("log")
    for ax in (left, right):
        ax.set_ylabel("learning rate")
        ax.grid(True, alpha=0.3)
    right.legend(fontsize="small")
    names = sorted({p.name for p in plans})
    fig.suptitle(title or "learning-rate schedule: " + ", ".join(names))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

