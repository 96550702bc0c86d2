"""The demo study: LAMB vs AdamW on the bundled MNIST at a small and a 32x larger batch.

Same epochs at both batch sizes (so the large batch takes 32x fewer steps), square-root LR
scaling and the paper's linear-epoch warmup, no retuning. It prints a results table and writes a
plot of held-out accuracy against epochs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from largebatch.train.loop import TrainConfig, TrainResult, fit


@dataclass(frozen=True)
class DemoSetting:
    optimizer: str
    base_lr: float  # at the base batch; scaled by the sqrt rule, never retuned
    weight_decay: float


# Standard starting points, not tuned on this data: AdamW's usual 1e-3; LAMB's per-layer steps
# are relative to the weight norm, so its lr is a fraction of the weights per step.
SETTINGS = (DemoSetting("lamb", 1e-2, 0.01), DemoSetting("adamw", 1e-3, 0.01))


def run_demo(
    out_dir: str | Path = "runs/demo",
    base_batch: int = 128,
    scale: int = 32,
    epochs: float = 3.0,
    train_subset: int | None = None,
    progress: bool = True,
) -> list[tuple[DemoSetting, int, TrainResult]]:
    for name, value in (("base_batch", base_batch), ("scale", scale)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"Invalid {name}: {value!r}; it must be a positive integer")
    out_dir = Path(out_dir)
    results = []
    for setting in SETTINGS:
        for batch in (base_batch, base_batch * scale):
            steps_per_epoch_hint = max(1, (train_subset or 60000) // batch)
            cfg = TrainConfig(
                task="mnist-lenet",
                task_options={"train_subset": train_subset} if train_subset else {},
                optimizer=setting.optimizer,
                batch_size=batch,
                epochs=epochs,
                base_lr=setting.base_lr,
                base_batch=base_batch,
                lr_rule="sqrt",
                warmup_epochs=epochs / 320,  # the paper's ratio at the base batch, growing with the batch
                warmup_rule="linear",
                decay="poly",
                weight_decay=setting.weight_decay,
                eval_every=max(1, steps_per_epoch_hint // 2),
                out_dir=str(out_dir / f"{setting.optimizer}-b{batch}"),
                progress=progress,
                log_every=max(1, steps_per_epoch_hint // 4),
            )
            t = time.perf_counter()
            res = fit(cfg)
            print(f"  {setting.optimizer:6s} batch {batch:5d}: accuracy {res.final.get('accuracy', float('nan')):.4f} "
                  f"in {res.steps} steps, {time.perf_counter() - t:.1f} s")  # fmt: skip
            results.append((setting, batch, res))
    return results


def results_table(results) -> str:
    batches = sorted({b for _, b, _ in results})
    lines = ["| optimizer | " + " | ".join(f"batch {b}" for b in batches) + " | drop |", "|---" * (len(batches) + 2) + "|"]
    for opt in dict.fromkeys(s.optimizer for s, _, _ in results):
        accs = {b: r.final.get("accuracy", float("nan")) for s, b, r in results if s.optimizer == opt}
        steps = {b: r.steps for s, b, r in results if s.optimizer == opt}
        lrs = {b: r.lr for s, b, r in results if s.optimizer == opt}
        cells = [f"{accs[b]:.4f} ({steps[b]} steps, lr {lrs[b]:.3g})" for b in batches]
        drop = (accs[batches[0]] - accs[batches[-1]]) * 100
        lines.append(f"| {opt} | " + " | ".join(cells) + f" | {drop:+.2f} pts |")
    return "\n".join(lines)


def plot_results(results, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    low = 0.9  # the zoom of a full run; a shorter one (fewer epochs, a subset) may stay below it
    for setting, batch, res in results:
        pts = [(h["epoch"], h["accuracy"]) for h in res.history if h.get("split") == "eval" and "accuracy" in h]
        if not pts:
            continue
        x, y = zip(*pts)
        low = min(low, min(y) - 0.02)
        ax.plot(x, y, marker="o", ms=3, ls="-" if batch == min(b for _, b, _ in results) else "--",
                label=f"{setting.optimizer}, batch {batch}")  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(max(0.0, low), 1.0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("MNIST LeNet-5: same epochs, sqrt LR scaling, no retuning")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
