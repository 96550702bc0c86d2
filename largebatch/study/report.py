"""Reports from a sweep database: Markdown tables and PNG plots (matplotlib, Agg backend).

For each sweep in the database, :func:`write_report` writes into one folder:

- the paper-style tables: rows optimizers, columns batch sizes, each cell the final value of the
  task's metric and the learning rate that produced it, for the *untuned* setting (the recipe from
  one base LR) and the *tuned* one (best of everything the sweep ran for that optimizer and batch);
- per cell: steps, wall time, the change against the base batch, steps to reach the target
  (the base batch's value less the sweep's tolerance), the speedup in steps to that target and the
  scaling efficiency (speedup / (B / B0));
- the gradient noise scale B_simple measured during training, as the predicted critical batch,
  beside the batch size at which the measured metric actually falls off;
- plots: metric vs batch size, loss curves, LR sensitivity per batch size, per-layer trust ratios
  over training, B_simple over training;
- a header with hardware, torch version, the total time of the sweep invocations and the exact
  commands that produced the data and the report.

Selection uses the final evaluation on the task's eval split (as the paper's tables do); a sweep
with a separate validation split would select on it instead.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from largebatch.study.grids import describe_grid
from largebatch.study.store import ResultStore, RunRecord, canonical_json

# --------------------------------------------------------------------------------------------
# Loading and selecting


@dataclass
class Group:
    """The runs of one configuration that differ only in their seed."""

    label: str
    batch: int
    runs: list[RunRecord]

    @property
    def run(self) -> RunRecord:
        return self.runs[0]

    @property
    def ok(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == "finished" and math.isfinite(r.value())]

    @property
    def value(self) -> float:
        """Mean final metric over seeds; -inf when a seed failed or diverged (it never wins)."""
        if len(self.ok) != len(self.runs) or not self.runs:
            return -math.inf
        return statistics.fmean(r.value() for r in self.runs)

    @property
    def std(self) -> float | None:
        return statistics.stdev(r.value() for r in self.runs) if len(self.ok) > 1 and len(self.ok) == len(self.runs) else None

    @property
    def status(self) -> str:
        bad = [r.status for r in self.runs if r.status != "finished"]
        return bad[0] if bad else "finished"

    @property
    def tags(self) -> set[str]:
        return {t for r in self.runs for t in r.tags}


@dataclass
class Study:
    name: str
    config: dict[str, Any]
    runs: list[RunRecord]
    invocations: list[dict[str, Any]]
    groups: list[Group] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        order = [o.get("label", o.get("name")) for o in self.config.get("optimizers", [])]
        seen = {r.label for r in self.runs}
        return [lb for lb in order if lb in seen] + sorted(seen - set(order))

    @property
    def batches(self) -> list[int]:
        return sorted({r.batch_size for r in self.runs})

    @property
    def base_batch(self) -> int:
        return int(self.config.get("base_batch") or min(self.batches))

    @property
    def metric(self) -> str:
        return next((r.metric for r in self.runs if r.metric), "accuracy")

    def cell(self, label: str, batch: int, setting: str) -> Group | None:
        """The untuned group, or the best group ("tuned") of ``label`` at ``batch``."""
        groups = [g for g in self.groups if g.label == label and g.batch == batch]
        if setting == "untuned":
            groups = [g for g in groups if "untuned" in g.tags]
        if not groups:
            return None
        # the best value; a tie goes to the smallest peak LR (the cell's text names the others)
        return max(groups, key=lambda g: (g.value, -(g.run.lr if g.run.lr is not None else math.inf)))

    def peers(self, g: Group) -> list[Group]:
        """Every group of ``g``'s optimizer at ``g``'s batch size (the candidates of a tuned cell)."""
        return [h for h in self.groups if h.label == g.label and h.batch == g.batch]

    def varied(self, label: str, field_name: str) -> bool:
        return len({g.run.spec["config"].get(field_name) for g in self.groups if g.label == label}) > 1


def load_study(db: str | Path, sweep: str) -> Study:
    with ResultStore(db, readonly=True) as store:
        config = store.sweep_config(sweep)
        if config is None:
            raise ValueError(f"no sweep {sweep!r} in {db}; it holds: {', '.join(store.sweeps()) or 'none'}")
        runs = store.runs(sweep)
        invocations = store.invocations(sweep)
    study = Study(sweep, config, runs, invocations)
    by: dict[tuple[str, int, str], list[RunRecord]] = defaultdict(list)
    for r in runs:
        cfg = {k: v for k, v in r.spec.get("config", {}).items() if k != "seed"}
        by[(r.label, r.batch_size, canonical_json(cfg))].append(r)
    study.groups = [Group(label, batch, rs) for (label, batch, _), rs in by.items()]
    return study


def target_value(base: float, target: dict[str, float]) -> float:
    if "relative" in target:
        return base * (1.0 - float(target["relative"]))
    return base - float(target.get("drop", 0.005))


LEARNED_FRACTION = 0.9


def learned(group: Group) -> bool:
    """False when a run ended with its loss not below LEARNED_FRACTION x its loss at step 0: a run
    that collapsed (e.g. to a constant prediction) without diverging. Such a B0 is no reference for
    "holds the target". True when the losses are not recorded."""
    for r in group.runs:
        start, end = r.final.get("initial_loss"), r.final.get("loss")
        if start is not None and end is not None and math.isfinite(start) and not end < LEARNED_FRACTION * start:
            return False
    return True


def steps_to(run: RunRecord, metric: str, value: float) -> int | None:
    """The first evaluated step at which ``metric`` reached ``value`` (None: never)."""
    for h in run.history:
        if h.get("split") == "eval" and h.get(metric) is not None and h[metric] >= value:
            return int(h["step"])
    return None


def group_steps_to(group: Group, metric: str, value: float) -> int | None:
    """The steps every seed of ``group`` needed to reach ``value``: the slowest seed's (None: a
    seed never did). The same rule at B0 and at B, so that a speedup compares like with like."""
    reached = [steps_to(r, metric, value) for r in group.runs]
    return None if not reached or any(s is None for s in reached) else max(reached)


# --------------------------------------------------------------------------------------------
# Formatting helpers


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-"
    return f"{x:.{digits}f}"


def _lr(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _cell_text(study: Study, g: Group | None, setting: str) -> str:
    if g is None:
        return "-"
    if g.status != "finished":
        return f"{g.status} (lr {_lr(g.run.lr)})"
    cfg = g.run.spec["config"]
    value = _fmt(g.value) + (f" ± {g.std:.4f}" if g.std is not None else "")
    extra = [f"lr {_lr(g.run.lr)}"]
    if setting == "tuned" and study.varied(g.label, "weight_decay"):
        extra.append(f"wd {cfg.get('weight_decay'):g}")
    if setting == "tuned" and study.varied(g.label, "warmup_epochs"):
        extra.append(f"warmup {cfg.get('warmup_epochs'):g} ep")
    if setting == "tuned":
        peers = study.peers(g)
        ties = sorted(h.run.lr for h in peers if h is not g and h.value == g.value and h.run.lr is not None)
        if ties:
            extra.append("tied with lr " + ", ".join(_lr(x) for x in ties))
        done = sum(1 for h in peers if h.status == "finished")
        if done < len(peers):  # pending, running, failed or diverged grid points: say so
            extra.append(f"best of the {done} of {len(peers)} grid points that finished")
    return f"{value} ({', '.join(extra)})"


def accuracy_table(study: Study, setting: str) -> str:
    header = ["optimizer"] + [f"B={b}" + (" (B0)" if b == study.base_batch else f" ({b // study.base_batch}xB0)" if b % study.base_batch == 0 else "")
                              for b in study.batches]  # fmt: skip
    rows = []
    for label in study.labels:
        cells = [study.cell(label, b, setting) for b in study.batches]
        if all(c is None for c in cells):
            continue
        rows.append([label] + [_cell_text(study, c, setting) for c in cells])
    return _table(header, rows) if rows else "_no runs in this setting_"


def grid_tables(study: Study, max_columns: int = 10) -> str:
    """Per batch size: rows optimizers, columns the peak LRs tried, cells the final value (best
    over the other grid dimensions at that LR)."""
    out = []
    for b in study.batches:
        groups = [g for g in study.groups if g.batch == b and g.run.lr is not None]
        lrs = sorted({g.run.lr for g in groups})
        if len(lrs) < 2 or len(lrs) > max_columns:
            continue
        rows = []
        for label in study.labels:
            mine = [g for g in groups if g.label == label]
            if len(mine) < 2:
                continue
            cells = []
            for lr in lrs:
                at = [g for g in mine if g.run.lr == lr]
                if not at:
                    cells.append("")
                    continue
                best = max(at, key=lambda g: g.value)
                cells.append(_fmt(best.value) if best.status == "finished" else best.status)
            rows.append([label] + cells)
        if rows:
            out += [f"**B={b}**, final {study.metric} by peak LR:", "", _table(["optimizer"] + [f"lr {lr:.3g}" for lr in lrs], rows), ""]
            unknown = [g for g in study.groups if g.batch == b and g.run.lr is None]
            if unknown:  # the peak LR is known once a run has started
                out += [f"({len(unknown)} grid point(s) at B={b} never started ({', '.join(sorted({g.status for g in unknown}))}) "
                        "and are not in this table.)", ""]  # fmt: skip
    return "\n".join(out)


def scaling_rows(study: Study, setting: str) -> list[dict[str, Any]]:
    """One record per (optimizer, batch): value, steps, wall time, target, speedup, efficiency."""
    target = study.config.get("target", {"drop": 0.005})
    metric = study.metric
    out = []
    for label in study.labels:
        base = study.cell(label, study.base_batch, setting)
        base_learned = base is not None and base.status == "finished" and learned(base)
        base_ok = base_learned
        tv = target_value(base.value, target) if base_ok else None
        base_steps = group_steps_to(base, metric, tv) if base_ok else None
        for b in study.batches:
            g = study.cell(label, b, setting)
            if g is None:
                continue
            rec: dict[str, Any] = {"label": label, "batch": b, "group": g, "value": g.value, "steps": g.run.steps,
                                   "wall": statistics.fmean(r.wall_time or 0.0 for r in g.runs), "status": g.status}  # fmt: skip
            if base is not None and base.status == "finished" and not base_learned:
                rec["base_did_not_learn"] = True
            if base_ok and g.status == "finished":
                rec["delta"] = g.value - base.value
                rec["holds"] = g.value >= tv
                rec["steps_to_target"] = group_steps_to(g, metric, tv)
                if rec["steps_to_target"] and base_steps:
                    rec["speedup"] = base_steps / rec["steps_to_target"]
                    rec["efficiency"] = rec["speedup"] / (b / study.base_batch)
                rec["wall_speedup"] = (statistics.fmean(r.wall_time or 0.0 for r in base.runs) / rec["wall"]) if rec["wall"] else None
            out.append(rec)
    return out


def scaling_table(study: Study, setting: str) -> str:
    rows = []
    for rec in scaling_rows(study, setting):
        rows.append([
            rec["label"], str(rec["batch"]), _fmt(rec["value"]) if rec["status"] == "finished" else rec["status"],
            "-" if rec.get("delta") is None else f"{100 * rec['delta']:+.2f}",
            ("n/a: B0 did not learn" if rec.get("base_did_not_learn") else "-") if rec.get("holds") is None
            else ("yes" if rec["holds"] else "**no**"),
            str(rec["steps"] or "-"), "-" if rec.get("steps_to_target") is None else str(rec["steps_to_target"]),
            "-" if rec.get("speedup") is None else f"{rec['speedup']:.1f}x",
            "-" if rec.get("efficiency") is None else f"{100 * rec['efficiency']:.0f}%",
            f"{rec['wall']:.0f}" if rec["wall"] else "-", "-" if rec.get("wall_speedup") is None else f"{rec['wall_speedup']:.1f}x",
        ])  # fmt: skip
    header = ["optimizer", "batch", study.metric, "change vs B0 (points)", "holds target", "steps",
              "steps to target", "speedup (steps)", "scaling efficiency", "wall (s)", "wall speedup"]  # fmt: skip
    return _table(header, rows) if rows else "_no runs in this setting_"


def noise_runs(study: Study) -> list[RunRecord]:
    return [r for r in study.runs if any("noise_b_simple" in h for h in r.history)]


def falloff(study: Study, setting: str) -> dict[str, tuple[int | None, int | None]]:
    """label -> (largest batch that holds the target with all smaller ones, first batch that misses)."""
    out = {}
    for label in study.labels:
        recs = [r for r in scaling_rows(study, setting) if r["label"] == label and r.get("holds") is not None]
        holds, first_miss = None, None
        for r in sorted(recs, key=lambda r: r["batch"]):
            if r["holds"] and first_miss is None:
                holds = r["batch"]
            elif not r["holds"] and first_miss is None:
                first_miss = r["batch"]
        if recs:
            out[label] = (holds, first_miss)
    return out


def noise_section(study: Study, plot_name: str | None) -> str:
    runs = noise_runs(study)
    if not runs:
        return ""
    unit = "sequences" if study.config.get("task", "").startswith("bert") else "examples"
    lines = ["### Gradient noise scale (McCandlish et al. 2018)", "",
             "B_simple = tr(Σ) / ‖G‖², from the squared gradient norms at two batch sizes averaged over several "
             "batches before the ratio (appendix A.1), measured on the training objective at every eval point of "
             f"these runs. B_simple (in {unit}) predicts the critical batch size: well below it a bigger batch "
             "cuts the steps almost proportionally, well above it it buys little.", ""]  # fmt: skip
    predictions = []
    for r in runs:
        pts = [h for h in r.history if "noise_b_simple" in h]
        noise = r.spec.get("noise") or {}
        lines.append(f"**{r.label}, B={r.batch_size}, peak lr {_lr(r.lr)}** (b_small={noise.get('b_small')}, b_big={noise.get('b_big')}, "
                     f"{noise.get('batches')} big batches per point):")  # fmt: skip
        lines.append("")
        rows = [[f"{h['epoch']:.2f}", str(h["step"]), _fmt(h.get(study.metric)), f"{h['noise_grad_sq']:.3g}",
                 f"{h['noise_trace']:.3g}", f"{h['noise_b_simple']:.0f}" if h["noise_grad_sq"] > 0 else "inf (‖G‖² estimate <= 0)"]
                for h in pts]  # fmt: skip
        lines.append(_table(["epoch", "step", study.metric, "‖G‖² (estimate)", "tr(Σ) (estimate)", "B_simple"], rows))
        lines.append("")
        # The final point comes after the LR has decayed to 0: there ‖G‖² -> 0 and B_simple overstates
        # the batch size that pays off during training, so the prediction uses the points before it.
        during = pts[:-1] if len(pts) > 1 else pts
        finite = [h["noise_b_simple"] for h in during if h["noise_grad_sq"] > 0 and math.isfinite(h["noise_b_simple"])]
        if finite:
            predictions.append((r, statistics.median(finite), min(finite), max(finite), pts[-1]["noise_b_simple"]))
    if predictions:
        lines.append("**Predicted vs measured.**")
        lines.append("")
        predictions.sort(key=lambda p: p[0].batch_size)
        r, med, lo, hi, last = predictions[0]
        lines.append(f"- prediction, from the smallest-batch run ({r.label}, B={r.batch_size}): B_crit ≈ B_simple = "
                     f"{med:.0f} (median over the eval points before the last; range {lo:.0f} .. {hi:.0f}). At the last "
                     f"point, after the LR has decayed to 0, B_simple = {last:.0f}: ‖G‖² is then nearly 0, so that value "
                     "says little about which batch pays off during training.")  # fmt: skip
        for r, med, lo, hi, last in predictions[1:]:
            lines.append(f"- along the B={r.batch_size} run ({r.label}): median {med:.0f} (range {lo:.0f} .. {hi:.0f}) before the last point.")
        for setting in ("untuned", "tuned"):
            for label, (holds, miss) in falloff(study, setting).items():
                desc = (f"holds the target up to B={holds}" if holds else "misses the target already at the smallest batch above B0")
                desc += f", first misses it at B={miss}" if miss else ", and at every batch size swept"
                lines.append(f"- measured ({setting}) {label}: {desc}.")
        lines.append("")
    if plot_name:
        lines += [f"![gradient noise scale]({plot_name})", ""]
    return "\n".join(lines)


def runs_table(study: Study) -> str:
    rows = []
    metric = study.metric
    for r in sorted(study.runs, key=lambda r: (r.label, r.batch_size, r.lr or 0.0, r.weight_decay or 0.0, r.seed)):
        cfg = r.spec.get("config", {})
        err = ""
        if r.error:
            err = r.error.strip().splitlines()[-1][:80].replace("|", "/")
        rows.append([r.label, str(r.batch_size), f"{cfg.get('base_lr', 0):.3g}", _lr(r.lr), f"{cfg.get('weight_decay', 0):g}",
                     f"{cfg.get('warmup_epochs', 0):g}", str(r.seed), ",".join(r.tags), r.status,
                     _fmt(r.value(metric)) if r.status == "finished" else "-", str(r.steps or "-"),
                     f"{r.wall_time:.0f}" if r.wall_time else "-", f"`{r.key}`" + (f" {err}" if err else "")])  # fmt: skip
    return _table(["optimizer", "batch", "base lr", "peak lr", "wd", "warmup (ep @B0)", "seed", "tags", "status",
                   metric, "steps", "wall (s)", "key"], rows)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int):
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def plot_accuracy_vs_batch(study: Study, path: Path) -> None:
    """Two panels: every value, and a zoom on the best ones (a collapsed run would flatten the rest)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    values = []
    for ax in axes:
        for color, label in zip(_colors(len(study.labels)), study.labels):
            for setting, style in (("tuned", "-"), ("untuned", "--")):
                pts = [(b, g.value) for b in study.batches if (g := study.cell(label, b, setting)) and math.isfinite(g.value)]
                if pts:
                    x, y = zip(*pts)
                    values += y
                    ax.plot(x, y, style, marker="o", ms=4, color=color, label=f"{label} ({setting})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"final {study.metric}")
        ax.grid(alpha=0.3)
    if values:
        top = max(values)
        span = max(0.02, 0.1 * abs(top))
        axes[1].set_ylim(top - span, top + 0.1 * span)
    axes[0].legend(fontsize=7, ncol=2)
    axes[0].set_title(f"{study.name}: {study.metric} vs batch size (same epochs)", fontsize=10)
    axes[1].set_title("zoom on the best values", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss_curves(study: Study, path: Path) -> None:
    plt = _plt()
    labels = study.labels
    fig, axes = plt.subplots(2, len(labels), figsize=(3.6 * len(labels), 6), squeeze=False)
    colors = dict(zip(study.batches, _colors(len(study.batches))))
    for j, label in enumerate(labels):
        setting = "untuned" if any(study.cell(label, b, "untuned") for b in study.batches) else "tuned"
        for b in study.batches:
            g = study.cell(label, b, setting)
            if g is None:
                continue
            train = [(h["epoch"], h["loss"]) for h in g.run.history if h.get("split") == "train" and math.isfinite(h.get("loss", math.nan))]
            evals = [(h["epoch"], h[study.metric]) for h in g.run.history if h.get("split") == "eval" and study.metric in h]
            if train:
                axes[0][j].plot(*zip(*train), color=colors[b], label=f"B={b}")
            if evals:
                axes[1][j].plot(*zip(*evals), marker="o", ms=3, color=colors[b], label=f"B={b}")
        axes[0][j].set_title(f"{label} ({setting})", fontsize=9)
        axes[0][j].set_yscale("log")
        axes[0][j].set_xlabel("epoch")
        axes[1][j].set_xlabel("epoch")
        for ax in (axes[0][j], axes[1][j]):
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("train loss")
    axes[1][0].set_ylabel(f"eval {study.metric}")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lr_sensitivity(study: Study, path: Path) -> bool:
    plt = _plt()
    labels = [lb for lb in study.labels if len({g.run.lr for g in study.groups if g.label == lb}) > 1]
    if not labels:
        return False
    fig, axes = plt.subplots(1, len(labels), figsize=(3.6 * len(labels), 3.6), squeeze=False)
    colors = dict(zip(study.batches, _colors(len(study.batches))))
    for ax, label in zip(axes[0], labels):
        for b in study.batches:
            best: dict[float, float] = {}
            for g in study.groups:
                if g.label == label and g.batch == b and g.run.lr:
                    v = g.value if math.isfinite(g.value) else math.nan
                    best[g.run.lr] = max(best.get(g.run.lr, -math.inf), v) if not math.isnan(v) else best.get(g.run.lr, math.nan)
            if best:
                xs = sorted(best)
                ax.plot(xs, [best[x] for x in xs], marker="o", ms=3, color=colors[b], label=f"B={b}")
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"final {study.metric} (failed/diverged: gap)")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_trust_ratios(study: Study, path: Path) -> bool:
    plt = _plt()
    picks = []
    for label in study.labels:
        for b in (study.base_batch, max(study.batches)):
            g = study.cell(label, b, "untuned") or study.cell(label, b, "tuned")
            if g and any("trust_ratio" in h for h in g.run.history) and (label, b) not in [(p[0], p[1]) for p in picks]:
                picks.append((label, b, g.run))
    if not picks:
        return False
    fig, axes = plt.subplots(1, len(picks), figsize=(4.2 * len(picks), 3.8), squeeze=False)
    for ax, (label, b, run) in zip(axes[0], picks):
        recs = [h for h in run.history if "trust_ratio" in h]
        names = [n for n in recs[0]["trust_ratio"] if not all(h["trust_ratio"].get(n) == 1.0 for h in recs)]
        for color, name in zip(_colors(len(names)), names):
            ys = [h["trust_ratio"].get(name, math.nan) for h in recs]
            ax.plot([h["epoch"] for h in recs], ys, color=color, lw=1, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(f"{label}, B={b}", fontsize=9)
        ax.grid(alpha=0.3)
        if len(names) <= 12:
            ax.legend(fontsize=6)
    axes[0][0].set_ylabel("trust ratio ||x|| / ||update||")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_noise(study: Study, path: Path) -> bool:
    runs = noise_runs(study)
    if not runs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for color, r in zip(_colors(len(runs)), runs):
        pts = [(h["epoch"], h["noise_b_simple"]) for h in r.history if "noise_b_simple" in h and math.isfinite(h["noise_b_simple"])]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=color, label=f"B_simple ({r.label}, B={r.batch_size})")
    for setting, style in (("untuned", ":"), ("tuned", "--")):
        misses: dict[int, list[str]] = defaultdict(list)
        for label, (holds, miss) in falloff(study, setting).items():
            if miss:
                misses[miss].append(label)
        for miss, labels in sorted(misses.items()):
            ax.axhline(miss, ls=style, lw=1.2, color="gray" if setting == "untuned" else "black",
                       label=f"first batch below target, {setting}: B={miss} ({', '.join(labels)})")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("batch size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title("gradient noise scale vs measured fall-off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# The synthetic study (the convergence theory in one picture)


def synthetic_section(out_dir: Path, steps: int = 500) -> str:
    from largebatch.study.synthetic import LayeredQuadratic, run_synthetic

    t = time.perf_counter()
    problem = LayeredQuadratic()
    res = run_synthetic(problem, steps=steps)
    elapsed = time.perf_counter() - t
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for color, (label, run) in zip(_colors(len(res.best)), res.best.items()):
        axes[0].plot(range(len(run.loss)), run.loss, color=color, label=f"{label} (lr {run.lr:.3g})")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss / initial loss")
    axes[0].set_title("best of each LR grid")
    axes[0].legend(fontsize=7)
    for ax, label in zip(axes[1:], ("lars", "lamb")):
        run = res.best.get(label)
        if not run or not run.trust_ratio:
            continue
        for color, (i, L) in zip(_colors(len(problem.curvatures)), enumerate(problem.curvatures)):
            ax.plot(range(1, len(run.trust_ratio) + 1), [r[i] for r in run.trust_ratio], color=color, label=f"layer {i}: L={L:g}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("trust ratio ||x_i|| / ||u_i||")
        ax.set_title(f"{label}: per-layer trust ratio")
        ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "synthetic.png", dpi=100)
    plt.close(fig)

    rows = []
    for label, run in res.best.items():
        grid = ", ".join(f"{lr:.3g}: {loss:.2g}" for lr, loss in res.grid[label])
        rows.append([label, f"{run.lr:.3g}", f"{run.final_loss:.3g}", " ".join(f"{b:.1g}" for b in run.block_loss[0]), grid])
    lines = [
        "## The convergence theory in one picture (synthetic)", "",
        f"A {len(problem.curvatures)}-layer quadratic (layer i: {problem.dim} weights, Hessian eigenvalues log-spaced in "
        f"[L_i/{problem.spread:g}, L_i] with random eigenvectors) whose per-layer smoothness constants span "
        f"L_i = {', '.join(f'{L:g}' for L in problem.curvatures)}: L_max = {problem.l_max:g}, "
        f"L_avg = {problem.l_avg:.4g} (L_max / L_avg = {problem.l_max / problem.l_avg:.1f}). Every layer starts with the "
        "same share of the loss, at distance 1/sqrt(L_i) from its optimum (flat layers have large weights). "
        f"Exact gradients, {res.steps} steps, LR decayed linearly to 0 for every optimizer; each optimizer's "
        "LR grid is swept and its best final loss kept. SGD with momentum 0.9 is stable only for "
        f"lr < 3.8 / L_max = {3.8 / problem.l_max:.3g}, so a layer of curvature L_i contracts at the rate "
        "lr L_i per step and the flat layers barely move; LARS and LAMB step every layer by a fraction of its "
        "weight norm, whatever its curvature (the paper's rates depend on L_avg, not L_max).", "",
        _table(["optimizer", "best lr", "final loss / initial", "final loss per layer (L small -> large)", "grid (lr: final loss)"], rows), "",
        "![synthetic: loss and trust ratios](synthetic.png)", "",
        "The trust ratios ||x_i|| / ||u_i|| span orders of magnitude across layers and order themselves by curvature: "
        "they are the per-layer learning rates that SGD would need and cannot have. Adam's per-coordinate "
        "normalisation also removes the per-layer scale here; the paper's comparison is with SGD.", "",
        f"Command: `largebatch report --synthetic --out DIR`; time {elapsed:.1f} s.", "",
    ]  # fmt: skip
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The report


def _hardware(invocations: list[dict[str, Any]], runs: list[RunRecord]) -> str:
    envs = [i["environment"] for i in invocations if i.get("environment")]
    if not envs:
        return "unknown"
    e = envs[-1]
    cores = e.get("affinity") or e.get("cpu_count")
    gpu = f", GPU {e['cuda']}" if e.get("cuda") else ""
    threads = sorted({r.environment.get("torch_threads") for r in runs if r.environment.get("torch_threads")})
    threads_text = "/".join(str(t) for t in threads) or str(e.get("torch_threads"))
    return (f"{e.get('cpu_model')} ({cores} cores usable, {e.get('cpu_count')} logical CPUs){gpu}; torch {e.get('torch')} "
            f"({threads_text} thread(s) per run), Python {e.get('python')}, {e.get('platform')}")  # fmt: skip


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s ({seconds / 60:.1f} min)"


def _protocol(study: Study) -> str:
    c = study.config
    lines = [f"- task `{c.get('task')}` with options `{json.dumps(c.get('task_options', {}))}`; {c.get('epochs', 1)} epochs at every "
             f"batch size (bigger batch = fewer steps); base batch B0 = {study.base_batch}; seeds {c.get('seeds', [0])}",
             f"- shared training settings: `{json.dumps(c.get('train', {}))}`",
             f"- target: {json.dumps(c.get('target', {'drop': 0.005}))} (`drop`: absolute, `relative`: fraction of the B0 value)"]  # fmt: skip
    for o in c.get("optimizers", []):
        parts = [f"`{o['name']}`"]
        if o.get("lr") is not None:
            parts.append(f"untuned base LR {o['lr']:g} at B0")
        if o.get("lrs") is not None:
            from largebatch.study.grids import resolve_grid

            parts.append(f"LR grid {describe_grid(resolve_grid(o['lrs']))} ({o.get('grid', 'scaled')})")
        if o.get("weight_decay") is not None:
            parts.append(f"weight decay {o['weight_decay']:g}")
        if o.get("weight_decays") is not None:
            from largebatch.study.grids import resolve_grid

            parts.append(f"weight-decay grid {describe_grid(resolve_grid(o['weight_decays']))}")
        if o.get("warmup_epochs") is not None:
            parts.append(f"warmup grid {o['warmup_epochs']}")
        if o.get("options"):
            parts.append(f"options `{json.dumps(o['options'])}`")
        if o.get("train"):
            parts.append(f"training overrides `{json.dumps(o['train'])}`")
        if o.get("batch_sizes"):
            parts.append(f"batches {o['batch_sizes']}")
        if o.get("grid_batch_sizes"):
            parts.append(f"grid only at batches {o['grid_batch_sizes']}")
        lines.append(f"- {o.get('label', o['name'])}: " + ", ".join(parts))
    return "\n".join(lines)


def sweep_section(study: Study, out_dir: Path, prefix: str = "") -> str:
    c = study.config
    total = sum(i.get("wall_time") or 0.0 for i in study.invocations)
    counts: dict[str, int] = defaultdict(int)
    for r in {r.key: r for r in study.runs}.values():
        counts[r.status] += 1
    commits = sorted({(i["code_version"].get("commit") or "?")[:12] + (" (modified)" if i["code_version"].get("dirty") else "")
                      for i in study.invocations if i.get("code_version")})  # fmt: skip
    lines = [f"## Sweep `{study.name}`", ""]
    if c.get("description"):
        lines += [c["description"].strip(), ""]
    if not study.runs:
        return "\n".join(lines + ["_No runs are recorded for this sweep._", ""])
    run_sum = sum(r.wall_time or 0.0 for r in {r.key: r for r in study.runs}.values())
    shared = (" (more than the elapsed time: runs ran in parallel, in worker processes or concurrent invocations, or "
              "were shared with another sweep of the same database)") if run_sum > 1.05 * total else ""  # fmt: skip
    lines += [
        f"- hardware: {_hardware(study.invocations, study.runs)}",
        f"- time: {_duration(total)} over {len(study.invocations)} invocation(s) of this sweep; the runs' own wall "
        f"times sum to {_duration(run_sum)}{shared}; runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
        f"- code: largebatch {study.invocations[-1]['code_version'].get('package') if study.invocations else '?'}, commit {', '.join(commits) or '?'}",
        "- commands:", "",
    ]  # fmt: skip
    lines += ["```"] + [f"{i['command']}    # {i.get('runs_executed') or 0} run(s) executed, {i.get('wall_time') or 0:.0f} s"
                        for i in study.invocations] + ["```", ""]  # fmt: skip
    lines += ["### Protocol", "", _protocol(study), ""]
    if c.get("notes"):
        lines += ["### Reduced versus the paper", "", c["notes"].strip(), ""]

    metric = study.metric
    lines += [f"### {metric} by optimizer and batch size", ""]
    if any("untuned" in g.tags for g in study.groups):
        lines += ["**Untuned** (the recipe only: one base LR at B0, scaled to each batch by the rule; the LR shown is the peak LR used):", "",
                  accuracy_table(study, "untuned"), ""]  # fmt: skip
    lines += ["**Tuned** (best final value over everything swept for that optimizer at that batch, selected on the same "
              "eval split it reports, so an optimistic estimate; a tie goes to the smallest LR; LR = peak LR):", "",
              accuracy_table(study, "tuned"), ""]  # fmt: skip
    grids = grid_tables(study)
    if grids:
        lines += ["### LR grids", "", grids]
    plots = {}
    for name, fn in ((("accuracy_vs_batch", plot_accuracy_vs_batch),) if len(study.batches) > 1 else ()) + (("loss_curves", plot_loss_curves),
                     ("lr_sensitivity", plot_lr_sensitivity), ("trust_ratios", plot_trust_ratios), ("noise_scale", plot_noise)):  # fmt: skip
        fname = f"{prefix}{name}.png"
        made = fn(study, out_dir / fname)
        if made is not False:
            plots[name] = fname
    if "accuracy_vs_batch" in plots:
        lines += [f"![{metric} vs batch size]({plots['accuracy_vs_batch']})", ""]
    if len(study.batches) > 1:
        target = c.get("target", {"drop": 0.005})
        lines += ["### Steps, time and scaling efficiency", "",
                  f"Target = the same optimizer's B0 value {'less ' + format(100 * target['drop'], 'g') + ' points' if 'drop' in target else 'times ' + format(1 - target['relative'], 'g')}. "
                  "Steps to target: the first eval point at or above it. Speedup (steps) = steps to target at B0 / at B "
                  "(ideal B/B0); scaling efficiency = speedup / (B/B0). Wall speedup: wall time at B0 / at B on this "
                  "machine (one device, so this is the throughput gain of bigger batches, not a parallel speedup; "
                  "the machine is shared, so wall times are noisy). With a schedule that decays to 0 most runs reach "
                  "their best value only at the end, so for a batch that holds the target the speedup is close to "
                  "the ratio of step counts; efficiencies above 100% come from the coarse eval points. A B0 run whose "
                  f"final loss is not below {LEARNED_FRACTION:g} x its initial loss did not learn (it collapsed "
                  "without diverging) and is no reference: its row says so instead of comparing.", ""]  # fmt: skip
        for setting in ("untuned", "tuned"):
            lines += [f"**{setting.capitalize()}:**", "", scaling_table(study, setting), ""]
    noise = noise_section(study, plots.get("noise_scale"))
    if noise:
        lines += [noise, ""]
    lines += ["### Curves", "", f"![loss curves]({plots['loss_curves']})", ""]
    if "lr_sensitivity" in plots:
        lines += [f"![LR sensitivity]({plots['lr_sensitivity']})", ""]
    if "trust_ratios" in plots:
        lines += ["Per-layer trust ratios over training (layers whose ratio is fixed at 1, i.e. excluded from "
                  "adaptation, are not drawn):", "", f"![trust ratios]({plots['trust_ratios']})", ""]  # fmt: skip
    lines += ["### All runs", "", runs_table(study), ""]
    failed = [r for r in study.runs if r.status == "failed" and r.error]
    if failed:
        lines += ["<details><summary>tracebacks of failed runs</summary>", ""]
        for r in failed:
            lines += [f"`{r.key}` ({r.label}, B={r.batch_size}):", "", "```", r.error.strip()[-2000:], "```", ""]
        lines += ["</details>", ""]
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    db: str | Path | None = None,
    sweeps: list[str] | None = None,
    synthetic: bool = False,
    title: str | None = None,
    command: str | None = None,
) -> Path:
    """Write ``report.md`` and its PNGs into ``out_dir``; return the path of ``report.md``."""
    t = time.perf_counter()
    out = Path(out_dir)
    if db is None and not synthetic:
        raise ValueError("nothing to report: give a sweep database and/or synthetic=True")
    names: list[str] = []
    studies: list[Study] = []
    if db is not None:  # every study is loaded (which checks database and names) before the folder is made
        with ResultStore(db, readonly=True) as store:
            names = list(sweeps or store.sweeps())
        if not names:
            raise ValueError(f"{db} holds no sweeps")
        studies = [load_study(db, name) for name in names]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"cannot write the report into {out}: it or a folder above it is a file, not a folder") from None
    sections = []
    for name, study in zip(names, studies):
        sections.append(sweep_section(study, out, prefix="" if len(names) == 1 else f"{name}-"))
    if synthetic:
        sections.append(synthetic_section(out))
    head = [f"# {title or (names[0] if len(names) == 1 else 'largebatch study report')}", ""]
    body = "\n".join(sections)
    if command:
        head += [f"Report generated by `{command}` in {time.perf_counter() - t:.0f} s.", ""]
        # every figure names the command that drew it
        body = "\n".join(line + (f"\n\n_Figure written by `{command}`._" if line.startswith("![") else "") for line in body.split("\n"))
    (out / "report.md").write_text("\n".join(head + [body]).rstrip() + "\n")
    return out / "report.md"
