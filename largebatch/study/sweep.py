"""Sweeps: a grid of task x optimizer x batch size x learning rate (x weight decay, warmup) run
into a :class:`~largebatch.study.store.ResultStore`.

A sweep is a TOML file (or the same dict)::

    name = "mnist-scaling"
    task = "mnist-lenet"
    task_options = { train_subset = 8192 }
    epochs = 4                     # the same number of epochs at every batch size (paper protocol)
    base_batch = 32                # B0: base LRs and warmup are stated at this batch
    batch_sizes = [32, 256, 2048]
    seeds = [0]
    evals = 4                      # eval points per run (plus the final evaluation)
    target = { drop = 0.005 }      # "holds" = within 0.5 points of B0 (or { relative = 0.02 })

    [train]                        # TrainConfig fields shared by every run
    lr_rule = "sqrt"               # the recipe: sqrt LR scaling ...
    warmup_rule = "linear"         # ... and linear-epoch warmup (warmup steps fixed)
    warmup_epochs = 0.0125         # at base_batch
    decay = "poly"

    [noise]                        # optional: gradient noise scale at eval points
    labels = ["lamb"]              # in the runs of these optimizer labels ...
    batch_sizes = [32]             # ... at these batch sizes
    b_small = 32
    b_big = 512
    batches = 4

    [[optimizers]]
    name = "lamb"                  # a registry name (largebatch.optim.registry.OPTIMIZERS)
    lr = 0.01                      # untuned: this base LR, scaled to each batch by the recipe
    lrs = "paper-mnist"            # tuned: a grid (list or preset of largebatch.study.grids)
    grid = "scaled"                # grid values are base LRs scaled by lr_rule; "peak": used as is
    weight_decay = 0.01            # the untuned run's weight decay
    weight_decays = [0.0, 0.01]    # grid (default: [weight_decay])
    warmup_epochs = [0.0125]       # grid (default: the [train] value)
    grid_batch_sizes = [2048]      # grid points only at these batches (default: every batch)
    options = { bias_correction = false }   # optimizer options
    label = "lamb"                 # the name in tables (default: name)

Every run is keyed by the hash of its semantic configuration, so a run shared by two sweeps, or
asked for twice (an untuned run that is also a grid point), runs once. ``run_sweep`` skips runs
that are done (finished, diverged, failed) or that another live process executes now (a second
sweep of the same database; each run's folder is locked while it runs), resumes interrupted ones
from their checkpoint (``fit(resume=True)`` in the run's own folder), records exceptions as
"failed" with the traceback and non-finite losses as "diverged", and goes on. Runs execute in the
calling process (``workers=1``) or in a pool of spawned worker processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from largebatch.schedules import _finite_number, _int
from largebatch.study.grids import resolve_grid
from largebatch.study.store import DONE, ResultStore, code_version, environment, python_command, run_key

# TrainConfig fields that only say how a run executes, never what it computes.
EXECUTION_FIELDS = frozenset({
    "out_dir", "resume", "progress", "tensorboard", "log_every", "checkpoint_every", "eval_every", "device",
    "eval_batch_size", "micro_batch_size", "max_micro_batch", "record_trust_ratios",
})  # fmt: skip
# Always part of a run's key, even at their default values.
CORE_FIELDS = ("task", "task_options", "optimizer", "optimizer_options", "batch_size", "seed", "epochs", "lr",
               "base_lr", "base_batch", "weight_decay")  # fmt: skip

_TOP_KEYS = {"name", "description", "notes", "task", "task_options", "epochs", "base_batch", "batch_sizes", "seeds",
             "evals", "log_points", "target", "train", "noise", "optimizers"}  # fmt: skip
_OPT_KEYS = {"name", "label", "lr", "lrs", "grid", "weight_decay", "weight_decays", "warmup_epochs", "options", "train",
             "batch_sizes", "grid_batch_sizes"}  # fmt: skip
_NOISE_KEYS = {"labels", "batch_sizes", "b_small", "b_big", "batches", "untuned_only"}


def _ints(name: str, value: Any, minimum: int, empty: bool = False) -> tuple[int, ...]:
    """A list of integers >= ``minimum`` (a TOML float such as 32.5 or a bool is refused, not cast)."""
    try:
        if not isinstance(value, (list, tuple)):
            raise ValueError
        value = [_int(name, v, minimum) for v in value]
    except ValueError:
        raise ValueError(f"{name} must be a list of integers >= {minimum}, got {value!r}") from None
    if not value and not empty:
        raise ValueError(f"{name} must not be empty")
    return tuple(value)


def _number(name: str, value: Any, minimum: float = 0.0, positive: bool = False) -> float:
    """A finite number >= ``minimum`` (> 0 with ``positive``); strings and bools are refused."""
    if not _finite_number(value, low=minimum, low_open=positive):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else f'>= {minimum:g}'}, got {value!r}")
    return float(value)


def _check_keys(d: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in {where}; allowed: {', '.join(sorted(allowed))}")


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of a sweep: an untuned base LR and/or a tuning grid."""

    name: str
    label: str
    lr: float | None = None
    lrs: tuple[float, ...] = ()
    grid: str = "scaled"
    weight_decay: float | None = None
    weight_decays: tuple[float, ...] = ()
    warmup_epochs: tuple[float, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    batch_sizes: tuple[int, ...] = ()
    grid_batch_sizes: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OptimizerSpec":
        _check_keys(d, _OPT_KEYS, "[[optimizers]]")
        if "name" not in d:
            raise ValueError("every [[optimizers]] entry needs a name (a registry name such as 'lamb')")
        if "lr" not in d and "lrs" not in d:
            raise ValueError(f"optimizer {d['name']!r} needs lr (untuned base LR) or lrs (a grid), or both")
        grid = d.get("grid", "scaled")
        if grid not in ("scaled", "peak"):
            raise ValueError(f"unknown grid mode {grid!r} for {d['name']!r}; allowed: 'scaled', 'peak'")
        where = f"[[optimizers]] {d['name']!r}"
        for table in ("options", "train"):
            if not isinstance(d.get(table, {}), dict):
                raise ValueError(f"{table} of {where} must be a table, got {d[table]!r}")
        lrs = resolve_grid(d["lrs"], "lrs") if "lrs" in d else ()
        if any(v <= 0 for v in lrs):
            raise ValueError(f"lrs of {where} must be > 0, got {d['lrs']!r}")
        return cls(
            name=d["name"],
            label=str(d.get("label", d["name"])),
            lr=None if d.get("lr") is None else _number(f"lr of {where}", d["lr"], positive=True),
            lrs=lrs,
            grid=grid,
            weight_decay=None if d.get("weight_decay") is None else _number(f"weight_decay of {where}", d["weight_decay"]),
            weight_decays=resolve_grid(d["weight_decays"], "weight_decays") if "weight_decays" in d else (),
            warmup_epochs=resolve_grid(d["warmup_epochs"], "warmup_epochs") if "warmup_epochs" in d else (),
            options=dict(d.get("options", {})),
            train=dict(d.get("train", {})),
            batch_sizes=_ints(f"batch_sizes of {where}", d.get("batch_sizes", []), 1, empty=True),
            grid_batch_sizes=_ints(f"grid_batch_sizes of {where}", d.get("grid_batch_sizes", []), 1, empty=True),
        )


@dataclass(frozen=True)
class NoiseSpec:
    """Where and how to measure the gradient noise scale (see :mod:`largebatch.study.noise`)."""

    labels: tuple[str, ...] = ()
    batch_sizes: tuple[int, ...] = ()
    b_small: int = 32
    b_big: int = 512
    batches: int = 4
    untuned_only: bool = True  # for an optimizer with an untuned LR, probe only that run (not the grid)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NoiseSpec":
        if not isinstance(d, dict):
            raise ValueError(f"[noise] must be a table, got {d!r}")
        _check_keys(d, _NOISE_KEYS, "[noise]")
        labels = d.get("labels", [])
        if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels):
            raise ValueError(f"[noise] labels must be a list of optimizer labels (strings), got {labels!r}")
        untuned_only = d.get("untuned_only", True)
        if not isinstance(untuned_only, bool):  # bool("false") would be True
            raise ValueError(f"[noise] untuned_only must be true or false (a TOML boolean, unquoted), got {untuned_only!r}")
        spec = cls(tuple(labels), _ints("[noise] batch_sizes", d.get("batch_sizes", []), 1, empty=True),
                   _int("[noise] b_small", d.get("b_small", 32), 1), _int("[noise] b_big", d.get("b_big", 512), 1),
                   _int("[noise] batches", d.get("batches", 4), 1), untuned_only)  # fmt: skip
        if spec.b_big % spec.b_small or spec.b_big <= spec.b_small:
            raise ValueError(f"[noise] b_big ({spec.b_big}) must be a multiple of b_small ({spec.b_small}) and larger")
        return spec

    def applies(self, label: str, batch_size: int, tag: str, has_untuned: bool) -> bool:
        if self.untuned_only and has_untuned and tag != "untuned":
            return False
        return (not self.labels or label in self.labels) and (not self.batch_sizes or batch_size in self.batch_sizes)


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its key, label, tags and specification (what ``execute_run`` needs)."""

    key: str
    label: str
    tags: tuple[str, ...]
    spec: dict[str, Any]


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep configuration (see the module docstring for the TOML layout)."""

    name: str
    task: str
    batch_sizes: tuple[int, ...]
    optimizers: tuple[OptimizerSpec, ...]
    base_batch: int
    epochs: float = 1.0
    task_options: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    evals: int = 4
    log_points: int = 40
    target: dict[str, float] = field(default_factory=lambda: {"drop": 0.005})
    train: dict[str, Any] = field(default_factory=dict)
    noise: NoiseSpec | None = None
    description: str = ""
    notes: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepSpec":
        _check_keys(d, _TOP_KEYS, "the sweep config")
        for k in ("name", "task", "batch_sizes", "optimizers"):
            if k not in d:
                raise ValueError(f"the sweep config needs {k!r}")
        if not isinstance(d["name"], str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", d["name"]):
            # the name becomes a file name (runs/NAME.sqlite, NAME-*.png): nothing that leaves its folder
            raise ValueError(f"name must be letters, digits, '.', '_' or '-' (not first), got {d['name']!r}")
        batch_sizes = _ints("batch_sizes", d["batch_sizes"], 1)
        if not isinstance(d["optimizers"], list) or not d["optimizers"] or not all(isinstance(o, dict) for o in d["optimizers"]):
            raise ValueError(f"optimizers must be a non-empty list of [[optimizers]] tables, got {d['optimizers']!r}")
        for table in ("train", "task_options"):
            if not isinstance(d.get(table, {}), dict):
                raise ValueError(f"{table} must be a table, got {d[table]!r}")
        target = dict(d.get("target", {"drop": 0.005}))
        if set(target) - {"drop", "relative"} or len(target) != 1:
            raise ValueError(f"target must be {{ drop = X }} or {{ relative = X }}, got {target!r}")
        for k, v in target.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"target {k} must be a number in [0, 1) (a drop in metric units or a fraction), got {v!r}")
        from largebatch.train.loop import TrainConfig

        known = {f.name for f in dataclasses.fields(TrainConfig)}
        for where, t in [("[train]", d.get("train", {}))] + [(f"[[optimizers]] {o.get('name')} train", o.get("train", {}))
                                                             for o in d["optimizers"]]:  # fmt: skip
            unknown = sorted(set(t) - known)
            if unknown:
                raise ValueError(f"unknown training option(s) {', '.join(unknown)} in {where}; valid: {', '.join(sorted(known))}")
        optimizers = tuple(OptimizerSpec.from_dict(o) for o in d["optimizers"])
        labels = [o.label for o in optimizers]
        if len(set(labels)) != len(labels):
            raise ValueError(f"optimizer labels must be unique, got {labels}; set label = '...' to tell them apart")
        for o in optimizers:
            for field_name in ("batch_sizes", "grid_batch_sizes"):
                values = getattr(o, field_name)
                if values and not set(values) & set(batch_sizes):
                    raise ValueError(f"{field_name} {list(values)} of {o.label!r} share no batch size with batch_sizes "
                                     f"{list(batch_sizes)}: those runs would never be planned")  # fmt: skip
        noise = NoiseSpec.from_dict(d["noise"]) if "noise" in d else None
        unknown = sorted(set(noise.labels) - set(labels)) if noise else []
        if unknown:
            raise ValueError(f"[noise] labels {unknown} are not optimizer labels of this sweep: {labels}")
        return cls(
            name=str(d["name"]),
            task=str(d["task"]),
            batch_sizes=batch_sizes,
            optimizers=optimizers,
            base_batch=_int("base_batch", d.get("base_batch", min(batch_sizes)), 1),
            epochs=_number("epochs", d.get("epochs", 1.0), positive=True),
            task_options=dict(d.get("task_options", {})),
            seeds=_ints("seeds", d.get("seeds", [0]), 0),
            evals=_int("evals", d.get("evals", 4), 0),
            log_points=_int("log_points", d.get("log_points", 40), 1),
            target=target,
            train=dict(d.get("train", {})),
            noise=noise,
            description=str(d.get("description", "")),
            notes=str(d.get("notes", "")),
            raw=d,
        )

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "SweepSpec":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]

        with open(path, "rb") as f:
            return cls.from_dict(tomllib.load(f))

    def expand(self) -> list[PlannedRun]:
        """Every run of the sweep, in a stable order (batch size, seed, optimizer, grid point)."""
        from largebatch.train.loop import TrainConfig

        from largebatch.train.tasks import TASKS

        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; valid tasks: {', '.join(sorted(TASKS))}")
        runs: dict[tuple[str, str], PlannedRun] = {}
        defaults = TrainConfig()
        for batch in self.batch_sizes:
            for seed in self.seeds:
                for opt in self.optimizers:
                    if opt.batch_sizes and batch not in opt.batch_sizes:
                        continue
                    train = {**self.train, **opt.train}
                    wd0 = opt.weight_decay if opt.weight_decay is not None else float(train.get("weight_decay", 0.0))
                    wu0 = float(train.get("warmup_epochs", 0.0))
                    points: list[tuple[str, dict[str, Any]]] = []
                    if opt.lr is not None:
                        points.append(("untuned", {"base_lr": opt.lr, "lr": None, "weight_decay": wd0, "warmup_epochs": wu0}))
                    grid_here = not opt.grid_batch_sizes or batch in opt.grid_batch_sizes
                    for lr in opt.lrs if grid_here else ():
                        for wd in opt.weight_decays or (wd0,):
                            for wu in opt.warmup_epochs or (wu0,):
                                lr_fields = {"base_lr": lr, "lr": None} if opt.grid == "scaled" else {"base_lr": lr, "lr": lr}
                                points.append(("grid", {**lr_fields, "weight_decay": wd, "warmup_epochs": wu}))
                    untuned_semantic = None
                    for tag, point in points:
                        cfg = {**train, "task": self.task, "task_options": dict(self.task_options),
                               "optimizer": opt.name, "optimizer_options": dict(opt.options), "batch_size": batch,
                               "base_batch": self.base_batch, "epochs": self.epochs, "seed": seed, **point}  # fmt: skip
                        try:  # every run's configuration is checked before anything runs
                            full = TrainConfig.from_dict(cfg)
                            full.validate()
                        except (TypeError, ValueError) as err:
                            raise ValueError(f"{opt.label} at batch {batch} ({tag}): {err}") from None
                        config = {k: v for k, v in full.to_dict().items() if k not in EXECUTION_FIELDS}
                        semantic = {k: v for k, v in config.items() if k in CORE_FIELDS or v != getattr(defaults, k)
                                    and not (isinstance(v, list) and tuple(v) == getattr(defaults, k))}  # fmt: skip
                        if tag == "untuned":
                            untuned_semantic = semantic
                        # a grid point equal to the untuned run is that run (probe included)
                        as_tag = "untuned" if semantic == untuned_semantic else tag
                        probe = self.noise and self.noise.applies(opt.label, batch, as_tag, opt.lr is not None)
                        noise = dataclasses.asdict(self.noise) if probe else None
                        if noise:
                            noise = {k: noise[k] for k in ("b_small", "b_big", "batches")}
                        key = run_key({"config": semantic, "evals": self.evals, "noise": noise})
                        spec = {"config": config, "evals": self.evals, "log_points": self.log_points, "noise": noise}
                        prev = runs.get((key, opt.label))
                        tags = tuple(sorted(set(prev.tags if prev else ()) | {tag}))
                        runs[(key, opt.label)] = PlannedRun(key, opt.label, tags, spec)
        return list(runs.values())


# ---------------------------------------------------------------------------------------------
# Executing one run (in this process or in a worker)

_TASKS: dict[str, Any] = {}  # the task of the last run in this process, by (name, options)
_INITIAL_LOSS: dict[tuple[str, int], float] = {}

# A finished run whose final eval loss exceeds this multiple of its initial eval loss is recorded
# as "diverged" (it blew up and landed somewhere worse than where it started; a loss that became
# non-finite is caught by the training loop itself).
DIVERGE_FACTOR = 2.0


def initial_loss(task, task_key: str, seed: int) -> float:
    """The eval loss of the model ``fit`` starts from (same seed), computed once per process."""
    import torch

    if (task_key, seed) not in _INITIAL_LOSS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = task.build_model()
        _INITIAL_LOSS[(task_key, seed)] = float(task.evaluate(model)["loss"])
    return _INITIAL_LOSS[(task_key, seed)]


def total_steps(epochs: float, dataset_size: int, batch_size: int) -> int:
    """The number of updates of ``epochs`` epochs at ``batch_size`` (as the training loop plans it)."""
    from largebatch.schedules import steps_per_epoch

    return max(1, int(math.floor(epochs * steps_per_epoch(dataset_size, batch_size) + 0.5)))


def execute_run(spec: dict[str, Any], out_dir: str, progress: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Run one sweep run in ``out_dir`` (resuming its checkpoint) and return what the store keeps.

    Never raises for a run's own failure: an exception becomes ``status="failed"`` with its
    traceback; a non-finite loss becomes ``status="diverged"``.
    """
    import torch

    from largebatch.study.noise import NoiseProbe
    from largebatch.train.checkpoint import load_checkpoint
    from largebatch.train.loop import TrainConfig, fit
    from largebatch.train.tasks import get_task

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    outcome: dict[str, Any] = {"environment": environment(), "code_version": code_version()}
    try:
        cfg = dict(spec["config"])
        tkey = f"{cfg['task']}|{sorted(cfg['task_options'].items())!r}"
        if tkey not in _TASKS:
            _TASKS.clear()  # one task in memory at a time
            _INITIAL_LOSS.clear()
            _TASKS[tkey] = get_task(cfg["task"], **cfg["task_options"])
        task = _TASKS[tkey]
        outcome["metric"] = task.metric
        total = total_steps(cfg["epochs"], task.num_examples("train"), cfg["batch_size"])
        evals = int(spec.get("evals") or 0)
        eval_every = max(1, math.ceil(total / evals)) if evals else 0
        config = TrainConfig.from_dict({
            **cfg, "out_dir": out_dir, "resume": True, "progress": progress, "record_trust_ratios": True,
            "eval_every": eval_every, "checkpoint_every": eval_every or max(1, total // 4),
            "log_every": max(1, total // max(1, int(spec.get("log_points") or 40))),
        })  # fmt: skip
        ckpt, saved = Path(out_dir) / "checkpoint.pt", Path(out_dir) / "result.json"
        if ckpt.exists() and not (saved.exists() and json.loads(saved.read_text()).get("status") == "finished"):
            outcome["resumed_from"] = int(load_checkpoint(ckpt)["step"])
        if spec.get("noise"):
            task = NoiseProbe(task, **spec["noise"], seed=cfg["seed"])
        result = fit(config, task)
        status = result.status
        loss = result.final.get("loss")
        if status == "finished":
            start = initial_loss(_TASKS[tkey], tkey, cfg["seed"])
            outcome["initial_loss"] = start
            if loss is None or not math.isfinite(loss) or loss > DIVERGE_FACTOR * start:
                status = "diverged"
        final = {**result.final, **({"initial_loss": outcome["initial_loss"]} if "initial_loss" in outcome else {})}
        outcome.update(status=status, final=final, history=result.history, steps=result.steps,
                       total_steps=result.total_steps, warmup_steps=result.warmup_steps, lr=result.lr,
                       wall_time=result.wall_time)  # fmt: skip
    except Exception:  # a run's own failure is data, not a reason to stop the sweep
        outcome.update(status="failed", error=traceback.format_exc())
    finally:
        torch.set_num_threads(previous_threads)  # this process may go on with other work
    return outcome


# ---------------------------------------------------------------------------------------------
# The sweep


@dataclass
class SweepSummary:
    name: str
    planned: int
    skipped: int
    executed: int
    statuses: dict[str, int]
    wall_time: float
    db: str
    busy: int = 0  # runs left alone because another live process was executing them
    dropped: int = 0  # memberships of runs the sweep's current config no longer asks for


def run_dir(runs_dir: str | os.PathLike, run: PlannedRun) -> str:
    cfg = run.spec["config"]
    return str(Path(runs_dir) / f"{cfg['optimizer']}-b{cfg['batch_size']}-{run.key}")


def _lock_run(out: str):
    """An exclusive lock on the run folder ``out`` (an open file), or None when another process
    holds it, i.e. executes that run now (a second sweep of the same database). The operating
    system drops the lock when its holder dies, even by SIGKILL, so a killed run can be resumed."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        return open(os.devnull)
    Path(out).mkdir(parents=True, exist_ok=True)
    f = open(Path(out) / ".sweep.lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _die_with_parent() -> None:
    """Worker initialiser: on Linux the worker gets SIGTERM when the sweep process dies (even by
    SIGKILL), instead of training on into results nobody records."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:  # pragma: no cover - no libc of that name
            return
        if os.getppid() == 1:  # the parent died before the request: stop now
            os._exit(1)


def run_sweep(
    spec: SweepSpec,
    db: str | os.PathLike,
    runs_dir: str | os.PathLike | None = None,
    workers: int = 1,
    threads: int | None = None,
    progress: bool = True,
    retry_failed: bool = False,
    command: str | None = None,
    only: tuple[str, ...] = (),
) -> SweepSummary:
    """Run every run of ``spec`` that is not done yet into the database ``db``.

    Args:
        runs_dir: where each run's folder (checkpoint, metrics.jsonl, result.json) goes; default
            ``<db without suffix>-runs`` beside the database.
        workers: 1 runs in this process; N > 1 in N spawned processes.
        threads: torch threads per run (default: unchanged for workers=1, else cpus // workers).
        retry_failed: also re-run runs recorded as failed.
        command: the command line to record (default: this process's).
        only: run only these optimizer labels (all when empty); the sweep still lists the
            other labels' runs of its current config (as pending when they never ran).
    """
    t0 = time.perf_counter()
    db = Path(db)
    runs_dir = Path(runs_dir) if runs_dir else db.with_name(db.stem + "-runs")
    every = spec.expand()
    planned = [r for r in every if not only or r.label in only]
    store = ResultStore(db)
    store.save_sweep(spec.name, spec.raw or {"name": spec.name})
    # The sweep's memberships follow its current config for every label, also under ``only``
    # (the runs of the other labels are registered, not executed), so that a report never shows
    # another config's runs under this one.
    for r in every:
        store.register(spec.name, r.key, r.label, r.tags, r.spec)
    dropped = store.prune_members(spec.name, {(r.key, r.label) for r in every})
    skip_status = set(DONE) - ({"failed"} if retry_failed else set())
    todo: dict[str, PlannedRun] = {}
    for r in planned:
        if store.status(r.key) not in skip_status and r.key not in todo:
            todo[r.key] = r
    invocation = store.begin_invocation(spec.name, command or python_command())
    executed = 0
    busy = 0
    locks: dict[str, Any] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"sweep {spec.name}", unit="run", dynamic_ncols=True)

    def claim(key: str, out: str) -> bool:
        """Lock the run's folder and mark the run running, unless another process executes it or
        finished it since the statuses above were read."""
        nonlocal busy
        lock = _lock_run(out)
        if lock is None:
            busy += 1
        elif store.status(key) in skip_status:
            lock.close()
        else:
            locks[key] = lock
            store.mark_running(key, out)
            return True
        if bar:
            bar.update(1)
        return False

    def done(key: str, outcome: dict[str, Any]) -> None:
        nonlocal executed
        try:
            store.record(key, outcome)
        finally:
            locks.pop(key).close()
        executed += 1
        store.end_invocation(invocation, executed)  # progress so far, kept if this process is killed
        if bar:
            final = outcome.get("final") or {}
            metric = final.get(outcome.get("metric") or "accuracy")
            bar.set_postfix_str(f"{todo[key].label} B={todo[key].spec['config']['batch_size']}: {outcome['status']}"
                                + (f" {metric:.4f}" if isinstance(metric, float) and math.isfinite(metric) else ""))  # fmt: skip
            bar.update(1)

    try:
        if workers <= 1:
            for key, r in todo.items():
                out = run_dir(runs_dir, r)
                if claim(key, out):
                    done(key, execute_run(r.spec, out, progress=progress and bar is not None, threads=threads))
        else:
            per_worker = threads or max(1, (os.cpu_count() or 1) // workers)
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_die_with_parent) as pool:
                pending = {}
                queue = iter(todo.items())

                def submit() -> None:
                    # one run per free worker: a run is marked running (attempts, start time)
                    # when it starts, not while it waits in the pool's queue
                    for key, r in queue:
                        out = run_dir(runs_dir, r)
                        if not claim(key, out):
                            continue
                        try:
                            pending[pool.submit(execute_run, r.spec, out, False, per_worker)] = key
                        except Exception:  # the pool broke (a worker process died)
                            done(key, {"status": "failed", "error": traceback.format_exc()})
                            continue
                        if len(pending) >= workers:
                            return

                submit()
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        key = pending.pop(fut)
                        try:
                            outcome = fut.result()
                        except Exception:  # the worker process itself died
                            outcome = {"status": "failed", "error": traceback.format_exc()}
                        done(key, outcome)
                    submit()
    finally:
        for lock in locks.values():
            lock.close()
        if bar:
            bar.close()
        store.end_invocation(invocation, executed)
        statuses = store.counts(spec.name)
        store.close()
    return SweepSummary(spec.name, len({r.key for r in planned}), len({r.key for r in planned}) - len(todo), executed,
                        statuses, time.perf_counter() - t0, str(db), busy, dropped)  # fmt: skip
