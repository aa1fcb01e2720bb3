"""The run store: one SQLite row per finished run of a sweep.

Only the sweep driver writes (executors return results to it), every insert is one
transaction, and the run id is the primary key, so a store survives a SIGKILL at any
point with no lost or duplicated row: rerunning the sweep skips the ids stored with a
result (``ok`` or ``diverged``) and retries the ``failed`` ones, whose rows the retries
replace.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import SmupError
from .fileio import json_text

STATUSES = ("ok", "diverged", "failed")
RESULTS = ("ok", "diverged")  # stored for good; a ``failed`` row is retried by a rerun

# column -> SQLite type; ``config`` is the run's full RunConfig as JSON
COLUMNS: dict[str, str] = {
    "id": "TEXT PRIMARY KEY",
    "sweep": "TEXT NOT NULL",
    "optimizer": "TEXT NOT NULL",
    "param": "TEXT NOT NULL",  # sp | mup
    "depth_alpha": "REAL",
    "width": "INTEGER NOT NULL",
    "depth": "INTEGER NOT NULL",
    "lr": "REAL NOT NULL",
    "weight_decay": "REAL NOT NULL",
    "seed": "INTEGER NOT NULL",
    "status": "TEXT NOT NULL",  # ok | diverged | failed
    "best_val_loss": "REAL",
    "final_val_loss": "REAL",
    "train_loss": "REAL",
    "diverged_step": "INTEGER",
    "iters": "INTEGER",
    "tokens": "INTEGER",
    "wall_time": "REAL",
    "error": "TEXT",
    "config": "TEXT NOT NULL",
    "finished_at": "TEXT NOT NULL",
}


class StoreError(SmupError):
    """The store file is not a run store, or a row is malformed."""


class RunStore:
    """``RunStore(path)`` opens (creating if needed) a store; ``add`` inserts one finished run,
    ``ids`` lists the stored run ids, ``statuses`` maps them to their status, ``rows``
    returns every row as a dict (``config`` decoded)."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise StoreError(f"no run store at {self.path}; run `smup sweep SPEC.toml` first")
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, timeout=30.0)
                self._db.execute("PRAGMA journal_mode=WAL")
                cols = ", ".join(f"{name} {typ}" for name, typ in COLUMNS.items())
                self._db.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols})")
                self._db.commit()
            else:  # read-only: a reader never changes the file (no table, no WAL switch)
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, timeout=30.0)
            have = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a spectral-mup run store ({exc})") from None
        if not have:
            raise StoreError(f"{self.path} is not a spectral-mup run store (no runs table)")
        if have != set(COLUMNS):
            raise StoreError(
                f"{self.path} has a different runs table (columns {sorted(have)}); "
                "use a new store path"
            )

    def add(self, row: dict[str, Any]) -> bool:
        """Insert one finished run, replacing a ``failed`` row of its id (a retry); False
        (and nothing written) when its id is stored with a result (``ok`` or ``diverged``)."""
        missing = [k for k, typ in COLUMNS.items() if "NOT NULL" in typ and row.get(k) is None]
        unknown = sorted(set(row) - set(COLUMNS))
        if missing or unknown or row.get("status") not in STATUSES:
            raise StoreError(f"bad run row: missing {missing}, unknown {unknown}")
        values = {k: row.get(k) for k in COLUMNS}
        if not isinstance(values["config"], str):
            values["config"] = json_text(values["config"], indent=None, sort_keys=True)
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self._db:  # one transaction: a reader sees the failed row or its retry
            self._db.execute("DELETE FROM runs WHERE id = ? AND status = 'failed'", (row["id"],))
            cur = self._db.execute(
                f"INSERT OR IGNORE INTO runs ({names}) VALUES ({marks})", tuple(values.values())
            )
        return cur.rowcount == 1

    def ids(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT id FROM runs")}

    def statuses(self) -> dict[str, str]:
        """Each stored run id and its status (ok, diverged or failed)."""
        return dict(self._db.execute("SELECT id, status FROM runs"))

    def rows(self, sweep: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT * FROM runs" + (" WHERE sweep = ?" if sweep else "") + " ORDER BY id"
        cur = self._db.execute(query, (sweep,) if sweep else ())
        names = [d[0] for d in cur.description]
        out = []
        for values in cur:
            row = dict(zip(names, values, strict=True))
            row["config"] = json.loads(row["config"])
            out.append(row)
        return out

    def add_many(self, rows: Iterable[dict[str, Any]]) -> int:
        return sum(self.add(r) for r in rows)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
