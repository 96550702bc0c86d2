"""The result store of a study: one SQLite file (stdlib ``sqlite3``, WAL journal).

Tables:

``runs``         one row per run, keyed by the hash of its semantic configuration
                 (:func:`run_key`): status, configuration, final metrics, the full history (eval
                 records, train-loss records, trust ratios, gradient noise scale), steps, wall
                 time, the traceback of a failed run, code version and environment.
``members``      which sweep asked for which run, under which optimizer label and with which
                 tags ("untuned": the recipe from the base LR; "grid": a point of a tuning
                 grid). One run can belong to several sweeps, labels or tags.
``sweeps``       each sweep's name and its full configuration, as given.
``invocations``  each ``largebatch sweep`` invocation: its command, start, end, wall time and
                 environment (a report's header sums these).

Statuses: ``pending`` (registered), ``running`` (started; a run found "running" by a later
invocation was interrupted and is resumed from its checkpoint), ``finished``, ``diverged``
(non-finite loss), ``failed`` (an exception; the traceback is kept) and ``stopped``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

DONE = ("finished", "diverged", "failed", "stopped")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    task TEXT NOT NULL,
    optimizer TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    base_lr REAL,
    lr REAL,
    weight_decay REAL,
    warmup_epochs REAL,
    epochs REAL,
    spec TEXT NOT NULL,
    metric TEXT,
    final TEXT,
    history TEXT,
    steps INTEGER,
    total_steps INTEGER,
    warmup_steps INTEGER,
    wall_time REAL,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    resumed_from INTEGER,
    code_version TEXT,
    package_version TEXT,
    environment TEXT,
    out_dir TEXT,
    started_at REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS members (
    sweep TEXT NOT NULL,
    key TEXT NOT NULL,
    label TEXT NOT NULL,
    tags TEXT NOT NULL,
    PRIMARY KEY (sweep, key, label)
);
CREATE TABLE IF NOT EXISTS sweeps (
    name TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS invocations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sweep TEXT NOT NULL,
    command TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    wall_time REAL,
    runs_executed INTEGER,
    environment TEXT,
    code_version TEXT
);
"""


def _schema_columns() -> dict[str, set[str]]:
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(_SCHEMA)
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {n: {r[1] for r in conn.execute(f"PRAGMA table_info({n})")} for n in names if not n.startswith("sqlite_")}
    finally:
        conn.close()


_COLUMNS = _schema_columns()  # table -> its columns, as _SCHEMA makes them


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def run_key(spec: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of a run's semantic specification."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:16]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Hardware and software of this process: CPU model and count, torch/python/platform, threads."""
    import torch

    env = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        env["affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        pass
    return env


def code_version() -> dict[str, Any]:
    """The package version and, when the package lives in a git checkout, its commit and whether
    the tracked files differ from it."""
    import largebatch

    out: dict[str, Any] = {"package": largebatch.__version__, "commit": None, "dirty": None}
    root = Path(largebatch.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "largebatch"],
                                    cwd=root, capture_output=True, text=True, timeout=10)  # fmt: skip
            out["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


@dataclass
class RunRecord:
    """One row of ``runs`` (JSON columns decoded), plus its labels and tags in one sweep."""

    key: str
    status: str
    task: str
    optimizer: str
    batch_size: int
    seed: int
    base_lr: float | None
    lr: float | None
    weight_decay: float | None
    warmup_epochs: float | None
    epochs: float | None
    spec: dict[str, Any]
    metric: str | None
    final: dict[str, Any]
    history: list[dict[str, Any]]
    steps: int | None
    total_steps: int | None
    warmup_steps: int | None
    wall_time: float | None
    error: str | None
    attempts: int
    resumed_from: int | None
    code_version: dict[str, Any]
    package_version: str | None
    environment: dict[str, Any]
    out_dir: str | None
    started_at: float | None
    finished_at: float | None
    label: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)

    def value(self, metric: str | None = None) -> float:
        """The final value of ``metric`` (default the task's headline metric); NaN if absent."""
        v = self.final.get(metric or self.metric or "accuracy")
        return float("nan") if v is None else float(v)


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    for k, default in (("spec", {}), ("final", {}), ("history", []), ("code_version", {}), ("environment", {})):
        d[k] = json.loads(d[k]) if d.get(k) else default
    return d


class ResultStore:
    """A study's SQLite database. Safe to open from several processes (WAL, busy timeout)."""

    def __init__(self, path: str | os.PathLike, timeout: float = 60.0, readonly: bool = False):
        """``readonly=True`` (reports) opens an existing database without writing to it at all."""
        self.path = Path(path)
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"no sweep database at {self.path}")
            self._check_sqlite_header("")
            # No -wal file: no writer is active and nothing is left to checkpoint, so the file is
            # read as immutable (SQLite then creates no -wal/-shm side files beside it either).
            live = self.path.with_name(self.path.name + "-wal").exists()
            uri = f"{self.path.resolve().as_uri()}?mode=ro" + ("" if live else "&immutable=1")
            self.conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            try:
                tables = {r["name"] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            except sqlite3.DatabaseError as err:
                self.conn.close()
                raise ValueError(f"{self.path} is not a sweep database (SQLite: {err})") from None
            if not {"runs", "sweeps"} <= tables:
                self.conn.close()
                raise ValueError(f"{self.path} is not a sweep database (it has no runs and sweeps tables): give a "
                                 f"database written by `largebatch sweep`")  # fmt: skip
            mismatch = self._foreign_tables(tables)
            if mismatch:
                self.conn.close()
                raise ValueError(f"{self.path} is not a sweep database ({mismatch}): give a database written by "
                                 f"`largebatch sweep`")  # fmt: skip
            return
        if self.path.exists():
            if not self.path.is_file():
                raise ValueError(f"the sweep database {self.path} is not a file; give a file name")
            self._check_sqlite_header(", or a new file name")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ValueError(f"cannot create the sweep database {self.path}: {self.path.parent} or a folder above it "
                             f"is a file, not a folder") from None  # fmt: skip
        self.conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        tables = {r["name"] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        mismatch = self._foreign_tables(tables)
        if tables and (not tables & set(_COLUMNS) or mismatch):  # another program's database
            self.conn.close()
            raise ValueError(f"{self.path} is an SQLite database of something else (tables: {', '.join(sorted(tables))}"
                             f"{'; ' + mismatch if mismatch else ''}); it was left as it is: give a database written by "
                             f"`largebatch sweep`, or a new file name")  # fmt: skip
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(f"BEGIN;{_SCHEMA}COMMIT;")  # all four tables or none

    def _foreign_tables(self, tables: set[str]) -> str:
        """What differs between the tables of this database named like ours and ours: "" when
        nothing does (another program's ``runs`` table must not be written to)."""
        for name, columns in _COLUMNS.items():
            if name in tables:
                have = {r["name"] for r in self.conn.execute(f"PRAGMA table_info({name})")}
                missing = sorted(columns - have)
                if missing:
                    more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
                    return f"its table {name} has no column(s) {', '.join(missing[:4])}{more}"
        return ""

    def _check_sqlite_header(self, alternative: str) -> None:
        """Refuse, without writing to it, a file that is not an SQLite database (an empty file is
        one: SQLite starts a new database in it)."""
        with open(self.path, "rb") as f:
            head = f.read(16)
        if head and head != b"SQLite format 3\x00":
            raise ValueError(f"{self.path} is not a sweep database (not an SQLite file; it was left as it is): give "
                             f"a database written by `largebatch sweep`{alternative}")  # fmt: skip

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _tx(self):
        return _Transaction(self.conn)

    # -- sweeps and membership

    def save_sweep(self, name: str, config: dict[str, Any]) -> None:
        with self._tx():
            self.conn.execute(
                "INSERT INTO sweeps(name, config, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET config=excluded.config, updated_at=excluded.updated_at",
                (name, canonical_json(config), time.time()),
            )

    def sweep_config(self, name: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT config FROM sweeps WHERE name=?", (name,)).fetchone()
        return json.loads(row["config"]) if row else None

    def sweeps(self) -> list[str]:
        return [r["name"] for r in self.conn.execute("SELECT name FROM sweeps ORDER BY updated_at")]

    def register(self, sweep: str, key: str, label: str, tags: Iterable[str], spec: dict[str, Any]) -> None:
        """Add a run (status "pending" unless it exists) and its membership in ``sweep``."""
        cfg = spec["config"]
        with self._tx():
            self.conn.execute(
                "INSERT OR IGNORE INTO runs(key, status, task, optimizer, batch_size, seed, base_lr, lr, weight_decay, "
                "warmup_epochs, epochs, spec) VALUES (?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, cfg["task"], cfg["optimizer"], cfg["batch_size"], cfg["seed"], cfg.get("base_lr"), cfg.get("lr"),
                 cfg.get("weight_decay"), cfg.get("warmup_epochs"), cfg.get("epochs"), canonical_json(spec)),
            )  # fmt: skip
            self.conn.execute(
                "INSERT INTO members(sweep, key, label, tags) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(sweep, key, label) DO UPDATE SET tags=excluded.tags",
                (sweep, key, label, json.dumps(sorted(set(tags)))),
            )

    def prune_members(self, sweep: str, keep: set[tuple[str, str]], labels: set[str] | None = None) -> int:
        """Drop the memberships of ``sweep`` that its current grid no longer asks for (of every
        label, or only of ``labels``), so that a report shows the current grid only. The runs
        themselves stay in the database (another sweep, or the grid changed back, reuses them).
        Returns the number of memberships dropped."""
        with self._tx():
            rows = self.conn.execute("SELECT key, label FROM members WHERE sweep=?", (sweep,)).fetchall()
            gone = [(r["key"], r["label"]) for r in rows
                    if (r["key"], r["label"]) not in keep and (labels is None or r["label"] in labels)]  # fmt: skip
            self.conn.executemany("DELETE FROM members WHERE sweep=? AND key=? AND label=?", [(sweep, k, lb) for k, lb in gone])
        return len(gone)

    # -- run lifecycle

    def status(self, key: str) -> str | None:
        row = self.conn.execute("SELECT status FROM runs WHERE key=?", (key,)).fetchone()
        return row["status"] if row else None

    def mark_running(self, key: str, out_dir: str) -> None:
        with self._tx():
            self.conn.execute(
                "UPDATE runs SET status='running', attempts=attempts+1, started_at=?, out_dir=?, error=NULL WHERE key=?",
                (time.time(), out_dir, key),
            )

    def record(self, key: str, outcome: dict[str, Any]) -> None:
        """Store what a run produced (see ``largebatch.study.sweep.execute_run``)."""
        final = {k: _finite_or_none(v) for k, v in (outcome.get("final") or {}).items()}
        with self._tx():
            self.conn.execute(
                "UPDATE runs SET status=?, metric=?, final=?, history=?, steps=?, total_steps=?, warmup_steps=?, lr=COALESCE(?, lr), "
                "wall_time=?, error=?, resumed_from=?, code_version=?, package_version=?, environment=?, finished_at=? "
                "WHERE key=?",
                (outcome["status"], outcome.get("metric"), json.dumps(final), json.dumps(outcome.get("history") or []),
                 outcome.get("steps"), outcome.get("total_steps"), outcome.get("warmup_steps"), outcome.get("lr"),
                 outcome.get("wall_time"), outcome.get("error"), outcome.get("resumed_from"),
                 json.dumps(outcome.get("code_version") or {}), (outcome.get("code_version") or {}).get("package"),
                 json.dumps(outcome.get("environment") or {}), time.time(), key),
            )  # fmt: skip

    # -- invocations

    def begin_invocation(self, sweep: str, command: str) -> int:
        with self._tx():
            cur = self.conn.execute(
                "INSERT INTO invocations(sweep, command, started_at, environment, code_version) VALUES (?, ?, ?, ?, ?)",
                (sweep, command, time.time(), json.dumps(environment()), json.dumps(code_version())),
            )
        return int(cur.lastrowid)

    def end_invocation(self, invocation: int, runs_executed: int) -> None:
        """Record an invocation's runs and time so far (called after every run, and at its end,
        so that an invocation that is killed still counts what it did)."""
        now = time.time()
        with self._tx():
            self.conn.execute(
                "UPDATE invocations SET finished_at=?, wall_time=?-started_at, runs_executed=? WHERE id=?",
                (now, now, runs_executed, invocation),
            )

    def invocations(self, sweep: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT * FROM invocations" + (" WHERE sweep=?" if sweep else "") + " ORDER BY id"
        rows = self.conn.execute(q, (sweep,) if sweep else ()).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["environment"] = json.loads(d["environment"]) if d["environment"] else {}
            d["code_version"] = json.loads(d["code_version"]) if d["code_version"] else {}
            out.append(d)
        return out

    # -- queries

    def runs(self, sweep: str | None = None) -> list[RunRecord]:
        """All runs (one record per run and label in ``sweep``; one per run when sweep is None)."""
        if sweep is None:
            rows = self.conn.execute("SELECT * FROM runs ORDER BY rowid").fetchall()
            return [RunRecord(**_decode(r)) for r in rows]
        rows = self.conn.execute(
            "SELECT runs.*, members.label AS label, members.tags AS tags FROM runs JOIN members ON runs.key = members.key "
            "WHERE members.sweep=? ORDER BY runs.rowid, members.label",
            (sweep,),
        ).fetchall()
        out = []
        for r in rows:
            d = _decode(r)
            d["tags"] = tuple(json.loads(d["tags"]))
            out.append(RunRecord(**d))
        return out

    def counts(self, sweep: str | None = None) -> dict[str, int]:
        if sweep is None:
            q, args = "SELECT status, COUNT(*) AS n FROM runs GROUP BY status", ()
        else:
            q = ("SELECT status, COUNT(*) AS n FROM runs WHERE key IN (SELECT key FROM members WHERE sweep=?) "
                 "GROUP BY status")  # fmt: skip
            args = (sweep,)
        return {r["status"]: r["n"] for r in self.conn.execute(q, args)}


class _Transaction:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, *rest):
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False


def python_command(argv: list[str] | None = None) -> str:
    """The command line of this process, as a user would type it (``largebatch ...``)."""
    import shlex

    argv = list(sys.argv if argv is None else argv)
    head = Path(argv[0]).name if argv else "largebatch"
    if head in ("__main__.py", "cli.py", "largebatch"):
        head = "largebatch"
    return " ".join([head] + [shlex.quote(a) for a in argv[1:]])
