"""Optimizers by name: a registry of frozen records, variants being a name plus defaults."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from largebatch.optim.lamb import Lamb
from largebatch.optim.lars import Lars
from largebatch.schedules import _finite_number


@dataclass(frozen=True)
class OptimInfo:
    name: str
    cls: Callable
    description: str
    defaults: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    layerwise: bool = False  # understands the per-group "adapt" flag


def _info(name, cls, description, layerwise=False, **defaults) -> OptimInfo:
    return OptimInfo(name, cls, description, MappingProxyType(defaults), layerwise)


OPTIMIZERS: dict[str, OptimInfo] = {
    i.name: i
    for i in (
        _info("lamb", Lamb, "LAMB, Algorithm 2 of You et al. 2020", True),
        _info("lambc", Lamb, "LAMB with the trust ratio capped at 1", True, trust_clip=True),
        _info("nlamb", Lamb, "N-LAMB: Nesterov look-ahead on the first moment", True, nesterov="first"),
        _info("nnlamb", Lamb, "NN-LAMB: Nesterov look-ahead on both moments", True, nesterov="both"),
        _info("lars", Lars, "LARS, Algorithm 1 of You et al. 2020 (mode='paper')", True, mode="paper"),
        _info("lars-classic", Lars, "LARS of You et al. 2017 (local lr, as timm/NVIDIA)", True, mode="classic"),
        _info("larc", Lars, "classic LARS with LARC clipping min(local_lr/lr, 1)", True, mode="classic", clip=True),
        _info("adamw", torch.optim.AdamW, "torch.optim.AdamW"),
        _info("adam", torch.optim.Adam, "torch.optim.Adam (L2 weight decay added to the gradient)"),
        _info("adagrad", torch.optim.Adagrad, "torch.optim.Adagrad"),
        _info("sgd", torch.optim.SGD, "torch.optim.SGD with momentum 0.9", momentum=0.9),
        _info("momentum", torch.optim.SGD, "torch.optim.SGD with momentum 0.9", momentum=0.9),
        _info("nesterov", torch.optim.SGD, "torch.optim.SGD with Nesterov momentum 0.9", momentum=0.9, nesterov=True),
    )
}


def check_optimizer_options(name: str, options: Mapping) -> None:
    """ValueError unless ``name`` is a registered optimizer whose constructor takes every option
    (``lr`` and ``weight_decay`` are arguments of their own, not options)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; valid names are: {', '.join(OPTIMIZERS)}")
    own = sorted({"lr", "weight_decay", "params"} & set(options))
    if own:
        raise ValueError(
            f"{', '.join(own)} cannot be an optimizer option: the learning rate comes from lr/base_lr and the "
            "recipe (--lr, --base-lr), the weight decay from weight_decay (--weight-decay)"
        )
    accepted = [n for n in inspect.signature(OPTIMIZERS[name].cls.__init__).parameters
                if n not in ("self", "params", "lr", "weight_decay", "args", "kwargs")]  # fmt: skip
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {', '.join(unknown)} for optimizer {name!r} "
            f"({OPTIMIZERS[name].cls.__name__}); allowed: {', '.join(accepted)}"
        )
    if not OPTIMIZERS[name].layerwise:  # Lamb and Lars check their own values; torch's optimizers take "False" as true
        signature = inspect.signature(OPTIMIZERS[name].cls.__init__).parameters
        for option, value in options.items():
            _check_torch_option(name, option, value, signature[option].default)


def _check_torch_option(name: str, option: str, value, default) -> None:
    """A value of the kind of the constructor's default: a bool for a bool, a finite number for a
    number, a sequence of numbers for a tuple, None or a bool where the default is None (foreach,
    fused). Text is never taken (torch optimizers treat any non-empty string as true)."""
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, (int, float)):
        ok, kind = _finite_number(value), "a finite number"
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and len(value) == len(default) and all(map(_finite_number, value))
        kind = f"a list of {len(default)} finite numbers"
    else:
        ok, kind = value is None or isinstance(value, bool), "null, true or false"
    if not ok:
        raise ValueError(f"Invalid option {option}={value!r} for optimizer {name!r}: it must be {kind} (default {default!r})")


def create_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, **options) -> torch.optim.Optimizer:
    """Build the optimizer called ``name`` (see ``OPTIMIZERS``) with its variant defaults.

    Per-group "adapt" flags (from :func:`largebatch.param_groups`) are dropped for optimizers that
    have no layer-wise adaptation.
    """
    check_optimizer_options(name, options)
    info = OPTIMIZERS[name]
    params = list(params)
    if not info.layerwise:
        params = [{k: v for k, v in g.items() if k != "adapt"} if isinstance(g, dict) else g for g in params]
    kwargs = {**info.defaults, **options}
    if not info.layerwise:  # a JSON list for a tuple default (betas)
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return info.cls(params, lr=lr, weight_decay=weight_decay, **kwargs)
