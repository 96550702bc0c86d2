"""Sweeps into SQLite (resume, failures, divergence, workers), reports, and the synthetic study."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest
import torch

from largebatch.cli import main
from largebatch.study.grids import PAPER_MNIST_LRS, PAPER_TUNING_LRS, resolve_grid
from largebatch.study.report import load_study, write_report
from largebatch.study.store import ResultStore, run_key
from largebatch.study.sweep import SweepSpec, run_dir, run_sweep
from largebatch.study.synthetic import LayeredQuadratic, run_synthetic

TINY = """
name = "tiny"
task = "mnist-lenet"
task_options = { train_subset = 512, eval_subset = 256 }
epochs = 1
base_batch = 32
batch_sizes = [32, 128]
evals = 2
log_points = 8

[train]
lr_rule = "sqrt"
warmup_rule = "linear"
warmup_epochs = 0.05

[noise]
labels = ["lamb"]
batch_sizes = [32]
b_small = 16
b_big = 64
batches = 2

[[optimizers]]
name = "lamb"
lr = 0.01
lrs = [0.001, 0.01]

[[optimizers]]
name = "adamw"
lrs = [0.001, 0.01]
weight_decay = 0.01

[[optimizers]]
name = "momentum"
label = "momentum-lr1e4"
lr = 1e4
batch_sizes = [32]

[[optimizers]]
name = "lamb"
label = "lamb-invalid"
lr = 0.01
options = { betas = [1.5, 0.999] }  # a value the optimizer refuses when the run builds it
batch_sizes = [32]
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny sweep, run once through the CLI: (config path, db path, first and second outputs)."""
    root = tmp_path_factory.mktemp("sweep")
    config = root / "tiny.toml"
    config.write_text(TINY)
    db = root / "tiny.sqlite"
    assert main(["sweep", str(config), "--db", str(db), "--no-progress", "--threads", "1"]) == 0
    with ResultStore(db) as store:
        first = {r.key: (r.attempts, r.finished_at, r.status) for r in store.runs()}
    return config, db, first


def _runs(db, sweep="tiny"):
    with ResultStore(db) as store:
        return store.runs(sweep)


def test_grids():
    assert resolve_grid("paper-mnist") == PAPER_MNIST_LRS == (1e-4, 1e-3, 1e-2, 1e-1)
    assert len(PAPER_TUNING_LRS) == 34 and PAPER_TUNING_LRS[0] == 1e-4 and PAPER_TUNING_LRS[-1] == 50
    assert resolve_grid([1, 2.5]) == (1.0, 2.5)
    with pytest.raises(ValueError, match="unknown lrs preset 'nope'; known presets: paper-mnist"):
        resolve_grid("nope", "lrs")
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        resolve_grid([-1.0])


def test_spec_expansion_and_validation(tmp_path):
    spec = SweepSpec.from_dict({"name": "s", "task": "mnist-lenet", "batch_sizes": [32, 128], "base_batch": 32,
                                "optimizers": [{"name": "lamb", "lr": 0.01, "lrs": [0.01, 0.1]}]})  # fmt: skip
    runs = spec.expand()
    # the untuned run equals the grid point 0.01, so it is one run with both tags
    assert [(r.spec["config"]["batch_size"], r.spec["config"]["base_lr"], r.tags) for r in runs] == [
        (32, 0.01, ("grid", "untuned")), (32, 0.1, ("grid",)), (128, 0.01, ("grid", "untuned")), (128, 0.1, ("grid",))]
    assert len({r.key for r in runs}) == 4
    # keys do not depend on execution-only options
    again = SweepSpec.from_dict({**spec.raw, "train": {"log_every": 3, "eval_batch_size": 17}}).expand()
    assert [r.key for r in again] == [r.key for r in runs]
    # "peak" grids use the value as the LR at every batch size
    peak = SweepSpec.from_dict({**spec.raw, "optimizers": [{"name": "adam", "lrs": [0.01], "grid": "peak"}]}).expand()
    assert [r.spec["config"]["lr"] for r in peak] == [0.01, 0.01]
    # a grid restricted to some batch sizes; the untuned run everywhere
    some = SweepSpec.from_dict({**spec.raw, "optimizers": [{"name": "lamb", "lr": 0.01, "lrs": [0.1], "grid_batch_sizes": [128]}]})
    assert [(r.spec["config"]["batch_size"], r.spec["config"]["base_lr"]) for r in some.expand()] == [(32, 0.01), (128, 0.01), (128, 0.1)]
    with pytest.raises(ValueError, match="unknown key.*lrz"):
        SweepSpec.from_dict({**spec.raw, "optimizers": [{"name": "lamb", "lrz": [1]}]})
    with pytest.raises(ValueError, match="unknown training option.*bogus"):
        SweepSpec.from_dict({**spec.raw, "train": {"bogus": 1}})
    with pytest.raises(ValueError, match="labels must be unique"):
        SweepSpec.from_dict({**spec.raw, "optimizers": [{"name": "lamb", "lr": 1}, {"name": "lamb", "lr": 2}]})
    assert run_key({"a": 1, "b": [1, 2]}) == run_key({"b": [1, 2], "a": 1})


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(batch_sizes=[32.7]), r"batch_sizes must be a list of integers >= 1, got \[32.7\]"),
        (dict(batch_sizes=32), r"batch_sizes must be a list of integers >= 1, got 32"),
        (dict(seeds=[]), r"seeds must not be empty"),
        (dict(optimizers=[]), r"optimizers must be a non-empty list"),
        (dict(epochs="two"), r"epochs must be a finite number > 0, got 'two'"),
        (dict(evals=-3), r"evals must be an integer >= 0, got -3"),
        (dict(target={"drop": "x"}), r"target drop must be a number in \[0, 1\)"),
        (dict(task="imagenet"), r"unknown task 'imagenet'"),
        (dict(task_options={"train_subst": 8}), r"unknown option\(s\) train_subst for task 'mnist-lenet'"),
        (dict(train={"lr_rule": "cubic"}), r"lamb at batch 32 \(untuned\): unknown rule 'cubic'"),
        (dict(optimizers=[{"name": "lambb", "lr": 0.01}]), r"Unknown optimizer 'lambb'"),
        (dict(optimizers=[{"name": "lamb", "lr": True}]), r"lr of \[\[optimizers\]\] 'lamb' must be a finite number > 0, got True"),
        (dict(optimizers=[{"name": "lamb", "lr": 0.01, "options": {"betaz": 1}}]), r"Unknown option\(s\) betaz for optimizer 'lamb'"),
        (dict(optimizers=[{"name": "lamb", "lr": 0.01, "grid_batch_sizes": [64]}]), r"share no batch size with batch_sizes"),
        (dict(noise={"labels": ["lmab"]}), r"\[noise\] labels \['lmab'\] are not optimizer labels"),
        (dict(noise={"b_small": 0, "b_big": 64}), r"\[noise\] b_small must be an integer >= 1, got 0"),
        (dict(noise={"b_small": 16, "b_big": 64.5}), r"\[noise\] b_big must be an integer >= 1, got 64.5"),
        (dict(noise={"batches": 0}), r"\[noise\] batches must be an integer >= 1, got 0"),
        (dict(noise={"batch_sizes": [32.5]}), r"\[noise\] batch_sizes must be a list of integers >= 1, got \[32.5\]"),
        (dict(noise={"labels": "lamb"}), r"\[noise\] labels must be a list of optimizer labels \(strings\), got 'lamb'"),
        (dict(noise={"untuned_only": "false"}), r"\[noise\] untuned_only must be true or false \(a TOML boolean, unquoted\), got 'false'"),
        (dict(noise={"untuned_only": 0}), r"\[noise\] untuned_only must be true or false .*got 0"),
        (dict(noise=3), r"\[noise\] must be a table, got 3"),
    ],
)
def test_bad_sweep_configs_are_refused_before_anything_runs(change, message):
    base = {"name": "s", "task": "mnist-lenet", "batch_sizes": [32], "optimizers": [{"name": "lamb", "lr": 0.01}]}
    with pytest.raises(ValueError, match=message):
        SweepSpec.from_dict({**base, **change}).expand()


def test_noise_untuned_only_false_is_read_as_false():
    from largebatch.study.sweep import NoiseSpec

    assert NoiseSpec.from_dict({"untuned_only": False, "b_small": 8, "b_big": 32}).untuned_only is False
    assert NoiseSpec.from_dict({"b_small": 8, "b_big": 32}).untuned_only is True


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_report_user_errors_are_one_line_and_leave_everything_as_it_was(tmp_path, capsys):
    db = tmp_path / "s.sqlite"
    with ResultStore(db) as store:
        store.save_sweep("s", {"name": "s"})
    toml = tmp_path / "tiny.toml"
    toml.write_text(TINY)
    afile = tmp_path / "afile"
    afile.write_text("keep")
    other = tmp_path / "other.sqlite"  # an SQLite database of something else
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")

    cases = [
        (["report", str(tmp_path / "nope.sqlite"), "--out", str(tmp_path / "r1")], f"error: no sweep database at {tmp_path / 'nope.sqlite'}"),
        (["report", str(toml), "--out", str(tmp_path / "r2")],
         f"error: {toml} is not a sweep database (not an SQLite file; it was left as it is): give a database written by `largebatch sweep`"),
        (["report", str(other), "--out", str(tmp_path / "r3")], f"error: {other} is not a sweep database (it has no runs and sweeps tables)"),
        (["report", str(db), "--out", str(tmp_path / "r4"), "--sweep", "nosuch"], f"error: no sweep 'nosuch' in {db}; it holds: s"),
        (["report", str(db), "--out", str(afile)], f"error: cannot write the report into {afile}: it or a folder above it is a file"),
        (["report", str(db), "--out", str(afile / "r")], f"error: cannot write the report into {afile / 'r'}: it or a folder above it is a file"),
        (["report", "--out", str(tmp_path / "r5")], "error: give a sweep database, --synthetic, or both"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert _one_error_line(capsys).startswith(message), argv
    # nothing was created (no empty database, no empty report folder) and nothing was changed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "other.sqlite", "s.sqlite", "tiny.toml"]
    assert toml.read_text() == TINY and afile.read_text() == "keep"


def test_sweep_bad_db_is_one_line_and_changes_nothing(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    (tmp_path / "afile").write_text("keep")
    other = tmp_path / "other.sqlite"  # an SQLite database of another program: no sweep tables added to it
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    cases = [
        (["--db", str(other)], f"error: {other} is an SQLite database of something else (tables: t); it was left as it is"),
        (["--db", str(config)], f"error: {config} is not a sweep database (not an SQLite file; it was left as it is): "
                                "give a database written by `largebatch sweep`, or a new file name"),
        (["--db", str(config), "--dry-run"], f"error: {config} is not a sweep database (not an SQLite file"),
        (["--db", str(tmp_path / "afile" / "x.sqlite")],
         f"error: cannot create the sweep database {tmp_path / 'afile' / 'x.sqlite'}: {tmp_path / 'afile'} or a folder above it is a file"),
        (["--db", str(tmp_path)], f"error: the sweep database {tmp_path} is not a file"),
    ]  # fmt: skip
    for extra, message in cases:
        assert main(["sweep", str(config), "--no-progress", *extra]) == 2, extra
        assert _one_error_line(capsys).startswith(message), extra
    assert config.read_text() == TINY and (tmp_path / "afile").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "other.sqlite", "tiny.toml"]
    with sqlite3.connect(other) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["t"]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    bad = tmp_path / "noise.toml"
    bad.write_text(TINY.replace("b_small = 16", "b_small = 0"))
    assert main(["sweep", str(bad), "--db", str(tmp_path / "n.sqlite"), "--no-progress"]) == 2
    assert _one_error_line(capsys) == "error: [noise] b_small must be an integer >= 1, got 0"
    assert not (tmp_path / "n.sqlite").exists()


def test_a_changed_grid_reports_only_its_current_runs(tmp_path):
    """Runs the TOML no longer asks for leave the sweep (they stay in the database for reuse)."""
    from largebatch.study.store import ResultStore

    base = {"name": "s", "task": "mnist-lenet", "batch_sizes": [32], "optimizers": [{"name": "sgd", "lrs": [0.01, 0.02]}]}
    db = tmp_path / "s.sqlite"
    with ResultStore(db) as store:
        for lrs in ([0.01, 0.02], [0.01, 0.03]):
            spec = SweepSpec.from_dict({**base, "optimizers": [{"name": "sgd", "lrs": lrs}]})
            planned = spec.expand()
            for r in planned:
                store.register("s", r.key, r.label, r.tags, r.spec)
            store.prune_members("s", {(r.key, r.label) for r in planned})
        assert sorted(r.base_lr for r in store.runs("s")) == [0.01, 0.03]
        assert store.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 3


def test_tuned_cells_name_ties_and_unfinished_grid_points(tmp_path):
    from largebatch.study.report import _cell_text, load_study

    spec = SweepSpec.from_dict({"name": "s", "task": "mnist-lenet", "batch_sizes": [32],
                                "optimizers": [{"name": "sgd", "lrs": [0.01, 0.02, 0.03, 0.04]}]})  # fmt: skip
    db = tmp_path / "s.sqlite"
    with ResultStore(db) as store:
        store.save_sweep("s", spec.raw)
        planned = spec.expand()
        for r in planned:
            store.register("s", r.key, r.label, r.tags, r.spec)
        for r, acc in zip(planned[:3], (0.9, 0.9, 0.5)):  # the fourth never ran
            store.mark_running(r.key, "/tmp/x")
            store.record(r.key, {"status": "finished", "final": {"accuracy": acc}, "metric": "accuracy",
                                 "lr": r.spec["config"]["base_lr"]})  # fmt: skip
    study = load_study(db, "s")
    best = study.cell("sgd", 32, "tuned")
    assert best.run.lr == 0.01  # a tie goes to the smallest LR
    text = _cell_text(study, best, "tuned")
    assert "tied with lr 0.02" in text and "best of the 3 of 4 grid points that finished" in text
    # a report reads the database without writing to it (no side files either)
    before = db.read_bytes()
    report = write_report(tmp_path / "report", db, command="largebatch report s.sqlite --out report").read_text()
    assert db.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["report", "s.sqlite"]
    assert "selected on the same eval split it reports" in report
    assert "(1 grid point(s) at B=32 never started (pending) and are not in this table.)" in report
    assert "_Figure written by `largebatch report s.sqlite --out report`._" in report


def test_sweep_records_runs(tiny):
    _, db, _ = tiny
    runs = {(r.label, r.batch_size, r.spec["config"]["base_lr"]): r for r in _runs(db)}
    assert len({r.key for r in runs.values()}) == 10
    statuses = sorted(r.status for r in {r.key: r for r in runs.values()}.values())
    assert statuses == ["diverged", "failed"] + ["finished"] * 8

    lamb = runs[("lamb", 128, 0.01)]
    assert lamb.lr == pytest.approx(0.02)  # sqrt rule: 0.01 * sqrt(128 / 32)
    assert lamb.steps == lamb.total_steps == 4  # 512 examples, one epoch
    assert 0.0 <= lamb.final["accuracy"] <= 1.0 and lamb.metric == "accuracy"
    assert lamb.wall_time > 0 and lamb.seed == 0 and lamb.spec["config"]["task_options"]["train_subset"] == 512
    assert lamb.code_version["package"] == "0.1.0" and lamb.package_version == "0.1.0"
    assert lamb.environment["torch"] == torch.__version__ and lamb.environment["cpu_count"] >= 1
    evals = [h for h in lamb.history if h["split"] == "eval"]
    assert [h["step"] for h in evals] == [2, 4]  # evals = 2 per run, the last one being the final evaluation
    # per-layer trust ratios are recorded for LAMB, not for AdamW
    trains = [h for h in lamb.history if h["split"] == "train"]
    assert trains and set(trains[-1]["trust_ratio"]) >= {"conv1.weight", "fc3.weight"}
    assert all("trust_ratio" not in h for h in runs[("adamw", 128, 0.01)].history)
    # the gradient noise scale is measured at the eval points of the untuned LAMB run at B0 only
    probed = [h for h in runs[("lamb", 32, 0.01)].history if "noise_b_simple" in h]
    assert len(probed) == 2 and all(h["noise_trace"] > 0 for h in probed)
    assert all("noise_b_simple" not in h for h in runs[("lamb", 32, 0.001)].history)

    failed = runs[("lamb-invalid", 32, 0.01)]
    assert failed.status == "failed" and "Invalid beta parameter at index 0: 1.5" in failed.error and "Traceback" in failed.error
    diverged = runs[("momentum-lr1e4", 32, 1e4)]
    assert diverged.status == "diverged"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT COUNT(*) FROM invocations").fetchone()[0] >= 1


def test_second_invocation_skips_finished_runs(tiny):
    config, db, first = tiny
    summary = run_sweep(SweepSpec.from_toml(config), db, progress=False)
    assert summary.executed == 0 and summary.skipped == summary.planned == 10
    with ResultStore(db) as store:
        again = {r.key: (r.attempts, r.finished_at, r.status) for r in store.runs()}
        assert again == first  # nothing re-ran: same attempts and finish times
        assert len(store.invocations("tiny")) >= 2


def test_report_structure_and_plots(tiny, tmp_path):
    _, db, _ = tiny
    out = tmp_path / "report"
    assert main(["report", str(db), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    header = "| optimizer | B=32 (B0) | B=128 (4xB0) |"
    assert text.count(header) == 2  # untuned and tuned tables
    for needle in ("**Untuned**", "**Tuned**", "hardware:", "torch " + torch.__version__, "commands:", "largebatch sweep",
                   "Gradient noise scale", "B_simple", "scaling efficiency", "| lamb-invalid | failed", "diverged",
                   "Invalid beta parameter"):  # fmt: skip
        assert needle in text, needle
    for png in ("accuracy_vs_batch", "loss_curves", "lr_sensitivity", "trust_ratios", "noise_scale"):
        assert (out / f"{png}.png").stat().st_size > 1000, png
        assert f"({png}.png)" in text

    # the tuned cell is the best of the grid at that batch; the untuned one is the recipe's run
    study = load_study(db, "tiny")
    for b in (32, 128):
        grid = [r for r in study.runs if r.label == "adamw" and r.batch_size == b]
        assert study.cell("adamw", b, "tuned").value == max(r.final["accuracy"] for r in grid)
        untuned = study.cell("lamb", b, "untuned")
        assert untuned.run.spec["config"]["base_lr"] == 0.01 and "untuned" in untuned.tags
        row = f"| lamb | {study.cell('lamb', 32, 'untuned').value:.4f} (lr 0.01) | {untuned.value if b == 128 else study.cell('lamb', 128, 'untuned').value:.4f} (lr 0.02) |"
    assert row in text


def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    from largebatch.train.loop import TrainConfig, fit

    spec = SweepSpec.from_dict({"name": "resume", "task": "mnist-lenet", "task_options": {"train_subset": 256, "eval_subset": 128},
                                "batch_sizes": [32], "evals": 2, "optimizers": [{"name": "lamb", "lr": 0.01}]})  # fmt: skip
    reference = run_sweep(spec, tmp_path / "ref.sqlite", progress=False)
    assert reference.statuses == {"finished": 1}
    (ref,) = _runs(tmp_path / "ref.sqlite", "resume")

    # a "killed" run: registered, marked running, stopped after 3 of its 8 steps with a checkpoint
    db = tmp_path / "killed.sqlite"
    (planned,) = spec.expand()
    out = run_dir(tmp_path / "killed-runs", planned)
    with ResultStore(db) as store:
        store.register("resume", planned.key, planned.label, planned.tags, planned.spec)
        store.mark_running(planned.key, out)
    cfg = TrainConfig.from_dict({**planned.spec["config"], "out_dir": out, "max_steps": 3, "progress": False,
                                 "eval_every": 4, "checkpoint_every": 4, "log_every": 1})  # fmt: skip
    assert fit(cfg).status == "stopped"
    (tmp_path / out / "result.json").unlink(missing_ok=True)

    summary = run_sweep(spec, db, progress=False)
    assert summary.executed == 1
    (run,) = _runs(db, "resume")
    assert run.status == "finished" and run.resumed_from == 3 and run.attempts == 2  # the killed attempt and this one
    assert run.final["accuracy"] == ref.final["accuracy"]
    assert run.final["loss"] == pytest.approx(ref.final["loss"], rel=1e-5)


def test_a_save_removes_stale_temporaries_of_its_checkpoint_only(tmp_path):
    """A writer killed during a save leaves its temporary file; the next save of the same
    checkpoint removes it once it is stale, and keeps a fresh one (a writer may be at work)."""
    import os
    import time

    from largebatch.train.checkpoint import load_checkpoint, save_checkpoint

    ckpt = tmp_path / "checkpoint.pt"
    old = time.time() - 3600  # an hour: stale
    stale, fresh = tmp_path / ".checkpoint.pt.abc_1234.tmp", tmp_path / ".checkpoint.pt.xyz_5678.tmp"
    others = [tmp_path / ".checkpoint.pt.bak.abc_1234.tmp", tmp_path / ".other.pt.abc_1234.tmp", tmp_path / "checkpoint.pt.abc_1234.tmp",
              tmp_path / ".checkpoint.pt.abc_1234.tmp.keep"]  # another target's temporaries, and user files  # fmt: skip
    for p in [stale, fresh, *others]:
        p.write_bytes(b"x" * 100)
    for p in [stale, *others]:
        os.utime(p, (old, old))
    save_checkpoint(ckpt, {"step": 3})
    assert load_checkpoint(ckpt)["step"] == 3
    assert not stale.exists()
    assert fresh.exists() and all(p.exists() for p in others)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in [ckpt, fresh, *others])


@pytest.mark.timeout(300)
def test_parallel_workers(tmp_path):
    spec = SweepSpec.from_dict({"name": "par", "task": "mnist-lenet", "task_options": {"train_subset": 128, "eval_subset": 64},
                                "batch_sizes": [32, 64], "evals": 1, "optimizers": [{"name": "adamw", "lr": 1e-3}]})  # fmt: skip
    summary = run_sweep(spec, tmp_path / "par.sqlite", workers=2, threads=1, progress=False)
    assert summary.executed == 2 and summary.statuses == {"finished": 2}
    assert all(r.environment["torch_threads"] == 1 for r in _runs(tmp_path / "par.sqlite", "par"))


def test_threads_option_is_restored(tmp_path):
    before = torch.get_num_threads()
    spec = SweepSpec.from_dict({"name": "thr", "task": "mnist-lenet", "task_options": {"train_subset": 64, "eval_subset": 32},
                                "batch_sizes": [32], "evals": 1, "optimizers": [{"name": "adamw", "lr": 1e-3}]})  # fmt: skip
    run_sweep(spec, tmp_path / "thr.sqlite", threads=1, progress=False)
    assert _runs(tmp_path / "thr.sqlite", "thr")[0].environment["torch_threads"] == 1
    assert torch.get_num_threads() == before


def test_synthetic_layerwise_beats_sgd():
    problem = LayeredQuadratic()
    res = run_synthetic(problem, steps=200, optimizers={
        "momentum (SGD)": ("momentum", (0.5, 1.0, 2.0, 3.0), {"lr_unit": "1/L_max"}),
        "lars": ("lars", (0.01, 0.03), {}),
        "lamb": ("lamb", (0.01, 0.03), {}),
    })  # fmt: skip
    sgd = res.best["momentum (SGD)"].final_loss
    assert res.best["lars"].final_loss < 1e-2 * sgd
    assert res.best["lamb"].final_loss < 1e-2 * sgd
    # SGD cannot move the flattest layer (L = 1e-3) at a stable step; LARS can
    assert res.best["momentum (SGD)"].block_loss[0][0] > 0.5 and res.best["lars"].block_loss[0][0] < 1e-2
    # LARS's trust ratios order the layers by curvature: flat layers get the large per-layer LR
    ratios = res.best["lars"].trust_ratio[len(res.best["lars"].trust_ratio) // 2]
    assert ratios[0] > 100 * ratios[-1]
    assert all(math.isfinite(x) for x in res.best["lamb"].loss)


def test_report_synthetic_only(tmp_path):
    from largebatch.study.report import synthetic_section

    text = synthetic_section(tmp_path, steps=40)
    assert "L_max = 100" in text and "| lamb |" in text and (tmp_path / "synthetic.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="nothing to report"):
        write_report(tmp_path / "x")
    assert main(["report", "--out", str(tmp_path / "y")]) == 2


def test_store_roundtrip(tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as store:
        spec = {"config": {"task": "t", "optimizer": "lamb", "batch_size": 8, "seed": 1}}
        store.register("a", "k1", "lamb", ["grid"], spec)
        store.register("a", "k1", "lamb", ["grid", "untuned"], spec)  # the current tags replace the old ones
        store.register("b", "k1", "LAMB", ["grid"], spec)  # one run in two sweeps
        store.mark_running("k1", "/tmp/x")
        store.record("k1", {"status": "finished", "final": {"accuracy": 0.5, "loss": math.nan}, "history": [{"step": 1}],
                            "steps": 1, "metric": "accuracy"})  # fmt: skip
        (a,) = store.runs("a")
        assert a.tags == ("grid", "untuned") and a.final == {"accuracy": 0.5, "loss": None} and a.attempts == 1
        assert [r.label for r in store.runs("b")] == ["LAMB"] and len(store.runs()) == 1
        assert json.loads(json.dumps(a.history)) == [{"step": 1}]


def test_a_b0_run_that_did_not_learn_is_no_reference():
    """A B0 run that collapsed to chance without diverging (final loss ~ initial loss) must not make
    every larger batch "hold the target" against it."""
    from types import SimpleNamespace

    from largebatch.study.report import Group, learned

    def group(initial, final):
        return Group("lars", 32, [SimpleNamespace(final={"initial_loss": initial, "loss": final})])

    assert learned(group(2.3036, 0.03))
    assert not learned(group(2.3036, 2.3023))  # MNIST at chance: 0.9994 x the initial loss
    assert not learned(group(2.3036, 2.2))  # 0.955 x: not below 0.9 x
    assert learned(Group("x", 32, [SimpleNamespace(final={"loss": 2.3})]))  # no initial loss recorded: no verdict


def test_scaling_speedup_takes_the_slowest_seed_at_b0_as_at_b():
    """Steps to target at B0 came from the first seed only, while every other batch took the
    slowest of its seeds: with two seeds the speedup compared unlike things."""
    from largebatch.study.report import Group, Study, scaling_rows
    from largebatch.study.store import RunRecord

    def run(batch, seed, reached_at):
        history = [{"split": "eval", "step": s, "accuracy": 0.5 if s < reached_at else 0.99} for s in (10, 20, 40, 80)]
        return RunRecord(
            key=f"{batch}-{seed}", status="finished", task="t", optimizer="lamb", batch_size=batch, seed=seed,
            base_lr=0.01, lr=0.01, weight_decay=0.0, warmup_epochs=0.0, epochs=1.0, spec={"config": {}},
            metric="accuracy", final={"accuracy": 0.99}, history=history, steps=80, total_steps=80, warmup_steps=0,
            wall_time=1.0, error=None, attempts=1, resumed_from=None, code_version={}, package_version=None,
            environment={}, out_dir=None, started_at=None, finished_at=None, label="lamb", tags=("untuned",),
        )  # fmt: skip

    base = Group("lamb", 8, [run(8, 0, 20), run(8, 1, 80)])  # the first seed is fast, the second slow
    big = Group("lamb", 64, [run(64, 0, 10), run(64, 1, 10)])
    study = Study("s", {"base_batch": 8}, base.runs + big.runs, [], groups=[base, big])
    rec = next(r for r in scaling_rows(study, "untuned") if r["batch"] == 64)
    assert rec["steps_to_target"] == 10 and rec["speedup"] == 80 / 10  # 20 / 10 before
    assert rec["efficiency"] == 1.0


def test_commands_print_user_errors_in_one_line(capsys):
    """report and sweep share one wrapper: a ValueError/OSError as it is, an sqlite3 error naming the database."""
    from largebatch.commands import with_one_line_errors

    def failing(error):
        def body(args):
            raise error
        return body

    assert with_one_line_errors(failing(sqlite3.OperationalError("database is locked")), None, "runs/s.sqlite") == 2
    assert capsys.readouterr().err == "error: sweep database runs/s.sqlite: database is locked\n"
    assert with_one_line_errors(failing(FileNotFoundError("no sweep database at x")), None, "x") == 2
    assert capsys.readouterr().err == "error: no sweep database at x\n"
    assert with_one_line_errors(lambda args: 0, None, "x") == 0
