"""History benchmark: a job costs the same whether the journal is new or has delivered 100,000 jobs.

A daemon runs for months: its journal keeps a row for every job, chunk, event, delivery and remote
batch it ever handled (events are pruned after ``notify.keep_days``, the rest stays). Anything the
daemon looks up per job without an index then costs each job time in proportion to the history.

Two workspaces, the same in all but history, each with ``batchd run --once`` on the embedded emulator
(``job_seconds = 0``): both deliver a warm-up of ``--warmup`` small manifests first, then the second
one's journal is grown to ``--history`` jobs by copying the warm-up's rows (jobs, chunks, events and
remote batches under new ids, a delivery to a notification plugin per event, as a webhook user's
journal has). Then ``--jobs`` new manifests are dropped into each and timed through ``run --once``,
alternating, ``--rounds`` times; and ``run --once`` on an empty inbox (the start: opening the journal,
recovery, the first prune) is timed on each. Printed: seconds of each run, and the ratios history /
new (goal: 1.0 within noise). Then the grown journal's jobs are made 30 days old and forgotten as
``forget_jobs_after_days`` does (batchd/journal/retention.py), a round per transaction: how long the
longest round holds the loop, the cost per job, and ``run --once`` of new jobs on what is left against
the new journal (goal: 1.0 within noise).

    python bench/history.py                       # 300 jobs, history of 100,000 jobs
    python bench/history.py --history 500000
"""

from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from common import CONFIG, Workspace, header, median, parser, report, small_manifest

#: Per table, the columns a copy of a row must change (suffixed with the copy's number) to stay distinct
#: and to point at its copied job.
RENAMED = {
    "jobs": {"id", "name", "sha256"},
    "chunks": {"job_id", "display_name", "remote_name", "packed_in"},
    "events": {"id", "job_id"},
    "remote_jobs": {"remote_name", "job_id", "display_name"},
}


def run_once(workspace: Workspace, timeout: float) -> float:
    """Seconds of ``batchd run --once`` in the workspace."""
    env = {**os.environ, "BATCHD_CONFIG": str(workspace.config)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "batchd", "--log-level", "WARNING", "run", "--once"],
                   cwd=workspace.path, env=env, check=True, timeout=timeout)
    return time.perf_counter() - started


def drop(workspace: Workspace, first: int, count: int) -> None:
    for n in range(first, first + count):
        workspace.drop_text(f"m{n:06d}.toml", small_manifest(n))


def grow(journal: Path, jobs: int) -> dict[str, int]:
    """Copy the journal's rows until it holds about ``jobs`` jobs; returns the row counts."""
    db = sqlite3.connect(journal, isolation_level=None)
    try:
        db.execute("BEGIN")
        base = db.execute("SELECT count(*) FROM jobs").fetchone()[0]
        copies = math.ceil(jobs / base) - 1
        db.execute("CREATE TEMP TABLE copy AS WITH RECURSIVE k(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM k"
                   " WHERE n < ?) SELECT n FROM k", (copies,))
        for table, renamed in RENAMED.items():
            columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})") if row[1] != "seq"]
            made = [f"{column} || '-h' || copy.n" if column in renamed else column for column in columns]
            # SQLite reads the whole source before inserting into the same table: each table is copied once.
            db.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(made)} FROM {table}, copy")
        # Jobs sent alone have a remote batch per chunk; a webhook user's events each have a delivery.
        db.execute("INSERT OR IGNORE INTO remote_jobs (remote_name, job_id, chunk_idx, display_name, role)"
                   " SELECT 'batches/history-' || job_id || '-' || idx, job_id, idx, display_name, 'adopted'"
                   " FROM chunks")
        db.execute("INSERT OR IGNORE INTO deliveries (event_id, plugin, state, attempts, next_at, sent_at)"
                   " SELECT id, 'history', 'sent', 1, created_at, created_at FROM events")
        db.execute("COMMIT")
        return {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("jobs", "chunks", "events", "deliveries", "remote_jobs")}
    finally:
        db.close()


def forget_all(journal_path: Path) -> tuple[int, list[float]]:
    """Every job of the journal made done 30 days ago, then forgotten round after round as the loop does:
    the jobs forgotten and each round's seconds."""
    from batchd.journal import Journal
    from batchd.journal.retention import FORGET_PER_TRANSACTION

    db = sqlite3.connect(journal_path)
    with db:
        db.execute("UPDATE jobs SET updated_at = updated_at - 30 * 86400 WHERE state = 'done'")
    db.close()
    journal = Journal(journal_path)
    try:
        forgotten, rounds = 0, []
        while True:
            started = time.perf_counter()
            count = journal.forget_finished(time.time() - 7 * 86400)
            rounds.append(time.perf_counter() - started)
            forgotten += count
            if count < FORGET_PER_TRANSACTION:
                return forgotten, rounds
    finally:
        journal.close()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, default=300, help="new manifests timed in each workspace (300)")
    p.add_argument("--history", type=int, default=100_000, help="jobs in the grown journal (100,000)")
    p.add_argument("--warmup", type=int, default=50, help="manifests delivered first in both workspaces (50)")
    p.add_argument("--rounds", type=int, default=2, help="timed runs in each workspace, alternating (2)")
    args = p.parse_args()
    header(f"history: {args.jobs} jobs with a new journal and with one of {args.history:,} jobs")
    with Workspace(CONFIG, keep=args.keep) as new, Workspace(CONFIG, keep=args.keep) as old:
        for workspace in (new, old):
            drop(workspace, 0, args.warmup)
            run_once(workspace, args.timeout)
        started = time.perf_counter()
        rows = grow(old.path / "state" / "journal.db", args.history)
        print(f"  grown in {time.perf_counter() - started:.1f} s: "
              + ", ".join(f"{count:,} {table}" for table, count in rows.items()), flush=True)
        seconds: dict[str, list[float]] = {"new": [], "history": []}
        starts: dict[str, list[float]] = {"new": [], "history": []}
        first = args.warmup
        for round_ in range(args.rounds):
            for label, workspace in (("new", new), ("history", old)):
                drop(workspace, first, args.jobs)
                seconds[label].append(run_once(workspace, args.timeout))
                starts[label].append(run_once(workspace, args.timeout))
            first += args.jobs
        expected = args.warmup + args.rounds * args.jobs
        assert new.delivered() == old.delivered() == expected, (new.delivered(), old.delivered(), expected)
        new_s, old_s = median(seconds["new"]), median(seconds["history"])
        new_start, old_start = median(starts["new"]), median(starts["history"])
        forgotten, rounds = forget_all(old.path / "state" / "journal.db")
        after: dict[str, list[float]] = {"new": [], "forgotten": []}
        for round_ in range(args.rounds):
            for label, workspace in (("new", new), ("forgotten", old)):
                drop(workspace, first, args.jobs)
                after[label].append(run_once(workspace, args.timeout))
            first += args.jobs
        report([
            (f"{args.jobs} jobs, new journal: s (each round)", ", ".join(f"{s:.2f}" for s in seconds["new"])),
            (f"{args.jobs} jobs, {rows['jobs']:,}-job journal: s (each round)",
             ", ".join(f"{s:.2f}" for s in seconds["history"])),
            ("ratio history / new (medians)", old_s / new_s),
            ("start (run --once, empty inbox), new / history: s", f"{new_start:.2f} / {old_start:.2f}"),
            ("ratio of the starts", old_start / new_start),
            ("per job less the start, new / history: ms",
             f"{(new_s - new_start) / args.jobs * 1e3:.2f} / {(old_s - old_start) / args.jobs * 1e3:.2f}"),
            ("forgotten (forget_jobs_after_days): jobs, rounds", f"{forgotten:,}, {len(rounds)}"),
            ("forgetting: s in all, longest round ms, us a job",
             f"{sum(rounds):.2f}, {max(rounds) * 1e3:.0f}, {sum(rounds) / max(forgotten, 1) * 1e6:.0f}"),
            (f"{args.jobs} jobs after it, new / forgotten journal: s (each round)",
             " / ".join(", ".join(f"{s:.2f}" for s in after[label]) for label in ("new", "forgotten"))),
            ("ratio forgotten / new (medians)", median(after["forgotten"]) / median(after["new"])),
        ], args.json, history=args.history, jobs=args.jobs)


if __name__ == "__main__":
    main()
