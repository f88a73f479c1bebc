"""A journal keeps every job's rows for as long as the daemon runs: what the daemon reads or writes per
job must find its rows by an index, never by reading the whole table (bench/history.py measures it)."""

from __future__ import annotations

import re
import sqlite3
import time

from batchd.config import load_settings
from batchd.daemon import Daemon
from batchd.journal import Journal, journal_path
from batchd.states import JobState
from batchd.testing import Workspace

#: Tables with rows for every job, chunk, event, delivery or remote batch ever handled.
GROWING_TABLES = {"jobs", "chunks", "events", "deliveries", "remote_jobs", "media", "chunk_media",
                  "webhook_deliveries"}


def statement_shape(sql: str) -> str:
    """The statement with its literals blanked, so each query is checked once."""
    return re.sub(r"'(?:[^']|'')*'|\b\d+(?:\.\d+)?\b", "?", " ".join(sql.split()))


def deliver_some_jobs(workspace: Workspace, *, statements: list[str] | None = None) -> None:
    """Small jobs sent together, a job of several chunks and a rejected manifest, through an in-process
    daemon until all six are delivered; then the prunes and the dashboard's reads. Every statement run
    after the start is appended to ``statements``."""
    workspace.configure(settle_seconds=0, job_seconds=0, chunk_max_requests=3, forget_jobs_after_days=7)
    for n in range(4):
        workspace.drop(f"small{n}.toml", f'task = "sentiment"\ntexts = ["Order {n} arrived.", "Order {n} was late."]\n')
    workspace.drop("large.toml", 'task = "sentiment"\ntexts = [' + ", ".join(f'"Review {n}."' for n in range(7)) + "]\n")
    workspace.drop("unknown.toml", 'task = "no-such-task"\ntexts = ["x"]\n')
    daemon = Daemon(load_settings(workspace.config), once=True)
    daemon.start()  # opens the journal and recovers (read once a start)
    if statements is not None:
        daemon.journal._db.set_trace_callback(statements.append)
    try:
        deadline = time.monotonic() + 60
        while len(workspace.outbox_folders()) < 6:
            assert time.monotonic() < deadline, "timed out"
            daemon.loop.tick()
            daemon.inbox.wait(min(daemon.loop.sleep_seconds(), 0.05))
        daemon.loop.prune_history()  # hourly, over every event
        daemon.journal.recent_jobs(done=50, limit=200)  # the dashboard's page and its cost chart
        daemon.journal.spend_by_day("gemini-2.5-flash", time.time() - 30 * 86400)
    finally:
        daemon.close()
    states = {folder.name: folder.state for folder in workspace.outbox_folders().values()}
    assert states == {**{f"small{n}": "succeeded" for n in range(4)}, "large": "succeeded", "unknown": "rejected"}


def test_every_statement_of_a_job_finds_its_rows_by_an_index(workspace: Workspace):
    """Through :func:`deliver_some_jobs`, no statement scans a table that grows with history. Before
    ``remote_jobs_by_job``, each delivery read every remote batch ever made (summary.json lists the
    job's): 9.6 ms a job on a journal of 100,000 jobs, 3.4 ms on a new one; the dashboard's page of
    recent jobs read and sorted every job (54 ms at 100,000, 1.1 ms now)."""
    statements: list[str] = []
    deliver_some_jobs(workspace, statements=statements)

    shapes = {statement_shape(sql): sql for sql in statements
              if sql.lstrip().split(" ", 1)[0].upper() in ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")}
    assert any("FROM remote_jobs WHERE job_id" in shape for shape in shapes), "the summary's lookup was not run"
    db = sqlite3.connect(journal_path(workspace.state))
    try:
        scans = {}
        for shape, sql in shapes.items():
            plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")]
            scanned = {match.group(1) for step in plan if (match := re.match(r"SCAN (\w+)", step))}
            if scanned & GROWING_TABLES:
                scans[shape] = plan
    finally:
        db.close()
    assert not scans, scans


#: /metrics' figures as they were read before done_totals: every job's row, at every scrape.
FIGURES_BY_SCAN = {
    "jobs": "SELECT state, count(*) FROM jobs WHERE pack = 0 GROUP BY state",
    "outcomes": "SELECT outcome, count(*) FROM jobs WHERE state = 'done' AND pack = 0 AND outcome IS NOT NULL"
                " GROUP BY outcome",
    "requests": "SELECT coalesce(sum(request_count), 0), coalesce(sum(CASE WHEN state IN ('fetched', 'skipped') THEN"
                " request_count ELSE coalesce(json_extract(stats, '$.successfulRequestCount'), 0) +"
                " coalesce(json_extract(stats, '$.failedRequestCount'), 0) END), 0) FROM chunks"
                " WHERE job_id NOT IN (SELECT id FROM jobs WHERE pack = 1)",
    "cost": "SELECT coalesce(sum(json_extract(cost, '$.actual.input_tokens')), 0),"
            " coalesce(sum(json_extract(cost, '$.actual.output_tokens')), 0),"
            " coalesce(sum(json_extract(cost, '$.estimate.cost')), 0.0), coalesce(sum(json_extract(cost, '$.actual.cost')), 0.0),"
            " coalesce(sum(CASE WHEN json_extract(cost, '$.actual.cost') IS NOT NULL THEN json_extract(cost, '$.actual.saving')"
            " ELSE json_extract(cost, '$.estimate.saving') END), 0.0) FROM jobs WHERE cost IS NOT NULL",
}


def figures_by_scan(path) -> dict:
    db = sqlite3.connect(path)
    try:
        figures = {name: dict(db.execute(FIGURES_BY_SCAN[name]).fetchall()) for name in ("jobs", "outcomes")}
        figures["requests_total"], figures["requests_done"] = db.execute(FIGURES_BY_SCAN["requests"]).fetchone()
        (figures["input_tokens"], figures["output_tokens"], figures["cost_estimate"], figures["cost_actual"],
         figures["cost_saving"]) = db.execute(FIGURES_BY_SCAN["cost"]).fetchone()
        return figures
    finally:
        db.close()


def comparable(figures: dict) -> dict:
    return {name: round(value, 9) if isinstance(value, float) else value for name, value in figures.items()
            if name in ("jobs", "outcomes", "requests_total", "requests_done", "input_tokens", "output_tokens",
                        "cost_estimate", "cost_actual", "cost_saving")}


def test_metrics_sums_of_finished_jobs_are_kept_as_they_finish_not_read_from_every_row(workspace: Workspace):
    """/metrics read every job's row at each scrape (195 ms at 100,000 jobs). The finished jobs' sums are now
    added in the transaction that finishes each (done_totals): they equal the sums read from the rows, a
    job made 'done' again is not counted twice, and a journal from before done_totals is summed once when
    first opened, as is one where an older batchd finished jobs since."""
    deliver_some_jobs(workspace)
    path = journal_path(workspace.state)
    expected = figures_by_scan(path)
    assert expected["jobs"] == {"done": 6} and expected["outcomes"] == {"succeeded": 5, "rejected": 1}
    assert expected["requests_total"] == 15 and expected["cost_actual"] > 0

    journal = Journal(path)
    try:
        assert comparable(journal.totals()) == comparable(expected)
        [large] = journal.find_jobs("large")
        journal.update_job(large.id, state=JobState.DONE)  # a field update of a finished job: no second count
        assert comparable(journal.totals()) == comparable(expected)
        with journal.transaction() as db:
            db.execute("DROP TABLE done_totals")  # as in a journal from before it
    finally:
        journal.close()
    reader = Journal(path, readonly=True)  # no daemon has opened it since: the rows are read
    try:
        assert comparable(reader.totals()) == comparable(expected)
    finally:
        reader.close()
    journal = Journal(path)  # a daemon opens it: summed once, kept from then on
    try:
        assert journal._db.execute("SELECT sum(jobs) FROM done_totals").fetchone()[0] == 6
        assert comparable(journal.totals()) == comparable(expected)
        with journal.transaction() as db:
            # As if an older batchd, run on the journal since, had finished the rejected job: not added.
            db.execute("DELETE FROM done_totals WHERE outcome = 'rejected'")
    finally:
        journal.close()
    journal = Journal(path)  # counts one finished job fewer than there are: summed again
    try:
        assert comparable(journal.totals()) == comparable(expected)
    finally:
        journal.close()


def test_the_writer_remembers_the_jobs_that_send_files_only_until_they_are_done(tmp_path):
    """The writer keeps the ids of jobs whose chunks send files, to spare the others a lookup per chunk.
    It read them from every chunk_media row ever written, and kept each for good: a service that sent a
    million jobs with images held a million ids. Only unfinished jobs are kept now; the uploaded files
    of finished ones are still found for deletion."""
    path = tmp_path / "journal.db"
    journal = Journal(path)
    try:
        for job_id in ("finished", "running"):
            journal.add_job(job_id, name=job_id, source=f"{job_id}.toml", state=JobState.RECEIVED)
            journal.update_job(job_id, state=JobState.BUILDING)
            journal.add_chunk(job_id, {"idx": 0, "display_name": f"batchd-{job_id}-c0", "mode": "inline",
                                       "request_count": 1, "byte_size": 10, "media": {"f" * 64: ("image/png", 10)}})
        journal.set_media({"f" * 64: {"state": "active", "last_used": 1.0}})
        assert [row["sha256"] for row in journal.chunk_media("finished", 0)] == ["f" * 64]
        for state in (JobState.BUILT, JobState.SUBMITTED, JobState.FETCHED, JobState.PUBLISHING, JobState.DONE):
            journal.update_job("finished", state=state)
        assert journal._jobs_with_media == {"running"}
    finally:
        journal.close()
    journal = Journal(path)
    try:
        assert journal._jobs_with_media == {"running"}
        assert [row["sha256"] for row in journal.chunk_media("running", 0)] == ["f" * 64]
        assert journal.media_to_delete(time.time()) == []  # the running job's chunk still needs it
        for state in (JobState.BUILT, JobState.SUBMITTED, JobState.FETCHED, JobState.PUBLISHING, JobState.DONE):
            journal.update_job("running", state=state)
        for job_id in ("finished", "running"):
            for state in ("submitting", "running", "fetched"):
                journal.update_chunk(job_id, 0, state=state)
    finally:
        journal.close()
    journal = Journal(path)
    try:
        assert journal._jobs_with_media == set()
        assert [row["sha256"] for row in journal.media_to_delete(time.time())] == ["f" * 64]
    finally:
        journal.close()


def _job_names(path) -> dict[str, int]:
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT name, count(*) FROM jobs WHERE pack = 0 GROUP BY name"))
    finally:
        db.close()


def _rows_naming(path, job_ids: set[str]) -> dict[str, int]:
    """Rows left in the tables that hold rows by job id, of the jobs ``job_ids``."""
    marks = ", ".join("?" * len(job_ids))
    db = sqlite3.connect(path)
    try:
        counts = {table: db.execute(f"SELECT count(*) FROM {table} WHERE job_id IN ({marks})",
                                    tuple(job_ids)).fetchone()[0]
                  for table in ("chunks", "remote_jobs", "watched_names", "chunk_media", "events")}
        counts["jobs"] = db.execute(f"SELECT count(*) FROM jobs WHERE id IN ({marks})", tuple(job_ids)).fetchone()[0]
        counts["deliveries"] = db.execute(f"SELECT count(*) FROM deliveries WHERE event_id IN (SELECT id FROM events"
                                          f" WHERE job_id IN ({marks}))", tuple(job_ids)).fetchone()[0]
        return {table: count for table, count in counts.items() if count}
    finally:
        db.close()


def _age(path, names: tuple[str, ...], days: float, *, packs: bool) -> set[str]:
    """Make the jobs named ``names`` (and every pack, with ``packs``) done ``days`` earlier; their ids."""
    db = sqlite3.connect(path)
    try:
        with db:
            which = f"name IN ({', '.join('?' * len(names))})" + (" OR pack = 1" if packs else "")
            ids = {row[0] for row in db.execute(f"SELECT id FROM jobs WHERE {which}", names)}
            db.execute(f"UPDATE jobs SET updated_at = updated_at - ? WHERE {which}", (days * 86400, *names))
        return ids
    finally:
        db.close()


def test_jobs_finished_before_forget_jobs_after_days_are_forgotten_with_every_row_that_names_them(workspace: Workspace):
    """A service runs for months: with forget_jobs_after_days, jobs finished longer ago go from every table that
    holds rows by job (a pack once no member of it is left), while /metrics' sums keep counting them, also
    when a later open sums the rows again; their outbox folders stay, and a forgotten manifest dropped again
    runs again instead of being refused as a duplicate. The jobs finished since are kept whole."""
    deliver_some_jobs(workspace)
    path = journal_path(workspace.state)
    journal = Journal(path)
    try:
        before = comparable(journal.totals())
    finally:
        journal.close()
    old = _age(path, ("small0", "small1", "large"), 40, packs=True)

    workspace.configure(settle_seconds=0, job_seconds=0, chunk_max_requests=3, forget_jobs_after_days=30)
    run = workspace.batchd("run", "--once")

    assert run.returncode == 0, run.stderr[-3000:]
    assert "forgot 3 jobs finished more than 30 days ago" in run.stderr
    assert _job_names(path) == {"small2": 1, "small3": 1, "unknown": 1}
    packs = old - {job.id for job in Journal(path, readonly=True).jobs()}
    left = _rows_naming(path, old)
    # the pack: its members remain
    assert left.get("jobs") == 1 and set(left) <= {"jobs", "chunks", "remote_jobs", "events"}, left
    for _ in range(2):  # as kept, and as summed from the rows again at an open (done_totals dropped)
        journal = Journal(path)
        try:
            assert comparable(journal.totals()) == before
            with journal.transaction() as db:
                db.execute("DELETE FROM done_totals")
        finally:
            journal.close()
    assert len(workspace.outbox_folders()) == 6

    workspace.drop("small0.toml", 'task = "sentiment"\ntexts = ["Order 0 arrived.", "Order 0 was late."]\n')
    again = workspace.batchd("run", "--once")
    assert again.returncode == 0, again.stderr[-3000:]  # not refused as the same content as a job it forgot
    assert _job_names(path)["small0"] == 1 and len(workspace.outbox_folders()) == 7

    _age(path, ("small2", "small3", "unknown", "small0"), 40, packs=True)
    assert workspace.batchd("run", "--once").returncode == 0
    assert _job_names(path) == {}
    assert _rows_naming(path, old | packs) == {}
    journal = Journal(path)
    try:
        totals = comparable(journal.totals())
        assert totals["jobs"] == {"done": 7} and totals["requests_total"] == before["requests_total"] + 2
    finally:
        journal.close()


def test_a_long_history_is_forgotten_a_round_per_transaction(tmp_path):
    """Turned on over a long history, the forgetting goes a few hundred jobs per transaction (the loop's tick
    stays short; the loop comes back at once while rounds are full), oldest first, and counts every one."""
    from batchd.journal.retention import FORGET_PER_TRANSACTION

    journal = Journal(tmp_path / "journal.db")
    try:
        long_ago = time.time() - 100 * 86400
        with journal.transaction() as db:
            db.executemany(
                "INSERT INTO jobs (id, name, source, state, outcome, created_at, updated_at)"
                " VALUES (?, ?, ?, 'done', 'succeeded', ?, ?)",
                [(f"job{n:05d}", f"job{n}", f"job{n}.toml", long_ago, long_ago + n) for n in range(1100)])
            db.execute("INSERT INTO done_totals (outcome, jobs, requests_total, requests_done, input_tokens,"
                       " output_tokens, cost_estimate, cost_actual, cost_saving) VALUES ('succeeded', 1100, 0, 0, 0, 0,"
                       " 0, 0, 0)")
        rounds = [journal.forget_finished(time.time() - 30 * 86400)]
        while rounds[-1] == FORGET_PER_TRANSACTION:
            rounds.append(journal.forget_finished(time.time() - 30 * 86400))
        full, rest = divmod(1100, FORGET_PER_TRANSACTION)
        assert full >= 2 and rounds == [FORGET_PER_TRANSACTION] * full + [rest]
        statements: list[str] = []
        journal._db.set_trace_callback(statements.append)
        assert journal.forget_finished(time.time() - 30 * 86400) == 0
        journal._db.set_trace_callback(None)
        [choice] = [sql for sql in statements if sql.startswith("SELECT id FROM jobs")]
        plan = [row[3] for row in journal._db.execute(f"EXPLAIN QUERY PLAN {choice}")]
        # The oldest done jobs by when they were done, each one's pending deliveries by its events: a round
        # costs the jobs it forgets, not the history (a sort of every done job made it 40 ms at 100,000).
        assert any("USING INDEX jobs_done_by_age" in step for step in plan), plan
        assert not any("TEMP B-TREE" in step or "deliveries_pending" in step for step in plan), plan
        assert journal.totals()["jobs"] == {"done": 1100}
        assert journal._db.execute("SELECT sum(jobs) FROM forgotten_totals").fetchone()[0] == 1100
    finally:
        journal.close()
