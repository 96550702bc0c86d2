"""`largebatch train`: train a built-in task at any effective batch size."""

from __future__ import annotations

import argparse
import json
import sys

from largebatch.optim.registry import OPTIMIZERS
from largebatch.train.tasks import TASKS


# task options whose values are file or folder names: taken as written (a folder may be called 2024 or null)
_PATH_OPTIONS = {"data_dir"}


def _kv(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE decoded as JSON where it is JSON (numbers, true, lists), else as text;
    the values of path options stay text, and ``config`` is decoded only when it is a JSON object."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    if k in _PATH_OPTIONS:
        return k, v
    try:
        value = json.loads(v)
    except json.JSONDecodeError:
        return k, v
    return k, v if k == "config" and not isinstance(value, dict) else value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="mnist-lenet", choices=sorted(TASKS), help="built-in task")
    p.add_argument("--task-option", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="task option, e.g. seq_len=512 or data_dir=/data/cifar (repeatable)")
    p.add_argument("--optimizer", default="lamb", choices=list(OPTIMIZERS), help="optimizer by name")
    p.add_argument("--optimizer-option", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="optimizer option, e.g. bias_correction=false (JSON values)")
    p.add_argument("--batch-size", type=int, default=128, help="effective (global) batch size")
    p.add_argument("--micro-batch-size", type=int, default=None, help="per-rank micro-batch (default: auto)")
    p.add_argument("--max-micro-batch", type=int, default=1024, help="largest automatic micro-batch")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs: the budget is the same at every batch size")
    p.add_argument("--lr", type=float, default=None, help="peak LR at --batch-size (overrides the scaling rule)")
    p.add_argument("--base-lr", type=float, default=1e-3, help="peak LR at --base-batch")
    p.add_argument("--base-batch", type=int, default=None, help="batch at which --base-lr holds (default: --batch-size)")
    p.add_argument("--lr-rule", default="sqrt", choices=["sqrt", "linear", "none"], help="LR scaling rule")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="warmup epochs at --base-batch")
    p.add_argument("--warmup-rule", default="constant", choices=["constant", "linear"],
                   help="constant: same warmup epochs at any batch; linear: epochs grow with the batch (paper)")
    p.add_argument("--decay", default="poly", choices=["poly", "cosine", "constant", "step"], help="LR decay")
    p.add_argument("--power", type=float, default=1.0, help="polynomial decay power")
    p.add_argument("--decay-epochs", type=float, nargs="*", default=[], help="epochs of x0.1 steps (--decay step)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (biases/norms excluded)")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="global gradient-norm clipping (Lamb/Lars inside their step, torch optimizers by clip_grad_norm_)")
    p.add_argument("--exclude-from-adaptation", nargs="+", default=["same"], metavar="RULE",
                   help="parameters without the trust ratio (Lamb/Lars): same (those excluded from weight decay, "
                        "the default), default (biases and norms), none, or name patterns such as '*bias' '*norm*'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (and at the end)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp64"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--out-dir", default=None, help="folder for checkpoint.pt, metrics.jsonl, result.json")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (and at the end)")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue a run found in --out-dir")
    p.add_argument("--tensorboard", action="store_true", help="TensorBoard logs with per-layer trust ratios")
    p.add_argument("--log-every", type=int, default=10, help="log train loss every N steps")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (the schedule is unchanged)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _adaptation_rule(words: list[str]):
    """One of the named rules, given alone, or the list of patterns."""
    return words[0] if len(words) == 1 and words[0] in ("same", "default", "none") else list(words)


def config_from_args(args: argparse.Namespace):
    from largebatch.train.loop import TrainConfig

    return TrainConfig(
        task=args.task, task_options=dict(args.task_option), optimizer=args.optimizer,
        optimizer_options=dict(args.optimizer_option), batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, max_micro_batch=args.max_micro_batch, epochs=args.epochs,
        lr=args.lr, base_lr=args.base_lr, base_batch=args.base_batch, lr_rule=args.lr_rule,
        warmup_epochs=args.warmup_epochs, warmup_rule=args.warmup_rule, decay=args.decay, power=args.power,
        decay_epochs=tuple(args.decay_epochs), weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        exclude_from_adaptation=_adaptation_rule(args.exclude_from_adaptation),
        seed=args.seed, eval_every=args.eval_every, precision=args.precision, device=args.device,
        out_dir=args.out_dir, checkpoint_every=args.checkpoint_every, resume=not args.no_resume,
        tensorboard=args.tensorboard, log_every=args.log_every, max_steps=args.max_steps,
        progress=not args.no_progress,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from largebatch import distributed
    from largebatch.train.loop import fit

    try:
        result = fit(config_from_args(args))
    except (ValueError, OSError) as err:  # bad options, data or folders: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        # Under torchrun: a process that exits with its gloo group alive can abort in the group's
        # worker threads during interpreter shutdown ("terminate called without an active exception").
        distributed.cleanup()
    if result.world_size > 1 and not result.final:
        return 0  # non-main ranks print nothing
    final = ", ".join(f"{k} {v:.4f}" for k, v in result.final.items())
    print(
        f"{result.status}: {args.task} {args.optimizer} batch {args.batch_size} "
        f"(micro {result.micro_batch_size} x {result.accumulation} accumulation x {result.world_size} ranks), "
        f"peak lr {result.lr:.4g}, warmup {result.warmup_steps} steps, {result.steps}/{result.total_steps} steps, "
        f"{result.wall_time:.1f} s; eval: {final}"
    )
    return 0 if result.status != "diverged" else 1
