"""A journal keeps every job's rows for as long as the daemon runs: what the daemon reads or writes per
job must find its rows by an index, never by reading the whole table (bench/history.py measures it)."""

from __future__ import annotations

import re
import sqlite3
import time

from batchd.config import load_settings
from batchd.daemon import Daemon
from batchd.journal import journal_path
from batchd.testing import Workspace

#: Tables with rows for every job, chunk, event, delivery or remote batch ever handled.
GROWING_TABLES = {"jobs", "chunks", "events", "deliveries", "remote_jobs", "media", "chunk_media",
                  "webhook_deliveries"}
#: Statements that read a whole table on purpose, and why that is bounded.
WHOLE_TABLE_READS = {
    # Once, when the journal is opened: which jobs send files (batchd/journal/__init__.py).
    "SELECT DISTINCT job_id FROM chunk_media",
}


def statement_shape(sql: str) -> str:
    """The statement with its literals blanked, so each query is checked once."""
    return re.sub(r"'(?:[^']|'')*'|\b\d+(?:\.\d+)?\b", "?", " ".join(sql.split()))


def test_every_statement_of_a_job_finds_its_rows_by_an_index(workspace: Workspace):
    """Small jobs sent together, a job of several chunks, a rejected manifest and their events' deliveries,
    through an in-process daemon, then the prunes and the dashboard's reads: no statement scans a table
    that grows with history. Before ``remote_jobs_by_job``, each delivery read every remote batch ever
    made (summary.json lists the job's): 9.6 ms a job on a journal of 100,000 jobs, 3.4 ms on a new one;
    the dashboard's page of recent jobs read and sorted every job (54 ms at 100,000, 1.1 ms now)."""
    workspace.configure(settle_seconds=0, job_seconds=0, chunk_max_requests=3)
    for n in range(4):
        workspace.drop(f"small{n}.toml", f'task = "sentiment"\ntexts = ["Order {n} arrived.", "Order {n} was late."]\n')
    workspace.drop("large.toml", 'task = "sentiment"\ntexts = [' + ", ".join(f'"Review {n}."' for n in range(7)) + "]\n")
    workspace.drop("unknown.toml", 'task = "no-such-task"\ntexts = ["x"]\n')
    daemon = Daemon(load_settings(workspace.config), once=True)
    statements: list[str] = []
    daemon.start()  # opens the journal and recovers (read once a start)
    daemon.journal._db.set_trace_callback(statements.append)
    try:
        deadline = time.monotonic() + 60
        while len(workspace.outbox_folders()) < 6:
            assert time.monotonic() < deadline, "timed out"
            daemon.loop.tick()
            daemon.inbox.wait(min(daemon.loop.sleep_seconds(), 0.05))
        daemon.loop.prune_events()  # hourly, over every event
        daemon.journal.recent_jobs(done=50, limit=200)  # the dashboard's page and its cost chart
        daemon.journal.spend_by_day("gemini-2.5-flash", time.time() - 30 * 86400)
    finally:
        daemon.close()
    states = {folder.name: folder.state for folder in workspace.outbox_folders().values()}
    assert states == {**{f"small{n}": "succeeded" for n in range(4)}, "large": "succeeded", "unknown": "rejected"}

    shapes = {statement_shape(sql): sql for sql in statements
              if sql.lstrip().split(" ", 1)[0].upper() in ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")}
    assert any("FROM remote_jobs WHERE job_id" in shape for shape in shapes), "the summary's lookup was not run"
    db = sqlite3.connect(journal_path(workspace.state))
    try:
        scans = {}
        for shape, sql in shapes.items():
            plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")]
            scanned = {match.group(1) for step in plan if (match := re.match(r"SCAN (\w+)", step))}
            if scanned & GROWING_TABLES and shape not in WHOLE_TABLE_READS:
                scans[shape] = plan
    finally:
        db.close()
    assert not scans, scans
