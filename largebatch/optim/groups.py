"""Parameter groups that exclude biases and normalisation parameters from weight decay and,
separately, from layer-wise adaptation (the trust ratio)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

from largebatch.optim._common import check_nonneg

# Name patterns (fnmatch, matched against the full parameter name, case-insensitive) of parameters
# that are excluded by default: biases and the parameters of normalisation layers. Short layer
# names (bn1, ln_f) match only as a whole name component ("layer1.0.bn1.weight", "h.0.ln_1.bias"),
# not inside another word ("kiln_proj.weight", "bnb.weight").
DEFAULT_EXCLUDE_PATTERNS = (
    "*bias", "*layernorm*", "*layer_norm*", "*norm.weight", "*batchnorm*",
    "bn.*", "*.bn.*", "bn[0-9]*", "*.bn[0-9]*", "ln.*", "*.ln.*", "ln_*", "*.ln_*",
)  # fmt: skip


# Modules whose parameters are normalisation parameters whatever they are called.
NORM_MODULES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)  # fmt: skip


def _unwrapped(model: nn.Module) -> tuple[nn.Module, str]:
    """The module inside ``torch.compile`` and DDP wrappers, and the prefix of its parameter names."""
    prefix = ""
    while True:
        inner = model._modules.get("_orig_mod")  # torch.compile's OptimizedModule
        if not isinstance(inner, nn.Module) and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
            prefix += "module."
        elif isinstance(inner, nn.Module):
            prefix += "_orig_mod."
        else:
            return model, prefix
        model = inner


def _model_no_weight_decay(model: nn.Module) -> set[str]:
    """Names returned by ``model.no_weight_decay()`` (timm's hook), if the model has one, as
    ``model.named_parameters()`` names them (a compiled or DDP-wrapped model's prefix added)."""
    inner, prefix = _unwrapped(model)
    hook = getattr(inner, "no_weight_decay", None)
    return {prefix + n for n in hook()} if callable(hook) else set()


def _norm_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that belong to normalisation modules (:data:`NORM_MODULES`)."""
    return {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, NORM_MODULES)
        for name, _ in module.named_parameters(recurse=False)
    }


def is_excluded(
    name: str,
    param,
    *,
    by_ndim: bool = True,
    patterns: Iterable[str] = DEFAULT_EXCLUDE_PATTERNS,
    names: Iterable[str] = (),
) -> bool:
    """Whether a parameter is a bias/normalisation parameter: ndim <= 1, a pattern, or a listed name."""
    lname = name.lower()
    if by_ndim and param.ndim <= 1:
        return True
    if name in set(names) or any(name.startswith(n + ".") for n in names):
        return True
    return any(fnmatch.fnmatchcase(lname, p.lower()) for p in patterns)


def exclusion_rule(spec: str | Iterable[str], what: str) -> str | tuple[str, ...]:
    """``spec`` of ``what`` ("exclude_from_weight_decay" or "exclude_from_adaptation") checked: a
    named rule ("default", "none"; "same" for the adaptation too) or a tuple of name patterns."""
    named = ("default", "none", "same") if what == "exclude_from_adaptation" else ("default", "none")
    if isinstance(spec, str):
        if spec not in named:
            raise ValueError(f"Invalid {what}: {spec!r}; allowed are {', '.join(map(repr, named))} or a list of name patterns")
        return spec
    patterns = tuple(spec) if isinstance(spec, Iterable) else (spec,)
    if not all(isinstance(pat, str) for pat in patterns):
        raise ValueError(f"Invalid {what}: {spec!r}; the patterns must be strings (fnmatch patterns or names)")
    return patterns


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    exclude_from_weight_decay: str | Iterable[str] = "default",
    exclude_from_adaptation: str | Iterable[str] = "same",
    by_ndim: bool = True,
    lr_scale: dict[str, float] | None = None,
) -> list[dict]:
    """Split ``model``'s trainable parameters into groups with their own ``weight_decay`` and ``adapt``.

    Args:
        model: the module whose ``named_parameters()`` are grouped (frozen ones are left out).
        weight_decay: the decay of the parameters that are not excluded.
        exclude_from_weight_decay: "default" (ndim <= 1 if ``by_ndim``, DEFAULT_EXCLUDE_PATTERNS,
            the parameters of normalisation modules (:data:`NORM_MODULES`, whatever their names)
            and the names of ``model.no_weight_decay()``, also through ``torch.compile`` and DDP
            wrappers), "none", or an iterable of fnmatch patterns / exact names used instead.
        exclude_from_adaptation: "same" (the BERT/TF Addons practice: whatever is excluded from
            weight decay is also excluded from the trust ratio), "default", "none", or patterns.
        by_ndim: treat every parameter with ndim <= 1 as excluded under "default".
        lr_scale: optional {pattern: factor}; matching parameters get ``lr_scale`` in their group,
            honoured by :class:`largebatch.schedules` adapters.

    Returns:
        A list of param-group dicts (empty groups dropped), each with "params", "param_names",
        "weight_decay" and "adapt" (and "lr_scale" where given). torch optimizers ignore "adapt".
    """
    check_nonneg("weight_decay", weight_decay)
    model_names = _model_no_weight_decay(model) | _norm_parameter_names(model)

    def rule(spec, what: str):
        spec = exclusion_rule(spec, what)
        if spec == "default":
            return lambda n, p: is_excluded(n, p, by_ndim=by_ndim, names=model_names)
        if spec == "none":
            return lambda n, p: False
        return lambda n, p: is_excluded(n, p, by_ndim=False, patterns=spec, names=())

    no_decay = rule(exclude_from_weight_decay, "exclude_from_weight_decay")
    no_adapt = no_decay if exclude_from_adaptation == "same" else rule(exclude_from_adaptation, "exclude_from_adaptation")

    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0
        for pat, f in (lr_scale or {}).items():
            if fnmatch.fnmatchcase(name, pat):
                scale = f
        key = (no_decay(name, p), no_adapt(name, p), scale)
        if key not in groups:
            g = {"params": [], "param_names": [], "weight_decay": 0.0 if key[0] else weight_decay, "adapt": not key[1]}
            if lr_scale:
                g["lr_scale"] = scale
            groups[key] = g
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())
