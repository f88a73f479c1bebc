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
    submitted  → fetched | done
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

    built      → submitting | skipped | packed
    packed     → fetched | skipped | built
    submitting → running | fetched | skipped | built
    running    → fetched | built

``built → skipped``: cancelled before it was ever sent. ``submitting → fetched``: the create was
refused (``remote_state`` "rejected"); ``submitting → skipped``: cancelled, and the unconfirmed
create never showed up; ``submitting → built``: the service refused the API key (nothing was
created), the chunk is sent again once a key is accepted. ``running → fetched``: results downloaded, or the remote job ended without
any (``remote_state`` "missing" when it disappeared). ``running → built``: it expired and is
submitted again (below).

Small jobs share remote batches: a *pack* is a job of batchd's own (``pack`` = 1: never delivered,
announced or shown) whose one chunk carries the requests of many small jobs' chunks (its
*members*, ``packed_in`` naming it). Sealing a pack commits, in one transaction, the pack's job and
chunk rows (its requests file already written and synced) with every member's ``built → packed``
and each member job's ``built → submitted``. The pack's chunk is then submitted, polled and
fetched like any other; its results are split into the members' spools before the transaction
that moves them ``packed → fetched``. A pack that ends without results ends its members as it
ended (``packed → fetched``, its state and error), except one whose create the service refused:
its members are sent alone (``packed → built``; a chunk is packed once). Then the pack is
``submitted → done``. A member cancelled meanwhile is ``packed → skipped``; a pack left without
members is cancelled.

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
plugin (pending → sent, or failed once given up); see :mod:`batchd.journal.notifications` and
:mod:`batchd.events`.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from batchd import fs
from batchd.journal.remote_records import RemoteRecords
from batchd.journal import kept as kept_rows
from batchd.journal.kept import KeptRows
from batchd.journal.retention import forget_finished
from batchd.journal.schema import DONE_TOTALS_ADD, HOLDING_UPLOADS, JOB_FIGURES, done_figures_by_scan
from batchd.journal.transactions import JournalLocked, JournalUnreadable
from batchd.journal.rows import (JOB_JSON_COLUMNS, Chunk, Job, SmallBuild, chunk_from_row, chunk_values, job_from_row,
                                 job_values, new_job_id, replace_row)
from batchd.logs import redact, redacted_json
from batchd.states import (ACTIVE_JOB_STATES, CHUNK_DONE_STATES, CHUNK_SOURCES, JOB_SOURCES, ChunkState, JobState,
                           MediaState, check_chunk_move, check_job_move)

__all__ = ["Chunk", "Job", "Journal", "JournalLocked", "JournalUnreadable", "journal_path", "new_job_id", "replace_row"]

#: ``output_observed`` forgets old jobs gradually: past this many requests its sums are halved, so
#: a task whose answers changed (a new prompt, a new model version) is priced by the new ones soon.
OBSERVED_REQUESTS_MAX = 100_000

_NOT_DONE = tuple(state for state in JobState if state != JobState.DONE)


def journal_path(state_dir: Path) -> Path:
    """Where a state dir keeps its journal."""
    return state_dir / "journal.db"


class Journal(RemoteRecords):
    """The daemon's durable state.  One writer process; readers may open it read-only.

    Its connection and commits are in transactions.py (:class:`~batchd.journal.transactions.Transactions`),
    job events and their deliveries in notifications.py (:class:`~batchd.journal.notifications.NotificationQueue`),
    what it knows of the service's side in remote_records.py
    (:class:`~batchd.journal.remote_records.RemoteRecords`: remote jobs and strays, watched names, batches
    to delete, webhook deliveries taken), its tables in schema.py; this class holds the rest: jobs,
    chunks, packs, media, the cost history, and what the dashboard and /metrics read.
    """

    def __init__(self, path: Path, *, readonly: bool = False,
                 while_locked: Callable[[float], None] = lambda seconds: None,
                 sync_group: fs.SyncGroup | None = None):
        super().__init__(path, readonly=readonly, while_locked=while_locked, sync_group=sync_group)
        #: Called with a job's id after every commit that changed the job or one of its chunks: the
        #: daemon's loop visits exactly those jobs next (see batchd.daemon.schedule).
        self.on_change: Callable[[str], None] = lambda job_id: None
        #: Whether ``jobs.pack`` exists: a writer adds it when it opens; a reader of a journal no daemon of
        #: this version has opened yet sees no pack (see :attr:`_not_pack`).
        self._has_pack_column = not readonly
        #: Jobs and chunks as last read, for the loop's many reads of the same rows (batchd/journal/kept.py):
        #: every write of a row drops it first, any rollback drops them all; a reader keeps none.
        self.kept_rows = KeptRows(lambda: self._rollbacks, keep=not readonly)
        #: The unfinished jobs whose requests send files (``chunk_media`` rows), kept by the one writer so
        #: that the many jobs without any skip the per-chunk lookups (a job leaves it when it is done: the
        #: set does not grow with the history); None for a reader (another process writes).
        self._jobs_with_media: set[str] | None = None if readonly else {
            row[0] for row in self._db.execute("SELECT DISTINCT cm.job_id FROM chunk_media cm JOIN jobs j"
                                               " ON j.id = cm.job_id WHERE j.state != ?", (JobState.DONE,))}
        #: Whether any request ever sent a file (a ``media`` row): else there is nothing uploaded to delete.
        self._media_seen = readonly or self._db.execute("SELECT 1 FROM media LIMIT 1").fetchone() is not None

    @property
    def _not_pack(self) -> str:
        """SQL that holds for a job people dropped, not a pack (batchd/daemon/pack.py)."""
        if not self._has_pack_column:
            self._has_pack_column = any(row[1] == "pack" for row in self._db.execute("PRAGMA table_info(jobs)"))
        return "pack = 0" if self._has_pack_column else "1"

    # -- jobs -------------------------------------------------------------------------------

    def add_job(self, job_id: str, *, name: str, source: str, state: str = "claiming",
                sha256: str | None = None, error: dict | None = None, task: str | None = None,
                model: str | None = None, manifest_sha256: str | None = None,
                retry_of: dict | None = None, kind: str = "generate") -> None:
        """A new job; ``error`` (already known at the claim: why it is rejected) is recorded with it."""
        now = time.time()
        with self.transaction(one_write=True) as db:
            db.execute(
                "INSERT INTO jobs (id, name, source, sha256, state, error, task, model, kind, manifest_sha256,"
                " retry_of, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, name, source, sha256, state,
                 redacted_json(error) if error is not None else None, task, model, kind, manifest_sha256,
                 redacted_json(retry_of) if retry_of is not None else None, now, now),
            )

    def update_job(self, job_id: str, *, events: Iterable[dict] = (), **fields: Any) -> None:
        """Set fields of one job in its own transaction, with the events that announce the change."""
        with self.transaction(one_write=not events) as db:
            self._update_job(db, job_id, **fields)
            self._add_events(db, events)
        self.on_change(job_id)

    def _update_job(self, db: sqlite3.Connection, job_id: str, **fields: Any) -> None:
        kept = self.kept_rows.job(job_id)
        self.kept_rows.forget_job(job_id)
        for name in JOB_JSON_COLUMNS:  # stored as JSON; job_values decodes the same columns for the kept row
            if name in fields and fields[name] is not None:
                fields[name] = redacted_json(fields[name])
        if isinstance(fields.get("hold"), str):
            fields["hold"] = redact(fields["hold"])
        fields["updated_at"] = time.time()
        columns = ", ".join(f"{name} = ?" for name in fields)
        # A job finishing is added to /metrics' sums over finished jobs (schema.py, done_totals), once.
        finishing = fields.get("state") == JobState.DONE and (
            kept.state if kept is not None
            else (db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone() or [None])[0]
        ) != JobState.DONE
        if "state" not in fields:
            updated = db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id)).rowcount
        else:
            # The move is checked by the UPDATE itself (one statement, not a read and a write); when it
            # changed nothing, the row is read to tell a missing job from a move the tables forbid.
            sources = JOB_SOURCES.get(fields["state"], (fields["state"],))
            updated = db.execute(
                f"UPDATE jobs SET {columns} WHERE id = ? AND state IN ({', '.join('?' * len(sources))})",
                (*fields.values(), job_id, *sources)).rowcount
            if not updated:
                row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is not None:
                    check_job_move(row[0], fields["state"])
        if updated and finishing:
            db.execute(DONE_TOTALS_ADD, (job_id,))
            db.execute("DELETE FROM member_results WHERE job_id = ?", (job_id,))  # (its outbox has them now)
            db.execute("DELETE FROM small_builds WHERE job_id = ?", (job_id,))
            if self._jobs_with_media is not None and job_id in self._jobs_with_media:
                self.after_commit(lambda: self._jobs_with_media.discard(job_id))
        if updated and kept is not None:
            # The row as a read would now return it, kept without the read: the loop visits a job right
            # after writing it. A rollback drops it with the rest (batchd/journal/kept.py).
            self.kept_rows.keep_job(replace_row(kept, **job_values(fields)))

    def job(self, job_id: str) -> Job | None:
        kept = self.kept_rows.job(job_id)
        if kept is not None:
            return kept
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self.kept_rows.keep_job(job_from_row(row)) if row else None

    def jobs(self, *, states: tuple[str, ...] | None = None, name: str | None = None,
             packs: bool = False) -> list[Job]:
        """Jobs in ``states`` (all: None), oldest first; packs only when asked (the loop's sweep):
        everything else shows the jobs people dropped."""
        if states and name is None:
            return self._cached(("jobs", tuple(states), packs), lambda: self._jobs(states=states, packs=packs))
        return self._jobs(states=states, name=name, packs=packs)

    def _jobs(self, *, states: tuple[str, ...] | None = None, name: str | None = None,
              packs: bool = False) -> list[Job]:
        query, args = "SELECT * FROM jobs", []
        clauses = [] if packs else [self._not_pack]
        if states:
            clauses.append(f"state IN ({', '.join('?' * len(states))})")
            args.extend(states)
        if name is not None:
            clauses.append("name = ?")
            args.append(name)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        return [job_from_row(row) for row in self._db.execute(query + " ORDER BY created_at, id", args)]

    def active_jobs(self) -> list[Job]:
        return self.jobs(states=ACTIVE_JOB_STATES)

    def jobs_by_id(self, job_ids: Iterable[str]) -> list[Job]:
        """The active ones of these jobs, oldest first (the loop's turn order)."""
        found: list[Job] = []
        ids = []
        for job_id in job_ids:
            kept = self.kept_rows.job(job_id)
            if kept is None:
                ids.append(job_id)
            elif kept.state in ACTIVE_JOB_STATES:
                found.append(kept)
        for start in range(0, len(ids), 500):  # SQLite caps the number of parameters
            part = ids[start:start + 500]
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE id IN ({', '.join('?' * len(part))})"
                f" AND state IN ({', '.join('?' * len(ACTIVE_JOB_STATES))})", (*part, *ACTIVE_JOB_STATES))
            found.extend(self.kept_rows.keep_job(job_from_row(row)) for row in rows)
        return sorted(found, key=lambda job: (job.created_at, job.id))

    def count_jobs(self, states: Iterable[str], *, limit: int = -1, packs: bool = True) -> int:
        """How many jobs are in ``states`` (at most ``limit``: 1 asks whether there is any, without
        counting thousands of queued jobs on every tick); packs too unless ``packs`` is False."""
        states = tuple(states)
        shown = "" if packs else f" AND {self._not_pack}"
        return self._cached(("count_jobs", states, limit, packs), lambda: self._db.execute(
            f"SELECT count(*) FROM (SELECT 1 FROM jobs WHERE state IN ({', '.join('?' * len(states))}){shown} LIMIT ?)",
            (*states, limit)).fetchone()[0])

    def job_with_content(self, sha256: str) -> Job | None:
        """An earlier job with the same manifest and inputs (not a rejected one)."""
        row = self._db.execute(
            "SELECT * FROM jobs WHERE sha256 = ? AND coalesce(outcome, '') != 'rejected'"
            " ORDER BY created_at LIMIT 1", (sha256,),
        ).fetchone()
        return job_from_row(row) if row else None

    def rejected_as_unmovable(self, source: str, manifest_sha256: str | None, *,
                              unchanged_since: float | None = None) -> bool:
        """Whether the manifest ``source`` with these bytes was rejected already because batchd's user may not
        move it out of the inbox (batchd.daemon.intake, ``not_movable``); ``manifest_sha256`` None: one rejected
        unread, the rejection finished after ``unchanged_since`` (the file's last change: the claim's attempt to
        link it may change it, where the kernel lets batchd's user link another user's file)."""
        if manifest_sha256 is not None:
            return self._db.execute(
                "SELECT 1 FROM jobs WHERE name = ? AND source = ? AND manifest_sha256 = ?"
                " AND json_extract(error, '$.code') = 'not_movable' LIMIT 1",
                (Path(source).stem, source, manifest_sha256)).fetchone() is not None
        return self._db.execute(
            "SELECT 1 FROM jobs WHERE name = ? AND source = ? AND manifest_sha256 IS NULL"
            " AND coalesce(finished_at, updated_at) >= ?"
            " AND json_extract(error, '$.code') = 'not_movable' LIMIT 1",
            (Path(source).stem, source, unchanged_since)).fetchone() is not None

    def control_file_taken(self, name: str, inode: int, changed_ns: int) -> bool:
        """Whether the control file ``name`` (``inode``) was taken already, unchanged since (its ctime)."""
        return self._db.execute("SELECT 1 FROM control_files_taken WHERE name = ? AND inode = ? AND changed_ns = ?",
                                (name, inode, changed_ns)).fetchone() is not None

    def note_control_file_taken(self, name: str, inode: int, changed_ns: int, *, keep: int) -> None:
        """Record the control file ``name`` taken (in the transition that sets its flags); the newest ``keep``
        are kept."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO control_files_taken (name, inode, changed_ns, taken_at)"
                       " VALUES (?, ?, ?, ?)", (name, inode, changed_ns, time.time()))
            db.execute("DELETE FROM control_files_taken WHERE taken_at < (SELECT taken_at FROM control_files_taken"
                       " ORDER BY taken_at DESC LIMIT 1 OFFSET ?)", (keep - 1,))

    def find_jobs(self, ref: str) -> list[Job]:
        """Jobs named ``ref`` (the manifest stem) or with id ``ref``, newest last."""
        rows = self._db.execute(
            f"SELECT * FROM jobs WHERE (name = ? OR id = ?) AND {self._not_pack} ORDER BY created_at, id", (ref, ref)
        )
        return [job_from_row(row) for row in rows]

    # -- chunks -----------------------------------------------------------------------------

    def add_chunk(self, job_id: str, chunk: dict, small: SmallBuild | None = None) -> bool:
        """Record a built chunk (state ``built``), with the job's ``small`` build when it was built in memory
        (:meth:`small_build`); False if it was already recorded before a crash."""
        self.kept_rows.forget_chunks(job_id)
        with self.transaction() as db:
            inserted = db.execute(
                "INSERT OR IGNORE INTO chunks (job_id, idx, display_name, mode, request_count, byte_size, state)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, chunk["idx"], chunk["display_name"], chunk["mode"], chunk["request_count"],
                 chunk["byte_size"], ChunkState.BUILT),
            ).rowcount
            if inserted and small is not None:
                db.execute("INSERT OR REPLACE INTO small_builds (job_id, requests, entries) VALUES (?, ?, ?)",
                           (job_id, small.requests, small.index))
            media = chunk.get("media") or {}
            if inserted and media:
                if self._jobs_with_media is not None:
                    self._jobs_with_media.add(job_id)  # before the rows: a rollback leaves one lookup too many
                self._media_seen = True
                db.executemany("INSERT OR IGNORE INTO media (sha256, mime_type, size, state) VALUES (?, ?, ?, ?)",
                               [(sha256, mime, size, MediaState.NEW) for sha256, (mime, size) in media.items()])
                db.executemany("INSERT OR IGNORE INTO chunk_media (job_id, idx, sha256) VALUES (?, ?, ?)",
                               [(job_id, chunk["idx"], sha256) for sha256 in media])
        self.on_change(job_id)
        return bool(inserted)

    def update_chunk(self, job_id: str, idx: int, *, events: Iterable[dict] = (), member_results: str | None = None,
                     **fields: Any) -> None:
        """Set fields of one chunk in its own transaction, with the events that announce the change and, for a
        pack member moving ``packed → fetched``, its share of the pack's results (:meth:`member_results`)."""
        with self.transaction(one_write=not events and member_results is None) as db:
            self._update_chunk(db, job_id, idx, **fields)
            if member_results is not None:
                db.execute("INSERT OR REPLACE INTO member_results (job_id, idx, records) VALUES (?, ?, ?)",
                           (job_id, idx, member_results))
            self._add_events(db, events)
        self.on_change(job_id)

    def small_build(self, job_id: str) -> SmallBuild | None:
        """The job's build as the journal keeps it when it was small (see schema.py), else None: its spool's files."""
        row = self._db.execute("SELECT requests, entries FROM small_builds WHERE job_id = ?", (job_id,)).fetchone()
        return SmallBuild(*row) if row is not None else None

    def member_results(self, job_id: str) -> dict[int, str]:
        """The job's chunks' shares of their packs' results, as JSON lines, by chunk index (see schema.py)."""
        return dict(self._db.execute("SELECT idx, records FROM member_results WHERE job_id = ?", (job_id,)))

    def _update_chunk(self, db: sqlite3.Connection, job_id: str, idx: int, **fields: Any) -> None:
        kept = self.kept_rows.chunks(job_id)
        self.kept_rows.forget_chunks(job_id)
        for name in ("stats", "error"):
            if name in fields and fields[name] is not None:
                fields[name] = redacted_json(fields[name])
        columns = ", ".join(f"{name} = ?" for name in fields)
        if "state" not in fields:
            updated = db.execute(f"UPDATE chunks SET {columns} WHERE job_id = ? AND idx = ?",
                                 (*fields.values(), job_id, idx)).rowcount
        else:
            # Checked as a job's move is (see _update_job).
            sources = CHUNK_SOURCES.get(fields["state"], (fields["state"],))
            updated = db.execute(f"UPDATE chunks SET {columns} WHERE job_id = ? AND idx = ?"
                                 f" AND state IN ({', '.join('?' * len(sources))})",
                                 (*fields.values(), job_id, idx, *sources)).rowcount
            if not updated:
                row = db.execute("SELECT state FROM chunks WHERE job_id = ? AND idx = ?", (job_id, idx)).fetchone()
                if row is not None:
                    check_chunk_move(row[0], fields["state"])
        if updated and kept is not None:
            # The job's chunks as a read would now return them, as a job's row is kept (_update_job): the
            # loop reads them again right after (counts for an event, the next step's chunks).
            changed = chunk_values(fields)
            self.kept_rows.keep_chunks(job_id, [replace_row(chunk, **changed) if chunk.idx == idx else chunk
                                                for chunk in kept])

    def resubmit_chunk(self, chunk: Chunk, display_name: str, *, events: Iterable[dict] = ()) -> None:
        """An expired chunk back to ``built`` under its next display name, to be submitted again.

        One transaction: its expired remote job stays on record (role ``expired``), and the event
        announcing the resubmission is committed with it.
        """
        self.kept_rows.forget_chunks(chunk.job_id)
        with self.transaction() as db:
            db.execute("UPDATE remote_jobs SET role = 'expired' WHERE remote_name = ?", (chunk.remote_name,))
            db.execute(
                "UPDATE chunks SET state = ?, display_name = ?, resubmits = resubmits + 1, remote_name = NULL,"
                " remote_state = NULL, stats = NULL, intent_at = NULL, cancel_sent = 0, error = NULL"
                " WHERE job_id = ? AND idx = ? AND state = ?",
                (ChunkState.BUILT, display_name, chunk.job_id, chunk.idx, ChunkState.RUNNING),
            )
            self._add_events(db, events)
        self.on_change(chunk.job_id)

    # -- packs (batchd/daemon/pack.py) -------------------------------------------------------

    def add_pack(self, pack_id: str, *, name: str, model: str, chunk: dict, members: list[Chunk]) -> None:
        """Seal a pack: its job and chunk rows (``built``), each member chunk ``built → packed`` and each
        member job ``built → submitted``, in one transaction (its requests file is already durable)."""
        now = time.time()
        self.kept_rows.forget_chunks(pack_id)  # (its members' kept chunks are updated with their rows)
        with self.transaction() as db:
            db.execute("INSERT INTO jobs (id, name, source, state, model, kind, pack, created_at, updated_at)"
                       " VALUES (?, ?, '', ?, ?, 'generate', 1, ?, ?)", (pack_id, name, JobState.BUILT, model, now, now))
            db.execute("INSERT INTO chunks (job_id, idx, display_name, mode, request_count, byte_size, state)"
                       " VALUES (?, 0, ?, 'inline', ?, ?, ?)",
                       (pack_id, chunk["display_name"], chunk["request_count"], chunk["byte_size"], ChunkState.BUILT))
            for member in members:
                self._update_chunk(db, member.job_id, member.idx, state=ChunkState.PACKED, packed_in=pack_id)
                self._update_job(db, member.job_id, state=JobState.SUBMITTED, submitted_at=now)
        self.on_change(pack_id)
        for member in members:
            self.on_change(member.job_id)

    def packed_members(self, pack_id: str) -> list[Chunk]:
        """The chunks still waiting for the pack's results (not cancelled, not sent alone)."""
        rows = self._db.execute("SELECT * FROM chunks WHERE packed_in = ? AND state = ? ORDER BY job_id, idx",
                                (pack_id, ChunkState.PACKED))
        return [chunk_from_row(row) for row in rows]

    def chunks(self, job_id: str) -> list[Chunk]:
        kept = self.kept_rows.chunks(job_id)
        if kept is not None:
            return list(kept)
        rows = self._db.execute("SELECT * FROM chunks WHERE job_id = ? ORDER BY idx", (job_id,))
        chunks = [chunk_from_row(row) for row in rows]
        self.kept_rows.keep_chunks(job_id, chunks)
        return list(chunks)

    def _kept_chunks(self, job_id: str) -> list[Chunk] | None:
        """The job's chunks as kept (not to be handed out: callers copy), read whole and kept first when the
        job has few; None for a job of many, or in a reader. Asked for by the reads of some of a job's
        chunks (its totals, its next built ones, one of them): a small job's next reads are then answered
        from memory, where each asked the database again."""
        kept = self.kept_rows.chunks(job_id)
        if kept is not None or not self.kept_rows.keeps or self.kept_rows.is_large(job_id):
            return kept
        most = kept_rows.KEPT_CHUNKS_PER_JOB
        rows = self._db.execute("SELECT * FROM chunks WHERE job_id = ? ORDER BY idx LIMIT ?",
                                (job_id, most + 1)).fetchall()
        if len(rows) > most:
            self.kept_rows.note_large(job_id)
            return None
        chunks = [chunk_from_row(row) for row in rows]
        self.kept_rows.keep_chunks(job_id, chunks)
        return chunks

    def built_chunks(self, job_id: str, limit: int) -> list[Chunk]:
        """The job's first ``limit`` chunks waiting to be submitted: a job of many chunks is not read
        whole on every visit while only a few of them can go out."""
        kept = self._kept_chunks(job_id)
        if kept is not None:
            return [chunk for chunk in kept if chunk.state == ChunkState.BUILT][:limit]
        rows = self._db.execute("SELECT * FROM chunks WHERE job_id = ? AND state = ? ORDER BY idx LIMIT ?",
                                (job_id, ChunkState.BUILT, limit))
        return [chunk_from_row(row) for row in rows]

    def chunk(self, job_id: str, idx: int) -> Chunk | None:
        kept = self._kept_chunks(job_id)
        if kept is not None:
            return next((chunk for chunk in kept if chunk.idx == idx), None)
        row = self._db.execute("SELECT * FROM chunks WHERE job_id = ? AND idx = ?", (job_id, idx)).fetchone()
        return chunk_from_row(row) if row else None

    def chunk_by_remote_name(self, remote_name: str) -> Chunk | None:
        # A pack's members record its remote name once they have their results: the pack's own chunk is it.
        row = self._db.execute("SELECT * FROM chunks WHERE remote_name = ? ORDER BY packed_in IS NOT NULL LIMIT 1",
                               (remote_name,)).fetchone()
        return chunk_from_row(row) if row else None

    def chunk_totals(self, job_id: str) -> dict[str, int]:
        """How many chunks the job has, in each state (``chunks``: all, ``requests``: their requests)."""
        totals = {"chunks": 0, "requests": 0}
        kept = self._kept_chunks(job_id)
        if kept is not None:
            for chunk in kept:
                totals[chunk.state] = totals.get(chunk.state, 0) + 1
                totals["chunks"] += 1
                totals["requests"] += chunk.request_count
            return totals
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
        return [chunk_from_row(row) for row in rows]

    def count_chunks_in(self, states: tuple[str, ...], *, job_states: tuple[str, ...], limit: int = -1) -> int:
        """How many chunks :meth:`chunks_in` would return (at most ``limit``: 1 asks whether there is any)."""
        return self._cached(("count_chunks_in", states, job_states, limit), lambda: self._db.execute(
            "SELECT count(*) FROM (SELECT 1 FROM chunks c JOIN jobs j ON j.id = c.job_id"
            f" WHERE c.state IN ({', '.join('?' * len(states))}) AND j.state IN ({', '.join('?' * len(job_states))})"
            " LIMIT ?)", (*states, *job_states, limit)).fetchone()[0])

    def uploads_to_delete(self) -> list[Chunk]:
        """Finished chunks (``fetched`` or ``skipped``, of any job) whose request file the service may still hold."""
        return self._cached(("uploads_to_delete",), lambda: [chunk_from_row(row) for row in self._db.execute(
            f"SELECT * FROM chunks WHERE {HOLDING_UPLOADS} AND state IN (?, ?) ORDER BY job_id, idx",
            CHUNK_DONE_STATES)])

    def set_upload_states(self, states: dict[tuple[str, int], str]) -> None:
        """Set the ``upload_state`` of several chunks, keyed by (job id, idx), in one transaction."""
        if not states:
            return
        self.kept_rows.forget_chunks(*(job_id for job_id, _ in states))
        with self.transaction() as db:
            db.executemany("UPDATE chunks SET upload_state = ? WHERE job_id = ? AND idx = ?",
                           [(state, job_id, idx) for (job_id, idx), state in states.items()])

    # -- history -----------------------------------------------------------------------------

    def forget_finished(self, before: float) -> int:
        """Forget a round of the jobs finished before ``before`` (batchd/journal/retention.py); returns how
        many (a full round, :data:`~batchd.journal.retention.FORGET_PER_TRANSACTION`: there may be more)."""
        with self.transaction() as db:
            count, ids = forget_finished(db, before)
        for job_id in ids:
            self.kept_rows.forget_job(job_id)
        self.kept_rows.forget_chunks(*ids)
        return count

    # -- media (files sent with requests) ---------------------------------------------------

    def chunk_media(self, job_id: str, idx: int) -> list[dict]:
        """The media rows of the files a chunk's requests upload (a chunk of a job that is not done)."""
        if self._jobs_with_media is not None and job_id not in self._jobs_with_media:
            return []
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
                    fields = {**fields, "error": redacted_json(fields["error"])}
                columns = ", ".join(f"{name} = ?" for name in fields)
                db.execute(f"UPDATE media SET {columns} WHERE sha256 = ?", (*fields.values(), sha256))

    def media_to_delete(self, unused_since: float) -> list[dict]:
        """Uploaded (or perhaps uploaded) files no chunk still to be sent or running needs, unused since
        ``unused_since``, and those a deletion round cut short left ``deleting``."""
        if not self._media_seen:
            return []  # no request ever sent a file: nothing was uploaded
        rows = self._db.execute(
            "SELECT * FROM media m WHERE (m.state = ? OR (m.state IN (?, ?)"
            " AND COALESCE(m.last_used, 0) <= ?)) AND NOT EXISTS (SELECT 1 FROM chunk_media cm JOIN chunks c"
            " ON c.job_id = cm.job_id AND c.idx = cm.idx WHERE cm.sha256 = m.sha256"
            " AND c.state NOT IN (?, ?)) ORDER BY m.sha256",
            (MediaState.DELETING, MediaState.ACTIVE, MediaState.UPLOADING, unused_since, *CHUNK_DONE_STATES))
        return [dict(row) for row in rows]

    # -- budgets and the cost history -------------------------------------------------------

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
        # Past OBSERVED_REQUESTS_MAX requests both sums are halved, so older jobs count less over time.
        # One statement (its SET reads the row as it was before it), so no savepoint in a group.
        first = (requests // 2, output_tokens // 2) if requests > OBSERVED_REQUESTS_MAX else (requests, output_tokens)
        with self.transaction(one_write=True) as db:
            db.execute(
                "INSERT INTO output_observed (task, model, requests, output_tokens, updated_at)"
                " VALUES (:task, :model, :first_requests, :first_tokens, :now)"
                " ON CONFLICT (task, model) DO UPDATE SET"
                " requests = CASE WHEN requests + :requests > :most THEN (requests + :requests) / 2"
                " ELSE requests + :requests END,"
                " output_tokens = CASE WHEN requests + :requests > :most THEN (output_tokens + :tokens) / 2"
                " ELSE output_tokens + :tokens END,"
                " updated_at = :now",
                {"task": task, "model": model, "first_requests": first[0], "first_tokens": first[1], "now": time.time(),
                 "requests": requests, "tokens": output_tokens, "most": OBSERVED_REQUESTS_MAX})

    def observed_output(self, task: str | None, model: str | None) -> dict | None:
        """``{"requests": n, "output_tokens": m}`` earlier jobs of this task and model came back with, or None."""
        try:
            row = self._db.execute("SELECT requests, output_tokens FROM output_observed WHERE task = ? AND model = ?",
                                   (task or "", model or "")).fetchone()
        except sqlite3.OperationalError:
            return None  # a journal opened read-only, from a batchd that did not keep it yet
        return {"requests": row[0], "output_tokens": row[1]} if row else None

    # -- what the dashboard and /metrics read ------------------------------------------------

    def recent_jobs(self, *, done: int, limit: int) -> list[Job]:
        """Every unfinished job and the ``done`` last finished ones, newest first, at most ``limit``."""
        rows = self._db.execute(
            # Each part by an index (schema.py): the states named, not "!= done", which reads every row.
            f"SELECT * FROM jobs WHERE state IN ({', '.join('?' * len(_NOT_DONE))}) AND {self._not_pack} UNION ALL"
            f" SELECT * FROM (SELECT * FROM jobs WHERE state = ? AND {self._not_pack}"
            " ORDER BY finished_at DESC LIMIT ?)"
            " ORDER BY created_at DESC, id DESC LIMIT ?", (*_NOT_DONE, JobState.DONE, done, limit)).fetchall()
        return [job_from_row(row) for row in rows]

    def spend_by_day(self, default_model: str, since: float) -> list[tuple[str, str, float]]:
        """``(day, model, spend)`` of the jobs since ``since``, summed per UTC day and model, oldest first."""
        rows = self._db.execute(
            "SELECT date(coalesce(finished_at, created_at), 'unixepoch') AS day, coalesce(model, ?) AS model,"
            f" sum(spend) FROM jobs WHERE spend IS NOT NULL AND {self._not_pack} AND coalesce(finished_at, created_at) >= ?"
            " GROUP BY day, model ORDER BY day, model", (default_model, since)).fetchall()
        return [(day, model, float(amount or 0.0)) for day, model, amount in rows]

    def totals(self) -> dict[str, Any]:
        """/metrics' figures: jobs by state and outcome, requests, tokens, cost, notification backlog, running chunks.

        The finished jobs' sums are kept in ``done_totals`` (a journal no daemon of this version opened yet
        has none: they are summed from the rows); the unfinished jobs' are read, by the state index."""
        db = self._db
        try:
            done = db.execute(f"SELECT outcome, jobs, {', '.join(JOB_FIGURES)} FROM done_totals").fetchall()
        except sqlite3.OperationalError as error:
            if "no such table" not in str(error):
                raise
            done = db.execute(done_figures_by_scan(self._not_pack)).fetchall()
        live = db.execute(
            f"SELECT j.state, count(*), {', '.join(f'sum({sql})' for sql in JOB_FIGURES.values())} FROM jobs j"
            f" WHERE j.state IN ({', '.join('?' * len(_NOT_DONE))}) AND {self._not_pack} GROUP BY j.state",
            _NOT_DONE).fetchall()
        figures: dict[str, Any] = {"jobs": {row[0]: row[1] for row in live},
                                   "outcomes": {row[0]: row[1] for row in done if row[0]}}
        if done:
            figures["jobs"][JobState.DONE.value] = sum(row[1] for row in done)
        for n, name in enumerate(JOB_FIGURES, start=2):
            figures[name] = sum(row[n] or 0 for row in (*done, *live))
        figures["notification_backlog"] = db.execute(
            "SELECT count(*) FROM deliveries WHERE state = 'pending'").fetchone()[0]
        figures["running_chunks"] = db.execute("SELECT count(*) FROM chunks WHERE state = ?",
                                               (ChunkState.RUNNING,)).fetchone()[0]
        return figures
