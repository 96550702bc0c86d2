"""The training loop: any effective batch size, same-epochs budgeting, exact accumulation, resume.

effective batch = micro-batch x accumulation steps x world size. The loop owns the data order: the
examples of epoch ``e`` are ``randperm(n)`` drawn from a generator seeded by (seed, e), global step
``s`` takes the ``s``-th slice of ``batch_size`` examples of its epoch, each rank takes its
contiguous share of that slice, and the share is cut into micro-batches. The objective of a step
is sum(loss_sum) / sum(weight) over the whole effective batch, so gradient accumulation and data
parallelism give the gradient of one big batch (exactly, for tasks without batch statistics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from largebatch import distributed
from largebatch.optim import create_optimizer, param_groups
from largebatch.optim.groups import exclusion_rule
from largebatch.optim.registry import OPTIMIZERS, check_optimizer_options
from largebatch.schedules import Recipe, ScheduleLR, _finite_number
from largebatch.train.checkpoint import CheckpointError, atomic_write_bytes, atomic_write_json, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from largebatch.train.task import Task

PRECISIONS = ("fp32", "bf16", "fp64")


@dataclass
class TrainConfig:
    """Everything that defines a run. Plain values only, so it is stored in checkpoints and databases.

    Learning rate: ``lr`` is the peak LR at ``batch_size``; when it is None, the recipe scales
    ``base_lr`` from ``base_batch`` to ``batch_size`` with ``lr_rule`` ("sqrt", "linear", "none").
    Warmup: ``warmup_epochs`` at ``base_batch``, scaled to ``batch_size`` by ``warmup_rule``
    ("constant": same epochs at any batch; "linear": epochs grow with the batch, the paper's
    linear-epoch warmup, i.e. the same number of warmup steps). Decay: "poly" (power ``power``),
    "cosine", "constant" or "step" (x``decay_factor`` at ``decay_epochs``).
    Batch: ``batch_size`` is the effective (global) batch; each rank's share is cut into
    micro-batches of ``micro_batch_size``, or, when that is None, of min(share, ``max_micro_batch``)
    halved until a step fits in memory; the number of accumulation steps follows.
    """

    task: str = "mnist-lenet"
    task_options: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "lamb"
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 128
    micro_batch_size: int | None = None
    max_micro_batch: int = 1024
    epochs: float = 1.0
    lr: float | None = None
    base_lr: float = 1e-3
    base_batch: int | None = None
    lr_rule: str = "sqrt"
    warmup_epochs: float = 0.0
    warmup_rule: str = "constant"
    decay: str = "poly"
    power: float = 1.0
    decay_epochs: tuple[float, ...] = ()
    decay_factor: float = 0.1
    weight_decay: float = 0.0
    exclude_from_adaptation: str = "same"
    max_grad_norm: float | None = None
    seed: int = 0
    eval_every: int = 0
    eval_batch_size: int = 1024
    precision: str = "fp32"
    device: str = "auto"
    out_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = True
    tensorboard: bool = False
    log_every: int = 10
    progress: bool = True
    max_steps: int | None = None
    diverge_patience: int = 3
    record_trust_ratios: bool = False  # add {layer name: trust ratio} of the last step to train log records

    def validate(self) -> None:
        check_optimizer_options(self.optimizer, self.optimizer_options)  # before any data is loaded
        exclusion_rule(self.exclude_from_adaptation, "exclude_from_adaptation")  # param_groups' own check
        if self.max_grad_norm is not None and "max_grad_norm" in self.optimizer_options:
            raise ValueError(
                f"max_grad_norm is given twice (max_grad_norm={self.max_grad_norm!r} and the optimizer option "
                f"max_grad_norm={self.optimizer_options['max_grad_norm']!r}); give it once (--max-grad-norm)"
            )
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"Invalid batch_size: {self.batch_size!r}; it must be a positive integer")
        if self.micro_batch_size is not None and (not isinstance(self.micro_batch_size, int) or self.micro_batch_size <= 0):
            raise ValueError(f"Invalid micro_batch_size: {self.micro_batch_size!r}; it must be None (auto) or a positive integer")
        for name in ("max_micro_batch", "diverge_patience"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Invalid {name}: {v!r}; it must be a positive integer")
        if not self.epochs > 0:
            raise ValueError(f"Invalid epochs: {self.epochs!r}; it must be > 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"Invalid precision: {self.precision!r}; allowed values are {', '.join(PRECISIONS)}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or isinstance(self.max_steps, bool) or self.max_steps < 1):
            raise ValueError(f"Invalid max_steps: {self.max_steps!r}; it must be None (train to the end) or an integer >= 1")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**31:
            # seed * 1_000_003 + step seeds the data order: kept well inside a 64-bit generator seed
            raise ValueError(f"Invalid seed: {self.seed!r}; it must be an integer in [0, 2**31 - 1]")
        if not isinstance(self.eval_batch_size, int) or isinstance(self.eval_batch_size, bool) or self.eval_batch_size < 1:
            # checked here: the final evaluation comes after the last step, before the last checkpoint
            raise ValueError(f"Invalid eval_batch_size: {self.eval_batch_size!r}; it must be a positive integer")
        for name in ("eval_every", "checkpoint_every", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"Invalid {name}: {v!r}; it must be an integer >= 0 (0 = off)")
        if self.lr is not None and not _finite_number(self.lr, low=0, low_open=True):
            raise ValueError(f"Invalid lr: {self.lr!r}; it must be a finite number > 0, or None (derived from base_lr by the recipe)")
        if self.base_batch is not None and (not isinstance(self.base_batch, int) or isinstance(self.base_batch, bool) or self.base_batch < 1):
            raise ValueError(f"Invalid base_batch: {self.base_batch!r}; it must be None (= batch_size) or a positive integer")
        if self.max_grad_norm is not None and not _finite_number(self.max_grad_norm, low=0, low_open=True):
            raise ValueError(f"Invalid max_grad_norm: {self.max_grad_norm!r}; it must be None (no clipping) or a finite number > 0")
        if not _finite_number(self.base_lr, low=0, low_open=True):
            raise ValueError(f"Invalid base_lr: {self.base_lr!r}; it must be a finite number > 0")
        if not _finite_number(self.weight_decay, low=0):
            raise ValueError(f"Invalid weight_decay: {self.weight_decay!r}; it must be a finite number >= 0")
        self.recipe()  # rule, warmup, decay: checked by the recipe itself, before any data is loaded
        from largebatch.train.tasks import _BUILTIN, task_options

        unknown = sorted(set(self.task_options) - set(task_options(self.task))) if self.task in _BUILTIN else []
        if unknown:  # a task built here (not passed to fit) is checked when it is built
            raise ValueError(f"unknown option(s) {', '.join(unknown)} for task {self.task!r}; valid options: {', '.join(task_options(self.task))}")

    def recipe(self) -> Recipe:
        """The LR recipe of this run: peak lr, warmup and decay for any batch size."""
        return Recipe(
            base_lr=self.lr if self.lr is not None else self.base_lr,
            base_batch=self.base_batch or self.batch_size,
            rule="none" if self.lr is not None else self.lr_rule,  # a given lr is used as it is
            warmup_epochs=self.warmup_epochs,
            warmup_rule=self.warmup_rule,
            decay=self.decay,
            power=self.power,
            decay_epochs=tuple(self.decay_epochs),
            decay_factor=self.decay_factor,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decay_epochs"] = list(self.decay_epochs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(known))}")
        d = dict(d)
        if "decay_epochs" in d:
            d["decay_epochs"] = tuple(d["decay_epochs"])
        return cls(**d)


# Options that do not change the numbers a run produces (so a run may be resumed under new ones).
_NON_SEMANTIC = {"out_dir", "resume", "progress", "tensorboard", "log_every", "checkpoint_every", "eval_every",
                 "max_steps", "device", "eval_batch_size", "micro_batch_size", "max_micro_batch", "record_trust_ratios"}  # fmt: skip
_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "rng", "step", "history", "wall_time", "config")


@dataclass
class TrainResult:
    status: str  # "finished", "diverged" or "stopped" (max_steps reached)
    steps: int
    total_steps: int
    final: dict[str, float]
    history: list[dict[str, Any]]
    wall_time: float
    lr: float
    warmup_steps: int
    accumulation: int
    micro_batch_size: int
    world_size: int
    config: dict[str, Any]
    skipped_group_steps: int = 0  # (parameter group, step) pairs skipped for non-finite gradients (Lamb, Lars)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(name)


def check_device(name: str) -> torch.device:
    """``torch.device(name)`` if this machine has it, else a ValueError that says what it has."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"Invalid device {name!r}: {err}; e.g. auto, cpu, cuda, cuda:1") from None
    if device.type in ("cpu", "meta"):
        return device
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu ...
    if backend is None or not hasattr(backend, "is_available"):
        return device  # a backend torch does not describe (an out-of-tree plugin): its own errors apply
    available = backend.is_available()
    count = backend.device_count() if available and hasattr(backend, "device_count") else 0
    if not available or (device.index is not None and hasattr(backend, "device_count") and device.index >= count):
        have = f"{count} {device.type} device(s)" if available else f"no {device.type} device"
        raise ValueError(f"Invalid device {name!r}: this machine has {have} (torch {torch.__version__}); use auto or cpu")
    return device


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The example order of one epoch: a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for augmentation/masking of one step, handed to every micro-batch on every rank
    (resumable: a pure function). Tasks draw per example from it (``task.example_generators``), so
    a step's data do not depend on the micro-batch size or the number of ranks."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def model_seed(seed: int, step: int, rank: int) -> int:
    """The global RNG seed of one step on one rank (dropout masks): a pure function, not the
    stream of ``step_generator``."""
    return (((seed * 1_000_003 + step) * 4099 + rank) % (1 << 62)) | (1 << 62)  # bit 62: never a step_generator seed


def plan_micro_batches(per_rank: int, micro_batch_size: int | None, max_micro_batch: int) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) for one rank's share of the effective batch."""
    micro = micro_batch_size or min(per_rank, max_micro_batch)
    micro = min(micro, per_rank)
    return micro, math.ceil(per_rank / micro)


def fit(config: TrainConfig, task: Task | None = None, model: nn.Module | None = None) -> TrainResult:
    """Train ``task`` (a built-in task by ``config.task`` if None) under ``config``.

    With ``config.out_dir`` set, the run writes ``checkpoint.pt`` (atomically), ``metrics.jsonl``
    and ``result.json`` there, and resumes from the checkpoint when ``config.resume`` is True. A
    finished run in ``out_dir`` is returned as it is, never overwritten.

    Under torchrun it initialises the default process group (or reuses one); call
    :func:`largebatch.distributed.cleanup` before the process exits, as ``largebatch train`` does.
    """
    config.validate()
    if config.device != "auto":
        check_device(config.device)
    # torchrun's environment -> DDP (gloo on CPU, nccl on cuda:LOCAL_RANK); otherwise one process
    dist = distributed.init_from_env(device=None if config.device == "auto" else config.device)
    device = dist.device
    if task is None:
        from largebatch.train.tasks import get_task

        task = get_task(config.task, **config.task_options)
    n_train = task.num_examples("train")
    if config.batch_size > n_train:
        raise ValueError(
            f"Invalid batch_size {config.batch_size}: it is larger than the {n_train} training examples of "
            f"task {config.task!r}; allowed: 1 .. {n_train}"
        )
    if config.batch_size < dist.world_size:
        raise ValueError(f"Invalid batch_size {config.batch_size}: fewer examples than the {dist.world_size} ranks")

    out_dir = Path(config.out_dir) if config.out_dir else None
    ckpt_path = out_dir / "checkpoint.pt" if out_dir else None
    if out_dir and out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"Invalid out_dir {str(out_dir)!r}: it is a file, not a folder")
    if out_dir and not config.resume and (ckpt_path.exists() or (out_dir / "result.json").exists()):
        raise FileExistsError(
            f"{out_dir} already holds a run (checkpoint.pt/result.json); continue it with resume=True "
            f"(the CLI: leave out --no-resume), or use another out_dir (nothing is overwritten)"
        )
    if out_dir and dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if out_dir and (out_dir / "result.json").exists() and config.resume:
        saved = _read_result(out_dir / "result.json")
        _check_same_run(saved["config"], config.to_dict(), out_dir)
        if saved["status"] == "finished":
            return TrainResult(**saved)

    # -- the recipe: peak LR, warmup and total steps for the same number of epochs
    recipe = config.recipe()
    plan = recipe.resolve(batch_size=config.batch_size, dataset_size=n_train, epochs=config.epochs)
    peak_lr = plan.lr
    total_steps = plan.total_steps
    spe = plan.steps_per_epoch

    per_rank = math.ceil(config.batch_size / dist.world_size)
    micro, accumulation = plan_micro_batches(per_rank, config.micro_batch_size, config.max_micro_batch)

    # -- model, optimizer, scheduler
    torch.manual_seed(config.seed)
    if model is None:
        model = task.build_model()
    dtype = torch.float64 if config.precision == "fp64" else None
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    names = {p: n for n, p in model.named_parameters()}
    groups = param_groups(model, config.weight_decay, exclude_from_adaptation=config.exclude_from_adaptation)
    opt_options = dict(config.optimizer_options)
    clip_outside = None  # torch optimizers: the loop clips with clip_grad_norm_ (same eps, 1e-6, as ours)
    if config.max_grad_norm is not None and OPTIMIZERS[config.optimizer].layerwise:
        opt_options.setdefault("max_grad_norm", config.max_grad_norm)
    elif config.max_grad_norm is not None:
        clip_outside = config.max_grad_norm
    optimizer = create_optimizer(config.optimizer, groups, lr=peak_lr, weight_decay=config.weight_decay, **opt_options)
    scheduler = ScheduleLR(optimizer, plan.schedule, peak_lr=peak_lr)
    train_model: nn.Module = model
    if dist.world_size > 1:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        train_model = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)

    start_step, history, wall_offset = 0, [], 0.0
    saved_window = (0.0, 0)  # the train-loss sum and step count since the last log record
    if ckpt_path and config.resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, map_location=device)
        missing = [k for k in _CHECKPOINT_KEYS if k not in ck] if isinstance(ck, dict) else list(_CHECKPOINT_KEYS)
        if missing:
            raise CheckpointError(
                f"{str(ckpt_path)!r} is not a checkpoint of a training run (it has no {', '.join(missing)}); it was "
                f"left as it is: move it away to start the run over, or use another output folder"
            )
        _check_same_run(ck["config"], config.to_dict(), out_dir)
        if config.max_steps is not None and int(ck["step"]) > config.max_steps:
            # the loop would not run, and the checkpoint would be saved again under the smaller step
            raise ValueError(
                f"{out_dir} holds this run at step {int(ck['step'])}, past max_steps={config.max_steps}; "
                f"nothing was changed: give max_steps >= {int(ck['step'])} (or none) to go on, or use "
                f"another out_dir"
            )
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        start_step, history, wall_offset = int(ck["step"]), list(ck["history"]), float(ck["wall_time"])
        saved_window = tuple(ck.get("loss_window", saved_window))  # absent from older checkpoints

    writer = _tensorboard(out_dir, config) if dist.is_main else None
    metrics_file = None
    if out_dir and dist.is_main:
        # the log restarts from the checkpoint's history, so a resumed run has no duplicate lines
        atomic_write_bytes(out_dir / "metrics.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in history).encode()))
        metrics_file = (out_dir / "metrics.jsonl").open("a")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.precision == "bf16" else contextlib.nullcontext()

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def evaluate(step: int) -> dict[str, float]:
        with autocast:
            metrics = task.evaluate(model, batch_size=config.eval_batch_size, device=device, dtype=dtype)
        record = {"step": step, "epoch": step / spe, "split": "eval", **metrics}
        log(record)
        if writer:
            for k, v in metrics.items():
                writer.add_scalar(f"eval/{k}", v, step)
        return metrics

    def save(step: int, elapsed: float, records: list | None = None, window: tuple[float, int] | None = None) -> None:
        # The last checkpoint stays the last good one: nothing is written when the weights or the
        # optimizer's state are not finite, or the loss since the last log or the last logged loss
        # is not (LAMB and LARS skip non-finite gradients, so a run can diverge with finite weights).
        # ``records`` and ``window``: the log and the open log window a resumed run goes on from.
        records = history if records is None else records
        window = (float(window_loss), window_weight) if window is None else window
        good_loss = bad_steps == 0 and math.isfinite(window[0])
        state = [v for s in optimizer.state_dict()["state"].values() for v in s.values()]
        if ckpt_path and dist.is_main and good_loss and _all_finite([*model.state_dict().values(), *state]):
            save_checkpoint(
                ckpt_path,
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng_state(), "step": step, "history": records, "wall_time": elapsed, "config": _plain(config.to_dict()),
                 "loss_window": [window[0], window[1]]},
            )  # fmt: skip
        distributed.barrier()

    end_step = total_steps if config.max_steps is None else min(total_steps, config.max_steps)
    status = "finished" if end_step == total_steps else "stopped"
    bar = None
    if config.progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc=f"{config.task} {config.optimizer} B={config.batch_size}",
                   unit="step", dynamic_ncols=True, leave=False)  # fmt: skip

    t0 = time.perf_counter()
    perm_epoch, perm = -1, None
    bad_steps = 0
    resume_point = None  # (log length, open window) before a stopped run's record of part of a log window
    # a resumed run logs the same train loss as an uninterrupted one: the window goes on
    window_loss = torch.tensor(float(saved_window[0]), dtype=torch.float64, device=device)
    window_weight, window_examples, window_t = int(saved_window[1]), 0, time.perf_counter()
    train_model.train()
    step = start_step
    for step in range(start_step, end_step):
        epoch, pos = divmod(step, spe)
        if epoch != perm_epoch:
            perm_epoch, perm = epoch, epoch_permutation(config.seed, epoch, n_train)
        idx = perm[pos * config.batch_size : (pos + 1) * config.batch_size]
        share = idx.tensor_split(dist.world_size)[dist.rank]

        def accumulate(micro: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Forward/backward over this rank's micro-batches; grads hold d(sum loss / W)."""
            micro_idx = share.split(micro)
            # the model's own randomness (dropout) per step and rank: ranks differ, a resumed run
            # or a retried step draws the same masks
            torch.manual_seed(model_seed(config.seed, step, dist.rank))
            gen = step_generator(config.seed, step)
            batches = [task.get_batch("train", mi, gen) for mi in micro_idx]
            # in float64: 1 / total_weight rounded to float32 would make an fp64 run inexact
            total_weight = distributed.all_reduce_sum(
                torch.tensor(float(sum(b.weight for b in batches)), dtype=torch.float64, device=device))
            # DDP averages gradients over ranks; scaling by world_size / W makes the result sum/W.
            scale = dist.world_size / total_weight
            step_loss = torch.zeros((), device=device, dtype=torch.float64)
            for j, b in enumerate(batches):
                b = b.to(device, dtype)
                with distributed.no_sync_if(train_model, j < len(batches) - 1), autocast:
                    loss_sum, _ = task.loss(train_model, b)
                (loss_sum * scale).backward()
                step_loss += loss_sum.detach().double()
            return step_loss, total_weight

        while True:
            try:
                step_loss, total_weight = accumulate(micro)
                break
            except (torch.OutOfMemoryError, RuntimeError) as err:
                # An automatic micro-batch that does not fit in memory is halved and the step is
                # redone: the objective is the same at any micro-batch size. A micro-batch the user
                # set, and data-parallel runs (ranks must agree), fail instead.
                if not _is_oom(err) or config.micro_batch_size is not None or dist.world_size > 1 or micro == 1:
                    raise
                optimizer.zero_grad(set_to_none=True)
                micro = (micro + 1) // 2
                accumulation = math.ceil(per_rank / micro)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                log({"step": step, "split": "train", "event": "out_of_memory", "micro_batch_size": micro})
        if clip_outside is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_outside)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_lr = optimizer.param_groups[0]["lr"]  # the lr this update used (logged as "lr")
        scheduler.step()

        window_loss += distributed.all_reduce_sum(step_loss) / total_weight  # stays on the device
        window_weight += 1
        window_examples += len(idx)

        done = step + 1
        if bar:
            bar.update(1)
        if done % max(config.log_every, 1) == 0 or done == end_step:
            # the loss is read on the host only here, once per log interval
            now = time.perf_counter()
            rec = {"step": done, "epoch": done / spe, "split": "train", "loss": float(window_loss) / window_weight,
                   "lr": step_lr, "examples_per_s": window_examples / max(now - window_t, 1e-9)}  # fmt: skip
            if hasattr(optimizer, "skipped_steps"):  # cumulative (group, step) pairs with non-finite gradients
                rec["skipped_group_steps"] = _skipped(optimizer)
            if config.record_trust_ratios and getattr(optimizer, "telemetry", None) is not None:
                rec["trust_ratio"] = {names.get(p, "?"): s["trust_ratio"] for p, s in optimizer.telemetry.read().items()}
            if done % max(config.log_every, 1) and status == "stopped":
                # an uninterrupted run writes no record here: a resumed one goes on with this window
                resume_point = (len(history), (float(window_loss), window_weight))
            if not math.isfinite(rec["loss"]):
                bad_steps += 1
                if bad_steps >= config.diverge_patience:
                    status = "diverged"
                    log({**rec, "status": "diverged"})
                    step = done
                    break
            else:
                bad_steps = 0
            if config.log_every:
                log(rec)
            if bar:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", ex_s=f"{rec['examples_per_s']:.0f}")
            if writer:
                _log_tensorboard(writer, rec, optimizer, names, done)
            window_loss.zero_()
            window_weight, window_examples, window_t = 0, 0, now
        if config.eval_every and done % config.eval_every == 0 and done < end_step and dist.is_main:
            evaluate(done)
        if config.eval_every and done % config.eval_every == 0:
            distributed.barrier()
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < end_step:
            save(done, wall_offset + time.perf_counter() - t0)
    else:
        step = end_step
    if bar:
        bar.close()

    if status != "diverged":
        # weights that are not finite at the end diverged within the patience (the last steps)
        nonfinite = torch.tensor(0.0 if _all_finite(model.state_dict().values()) else 1.0, device=device)
        if float(distributed.all_reduce_sum(nonfinite)) > 0:
            status = "diverged"
    logged = len(history)
    final: dict[str, float] = {}
    if dist.is_main:
        final = evaluate(step) if status != "diverged" else {"loss": float("nan")}
    elapsed = wall_offset + time.perf_counter() - t0
    if status == "stopped":
        # the checkpoint holds what a run going on holds at this step (its log and open log window),
        # so a resumed run logs what an uninterrupted one does: no record of part of a log window,
        # and the final evaluation only where an uninterrupted run evaluates too
        records = history[: resume_point[0] if resume_point else logged]
        if config.eval_every and step % config.eval_every == 0:
            records = records + history[logged:]
        save(step, elapsed, records, resume_point[1] if resume_point else None)
    elif status != "diverged":  # a diverged run keeps its last good checkpoint
        save(step, elapsed)
    result = TrainResult(
        status=status, steps=step, total_steps=total_steps, final=final, history=history, wall_time=elapsed,
        lr=peak_lr, warmup_steps=plan.warmup_steps, accumulation=accumulation, micro_batch_size=micro,
        world_size=dist.world_size, config=config.to_dict(), skipped_group_steps=_skipped(optimizer),
    )  # fmt: skip
    if out_dir and dist.is_main:
        atomic_write_json(out_dir / "result.json", result.to_dict())
    if metrics_file:
        metrics_file.close()
    if writer:
        writer.close()
    return result


def _all_finite(tensors) -> bool:
    """All elements finite; the local shard of a DTensor (called on one rank: no collective)."""
    from largebatch.optim._common import local_tensor

    floats = [local_tensor(t) for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    floats = [t for t in floats if t.numel()]
    return not floats or bool(torch.stack([torch.isfinite(t).all() for t in floats]).all())


def _skipped(optimizer) -> int:
    return int(getattr(optimizer, "skipped_steps", 0))


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text


def _plain(value: Any) -> Any:
    """``value`` as result.json holds it (tuples as lists, paths as text): what a checkpoint stores of
    a config (``torch.load(weights_only=True)`` refuses a path) and what runs are compared in."""
    return json.loads(json.dumps(value, default=str))


def _read_result(path: Path) -> dict[str, Any]:
    """The result.json of a run in ``path``'s folder, or a ValueError naming the file."""
    fields = {f.name: f for f in dataclasses.fields(TrainResult)}
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # not JSON, or not UTF-8
        saved, problem = None, f"not valid JSON: {err}"
    else:
        problem = "not a JSON object" if not isinstance(saved, dict) else ""
    if isinstance(saved, dict):
        missing, unknown = [n for n in required if n not in saved], sorted(set(saved) - set(fields))
        problem = "; ".join(([f"no {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(unknown)}"] if unknown else []))
    if problem:
        raise ValueError(
            f"{str(path)!r} is not the result of a training run ({problem}); it was left as it is: move it away "
            f"to go on with the run in this folder, or use another output folder"
        )
    return saved


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], out_dir: Path | None) -> None:
    saved, current = _plain(saved), _plain(current)
    diff = sorted(k for k in set(saved) | set(current) if k not in _NON_SEMANTIC and saved.get(k) != current.get(k))
    if diff:
        details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in diff)
        raise ValueError(
            f"{out_dir} holds a different run ({details}); use another out_dir for this one "
            f"(nothing was overwritten)"
        )


def _tensorboard(out_dir: Path | None, config: TrainConfig):
    if not (config.tensorboard and out_dir):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError("tensorboard logging needs the tensorboard package: pip install 'largebatch[tensorboard]'") from exc
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def _log_tensorboard(writer, rec: dict[str, Any], optimizer, names: dict, step: int) -> None:
    for k in ("loss", "lr", "examples_per_s"):
        writer.add_scalar(f"train/{k}", rec[k], step)
    telemetry = getattr(optimizer, "telemetry", None)
    if telemetry is None:
        return
    stats = telemetry.read()
    ratios = []
    for p, s in stats.items():
        name = names.get(p, "?")
        writer.add_scalar(f"trust_ratio/{name}", s["trust_ratio"], step)
        writer.add_scalar(f"weight_norm/{name}", s["weight_norm"], step)
        ratios.append(s["trust_ratio"])
    if ratios:
        writer.add_histogram("trust_ratio/all", torch.tensor(ratios), step)
