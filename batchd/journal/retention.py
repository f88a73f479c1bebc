"""Forgetting finished jobs: ``forget_jobs_after_days`` keeps the journal the size of its recent history.

A service runs for months, and every job it ever ran kept its rows (the job, its chunks, its remote
batches, its events): tens of thousands a day. Jobs finished longer ago than the setting are deleted
from every table that holds them by job, a few hundred per transaction, so the loop's tick stays short.
What outlives them:

- ``done_totals`` (/metrics' sums over finished jobs) keeps counting them, and ``forgotten_totals``
  holds their figures so that a journal whose sums are read again from its rows
  (:func:`batchd.journal.schema.migrate`) still counts them;
- ``output_observed`` (what each task and model answered, which estimates price by), the request cache
  and ``media`` (shared by content, with a life of their own);
- ``batches_to_delete``, by remote name, until each is deleted (bounded: batchd/daemon/uploads.py);
- their outbox folders, which are the user's.

Not forgotten: a job with a notification still pending for a plugin (a receiver down for days gets it
when it is back), and a pack (batchd's own job carrying small jobs' requests) while a member of it is
kept. A forgotten job's manifest is no longer recognized: dropped again with the same content, it runs
again (see README, "Forgetting old jobs").
"""

from __future__ import annotations

import sqlite3

from batchd.journal.schema import DONE, totals_add

#: Jobs forgotten per transaction: each costs about a dozen row deletions with their index entries (0.16 ms
#: a job in all, bench/history.py), so a round holds the loop about 30 ms.
FORGET_PER_TRANSACTION = 200

#: Tables holding rows by job id, emptied of a forgotten job's (its events' deliveries first).
_ROWS_BY_JOB = ("chunks", "remote_jobs", "watched_names", "chunk_media", "events")


def forget_finished(db: sqlite3.Connection, before: float,
                    limit: int = FORGET_PER_TRANSACTION) -> tuple[int, list[str]]:
    """Delete up to ``limit`` jobs (packs aside) done before ``before`` (wall clock; their row's last write,
    which made them done: a rejected job has no ``finished_at``), oldest first, with every row that names
    them; then the packs they were sent in that no chunk is packed in any more.
    Returns how many jobs (not packs) were forgotten, and the ids of all (packs too). Runs inside the
    caller's transaction."""
    jobs = [row[0] for row in db.execute(
        # (INDEXED BY: without statistics SQLite takes the index by state and sorts every done job)
        f"SELECT id FROM jobs INDEXED BY jobs_done_by_age WHERE {DONE} AND updated_at < ? AND pack = 0 AND NOT EXISTS ("
        # each of its events (by job), then their deliveries (by event; the unary + keeps SQLite from reading
        # every pending delivery by state instead, for each job)
        " SELECT 1 FROM events e WHERE e.job_id = jobs.id AND EXISTS ("
        "  SELECT 1 FROM deliveries d WHERE d.event_id = e.id AND +d.state = 'pending'))"
        " ORDER BY updated_at LIMIT ?", (before, limit))]
    if not jobs:
        return 0, []
    ids = _temp_ids(db, jobs)
    db.execute(totals_add("forgotten_totals", f"j.id IN (SELECT id FROM {ids})"))
    # Their packs, found through them (a scan of every old job for packs cost each round as much as the history)
    packed_in = [row[0] for row in db.execute(
        f"SELECT DISTINCT packed_in FROM chunks WHERE job_id IN (SELECT id FROM {ids}) AND packed_in IS NOT NULL")]
    _delete_rows_of(db, ids)
    packs = [row[0] for row in db.execute(
        f"SELECT id FROM jobs WHERE id IN ({', '.join('?' * len(packed_in))}) AND {DONE} AND pack = 1"
        " AND NOT EXISTS (SELECT 1 FROM chunks WHERE packed_in = jobs.id)", packed_in)] if packed_in else []
    if packs:
        _delete_rows_of(db, _temp_ids(db, packs))
    return len(jobs), jobs + packs


def _temp_ids(db: sqlite3.Connection, ids: list[str]) -> str:
    """The ids in a temporary table (dropped at the connection's close; emptied at each use), its name."""
    db.execute("CREATE TEMP TABLE IF NOT EXISTS forgetting (id TEXT PRIMARY KEY)")
    db.execute("DELETE FROM forgetting")
    db.executemany("INSERT INTO forgetting VALUES (?)", ((job_id,) for job_id in ids))
    return "temp.forgetting"


def _delete_rows_of(db: sqlite3.Connection, ids: str) -> None:
    db.execute(f"DELETE FROM deliveries WHERE event_id IN"
               f" (SELECT id FROM events WHERE job_id IN (SELECT id FROM {ids}))")
    for table in _ROWS_BY_JOB:
        db.execute(f"DELETE FROM {table} WHERE job_id IN (SELECT id FROM {ids})")
    db.execute(f"DELETE FROM jobs WHERE id IN (SELECT id FROM {ids})")
