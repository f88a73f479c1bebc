"""The journal: every job's state machine, in SQLite, committed before every effect.

Each transition is one ``BEGIN IMMEDIATE … COMMIT`` on a WAL database with
``synchronous=FULL``, so a commit is the acknowledgement point and survives a
power loss, not only ``kill -9``.  The rule that keeps the daemon crash-safe is
*intent before effect*: the row that says what is about to happen (a claim's
destination, a remote job's display name, an outbox folder) is committed before
the rename, the ``batches.create`` or the publish, so that on restart the
daemon can always tell whether the effect happened and finish it, never redo
it blindly.

Job states, in order::

    claiming → received → building → built → submitted → fetched → publishing → done

A chunk is recorded as soon as its requests file is complete, so chunks are
submitted while later ones are still being built; ``built`` means every chunk
is known. ``submitted`` covers the time the remote jobs run; every chunk (one
remote batch) has its own small state machine::

    built → submitting → running → finished → fetched
                       ↘ skipped (cancelled before it was ever sent)

A ``done`` job has an ``outcome``: succeeded, partial, failed, cancelled or
rejected.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,      -- the manifest's stem: inbox/NAME.toml
    source        TEXT NOT NULL,      -- the manifest's file name in the inbox
    sha256        TEXT,               -- manifest bytes plus input files
    state         TEXT NOT NULL,
    outcome       TEXT,
    task          TEXT,
    model         TEXT,
    error         TEXT,               -- JSON: why a job was rejected or failed
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    outbox_dir    TEXT,               -- chosen and committed before publishing
    chunk_limits  TEXT,               -- JSON: the limits its chunks were cut with (a rebuild reuses them)
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    submitted_at  REAL,
    finished_at   REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_name ON jobs(name);
CREATE INDEX IF NOT EXISTS jobs_by_sha ON jobs(sha256);

CREATE TABLE IF NOT EXISTS chunks (
    job_id        TEXT NOT NULL REFERENCES jobs(id),
    idx           INTEGER NOT NULL,
    display_name  TEXT NOT NULL UNIQUE,
    mode          TEXT NOT NULL,       -- inline | file
    request_count INTEGER NOT NULL,
    byte_size     INTEGER NOT NULL,
    state         TEXT NOT NULL,
    remote_name   TEXT,
    remote_state  TEXT,
    stats         TEXT,                -- JSON batchStats, for progress
    uploaded_file TEXT,
    intent_at     REAL,                -- when the create intent was committed
    cancel_sent   INTEGER NOT NULL DEFAULT 0,
    error         TEXT,                -- JSON: why the chunk has no results (refused, vanished)
    PRIMARY KEY (job_id, idx)
);

-- Every remote job ever seen for a chunk, adopted or not, so cost is counted once per name.
CREATE TABLE IF NOT EXISTS remote_jobs (
    remote_name   TEXT PRIMARY KEY,
    job_id        TEXT NOT NULL,
    chunk_idx     INTEGER NOT NULL,
    display_name  TEXT NOT NULL,
    role          TEXT NOT NULL        -- adopted | duplicate (cancelled)
);
"""

#: Job states that still need work from the daemon.
ACTIVE_STATES = ("claiming", "received", "building", "built", "submitted", "fetched", "publishing")
#: Chunk states in which a remote job exists (or may exist) and is not yet known to be finished.
REMOTE_LIVE_STATES = ("submitting", "running")


@dataclass(frozen=True)
class Job:
    id: str
    name: str
    source: str
    sha256: str | None
    state: str
    outcome: str | None
    task: str | None
    model: str | None
    error: dict | None
    cancel_requested: bool
    outbox_dir: str | None
    chunk_limits: dict | None
    created_at: float
    updated_at: float
    submitted_at: float | None
    finished_at: float | None


@dataclass(frozen=True)
class Chunk:
    job_id: str
    idx: int
    display_name: str
    mode: str
    request_count: int
    byte_size: int
    state: str
    remote_name: str | None
    remote_state: str | None
    stats: dict
    uploaded_file: str | None
    intent_at: float | None
    cancel_sent: bool
    error: dict | None


def journal_path(state_dir: Path) -> Path:
    """Where a state dir keeps its journal."""
    return state_dir / "journal.db"


def new_job_id() -> str:
    """A sortable, unique job id: creation time plus randomness."""
    return time.strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(3)


def _job(row: sqlite3.Row) -> Job:
    data = dict(row)
    data["error"] = json.loads(data["error"]) if data["error"] else None
    data["chunk_limits"] = json.loads(data["chunk_limits"]) if data["chunk_limits"] else None
    data["cancel_requested"] = bool(data["cancel_requested"])
    return Job(**data)


def _chunk(row: sqlite3.Row) -> Chunk:
    data = dict(row)
    data["stats"] = json.loads(data["stats"]) if data["stats"] else {}
    data["error"] = json.loads(data["error"]) if data["error"] else None
    data["cancel_sent"] = bool(data["cancel_sent"])
    return Chunk(**data)


class Journal:
    """The daemon's durable state.  One writer process; readers may open it read-only."""

    def __init__(self, path: Path, *, readonly: bool = False):
        self.path = path
        if readonly:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                       check_same_thread=False)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed transition survives power loss, not just a killed process.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout=5000")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One state transition: all of it is committed, or none of it."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- jobs -------------------------------------------------------------------------------

    def add_job(self, job_id: str, *, name: str, source: str, state: str = "claiming",
                sha256: str | None = None) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, name, source, sha256, state, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, name, source, sha256, state, now, now),
            )

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Set fields of one job in its own transaction."""
        with self.transaction() as db:
            self._update_job(db, job_id, **fields)

    @staticmethod
    def _update_job(db: sqlite3.Connection, job_id: str, **fields: Any) -> None:
        for name in ("error", "chunk_limits"):
            if name in fields and fields[name] is not None:
                fields[name] = json.dumps(fields[name], ensure_ascii=False)
        fields["updated_at"] = time.time()
        columns = ", ".join(f"{name} = ?" for name in fields)
        db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))

    def job(self, job_id: str) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self, *, states: tuple[str, ...] | None = None, name: str | None = None) -> list[Job]:
        query, args = "SELECT * FROM jobs", []
        clauses = []
        if states:
            clauses.append(f"state IN ({', '.join('?' * len(states))})")
            args.extend(states)
        if name is not None:
            clauses.append("name = ?")
            args.append(name)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        return [_job(row) for row in self._db.execute(query + " ORDER BY created_at, id", args)]

    def active_jobs(self) -> list[Job]:
        return self.jobs(states=ACTIVE_STATES)

    def job_with_content(self, sha256: str) -> Job | None:
        """An earlier job with the same manifest and inputs (not a rejected one)."""
        row = self._db.execute(
            "SELECT * FROM jobs WHERE sha256 = ? AND coalesce(outcome, '') != 'rejected'"
            " ORDER BY created_at LIMIT 1", (sha256,),
        ).fetchone()
        return _job(row) if row else None

    def find_jobs(self, ref: str) -> list[Job]:
        """Jobs named ``ref`` (the manifest stem) or with id ``ref``, newest last."""
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE name = ? OR id = ? ORDER BY created_at, id", (ref, ref)
        )
        return [_job(row) for row in rows]

    # -- chunks -----------------------------------------------------------------------------

    def add_chunk(self, job_id: str, chunk: dict) -> bool:
        """Record a built chunk (state ``built``); False if it was already recorded before a crash."""
        with self.transaction() as db:
            inserted = db.execute(
                "INSERT OR IGNORE INTO chunks (job_id, idx, display_name, mode, request_count, byte_size, state)"
                " VALUES (?, ?, ?, ?, ?, ?, 'built')",
                (job_id, chunk["idx"], chunk["display_name"], chunk["mode"], chunk["request_count"],
                 chunk["byte_size"]),
            ).rowcount
        return bool(inserted)

    def chunks(self, job_id: str) -> list[Chunk]:
        rows = self._db.execute("SELECT * FROM chunks WHERE job_id = ? ORDER BY idx", (job_id,))
        return [_chunk(row) for row in rows]

    def update_chunk(self, job_id: str, idx: int, **fields: Any) -> None:
        for name in ("stats", "error"):
            if name in fields and fields[name] is not None:
                fields[name] = json.dumps(fields[name], ensure_ascii=False)
        columns = ", ".join(f"{name} = ?" for name in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE chunks SET {columns} WHERE job_id = ? AND idx = ?",
                       (*fields.values(), job_id, idx))

    def record_remote_job(self, remote_name: str, chunk: Chunk, role: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO remote_jobs (remote_name, job_id, chunk_idx, display_name, role)"
                " VALUES (?, ?, ?, ?, ?)",
                (remote_name, chunk.job_id, chunk.idx, chunk.display_name, role),
            )

    def remote_jobs(self, job_id: str) -> list[dict]:
        rows = self._db.execute(
            "SELECT * FROM remote_jobs WHERE job_id = ? ORDER BY chunk_idx, remote_name", (job_id,)
        )
        return [dict(row) for row in rows]
