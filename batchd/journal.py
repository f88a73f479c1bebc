"""The journal: every job's state machine, in SQLite, committed before every effect.

Each transition is all-or-nothing on a WAL database with ``synchronous=FULL``, so a
commit is the acknowledgement point and survives a power loss, not only ``kill -9``.
Alone it is one ``BEGIN IMMEDIATE … COMMIT``; inside :meth:`Journal.group` (the
daemon's loop, one per tick) it is a savepoint and the tick commits once, with every
effect waiting for that commit (:meth:`Journal.after_commit`).  The rule that keeps the daemon crash-safe is
*intent before effect*: the row that says what is about to happen (a claim's
destination, a remote job's display name, an outbox folder) is committed before
the rename, the ``batches.create`` or the publish, so that on restart the
daemon can always tell whether the effect happened and finish it, never redo
it blindly.

The states and every move between them are defined in :mod:`batchd.states`; the journal refuses any
other (a test checks these diagrams against those tables). Job states, from left to right::

    claiming   → received | done
    received   → held | building | publishing
    held       → received
    building   → built | received | publishing
    built      → submitted
    submitted  → fetched
    fetched    → publishing
    publishing → done | fetched | received

Before it is built, a ``received`` job gets a cost estimate (committed in ``cost``) and a budget
decision: within budget, ``admitted_at`` is committed and it is built; over budget it goes to
``held``, with the reason in ``hold``, and waits, never dropped. A held job goes back to
``received`` (admitted) when ``approved`` is set (``batchd approve``) or when the budget check
passes again (a raised budget, or older spending leaving the rolling day); a cancel delivers it
as cancelled. Held jobs are not *active*: ``batchd run --once`` does not wait for them.

A chunk is recorded as soon as its requests file is complete, so chunks are
submitted while later ones are still being built; ``built`` means every chunk
is known. A cancel stops a build at the chunk boundary it is at: ``built`` then
holds the chunks recorded so far, and ``build_stopped`` says requests were left
unbuilt. ``submitted`` covers the time the remote jobs run; every chunk (one
remote batch) has its own small state machine (``remote_state`` says how it ended)::

    built      → submitting | skipped
    submitting → running | fetched | skipped | built
    running    → fetched | built

``built → skipped``: cancelled before it was ever sent. ``submitting → fetched``: the create was
refused (``remote_state`` "rejected"); ``submitting → skipped``: cancelled, and the unconfirmed
create never showed up; ``submitting → built``: the service refused the API key (nothing was
created), the chunk is sent again once a key is accepted. ``running → fetched``: results downloaded, or the remote job ended without
any (``remote_state`` "missing" when it disappeared). ``running → built``: it expired and is
submitted again (below).

A remote job the service did not finish within 48 hours ends EXPIRED, without results. While
``resubmits`` is below the ``resubmit_expired`` setting, the chunk goes back to ``built`` under its
next display name (``…-c<idx>-r<resubmits>``), in the same transaction that records the expired
remote job (role ``expired``) and its ``expired`` event; from there it is submitted like any chunk,
intent first, and reconciled by its new name. After the last resubmission it ends ``fetched``
with an ``expired`` error.

``submitting`` is written before the create call; a crash there leaves the chunk
``submitting`` until reconciliation finds its remote job by display name (then
``running``) or, after ``submit_grace_seconds``, creates it again; a chunk of a job
whose cancel was requested is never created again: found, it is adopted and
cancelled, not found after the grace period, it ends ``skipped``. A display name whose create
outcome was ever unknown is kept in ``watched_names`` for as long as a remote job under it could
live, whatever its chunk and job became: a create that shows up in the list late is a stray,
recorded in ``remote_jobs`` (a ``duplicate``) before it is cancelled.

A file chunk's requests go to the Files API first; ``upload_state`` follows that file::

    (none) → uploading → uploaded → deleted    (or kept: deletion is off, or the service refused it)

``uploading`` is committed with the create intent, before any upload: copies under the chunk's
upload display name (see ``batchd.daemon.naming.upload_display_name``) may exist that nobody knows the
name of (a crash before the answer was recorded, or a retried transfer). ``uploaded``: ``uploaded_file``,
recorded before ``batches.create``, is the only copy. A create made again reuses that file while the
service still has it. Once the chunk is ``fetched`` (or ``skipped``) its file is due for deletion;
an ``uploading`` chunk's copies are first looked up by display name.

A ``done`` job has an ``outcome``: succeeded, partial, plugin_failed, failed,
cancelled or rejected.

Job events for the notification plugins are rows of ``events``, inserted in the
transaction of the transition they announce, each with a ``deliveries`` row per
plugin (pending → sent, or failed once given up); see :mod:`batchd.events`.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator

from batchd import fs
from batchd.durable import fsync_dir
from batchd.logs import redact, redact_data
from batchd.states import ACTIVE_JOB_STATES, CHUNK_SOURCES, JOB_SOURCES, check_chunk_move, check_job_move

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
    kind          TEXT NOT NULL DEFAULT 'generate',  -- its task's kind: generate | embed (how chunks are sent and read)
    error         TEXT,               -- JSON: why a job was rejected or failed
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    outbox_dir    TEXT,               -- chosen and committed before publishing
    chunk_limits  TEXT,               -- JSON: the limits its chunks were cut with (a rebuild reuses them)
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    submitted_at  REAL,
    finished_at   REAL,
    cost          TEXT,               -- JSON {"estimate": {...}, "actual": {...}} from the cost hooks
    spend         REAL,               -- what the job counts against budgets: actual, else estimate
    admitted_at   REAL,               -- when it passed the budget check (or was approved)
    hold          TEXT,               -- why it is held
    approved      INTEGER NOT NULL DEFAULT 0,  -- `batchd approve`: no budget check
    build_stopped INTEGER NOT NULL DEFAULT 0   -- a cancel stopped its build before its last request
);
CREATE INDEX IF NOT EXISTS jobs_by_name ON jobs(name);
CREATE INDEX IF NOT EXISTS jobs_by_sha ON jobs(sha256);
-- The loop looks up the active jobs and the live chunks on every tick; finished ones pile up.
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state);

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
    uploaded_file TEXT,                -- the requests file on the Files API ("files/…"), recorded before create
    upload_state  TEXT,                -- uploading | uploaded | deleted | kept (see above)
    intent_at     REAL,                -- when the create intent was committed
    cancel_sent   INTEGER NOT NULL DEFAULT 0,
    error         TEXT,                -- JSON: why the chunk has no results (refused, vanished)
    resubmits     INTEGER NOT NULL DEFAULT 0,  -- times it was submitted again after its remote job expired
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX IF NOT EXISTS chunks_by_state ON chunks(state);

-- Every remote job ever seen for a chunk, adopted or not, so cost is counted once per name.
CREATE TABLE IF NOT EXISTS remote_jobs (
    remote_name   TEXT PRIMARY KEY,
    job_id        TEXT NOT NULL,
    chunk_idx     INTEGER NOT NULL,
    display_name  TEXT NOT NULL,
    role          TEXT NOT NULL,       -- adopted | duplicate (cancelled) | expired (its chunk was resubmitted)
    outcome       TEXT                 -- of a duplicate found by the stray watch: cancelling (cancel not yet
                                       -- accepted) | cancelled | finished (ended on its own, results unused)
);

-- Display names whose create outcome was once unknown (a timeout, a 5xx, a crash): a create that
-- reached the service may show up in the list late, after its chunk was created again, fetched or
-- skipped, or its job delivered. Each is watched, whatever became of its chunk, until a remote job
-- created under it would have expired.
CREATE TABLE IF NOT EXISTS watched_names (
    display_name     TEXT PRIMARY KEY,
    job_id           TEXT NOT NULL,
    chunk_idx        INTEGER NOT NULL,
    first_attempt_at REAL NOT NULL,    -- the first create under it: no stray of it is older
    last_attempt_at  REAL NOT NULL     -- the last create under it: the watch runs from here
);

-- Job events for the notification plugins: committed in the transaction of the transition they
-- announce, with one delivery row per plugin implementing job_event (an outbox table).
CREATE TABLE IF NOT EXISTS events (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL UNIQUE, -- stable: <job id>:<kind>[:<n>]
    job_id        TEXT NOT NULL,
    kind          TEXT NOT NULL,
    body          TEXT NOT NULL,        -- JSON, as handed to job_event
    created_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    event_id      TEXT NOT NULL REFERENCES events(id),
    plugin        TEXT NOT NULL,
    state         TEXT NOT NULL,        -- pending | sent | failed (gave up)
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_at       REAL NOT NULL,        -- not retried before this time
    last_error    TEXT,
    sent_at       REAL,
    PRIMARY KEY (event_id, plugin)
);
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries(state, next_at);
-- Each plugin's pending deliveries in rowid order, which is their events' order (a delivery row is
-- inserted with its event): a page of the oldest due ones is read without sorting every pending row.
CREATE INDEX IF NOT EXISTS deliveries_pending_by_plugin ON deliveries(plugin) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS events_by_job ON events(job_id, kind);

-- Files sent with requests (batchd/media.py), one row per content hash, shared by every job that
-- sends it: 'uploading' is committed before an upload (copies under its display name may then exist
-- whose name is unknown: they are looked up by it), 'active' records the File; 'deleting' is committed
-- before a deletion round.   new → uploading → active → deleting → deleted (→ uploading again);
-- failed: the service refused the upload (the chunks needing it fail).
CREATE TABLE IF NOT EXISTS media (
    sha256        TEXT PRIMARY KEY,
    mime_type     TEXT NOT NULL,
    size          INTEGER NOT NULL,
    state         TEXT NOT NULL,
    remote_name   TEXT,               -- "files/…"
    uri           TEXT,               -- what fileData.fileUri names
    expires_at    REAL,
    intent_at     REAL,
    last_used     REAL,               -- when a chunk needing it was last sent
    error         TEXT
);
CREATE TABLE IF NOT EXISTS chunk_media (
    job_id        TEXT NOT NULL,
    idx           INTEGER NOT NULL,
    sha256        TEXT NOT NULL,
    PRIMARY KEY (job_id, idx, sha256)
);
CREATE INDEX IF NOT EXISTS chunk_media_by_sha ON chunk_media(sha256);
-- Gemini webhook deliveries taken (by their webhook-id, the sender's idempotency key): a delivery sent
-- again is acknowledged, not acted on twice. Written by the loop alone; forgotten after a week.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    webhook_id    TEXT PRIMARY KEY,
    remote_name   TEXT,
    event_type    TEXT,
    received_at   REAL NOT NULL
);

-- What each task and model answered per request (answer and thoughts, in tokens), summed over
-- delivered jobs: cost estimates price a job's output by it (plugins/cost.py).
CREATE TABLE IF NOT EXISTS output_observed (
    task          TEXT NOT NULL,
    model         TEXT NOT NULL,
    requests      INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    updated_at    REAL NOT NULL,
    PRIMARY KEY (task, model)
);
"""

#: ``output_observed`` forgets old jobs gradually: past this many requests its sums are halved, so
#: a task whose answers changed (a new prompt, a new model version) is priced by the new ones soon.
OBSERVED_REQUESTS_MAX = 100_000

#: Columns added to ``jobs`` after its first release, added to older journals when opened.
_ADDED_JOB_COLUMNS = {
    "cost": "TEXT", "spend": "REAL", "admitted_at": "REAL", "hold": "TEXT",
    "approved": "INTEGER NOT NULL DEFAULT 0", "build_stopped": "INTEGER NOT NULL DEFAULT 0",
    "manifest_sha256": "TEXT",  # the manifest's bytes as checked at the claim (later reads must match)
    "retry_of": "TEXT",  # JSON {"job", "name"}: the job a retry manifest (`batchd retry`) sends requests of again
    "kind": "TEXT NOT NULL DEFAULT 'generate'",
}
#: The same for ``chunks`` and ``remote_jobs``.
_ADDED_REMOTE_JOB_COLUMNS = {"outcome": "TEXT"}
#: Columns added to ``chunks`` after its first release.
_ADDED_CHUNK_COLUMNS = {"resubmits": "INTEGER NOT NULL DEFAULT 0", "upload_state": "TEXT"}

def _dumps(value: Any) -> str:
    """JSON for the journal, secrets masked: an error or an event may quote an API key, and the
    journal is what ``batchd status``, the outbox and the notification plugins are made from."""
    return json.dumps(redact_data(value), ensure_ascii=False)



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
    cost: dict | None = None
    spend: float | None = None
    admitted_at: float | None = None
    hold: str | None = None
    approved: bool = False
    build_stopped: bool = False
    manifest_sha256: str | None = None
    retry_of: dict | None = None
    kind: str = "generate"


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
    resubmits: int = 0
    upload_state: str | None = None


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
    data["cost"] = json.loads(data["cost"]) if data.get("cost") else None
    data["retry_of"] = json.loads(data["retry_of"]) if data.get("retry_of") else None
    data["cancel_requested"] = bool(data["cancel_requested"])
    data["approved"] = bool(data.get("approved"))
    data["build_stopped"] = bool(data.get("build_stopped"))
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
            # One transaction: a reader opening the file meanwhile sees the whole schema or none of it.
            with self._storage_failures():
                self._db.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}")
                self._add_missing_columns()
                self._db.execute("COMMIT")
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout=5000")
        #: The plugins an event is to be delivered to (one delivery row each); set by the dispatcher.
        self.event_targets: Callable[[dict], Iterable[str]] = lambda event: ()
        #: Delivery rows added by this process so far (lets the dispatcher skip its queries when none
        #: are new: events no plugin wants add none).
        self.deliveries_added = 0
        #: Called with a job's id after every commit that changed the job or one of its chunks: the
        #: daemon's loop visits exactly those jobs next (see batchd.daemon.schedule).
        self.on_change: Callable[[str], None] = lambda job_id: None
        #: Effects waiting for the open transaction or group to commit (see :meth:`after_commit`).
        self._effects: list[Callable[[], Any]] = []
        #: Directories whose entries must be durable before the open group commits (see
        #: :meth:`sync_before_commit`), with the step each is synced for.
        self._dirs_to_sync: dict[Path, str | None] = {}
        self._group_thread: int | None = None
        self._transaction_thread: int | None = None
        #: Reads the loop makes on every tick, kept while nothing was written (see :meth:`_unchanged_since`).
        self._readonly = readonly
        self._rollbacks = 0
        self._reads: dict[tuple, tuple[tuple[int, int], Any]] = {}

    def _add_missing_columns(self) -> None:
        for table, added in (("jobs", _ADDED_JOB_COLUMNS), ("chunks", _ADDED_CHUNK_COLUMNS),
                             ("remote_jobs", _ADDED_REMOTE_JOB_COLUMNS)):
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for column, declaration in added.items():
                if column not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        # After the columns: an older journal gets admitted_at above first.
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_by_admission ON jobs(admitted_at)")
        # Finished chunks pile up; the few whose request file is still to be deleted are looked up often.
        self._db.execute("CREATE INDEX IF NOT EXISTS chunks_holding_uploads ON chunks(state)"
                         " WHERE upload_state IN ('uploading', 'uploaded')")
        # The stray cancels still to retry are looked up while the table holds every remote job ever made.
        self._db.execute("CREATE INDEX IF NOT EXISTS remote_jobs_by_outcome ON remote_jobs(outcome)")
        # A webhook delivery names a remote batch; its chunk is looked up by that name.
        self._db.execute("CREATE INDEX IF NOT EXISTS chunks_by_remote_name ON chunks(remote_name)")

    @property
    def initialized(self) -> bool:
        """False while the writer that created the file has not yet committed its schema."""
        return self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone() is not None

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One state transition: all of it is committed, or none of it.

        Inside :meth:`group` the transition is a savepoint of the group's transaction, committed with
        the group. A transition the database file cannot take (disk full, I/O error) raises
        :class:`batchd.fs.StorageFailure`: the daemon must not go on from a state it did not commit.
        """
        if self._grouped():
            with self._storage_failures():
                if not self._db.in_transaction:
                    self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("SAVEPOINT transition")
                try:
                    yield self._db
                except BaseException:
                    self._rollbacks += 1
                    with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                        self._db.execute("ROLLBACK TO transition")
                        self._db.execute("RELEASE transition")
                    raise
                self._db.execute("RELEASE transition")
            return
        if self._group_thread is not None:
            raise RuntimeError("the journal is written only by the thread whose group is open (the loop's)")
        with self._storage_failures():
            self._db.execute("BEGIN IMMEDIATE")
            self._transaction_thread = threading.get_ident()
            try:
                try:
                    yield self._db
                except BaseException:
                    self._rollbacks += 1
                    with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                        self._db.execute("ROLLBACK")
                    raise
                self._commit()
            finally:
                self._transaction_thread = None
        self._run_effects()

    # -- group commit: many transitions, one fsync -------------------------------------------------

    @contextmanager
    def group(self) -> Iterator[None]:
        """Commit every transition made inside in one transaction, at the end (or at :meth:`flush`).

        Each commit costs an fsync; the loop makes dozens of transitions a tick, each of which may
        stand alone. Intent before effect still holds because an effect that must follow a
        transition is handed to :meth:`after_commit`, which runs it once the group has committed;
        an effect the loop performs itself calls :meth:`flush` first. Only the thread that opened
        the group may write meanwhile. A step that raises inside keeps what it committed before:
        the transitions that completed are committed and their effects run, then the error goes on.
        """
        if self._group_thread is not None:
            raise RuntimeError("journal groups do not nest")
        self._group_thread = threading.get_ident()
        try:
            yield
        except fs.StorageFailure:
            # The database cannot take the group (SQLite may have rolled it back already): none of it
            # happened, nor will its effects; the daemon stops on this error.
            self._effects.clear()
            self._dirs_to_sync.clear()
            self._rollbacks += 1
            with contextlib.suppress(sqlite3.Error):
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            raise
        except BaseException:
            self.flush()
            raise
        else:
            self.flush()
        finally:
            self._group_thread = None

    def flush(self) -> None:
        """Commit the open group's transitions now and run the effects waiting for them (a no-op
        outside a group, or when called from another thread, such as a worker at a crash point)."""
        if self._group_thread != threading.get_ident():
            return
        self._sync_dirs()
        if self._db.in_transaction:
            with self._storage_failures():
                try:
                    self._commit()
                except BaseException:
                    self._effects.clear()
                    raise
        self._run_effects()

    def after_commit(self, effect: Callable[[], Any]) -> None:
        """Run ``effect`` once the transitions made so far are committed: at once when none is pending."""
        if self._grouped() or self._transaction_thread == threading.get_ident():
            self._effects.append(effect)
        else:
            effect()

    def sync_before_commit(self, directory: Path, *, step: str | None = None) -> None:
        """Make the entries of ``directory`` (a file moved in or out) durable before the transitions
        made so far commit: in a group, once for every move of the tick into or out of it (a burst
        claimed from the inbox, or published to the outbox, costs one fsync of it, not one a job);
        outside one, at once. ``step`` classifies a failure as for :func:`batchd.durable.fsync_dir`."""
        if self._grouped():
            self._dirs_to_sync.setdefault(Path(directory), step)
        else:
            fsync_dir(directory, step=step)

    def _sync_dirs(self) -> None:
        while self._dirs_to_sync:
            directory, step = next(iter(self._dirs_to_sync.items()))
            fsync_dir(directory, step=step)  # a failure leaves it (and the rest) for the next flush
            del self._dirs_to_sync[directory]

    def _grouped(self) -> bool:
        return self._group_thread is not None and self._group_thread == threading.get_ident()

    def _commit(self) -> None:
        try:
            fs.fault_point("journal", self.path)
            self._db.execute("COMMIT")
        except BaseException:
            self._rollbacks += 1
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise

    def _cached(self, key: tuple, read: Callable[[], Any]) -> Any:
        """``read()``, or what it returned last time if this connection changed no row since.

        For the few queries the loop makes on every tick: each costs the loop a wait for the GIL, and
        most ticks change nothing they count. Sound because one daemon alone writes its journal (the
        state dir's lock) and every write goes through this connection: ``total_changes`` moves with
        each row written, and a rollback (which undoes rows without moving it) is counted apart. A
        read-only journal (another process writes it) never keeps a read. Callers must not change what
        they are given.
        """
        if self._readonly:
            return read()
        written = (self._db.total_changes, self._rollbacks)
        kept = self._reads.get(key)
        if kept is not None and kept[0] == written:
            return kept[1]
        value = read()
        self._reads[key] = (written, value)
        return value

    def _run_effects(self) -> None:
        """Run the waiting effects in the order they were asked for; one that fails does not keep the
        others from running (each was promised by a committed transition), its error is raised after."""
        failure = None
        while self._effects:
            effects, self._effects = self._effects, []
            for effect in effects:
                try:
                    effect()
                except BaseException as error:
                    failure = failure or error
        if failure is not None:
            raise failure

    @contextmanager
    def _storage_failures(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.OperationalError, OSError) as error:
            if not fs.is_journal_storage_error(error):
                raise
            raise fs.StorageFailure("journal", self.path, error) from error

    # -- jobs -------------------------------------------------------------------------------

    def add_job(self, job_id: str, *, name: str, source: str, state: str = "claiming",
                sha256: str | None = None, error: dict | None = None, task: str | None = None,
                model: str | None = None, manifest_sha256: str | None = None,
                retry_of: dict | None = None, kind: str = "generate") -> None:
        """A new job; ``error`` (already known at the claim: why it is rejected) is recorded with it."""
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, name, source, sha256, state, error, task, model, kind, manifest_sha256,"
                " retry_of, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, name, source, sha256, state,
                 _dumps(error) if error is not None else None, task, model, kind, manifest_sha256,
                 _dumps(retry_of) if retry_of is not None else None, now, now),
            )

    def update_job(self, job_id: str, *, events: Iterable[dict] = (), **fields: Any) -> None:
        """Set fields of one job in its own transaction, with the events that announce the change."""
        with self.transaction() as db:
            self._update_job(db, job_id, **fields)
            self._add_events(db, events)
        self.on_change(job_id)

    @staticmethod
    def _update_job(db: sqlite3.Connection, job_id: str, **fields: Any) -> None:
        for name in ("error", "chunk_limits", "cost"):
            if name in fields and fields[name] is not None:
                fields[name] = _dumps(fields[name])
        if isinstance(fields.get("hold"), str):
            fields["hold"] = redact(fields["hold"])
        fields["updated_at"] = time.time()
        columns = ", ".join(f"{name} = ?" for name in fields)
        if "state" not in fields:
            db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))
            return
        # The move is checked by the UPDATE itself (one statement, not a read and a write); when it
        # changed nothing, the row is read to tell a missing job from a move the tables forbid.
        sources = JOB_SOURCES.get(fields["state"], (fields["state"],))
        updated = db.execute(f"UPDATE jobs SET {columns} WHERE id = ? AND state IN ({', '.join('?' * len(sources))})",
                             (*fields.values(), job_id, *sources)).rowcount
        if not updated:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None:
                check_job_move(row[0], fields["state"])

    def job(self, job_id: str) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self, *, states: tuple[str, ...] | None = None, name: str | None = None) -> list[Job]:
        if states and name is None:
            return self._cached(("jobs", tuple(states)), lambda: self._jobs(states=states))
        return self._jobs(states=states, name=name)

    def _jobs(self, *, states: tuple[str, ...] | None = None, name: str | None = None) -> list[Job]:
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
        return self.jobs(states=ACTIVE_JOB_STATES)

    def jobs_by_id(self, job_ids: Iterable[str]) -> list[Job]:
        """The active ones of these jobs, oldest first (the loop's turn order)."""
        ids = list(job_ids)
        found: list[Job] = []
        for start in range(0, len(ids), 500):  # SQLite caps the number of parameters
            part = ids[start:start + 500]
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE id IN ({', '.join('?' * len(part))})"
                f" AND state IN ({', '.join('?' * len(ACTIVE_JOB_STATES))})", (*part, *ACTIVE_JOB_STATES))
            found.extend(_job(row) for row in rows)
        return sorted(found, key=lambda job: (job.created_at, job.id))

    def count_jobs(self, states: Iterable[str]) -> int:
        states = tuple(states)
        return self._cached(("count_jobs", states), lambda: self._db.execute(
            f"SELECT count(*) FROM jobs WHERE state IN ({', '.join('?' * len(states))})", states).fetchone()[0])

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
            media = chunk.get("media") or {}
            if inserted and media:
                db.executemany("INSERT OR IGNORE INTO media (sha256, mime_type, size, state) VALUES (?, ?, ?, 'new')",
                               [(sha256, mime, size) for sha256, (mime, size) in media.items()])
                db.executemany("INSERT OR IGNORE INTO chunk_media (job_id, idx, sha256) VALUES (?, ?, ?)",
                               [(job_id, chunk["idx"], sha256) for sha256 in media])
        self.on_change(job_id)
        return bool(inserted)

    def chunks(self, job_id: str) -> list[Chunk]:
        rows = self._db.execute("SELECT * FROM chunks WHERE job_id = ? ORDER BY idx", (job_id,))
        return [_chunk(row) for row in rows]

    def built_chunks(self, job_id: str, limit: int) -> list[Chunk]:
        """The job's first ``limit`` chunks waiting to be submitted: a job of many chunks is not read
        whole on every visit while only a few of them can go out."""
        rows = self._db.execute("SELECT * FROM chunks WHERE job_id = ? AND state = 'built' ORDER BY idx LIMIT ?",
                                (job_id, limit))
        return [_chunk(row) for row in rows]

    def chunk(self, job_id: str, idx: int) -> Chunk | None:
        row = self._db.execute("SELECT * FROM chunks WHERE job_id = ? AND idx = ?", (job_id, idx)).fetchone()
        return _chunk(row) if row else None

    def chunk_totals(self, job_id: str) -> dict[str, int]:
        """How many chunks the job has, in each state (``chunks``: all, ``requests``: their requests)."""
        totals = {"chunks": 0, "requests": 0}
        for state, chunks, requests in self._db.execute(
                "SELECT state, count(*), sum(request_count) FROM chunks WHERE job_id = ? GROUP BY state", (job_id,)):
            totals[state] = chunks
            totals["chunks"] += chunks
            totals["requests"] += requests
        return totals

    def chunks_in(self, states: tuple[str, ...], *, job_states: tuple[str, ...]) -> list[Chunk]:
        """The chunks in ``states`` of the jobs in ``job_states``, in job order: one query, however
        many jobs there are."""
        rows = self._db.execute(
            "SELECT c.* FROM chunks c JOIN jobs j ON j.id = c.job_id"
            f" WHERE c.state IN ({', '.join('?' * len(states))}) AND j.state IN ({', '.join('?' * len(job_states))})"
            " ORDER BY j.created_at, j.id, c.idx",
            (*states, *job_states),
        )
        return [_chunk(row) for row in rows]

    def count_chunks_in(self, states: tuple[str, ...], *, job_states: tuple[str, ...], limit: int = -1) -> int:
        """How many chunks :meth:`chunks_in` would return (at most ``limit``: 1 asks whether there is any)."""
        return self._cached(("count_chunks_in", states, job_states, limit), lambda: self._db.execute(
            "SELECT count(*) FROM (SELECT 1 FROM chunks c JOIN jobs j ON j.id = c.job_id"
            f" WHERE c.state IN ({', '.join('?' * len(states))}) AND j.state IN ({', '.join('?' * len(job_states))})"
            " LIMIT ?)", (*states, *job_states, limit)).fetchone()[0])

    def uploads_to_delete(self) -> list[Chunk]:
        """Finished chunks (``fetched`` or ``skipped``, of any job) whose request file the service may still hold."""
        return self._cached(("uploads_to_delete",), lambda: [_chunk(row) for row in self._db.execute(
            "SELECT * FROM chunks WHERE upload_state IN ('uploading', 'uploaded') AND state IN ('fetched', 'skipped')"
            " ORDER BY job_id, idx")])

    # -- media (files sent with requests) ----------------------------------------------------------

    def chunk_media(self, job_id: str, idx: int) -> list[dict]:
        """The media rows of the files a chunk's requests upload."""
        rows = self._db.execute("SELECT m.* FROM media m JOIN chunk_media cm ON cm.sha256 = m.sha256"
                                " WHERE cm.job_id = ? AND cm.idx = ? ORDER BY m.sha256", (job_id, idx))
        return [dict(row) for row in rows]

    def media(self, sha256: str) -> dict | None:
        row = self._db.execute("SELECT * FROM media WHERE sha256 = ?", (sha256,)).fetchone()
        return dict(row) if row else None

    def all_media(self) -> list[dict]:
        return [dict(row) for row in self._db.execute("SELECT * FROM media ORDER BY sha256")]

    def set_media(self, states: dict[str, dict[str, Any]]) -> None:
        """Update media rows, content hash → fields, in one transaction."""
        if not states:
            return
        with self.transaction() as db:
            for sha256, fields in states.items():
                if "error" in fields and fields["error"] is not None:
                    fields = {**fields, "error": _dumps(fields["error"])}
                columns = ", ".join(f"{name} = ?" for name in fields)
                db.execute(f"UPDATE media SET {columns} WHERE sha256 = ?", (*fields.values(), sha256))

    def media_to_delete(self, unused_since: float) -> list[dict]:
        """Uploaded (or perhaps uploaded) files no chunk still to be sent or running needs, unused since
        ``unused_since``, and those a deletion round cut short left ``deleting``."""
        rows = self._db.execute(
            "SELECT * FROM media m WHERE (m.state = 'deleting' OR (m.state IN ('active', 'uploading')"
            " AND COALESCE(m.last_used, 0) <= ?)) AND NOT EXISTS (SELECT 1 FROM chunk_media cm JOIN chunks c"
            " ON c.job_id = cm.job_id AND c.idx = cm.idx WHERE cm.sha256 = m.sha256"
            " AND c.state NOT IN ('fetched', 'skipped')) ORDER BY m.sha256", (unused_since,))
        return [dict(row) for row in rows]

    def set_upload_states(self, states: dict[tuple[str, int], str]) -> None:
        """Set the ``upload_state`` of several chunks, keyed by (job id, idx), in one transaction."""
        if not states:
            return
        with self.transaction() as db:
            db.executemany("UPDATE chunks SET upload_state = ? WHERE job_id = ? AND idx = ?",
                           [(state, job_id, idx) for (job_id, idx), state in states.items()])

    def update_chunk(self, job_id: str, idx: int, *, events: Iterable[dict] = (), **fields: Any) -> None:
        for name in ("stats", "error"):
            if name in fields and fields[name] is not None:
                fields[name] = _dumps(fields[name])
        columns = ", ".join(f"{name} = ?" for name in fields)
        with self.transaction() as db:
            if "state" not in fields:
                db.execute(f"UPDATE chunks SET {columns} WHERE job_id = ? AND idx = ?", (*fields.values(), job_id, idx))
            else:  # checked as a job's move is (see _update_job)
                sources = CHUNK_SOURCES.get(fields["state"], (fields["state"],))
                updated = db.execute(f"UPDATE chunks SET {columns} WHERE job_id = ? AND idx = ?"
                                     f" AND state IN ({', '.join('?' * len(sources))})",
                                     (*fields.values(), job_id, idx, *sources)).rowcount
                if not updated:
                    row = db.execute("SELECT state FROM chunks WHERE job_id = ? AND idx = ?", (job_id, idx)).fetchone()
                    if row is not None:
                        check_chunk_move(row[0], fields["state"])
            self._add_events(db, events)
        self.on_change(job_id)

    def resubmit_chunk(self, chunk: Chunk, display_name: str, *, events: Iterable[dict] = ()) -> None:
        """An expired chunk back to ``built`` under its next display name, to be submitted again.

        One transaction: its expired remote job stays on record (role ``expired``), and the event
        announcing the resubmission is committed with it.
        """
        with self.transaction() as db:
            db.execute("UPDATE remote_jobs SET role = 'expired' WHERE remote_name = ?", (chunk.remote_name,))
            db.execute(
                "UPDATE chunks SET state = 'built', display_name = ?, resubmits = resubmits + 1, remote_name = NULL,"
                " remote_state = NULL, stats = NULL, intent_at = NULL, cancel_sent = 0, error = NULL"
                " WHERE job_id = ? AND idx = ? AND state = 'running'",
                (display_name, chunk.job_id, chunk.idx),
            )
            self._add_events(db, events)
        self.on_change(chunk.job_id)

    def record_remote_job(self, remote_name: str, chunk: Chunk, role: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO remote_jobs (remote_name, job_id, chunk_idx, display_name, role)"
                " VALUES (?, ?, ?, ?, ?)",
                (remote_name, chunk.job_id, chunk.idx, chunk.display_name, role),
            )

    def record_stray(self, remote_name: str, *, job_id: str, chunk_idx: int, display_name: str,
                     outcome: str) -> None:
        """A duplicate the stray watch found (``outcome``: cancelling or finished), recorded before any cancel."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO remote_jobs (remote_name, job_id, chunk_idx, display_name, role, outcome)"
                " VALUES (?, ?, ?, ?, 'duplicate', ?)", (remote_name, job_id, chunk_idx, display_name, outcome))

    def set_remote_outcome(self, remote_name: str, outcome: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE remote_jobs SET outcome = ? WHERE remote_name = ?", (outcome, remote_name))

    def chunk_by_remote_name(self, remote_name: str) -> Chunk | None:
        row = self._db.execute("SELECT * FROM chunks WHERE remote_name = ?", (remote_name,)).fetchone()
        return _chunk(row) if row else None

    def webhook_seen(self, webhook_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM webhook_deliveries WHERE webhook_id = ?",
                                (webhook_id,)).fetchone() is not None

    def record_webhook(self, webhook_id: str, remote_name: str | None, event_type: str | None) -> bool:
        """Record a webhook delivery by its id; False when it was taken before (a duplicate)."""
        with self.transaction() as db:
            cursor = db.execute("INSERT OR IGNORE INTO webhook_deliveries (webhook_id, remote_name, event_type,"
                                " received_at) VALUES (?, ?, ?, ?)", (webhook_id, remote_name, event_type, time.time()))
            return cursor.rowcount == 1

    def last_webhook_at(self) -> float | None:
        """When the latest webhook delivery was taken (wall clock), if any."""
        return self._db.execute("SELECT max(received_at) FROM webhook_deliveries").fetchone()[0]

    def forget_webhooks(self, before: float) -> int:
        with self.transaction() as db:
            return db.execute("DELETE FROM webhook_deliveries WHERE received_at < ?", (before,)).rowcount

    def remote_job(self, remote_name: str) -> dict | None:
        row = self._db.execute("SELECT * FROM remote_jobs WHERE remote_name = ?", (remote_name,)).fetchone()
        return dict(row) if row else None

    def remote_jobs_with_outcome(self, outcome: str) -> list[dict]:
        rows = self._db.execute("SELECT * FROM remote_jobs WHERE outcome = ? ORDER BY remote_name", (outcome,))
        return [dict(row) for row in rows]

    def watch_name(self, job_id: str, chunk_idx: int, display_name: str, attempt_at: float) -> None:
        """Watch ``display_name`` (a create under it had an unknown outcome) from ``attempt_at`` on."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO watched_names (display_name, job_id, chunk_idx, first_attempt_at, last_attempt_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT(display_name) DO UPDATE SET"
                " first_attempt_at = min(first_attempt_at, excluded.first_attempt_at),"
                " last_attempt_at = max(last_attempt_at, excluded.last_attempt_at)",
                (display_name, job_id, chunk_idx, attempt_at, attempt_at))

    def watched_names(self) -> dict[str, dict]:
        """Every watched display name, with its row."""
        return self._cached(("watched_names",), lambda: {row["display_name"]: dict(row) for row in self._db.execute(
            "SELECT * FROM watched_names ORDER BY first_attempt_at")})

    def forget_watched_names(self, last_attempt_before: float) -> int:
        """Stop watching the names whose last create is older than ``last_attempt_before``; returns how many."""
        with self.transaction() as db:
            return db.execute("DELETE FROM watched_names WHERE last_attempt_at < ?",
                              (last_attempt_before,)).rowcount

    def remote_jobs(self, job_id: str) -> list[dict]:
        rows = self._db.execute(
            "SELECT * FROM remote_jobs WHERE job_id = ? ORDER BY chunk_idx, remote_name", (job_id,)
        )
        return [dict(row) for row in rows]

    # -- budgets ----------------------------------------------------------------------------

    def spent_since(self, since: float, *, excluding: str | None = None) -> float:
        """What the jobs admitted since ``since`` count against budgets (``spend``), summed."""
        row = self._db.execute(
            "SELECT coalesce(sum(spend), 0) FROM jobs WHERE admitted_at >= ? AND id != ?",
            (since, excluding or ""),
        ).fetchone()
        return float(row[0])

    def observe_output(self, task: str, model: str, requests: int, output_tokens: int) -> None:
        """Add a delivered job's answers to what its task and model produce per request."""
        if requests <= 0:
            return
        with self.transaction() as db:
            db.execute(
                "INSERT INTO output_observed (task, model, requests, output_tokens, updated_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (task, model) DO UPDATE SET requests = requests + excluded.requests,"
                " output_tokens = output_tokens + excluded.output_tokens, updated_at = excluded.updated_at",
                (task, model, requests, output_tokens, time.time()))
            db.execute("UPDATE output_observed SET requests = requests / 2, output_tokens = output_tokens / 2"
                       " WHERE task = ? AND model = ? AND requests > ?", (task, model, OBSERVED_REQUESTS_MAX))

    def observed_output(self, task: str | None, model: str | None) -> dict | None:
        """``{"requests": n, "output_tokens": m}`` earlier jobs of this task and model came back with, or None."""
        try:
            row = self._db.execute("SELECT requests, output_tokens FROM output_observed WHERE task = ? AND model = ?",
                                   (task or "", model or "")).fetchone()
        except sqlite3.OperationalError:
            return None  # a journal opened read-only, from a batchd that did not keep it yet
        return {"requests": row[0], "output_tokens": row[1]} if row else None

    # -- events -----------------------------------------------------------------------------

    def _add_events(self, db: sqlite3.Connection, events: Iterable[dict]) -> None:
        now = time.time()
        for event in events:
            inserted = db.execute(
                "INSERT OR IGNORE INTO events (id, job_id, kind, body, created_at) VALUES (?, ?, ?, ?, ?)",
                (event["id"], event["job_id"], event["kind"], _dumps(event), now),
            ).rowcount
            if not inserted:
                continue  # the same transition again after a crash: the event exists already
            targets = list(self.event_targets(event))
            if targets:
                self.deliveries_added += len(targets)
                db.executemany(
                    "INSERT OR IGNORE INTO deliveries (event_id, plugin, state, next_at) VALUES (?, ?, 'pending', ?)",
                    [(event["id"], plugin, now) for plugin in targets],
                )

    def add_events(self, events: Iterable[dict]) -> None:
        with self.transaction() as db:
            self._add_events(db, events)

    def event_count(self, job_id: str, kind: str) -> int:
        return self._db.execute("SELECT count(*) FROM events WHERE job_id = ? AND kind = ?",
                                (job_id, kind)).fetchone()[0]

    def last_event(self, job_id: str, kind: str) -> tuple[dict, float] | None:
        """The job's latest event of this kind and when it was committed (``time.time()``), if any."""
        row = self._db.execute("SELECT body, created_at FROM events WHERE job_id = ? AND kind = ?"
                               " ORDER BY seq DESC LIMIT 1", (job_id, kind)).fetchone()
        return (json.loads(row["body"]), row["created_at"]) if row else None

    def events(self, job_id: str | None = None) -> list[dict]:
        """Events in the order they were committed, each with its deliveries by plugin."""
        query, args = "SELECT * FROM events", ()
        if job_id is not None:
            query, args = query + " WHERE job_id = ?", (job_id,)
        found = []
        for row in self._db.execute(query + " ORDER BY seq", args).fetchall():
            deliveries = {d["plugin"]: dict(d) for d in self._db.execute(
                "SELECT * FROM deliveries WHERE event_id = ?", (row["id"],))}
            found.append({"event": json.loads(row["body"]), "deliveries": deliveries})
        return found

    def due_deliveries(self, now: float, *, plugins: Iterable[str], limit: int = 1,
                       excluding: Collection[str] = ()) -> list[tuple[str, dict, int]]:
        """``(plugin, event, attempts)`` of the oldest ``limit`` pending deliveries due by ``now`` of
        each plugin, oldest event first: a bounded page, however many are pending.

        ``excluding``: event ids to leave out (those handed to a plugin and not yet recorded).
        """
        due = []
        for plugin in plugins:
            # The planner would rather range over deliveries_pending (every plugin's due rows) and sort them.
            rows = self._db.execute(
                "SELECT d.attempts, e.body FROM deliveries d INDEXED BY deliveries_pending_by_plugin"
                " JOIN events e ON e.id = d.event_id WHERE d.plugin = ? AND d.state = 'pending' AND d.next_at <= ?"
                f" AND d.event_id NOT IN ({', '.join('?' * len(excluding))}) ORDER BY d.rowid LIMIT ?",
                (plugin, now, *excluding, limit),
            )
            due.extend((plugin, json.loads(row["body"]), row["attempts"]) for row in rows)
        return due

    def next_delivery_at(self, *, plugins: Iterable[str]) -> float | None:
        """When the earliest pending delivery to these plugins is due (None: none pending).

        One aggregate over the pending index: it runs on every pump while a notifier keeps failing,
        when the pending rows can be many.
        """
        plugins = tuple(plugins)
        if not plugins:
            return None
        row = self._db.execute(
            f"SELECT MIN(next_at) FROM deliveries WHERE state = 'pending'"
            f" AND plugin IN ({', '.join('?' * len(plugins))})", plugins).fetchone()
        return row[0]

    def delivery_attempts(self, event_id: str, plugin: str) -> int:
        row = self._db.execute("SELECT attempts FROM deliveries WHERE event_id = ? AND plugin = ?",
                               (event_id, plugin)).fetchone()
        return row[0] if row else 0

    def prune_events(self, before: float) -> int:
        """Forget events older than ``before`` that no plugin is still waiting for; returns how many."""
        pending = "SELECT event_id FROM deliveries WHERE state = 'pending'"
        with self.transaction() as db:
            db.execute(f"DELETE FROM deliveries WHERE event_id IN (SELECT id FROM events WHERE created_at < ?"
                       f" AND id NOT IN ({pending}))", (before,))
            return db.execute(f"DELETE FROM events WHERE created_at < ? AND id NOT IN ({pending})",
                              (before,)).rowcount

    def delivery_sent(self, event_id: str, plugin: str) -> None:
        self.record_deliveries(sent=[(event_id, plugin)])

    def delivery_failed(self, event_id: str, plugin: str, error: str, *, retry_at: float | None) -> None:
        """Record a failed attempt: retried from ``retry_at``, or given up for good when it is None."""
        self.record_deliveries(failed=[(event_id, plugin, error, retry_at)])

    def record_deliveries(self, *, sent: Iterable[tuple[str, str]] = (),
                          failed: Iterable[tuple[str, str, str, float | None]] = ()) -> None:
        """Record delivery attempts in one transaction: ``sent`` as ``(event id, plugin)``, ``failed`` as
        ``(event id, plugin, error, retry_at)`` (see :meth:`delivery_failed`)."""
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "UPDATE deliveries SET state = 'sent', attempts = attempts + 1, sent_at = ?, last_error = NULL"
                " WHERE event_id = ? AND plugin = ?", [(now, event_id, plugin) for event_id, plugin in sent])
            db.executemany(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, state = ?, next_at = ?"
                " WHERE event_id = ? AND plugin = ?",
                [(error, "failed" if retry_at is None else "pending", retry_at or now, event_id, plugin)
                 for event_id, plugin, error, retry_at in failed])
