"""``largebatch schedule``: print and plot a large-batch recipe's learning-rate schedule.

Examples::

  largebatch schedule --recipe bert --batch-size 512 4096 32768 --plot schedule.png
  largebatch schedule --recipe goyal --batch-size 8192
  largebatch schedule --recipe bert-two-phase --phase-steps 7038 1563
  largebatch schedule --recipe custom --base-lr 1e-3 --base-batch 128 --warmup-epochs 1 \\
      --batch-size 8192 --dataset-size 60000 --epochs 10
"""

from __future__ import annotations

import argparse
import sys

from largebatch import schedules

RECIPES = ("bert", "goyal", "bert-two-phase", "custom")

# command-line option -> Recipe field (single-batch recipes).
RECIPE_FIELDS = {
    "base_lr": "base_lr",
    "base_batch": "base_batch",
    "rule": "rule",
    "warmup_epochs": "warmup_epochs",
    "warmup_ratio": "warmup_ratio",
    "warmup_rule": "warmup_rule",
    "decay": "decay",
    "power": "power",
    "end_value": "end_value",
    "decay_epochs": "decay_epochs",
    "decay_factor": "decay_factor",
    "decay_over": "decay_over",
    "warmup_offset": "warmup_offset",
    "warmup_from": "warmup_from",
    "drop_last": "drop_last",
}

# command-line option -> bert_two_phase argument.
TWO_PHASE_FIELDS = {
    "phase_lrs": "lrs",
    "phase_warmup_ratios": "warmup_ratios",
    "phase_steps": "num_steps",
    "power": "power",
    "end_value": "end_value",
    "decay_over": "decay_over",
    "warmup_offset": "warmup_offset",
    "drop_last": "drop_last",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", choices=RECIPES, default="bert",
                        help="preset to start from, or 'custom' (needs --base-lr, --base-batch)")
    parser.add_argument("--batch-size", type=int, nargs="+", metavar="B",
                        help="target batch size(s), overlaid in one plot "
                             "(default: the recipe's base batch size)")
    budget = parser.add_argument_group("training length (default: the recipe's)")
    budget.add_argument("--dataset-size", type=int, help="examples per epoch")
    budget.add_argument("--epochs", type=float, help="epochs, the same at every batch size")
    budget.add_argument("--total-steps", type=int,
                        help="updates; overrides --epochs (single-batch recipes)")
    recipe = parser.add_argument_group("recipe fields (override the preset's)")
    recipe.add_argument("--base-lr", type=float, help="peak lr at --base-batch")
    recipe.add_argument("--base-batch", type=int, help="batch size --base-lr is stated for")
    recipe.add_argument("--rule", choices=tuple(schedules.LR_RULES), help="lr scaling rule")
    recipe.add_argument("--warmup-epochs", type=float, help="warmup at the base batch, in epochs")
    recipe.add_argument("--warmup-ratio", type=float,
                        help="warmup at the base batch, as a fraction of the steps")
    recipe.add_argument("--warmup-rule", choices=tuple(schedules.WARMUP_RULES),
                        help="constant: same warmup epochs at every batch; linear: epochs grow "
                             "with the batch (same warmup steps)")
    recipe.add_argument("--decay", choices=schedules.DECAYS, help="decay after the warmup")
    recipe.add_argument("--power", type=float, help="polynomial decay exponent")
    recipe.add_argument("--end-value", type=float, help="final multiplier of poly/cosine decay")
    recipe.add_argument("--decay-epochs", type=float, nargs="+", help="step decay epochs")
    recipe.add_argument("--decay-factor", type=float, help="step decay factor")
    recipe.add_argument("--decay-over", choices=schedules.DECAY_OVER,
                        help="decay over the post-warmup steps or over all steps")
    recipe.add_argument("--warmup-offset", type=int, choices=(0, 1),
                        help="warmup multiplier (t + offset) / W at step t")
    recipe.add_argument("--warmup-from", choices=("zero", "base"), help="warmup start")
    recipe.add_argument("--drop-last", action="store_true", default=None,
                        help="steps per epoch = floor(N / B) instead of ceil(N / B)")
    two = parser.add_argument_group("bert-two-phase")
    two.add_argument("--phase-lrs", type=float, nargs=2, metavar=("LR1", "LR2"))
    two.add_argument("--phase-warmup-ratios", type=float, nargs=2, metavar=("R1", "R2"))
    two.add_argument("--phase-steps", type=int, nargs=2, metavar=("N1", "N2"),
                     help="explicit phase lengths instead of the ones computed from the epochs")
    out = parser.add_argument_group("output")
    out.add_argument("--steps", type=int, nargs="+", default=(), metavar="T",
                     help="also print the lr at these steps")
    out.add_argument("--plot", metavar="PNG", help="write a plot of the schedule(s) here")


def _overrides(args: argparse.Namespace, fields: dict[str, str]) -> dict:
    given = {}
    for option, name in fields.items():
        value = getattr(args, option, None)
        if value is not None:
            given[name] = tuple(value) if isinstance(value, list) else value
    return given


def _unused(args: argparse.Namespace, used: dict[str, str]) -> list[str]:
    every = set(RECIPE_FIELDS) | set(TWO_PHASE_FIELDS)
    return sorted(
        "--" + o.replace("_", "-") for o in every - set(used) if getattr(args, o, None) is not None
    )


# options that only some decays read
DECAY_OPTIONS = {"power": ("poly",), "end_value": ("poly", "cosine"), "decay_epochs": ("step",),
                 "decay_factor": ("step",)}


def _unused_by_decay(args: argparse.Namespace, decay: str | None) -> list[str]:
    return sorted(
        f"--{o.replace('_', '-')} (read by --decay {'/'.join(used)} only; this recipe decays with {decay!r})"
        for o, used in DECAY_OPTIONS.items()
        if decay is not None and decay not in used and getattr(args, o, None) is not None
    )


def _plot_path_error(path: str) -> str | None:
    """Why ``--plot path`` cannot be written as given (matplotlib would write ``path.png`` for a
    name without a suffix, beside a folder of that name), or None."""
    from pathlib import Path

    if Path(path).is_dir():
        return f"--plot {path} is a folder; give a file name such as {Path(path) / 'schedule.png'}"
    if not Path(path).suffix:
        return f"--plot {path} has no suffix; give a file name with the format as its suffix, such as {path}.png"
    return None


def run(args: argparse.Namespace) -> int:
    if args.plot and _plot_path_error(args.plot):
        print(f"error: {_plot_path_error(args.plot)}", file=sys.stderr)
        return 2
    try:
        if args.recipe == "bert-two-phase":
            fields = TWO_PHASE_FIELDS
            recipe = schedules.preset(args.recipe, **_overrides(args, fields))
            batch_sizes = args.batch_size or [None]
        else:
            fields = RECIPE_FIELDS
            given = _overrides(args, fields)
            if args.recipe == "custom":
                missing = [o for o in ("base_lr", "base_batch") if o not in given]
                if missing:
                    names = ", ".join("--" + m.replace("_", "-") for m in missing)
                    print(f"error: --recipe custom needs {names}", file=sys.stderr)
                    return 2
                recipe = schedules.Recipe(**given)
            else:
                recipe = schedules.preset(args.recipe, **given)
            batch_sizes = args.batch_size or [recipe.base_batch]
        unused = _unused(args, fields)
        unused += [o for o in _unused_by_decay(args, getattr(recipe, "decay", None)) if o.split(" ")[0] not in unused]
        if unused:
            print(f"error: --recipe {args.recipe} does not use {', '.join(unused)}",
                  file=sys.stderr)
            return 2
        plans = [
            recipe.resolve(
                batch_size=b,
                dataset_size=args.dataset_size,
                epochs=args.epochs,
                total_steps=args.total_steps,
            )
            for b in batch_sizes
        ]
        for plan in plans:
            print(plan.describe(steps=args.steps))
            print()
        if args.plot:
            try:
                schedules.plot_plans(plans, args.plot)
            except OSError as err:
                print(f"error: cannot write the plot {args.plot}: {err.strerror or err}", file=sys.stderr)
                return 2
            print(f"wrote {args.plot}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
