"""What sweeps, the result store, reports, the demo and `largebatch schedule` promise a user:
results are never run twice at once nor mixed with another config's, files that are not ours are
left as they are, and a bad argument is a one-line error."""

from __future__ import annotations

import fcntl
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from largebatch.cli import main
from largebatch.study.store import ResultStore
from largebatch.study.sweep import SweepSpec, run_dir, run_sweep

TINY_TASK = {"task": "mnist-lenet", "task_options": {"train_subset": 64, "eval_subset": 32}, "evals": 1}


def test_a_foreign_database_with_a_runs_table_is_refused_and_left_as_it_is(tmp_path):
    """Another program's SQLite file that has a table called runs was written to (three tables
    added, WAL journal switched on) before the sweep failed on a missing column."""
    db = tmp_path / "other.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE runs (x)")
        conn.execute("CREATE TABLE sweeps (y)")
    before = db.read_bytes()
    with pytest.raises(ValueError, match=r"other.sqlite is an SQLite database of something else \(tables: runs, sweeps; "
                                         r"its table runs has no column\(s\) attempts, base_lr, batch_size, code_version and 24 more\); "
                                         r"it was left as it is"):  # fmt: skip
        ResultStore(db)
    with pytest.raises(ValueError, match=r"other.sqlite is not a sweep database \(its table runs has no column\(s\) attempts"):
        ResultStore(db, readonly=True)
    assert db.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["other.sqlite"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master")) == ["runs", "sweeps"]

    # the CLI says so in one line, and a sweep database of ours still opens
    config = tmp_path / "s.toml"
    config.write_text('name = "s"\ntask = "mnist-lenet"\nbatch_sizes = [32]\n[[optimizers]]\nname = "sgd"\nlr = 0.1\n')
    assert main(["sweep", str(config), "--db", str(db), "--no-progress"]) == 2
    assert db.read_bytes() == before
    with ResultStore(tmp_path / "ours.sqlite"):
        pass
    with ResultStore(tmp_path / "ours.sqlite") as store:
        assert store.runs() == []


def test_a_second_sweep_leaves_alone_the_runs_another_process_executes(tmp_path):
    """Two sweeps of one database both executed every run (each saw the other's "running" runs
    as interrupted), twice the work in the same run folders."""
    spec = SweepSpec.from_dict({"name": "two", **TINY_TASK, "batch_sizes": [64], "optimizers": [{"name": "sgd", "lrs": [0.01, 0.02]}]})
    db = tmp_path / "two.sqlite"
    busy, free = spec.expand()
    out = run_dir(tmp_path / "two-runs", busy)
    with ResultStore(db) as store:  # another sweep process has started `busy` and holds its folder
        store.register("two", busy.key, busy.label, busy.tags, busy.spec)
        store.mark_running(busy.key, out)
    Path(out).mkdir(parents=True)
    with open(Path(out) / ".sweep.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        summary = run_sweep(spec, db, progress=False)
    assert summary.executed == 1 and summary.statuses == {"finished": 1, "running": 1}  # 2 executed before
    assert summary.busy == 1
    with ResultStore(db) as store:
        assert (store.status(busy.key), store.status(free.key)) == ("running", "finished")
        assert not (Path(out) / "result.json").exists()
    # that process died (its lock went with it): the next sweep resumes the run
    summary = run_sweep(spec, db, progress=False)
    assert (summary.executed, summary.busy, summary.statuses) == (1, 0, {"finished": 2})
    with ResultStore(db) as store:
        assert [r.attempts for r in store.runs("two")] == [2, 1]


@pytest.mark.timeout(120)
def test_worker_sweeps_mark_a_run_running_only_when_it_starts(tmp_path, monkeypatch):
    """With workers=2 every queued run was marked running (attempts + 1, start time) at once: a
    sweep killed early left them all "running" with an attempt they never made."""
    events = []
    mark, record = ResultStore.mark_running, ResultStore.record
    monkeypatch.setattr(ResultStore, "mark_running", lambda self, key, out: (events.append("start"), mark(self, key, out)))
    monkeypatch.setattr(ResultStore, "record", lambda self, key, outcome: (events.append("end"), record(self, key, outcome)))
    spec = SweepSpec.from_dict({"name": "pool", **TINY_TASK, "batch_sizes": [64], "optimizers": [{"name": "sgd", "lrs": [0.01, 0.02, 0.03]}]})
    summary = run_sweep(spec, tmp_path / "pool.sqlite", workers=2, threads=1, progress=False)
    assert summary.statuses == {"finished": 3}
    in_flight = [events[: i + 1].count("start") - events[: i + 1].count("end") for i in range(len(events))]
    assert events.count("start") == 3 and max(in_flight) == 2  # 3 before
    with ResultStore(tmp_path / "pool.sqlite") as store:
        assert [r.attempts for r in store.runs("pool")] == [1, 1, 1]


def test_only_keeps_the_sweep_to_its_current_config(tmp_path):
    """After an edit of label b's grid, `--only a` kept b's old grid points in the sweep (and did
    not add the new ones): the report showed the old runs under the new config."""
    base = {"name": "s", **TINY_TASK, "batch_sizes": [64]}
    old = SweepSpec.from_dict({**base, "optimizers": [{"name": "sgd", "label": "a", "lrs": [0.01]},
                                                      {"name": "sgd", "label": "b", "lrs": [0.1]}]})  # fmt: skip
    new = SweepSpec.from_dict({**base, "optimizers": [{"name": "sgd", "label": "a", "lrs": [0.01]},
                                                      {"name": "sgd", "label": "b", "lrs": [0.2]}]})  # fmt: skip
    db = tmp_path / "s.sqlite"
    with ResultStore(db) as store:  # the old config, run to the end
        store.save_sweep("s", old.raw)
        for r in old.expand():
            store.register("s", r.key, r.label, r.tags, r.spec)
            store.mark_running(r.key, "x")
            store.record(r.key, {"status": "finished", "final": {"accuracy": 0.5}, "lr": r.spec["config"]["base_lr"]})
    summary = run_sweep(new, db, progress=False, only=("a",))
    with ResultStore(db) as store:
        assert sorted((r.label, r.base_lr, r.status) for r in store.runs("s")) == [("a", 0.01, "finished"), ("b", 0.2, "pending")]
        assert len(store.runs()) == 3  # b's old run stays in the database
    assert (summary.planned, summary.executed, summary.dropped) == (1, 0, 1)


def test_sweep_says_when_the_config_dropped_runs(tmp_path, capsys):
    db = tmp_path / "s.sqlite"
    toml = tmp_path / "s.toml"
    head = 'name = "s"\ntask = "mnist-lenet"\nbatch_sizes = [32]\n[[optimizers]]\nname = "sgd"\nlabel = "b"\nlrs = [0.1]\n'
    toml.write_text(head + '[[optimizers]]\nname = "sgd"\nlabel = "a"\nlrs = [0.2]\n')
    spec = SweepSpec.from_toml(toml)
    with ResultStore(db) as store:
        store.save_sweep("s", spec.raw)
        for r in spec.expand():
            store.register("s", r.key, r.label, r.tags, r.spec)
            store.mark_running(r.key, "x")
            store.record(r.key, {"status": "finished", "final": {"accuracy": 0.5}})
    toml.write_text(head)
    assert main(["sweep", str(toml), "--db", str(db), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "sweep s: 1 runs, 1 already done, 0 executed" in out
    assert ("the config of sweep 's' changed: 1 run(s) it no longer asks for left the sweep (they stay in the database, "
            "and come back if the config asks for them again)") in out


@pytest.mark.parametrize("name, message", [
    ("", "is a folder; give a file name such as {p}/schedule.png"),
    ("sched", "has no suffix; give a file name with the format as its suffix, such as {p}.png"),
])  # fmt: skip
def test_schedule_plot_needs_a_file_name_with_a_format(tmp_path, capsys, name, message):
    """`--plot DIR` (or a name without suffix) wrote DIR.png beside it and printed "wrote DIR"."""
    path = str(tmp_path / name) if name else str(tmp_path)
    assert main(["schedule", "--recipe", "bert", "--plot", path]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"error: --plot {path} {message.format(p=path)}\n"
    assert not (tmp_path.parent / f"{tmp_path.name}.png").exists() and list(tmp_path.iterdir()) == []


def test_demo_plot_shows_short_runs_and_names_its_command(tmp_path, monkeypatch):
    """The demo's plot had its y axis fixed to [0.9, 1]: a run with --epochs/--train-subset below
    90% accuracy drew an empty plot; results.md did not say which command wrote it."""
    import matplotlib.axes

    from largebatch.study import demo

    def result(acc):
        return SimpleNamespace(final={"accuracy": acc}, steps=4, lr=0.01,
                               history=[{"split": "eval", "epoch": 0.5, "accuracy": acc / 2}, {"split": "eval", "epoch": 1.0, "accuracy": acc}])  # fmt: skip

    fake = [(s, b, result(a)) for s in demo.SETTINGS for b, a in ((16, 0.4), (64, 0.3))]
    monkeypatch.setattr(demo, "run_demo", lambda *args: fake)
    limits = []
    set_ylim = matplotlib.axes.Axes.set_ylim
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylim", lambda self, *a, **k: (limits.append(a), set_ylim(self, *a, **k))[1])
    out = tmp_path / "demo"
    out.mkdir()  # the runs' folders are in it
    assert main(["demo", "--out-dir", str(out), "--base-batch", "16", "--scale", "4", "--epochs", "1", "--train-subset", "512",
                 "--no-progress"]) == 0  # fmt: skip
    assert limits[0] == (pytest.approx(0.13), 1.0)  # the plot's own limits: lowest point 0.3 / 2, less 0.02
    text = (out / "results.md").read_text()
    assert text.startswith("| optimizer | batch 16 | batch 64 | drop |\n")
    assert text.endswith(f"\n\nTable and accuracy.png written by `largebatch demo --out-dir {out} --base-batch 16 --scale 4 "
                         f"--epochs 1 --train-subset 512`.\n")  # fmt: skip
    assert (out / "accuracy.png").stat().st_size > 1000


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", 7])
def test_a_sweep_name_that_is_no_plain_file_name_is_refused(name):
    d = {"name": name, "task": "mnist-lenet", "batch_sizes": [32], "optimizers": [{"name": "sgd", "lr": 0.1}]}
    with pytest.raises(ValueError, match="name must be letters, digits"):
        SweepSpec.from_dict(d)
    d["name"] = "mnist-scaling_10ep.v2"
    assert SweepSpec.from_dict(d).name == "mnist-scaling_10ep.v2"
