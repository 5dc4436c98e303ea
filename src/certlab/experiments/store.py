"""The results store: one SQLite database per sweep directory (``DIR/results.sqlite``), WAL journal.

Schema (version 1; documented in docs/experiments.md):

- ``meta(key PK, value)``: ``schema_version``.
- ``experiments(name PK, source, spec_json, created, updated)``: the experiment file as loaded.
- ``cells(id PK, experiment, idx, params_json, config_json, status, attempts, started, finished, error,
  result_json, history_json)``: one row per distinct resolved config. ``status`` ∈ pending | running |
  finished | failed. ``result_json`` holds the cell function's full result; ``history_json`` the per-epoch rows.
- ``members(experiment, cell_id)`` PK (experiment, cell_id): which experiments contain a cell (two experiment
  files may share a cell; it is run once).
- ``metrics(cell_id, key, value)`` PK (cell_id, key): flat numeric metrics of finished cells.

Every state change is one ``BEGIN IMMEDIATE`` transaction, so a killed process leaves either the old or the new
state; the primary keys make duplicate cells impossible.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from contextlib import contextmanager

from certlab.errors import CertlabError

SCHEMA_VERSION = 1
DB_NAME = "results.sqlite"
STATUSES = ("pending", "running", "finished", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS experiments (
    name TEXT PRIMARY KEY, source TEXT, spec_json TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    id TEXT PRIMARY KEY,
    experiment TEXT NOT NULL,
    idx INTEGER NOT NULL,
    params_json TEXT NOT NULL,
    config_json TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending','running','finished','failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    started REAL, finished REAL, error TEXT, result_json TEXT, history_json TEXT);
CREATE TABLE IF NOT EXISTS members (
    experiment TEXT NOT NULL, cell_id TEXT NOT NULL REFERENCES cells(id), idx INTEGER NOT NULL,
    params_json TEXT NOT NULL, PRIMARY KEY (experiment, cell_id));
CREATE TABLE IF NOT EXISTS metrics (
    cell_id TEXT NOT NULL REFERENCES cells(id), key TEXT NOT NULL, value REAL,
    PRIMARY KEY (cell_id, key));
CREATE INDEX IF NOT EXISTS cells_status ON cells(status);
"""


def db_path(directory) -> str:
    return os.path.join(os.fspath(directory), DB_NAME)


def flatten_metrics(result: dict, prefix: str = "") -> dict:
    """Numeric leaves of a nested dict as ``{"a.b": float}`` (bools as 0/1, None skipped, lists skipped)."""
    out = {}
    for k, v in (result or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_metrics(v, key + "."))
        elif isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[key] = float(v)
    return out


class Store:
    """Open (creating if needed) the results database of a sweep directory.

    ``Store(dir)`` for read/write; ``Store(dir, readonly=True)`` never creates or changes anything."""

    def __init__(self, directory, readonly: bool = False):
        self.directory = os.fspath(directory)
        self.path = db_path(self.directory)
        if readonly:
            if not os.path.exists(self.path):
                raise CertlabError(f"no results database in {self.directory} (expected {DB_NAME})")
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30,
                                        isolation_level=None)
            self._check_version()
            return
        os.makedirs(self.directory, exist_ok=True)
        self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            with self.transaction() as c:
                for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                    c.execute(stmt)
                row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if row is None:
                    c.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise CertlabError(f"{self.path} is not a certlab results database: {e}") from None
        self._check_version()

    def _check_version(self):
        try:
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as e:
            raise CertlabError(f"{self.path} is not a certlab results database: {e}") from None
        if row is None or int(row[0]) != SCHEMA_VERSION:
            raise CertlabError(f"{self.path}: schema version {row and row[0]} is not {SCHEMA_VERSION}")

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def transaction(self):
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error)."""
        cur = self.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield _Cursor(cur)
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    # ---- writing -------------------------------------------------------------------------------------
    def add_experiment(self, exp, cells) -> int:
        """Record ``exp`` and insert its cells that are not in the database yet (existing cells — same id —
        keep their status and results). Returns the number of new cells."""
        now = time.time()
        spec = json.dumps(exp.to_dict(), sort_keys=True)
        new = 0
        with self.transaction() as c:
            c.execute("INSERT INTO experiments VALUES (?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
                      "source=excluded.source, spec_json=excluded.spec_json, updated=excluded.updated",
                      (exp.name, exp.source, spec, now, now))
            ids = {cell.id for cell in cells}
            for (old,) in c.execute("SELECT cell_id FROM members WHERE experiment=?", (exp.name,)).fetchall():
                if old not in ids:  # the file changed: the cell stays in the database, no longer in this experiment
                    c.execute("DELETE FROM members WHERE experiment=? AND cell_id=?", (exp.name, old))
            for cell in cells:
                params = json.dumps(cell.params, sort_keys=True)
                cur = c.execute("INSERT OR IGNORE INTO cells (id, experiment, idx, params_json, config_json) "
                                "VALUES (?,?,?,?,?)", (cell.id, exp.name, cell.index, params,
                                                       json.dumps(cell.config, sort_keys=True)))
                new += cur.rowcount
                c.execute("INSERT OR REPLACE INTO members VALUES (?,?,?,?)", (exp.name, cell.id, cell.index, params))
        return new

    def recover_interrupted(self, message="interrupted: the sweep running it stopped") -> list:
        """Mark every ``running`` cell failed (call only while holding the directory lock: then no live sweep
        owns them). Returns their ids."""
        with self.transaction() as c:
            ids = [r[0] for r in c.execute("SELECT id FROM cells WHERE status='running'").fetchall()]
            c.execute("UPDATE cells SET status='failed', error=?, finished=? WHERE status='running'",
                      (message, time.time()))
        return ids

    def claim(self, cell_id: str) -> None:
        """pending/failed -> running, attempts + 1."""
        with self.transaction() as c:
            cur = c.execute("UPDATE cells SET status='running', attempts=attempts+1, started=?, finished=NULL, "
                            "error=NULL WHERE id=? AND status IN ('pending','failed')", (time.time(), cell_id))
            if cur.rowcount != 1:
                raise CertlabError(f"cell {cell_id} cannot be claimed (not pending or failed)")

    def finish(self, cell_id: str, result: dict, history=None) -> None:
        """running -> finished with the result and its flat metrics, in one transaction."""
        metrics = flatten_metrics(result.get("metrics", result))
        # paths inside the sweep directory are stored relative to it, so a committed database names no machine
        root = json.dumps(os.path.abspath(self.directory) + os.sep)[1:-1]
        text = json.dumps(result, sort_keys=True, default=_jsonable).replace(root, "")
        with self.transaction() as c:
            cur = c.execute("UPDATE cells SET status='finished', finished=?, error=NULL, result_json=?, "
                            "history_json=? WHERE id=? AND status='running'",
                            (time.time(), text,
                             None if history is None else json.dumps(history, default=_jsonable), cell_id))
            if cur.rowcount != 1:
                raise CertlabError(f"cell {cell_id} is not running; its result was not recorded")
            c.execute("DELETE FROM metrics WHERE cell_id=?", (cell_id,))
            c.executemany("INSERT INTO metrics VALUES (?,?,?)", [(cell_id, k, v) for k, v in metrics.items()])

    def fail(self, cell_id: str, error: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE cells SET status='failed', finished=?, error=? WHERE id=? AND status='running'",
                      (time.time(), error[-4000:], cell_id))

    # ---- reading -------------------------------------------------------------------------------------
    def status_counts(self, experiment: str | None = None) -> dict:
        """{status: number of cells} (of one experiment if given)."""
        if experiment:
            rows = self.conn.execute("SELECT c.status, COUNT(*) FROM cells c JOIN members m ON m.cell_id=c.id "
                                     "WHERE m.experiment=? GROUP BY c.status", (experiment,)).fetchall()
        else:
            rows = self.conn.execute("SELECT status, COUNT(*) FROM cells GROUP BY status").fetchall()
        counts = dict.fromkeys(STATUSES, 0)
        counts.update(dict(rows))
        return counts

    def cell_ids(self, experiment: str, statuses=STATUSES) -> list:
        marks = ",".join("?" * len(statuses))
        rows = self.conn.execute(f"SELECT c.id FROM cells c JOIN members m ON m.cell_id=c.id WHERE m.experiment=? "
                                 f"AND c.status IN ({marks}) ORDER BY m.idx", (experiment, *statuses)).fetchall()
        return [r[0] for r in rows]

    def cell(self, cell_id: str) -> dict:
        row = self.conn.execute("SELECT * FROM cells WHERE id=?", (cell_id,)).fetchone()
        if row is None:
            raise CertlabError(f"no cell {cell_id} in {self.path}")
        return self._row(row)

    def _row(self, row) -> dict:
        names = [d[0] for d in self.conn.execute("SELECT * FROM cells LIMIT 0").description]
        d = dict(zip(names, row))
        for k in ("params_json", "config_json", "result_json", "history_json"):
            d[k[:-5]] = json.loads(d.pop(k)) if d.get(k) else None
        return d

    def experiments(self) -> list:
        rows = self.conn.execute("SELECT name, source, spec_json FROM experiments ORDER BY created, name").fetchall()
        return [{"name": n, "source": s, "spec": json.loads(j)} for n, s, j in rows]

    def cells(self, experiment: str | None = None, status: str | None = None) -> list:
        """Cells (dicts with params/config/result/history decoded and ``metrics`` {key: value}); with
        ``experiment`` the params are those of that experiment's grid."""
        if experiment:
            rows = self.conn.execute("SELECT c.*, m.params_json FROM cells c JOIN members m ON m.cell_id=c.id "
                                     "WHERE m.experiment=? ORDER BY m.idx", (experiment,)).fetchall()
        else:
            rows = [r + (None,) for r in self.conn.execute("SELECT * FROM cells ORDER BY experiment, idx")]
        out = []
        for r in rows:
            d = self._row(r[:-1])
            if r[-1] is not None:
                d["params"] = json.loads(r[-1])
            if status and d["status"] != status:
                continue
            d["metrics"] = dict(self.conn.execute("SELECT key, value FROM metrics WHERE cell_id=?", (d["id"],)))
            out.append(d)
        return out


class _Cursor:
    def __init__(self, cur):
        self._cur = cur

    def execute(self, *a):
        return self._cur.execute(*a)

    def executemany(self, *a):
        return self._cur.executemany(*a)


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)
