"""The journal's tables, as SQLite DDL, and what an older journal gets when it is opened.

Every table and index is created ``IF NOT EXISTS``, so :data:`SCHEMA` runs on every open; it leaves a
table that exists as it is, so :func:`migrate` then adds the columns an older journal lacks, and the
indexes on them. The rules the rows follow (states, intents, events) are in :mod:`batchd.journal`.
"""

from __future__ import annotations

import sqlite3

from batchd.states import ChunkState, JobState

#: The rows of ``chunks_holding_uploads``, a partial index. A query reaches the index only if its WHERE
#: repeats this condition word for word, literals included (SQLite cannot tell what a bound parameter
#: will be when it plans), so the index and :meth:`batchd.journal.Journal.uploads_to_delete` share it.
HOLDING_UPLOADS = "upload_state IN ('uploading', 'uploaded')"

#: A chunk's requests answered or failed so far: all of a finished one, else the service's counts (``stats``).
_DONE_REQUESTS = (f"CASE WHEN state IN ('{ChunkState.FETCHED}', '{ChunkState.SKIPPED}') THEN request_count ELSE"
                  " coalesce(json_extract(stats, '$.successfulRequestCount'), 0) +"
                  " coalesce(json_extract(stats, '$.failedRequestCount'), 0) END")
#: The rows of ``jobs_done_by_age``, a partial index (word for word in a query that is to use it, as above).
DONE = "state = 'done'"

#: What /metrics sums over jobs, as SQL over one job's row ``j``: its chunks' requests, its actual tokens,
#: its estimated and actual cost and the saving (the actual one once known). The sums over finished jobs
#: are kept in ``done_totals`` (see :data:`DONE_TOTALS_ADD`); those of the others are read at each scrape.
JOB_FIGURES = {
    "requests_total": "(SELECT coalesce(sum(request_count), 0) FROM chunks WHERE job_id = j.id)",
    "requests_done": f"(SELECT coalesce(sum({_DONE_REQUESTS}), 0) FROM chunks WHERE job_id = j.id)",
    "input_tokens": "coalesce(json_extract(j.cost, '$.actual.input_tokens'), 0)",
    "output_tokens": "coalesce(json_extract(j.cost, '$.actual.output_tokens'), 0)",
    "cost_estimate": "coalesce(json_extract(j.cost, '$.estimate.cost'), 0.0)",
    "cost_actual": "coalesce(json_extract(j.cost, '$.actual.cost'), 0.0)",
    "cost_saving": "coalesce(CASE WHEN json_extract(j.cost, '$.actual.cost') IS NOT NULL THEN"
                   " json_extract(j.cost, '$.actual.saving') ELSE json_extract(j.cost, '$.estimate.saving') END, 0.0)",
}
_FIGURE_SUMS = ", ".join(f"sum({expression})" for expression in JOB_FIGURES.values())


def done_figures_by_scan(not_pack: str = "pack = 0") -> str:
    """SQL: the finished jobs' figures by outcome ('' for none), summed from their rows (what ``done_totals``
    holds); ``not_pack`` is the condition that leaves packs out (a journal from before packs has no column)."""
    return (f"SELECT coalesce(j.outcome, ''), count(*), {_FIGURE_SUMS} FROM jobs j"
            f" WHERE j.state = '{JobState.DONE}' AND {not_pack} GROUP BY 1")


def totals_add(table: str, which: str) -> str:
    """SQL: add the figures of the jobs ``which`` selects (a condition on ``j``, packs left out) to ``table``
    (``done_totals`` or ``forgotten_totals``), by outcome."""
    return (f"INSERT INTO {table} (outcome, jobs, {', '.join(JOB_FIGURES)})"
            f" SELECT coalesce(j.outcome, ''), count(*), {_FIGURE_SUMS} FROM jobs j WHERE ({which}) AND j.pack = 0"
            " GROUP BY 1 ON CONFLICT (outcome) DO UPDATE SET jobs = jobs + excluded.jobs, "
            + ", ".join(f"{name} = {name} + excluded.{name}" for name in JOB_FIGURES))


#: Adds the job ``?`` (just finished) to ``done_totals``, in the transaction that finishes it.
DONE_TOTALS_ADD = totals_add("done_totals", "j.id = ?")

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
-- By state, and within one by when it finished: the dashboard's page of the last jobs done reads that page.
CREATE INDEX IF NOT EXISTS jobs_by_state_and_finish ON jobs(state, finished_at);

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
    upload_state  TEXT,                -- uploading | uploaded | deleted | kept (see batchd.journal)
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

-- Remote batches of delivered work, waiting for their deletion (delete_finished_batches): each added
-- with the transition that delivered its work, removed once the service deleted it (or refused to),
-- so a restart deletes what the last run had not yet. At most BATCHES_WAITING (batchd/daemon/uploads.py).
CREATE TABLE IF NOT EXISTS batches_to_delete (
    remote_name   TEXT PRIMARY KEY,
    since         REAL NOT NULL        -- when its work was delivered: the oldest go first
);

-- Control files (NAME.cancel, NAME.approve) taken, by name, inode and last change, each added with the flags it
-- set: one batchd's user may not remove (another user's, in a folder with the sticky bit) stays in the
-- inbox, and is not taken again after a restart while unchanged (a job of that name claimed later is not
-- what it asked about). The newest CONTROL_FILES_KEPT (batchd/daemon/intake.py).
CREATE TABLE IF NOT EXISTS control_files_taken (
    name          TEXT NOT NULL,
    inode         INTEGER NOT NULL,
    changed_ns    INTEGER NOT NULL,    -- its ctime when taken (only the kernel sets it)
    taken_at      REAL NOT NULL,
    PRIMARY KEY (name, inode, changed_ns)
);
CREATE INDEX IF NOT EXISTS control_files_by_age ON control_files_taken(taken_at);

-- A pack member's share of its pack's results (batchd/daemon/pack.py), as JSON lines: added in the
-- transaction that moves its chunk 'packed → fetched', read by its job's writer, removed in the one that
-- finishes its job. A share is small (a pack's results come back inline), and a file of its own would cost
-- each small job an inode created and freed (docs/design.md, "Packs").
CREATE TABLE IF NOT EXISTS member_results (
    job_id        TEXT NOT NULL,
    idx           INTEGER NOT NULL,
    records       TEXT NOT NULL,       -- JSON lines, as a results file has them
    PRIMARY KEY (job_id, idx)
);

-- A small job's build (batchd/spool.py, SmallBuild): its one chunk's request lines and its index lines,
-- added in the transaction that records the chunk, read by the steps that send, split and join it,
-- removed in the one that finishes its job. Files of their own would cost each small job two inodes
-- created and freed (docs/design.md, "Small jobs").
CREATE TABLE IF NOT EXISTS small_builds (
    job_id        TEXT PRIMARY KEY,
    requests      TEXT NOT NULL,       -- JSON lines, as a requests file has them
    entries       TEXT NOT NULL        -- JSON lines, as index.jsonl has them
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

-- /metrics' sums over the finished jobs (not packs), by outcome ('' for none): each job is added in the
-- transaction that makes it 'done' (DONE_TOTALS_ADD), so a scrape reads these and the unfinished jobs,
-- never the whole history. Filled from the jobs' rows when a writer opens a journal where it does not
-- count every finished job (an older journal, or one an older batchd ran on since).
CREATE TABLE IF NOT EXISTS done_totals (__TOTALS__);
-- The same sums over the finished jobs forgotten since (forget_jobs_after_days, batchd/journal/retention.py):
-- done_totals still counts them, and a sum read again from the rows adds these.
CREATE TABLE IF NOT EXISTS forgotten_totals (__TOTALS__);
""".replace("__TOTALS__", """
    outcome        TEXT PRIMARY KEY,
    jobs           INTEGER NOT NULL,
    requests_total INTEGER NOT NULL,
    requests_done  INTEGER NOT NULL,
    input_tokens   INTEGER NOT NULL,
    output_tokens  INTEGER NOT NULL,
    cost_estimate  REAL NOT NULL,
    cost_actual    REAL NOT NULL,
    cost_saving    REAL NOT NULL
""")

#: Columns added to ``jobs`` after its first release, added to older journals when opened.
ADDED_JOB_COLUMNS = {
    "cost": "TEXT", "spend": "REAL", "admitted_at": "REAL", "hold": "TEXT",
    "approved": "INTEGER NOT NULL DEFAULT 0", "build_stopped": "INTEGER NOT NULL DEFAULT 0",
    "manifest_sha256": "TEXT",  # the manifest's bytes as checked at the claim (later reads must match)
    "retry_of": "TEXT",  # JSON {"job", "name"}: the job a retry manifest (`batchd retry`) sends requests of again
    "kind": "TEXT NOT NULL DEFAULT 'generate'",
    # 1: a pack, batchd's own job carrying small jobs' chunks in one remote batch (batchd/daemon/pack.py);
    # never delivered, announced or shown: its members are.
    "pack": "INTEGER NOT NULL DEFAULT 0",
}
#: Columns added to ``chunks`` after its first release.
ADDED_CHUNK_COLUMNS = {
    "resubmits": "INTEGER NOT NULL DEFAULT 0", "upload_state": "TEXT",
    "packed_in": "TEXT",  # the pack its requests were sealed into (kept once it is done: a chunk is packed once)
}
#: Columns added to ``remote_jobs`` after its first release.
ADDED_REMOTE_JOB_COLUMNS = {"outcome": "TEXT"}


def migrate(db: sqlite3.Connection) -> None:
    """Add what :data:`SCHEMA` cannot to an older journal: the columns added since, then their indexes."""
    for table, added in (("jobs", ADDED_JOB_COLUMNS), ("chunks", ADDED_CHUNK_COLUMNS),
                         ("remote_jobs", ADDED_REMOTE_JOB_COLUMNS)):
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for column, declaration in added.items():
            if column not in present:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
    # After the columns: an older journal gets admitted_at above first.
    db.execute("CREATE INDEX IF NOT EXISTS jobs_by_admission ON jobs(admitted_at)")
    # Finished chunks pile up; the few whose request file is still to be deleted are looked up often.
    db.execute(f"CREATE INDEX IF NOT EXISTS chunks_holding_uploads ON chunks(state) WHERE {HOLDING_UPLOADS}")
    # The stray cancels still to retry are looked up while the table holds every remote job ever made.
    db.execute("CREATE INDEX IF NOT EXISTS remote_jobs_by_outcome ON remote_jobs(outcome)")
    # A webhook delivery names a remote batch; its chunk is looked up by that name.
    db.execute("CREATE INDEX IF NOT EXISTS chunks_by_remote_name ON chunks(remote_name)")
    # A pack's members are looked up by it.
    db.execute("CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks(packed_in) WHERE packed_in IS NOT NULL")
    # Tables that keep every job's rows for as long as the journal lives are read per job by an index:
    # a scan would cost each delivery (summary.json lists the job's remote batches) time in proportion
    # to every job ever delivered, and the hourly prunes of old events and webhook ids would hold the
    # loop as long.
    db.execute("CREATE INDEX IF NOT EXISTS remote_jobs_by_job ON remote_jobs(job_id, chunk_idx)")
    db.execute("CREATE INDEX IF NOT EXISTS events_by_age ON events(created_at)")
    db.execute("CREATE INDEX IF NOT EXISTS webhook_deliveries_by_age ON webhook_deliveries(received_at)")
    db.execute("DROP INDEX IF EXISTS jobs_by_state")  # jobs_by_state_and_finish serves its lookups
    # Jobs done longer ago than forget_jobs_after_days are found by when they were done (batchd/journal/retention.py).
    db.execute(f"CREATE INDEX IF NOT EXISTS jobs_done_by_age ON jobs(updated_at) WHERE {DONE}")
    # The dashboard's cost chart of the last days reads those days, not the history.
    db.execute("CREATE INDEX IF NOT EXISTS jobs_spent_by_day ON jobs(coalesce(finished_at, created_at))"
               " WHERE spend IS NOT NULL")
    # done_totals counts every finished job once, as each finishes; read from the rows again when it does not
    # count as many as there are: a journal whose jobs finished before it existed, or one an older batchd ran
    # on since (it finishes jobs without adding them). Counting them is 10 ms at 100,000 jobs; a sum 0.25 s.
    # Jobs forgotten since (batchd/journal/retention.py) are counted by forgotten_totals, and added back.
    counted = db.execute("SELECT coalesce(sum(jobs), 0) FROM done_totals").fetchone()[0]
    forgotten = db.execute("SELECT coalesce(sum(jobs), 0) FROM forgotten_totals").fetchone()[0]
    done = db.execute("SELECT count(*) FROM jobs WHERE state = ? AND pack = 0", (JobState.DONE,)).fetchone()[0]
    if counted != done + forgotten:
        db.execute("DELETE FROM done_totals")
        db.execute(f"INSERT INTO done_totals (outcome, jobs, {', '.join(JOB_FIGURES)}) {done_figures_by_scan()}")
        db.execute(f"INSERT INTO done_totals SELECT * FROM forgotten_totals WHERE true ON CONFLICT (outcome) DO UPDATE"
                   f" SET jobs = jobs + excluded.jobs, "
                   + ", ".join(f"{name} = {name} + excluded.{name}" for name in JOB_FIGURES))
