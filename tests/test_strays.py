"""Late strays: a create whose outcome was unknown reached the service after all, and its remote job
shows up in the list only later, under the display name of a chunk that was created again. Whatever
became of the chunk and its job by then (fetched, delivered, skipped because the job was cancelled, or
the daemon restarted), the stray is recorded in the journal (its cost counts) and cancelled.

Each test makes the first create fail (``500*1@create``: its outcome is unknown to batchd), lets the
grace period create the chunk again, and then creates the late remote job itself under the watched
display name at the moment the test is about, as the lagging list would have shown it.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from google.genai import types

from batchd.journal import Journal, journal_path
from batchd.testing import DaemonRunner, Emulator, Workspace
from invariants import Dropped, assert_invariants
from test_daemon import TRANSLATE

MODEL = "gemini-2.5-flash"
ONE = """\
task = "translate"
texts = ["one"]
languages = ["French"]
"""


@pytest.fixture
def google(tmp_path: Path):
    """The service, of this test's own; the first create it gets fails (500) before creating anything."""
    with Emulator(tmp_path / "google", faults=["500*1@create"]) as server:
        yield server


def journal_rows(ws: Workspace) -> tuple[dict, list, dict, list]:
    """The only job's row, its chunks, its remote_jobs by name and the watched names."""
    if not journal_path(ws.state).exists():
        return {}, [], {}, []  # the daemon has not started yet
    journal = Journal(journal_path(ws.state), readonly=True)
    try:
        if not journal.initialized or not journal.jobs():
            return {}, [], {}, []
        (job,) = journal.jobs()
        remote = {row["remote_name"]: row for row in journal.remote_jobs(job.id)}
        watched = list(journal.watched_names())
        return job, journal.chunks(job.id), remote, watched
    finally:
        journal.close()


def watched_name(ws: Workspace) -> str:
    """The display name whose create failed (watched from then on), once the journal holds it."""
    [name] = ws.wait_for(lambda: journal_rows(ws)[3], what="a watched display name")
    return name


def create_stray(google: Emulator, display_name: str) -> types.BatchJob:
    """The create that reached the service after all, as the list finally shows it (still pending there:
    a stray that has ended is only recorded)."""
    request = {"contents": [{"parts": [{"text": "one"}], "role": "user"}], "metadata": {"key": "late"}}
    return google.client(fault="stuck-pending").batches.create(model=MODEL, src=[request],
                                          config=types.CreateBatchJobConfig(display_name=display_name))


def stray_recorded(ws: Workspace, stray: types.BatchJob) -> dict | None:
    row = journal_rows(ws)[2].get(stray.name)
    return row if row and row["outcome"] == "cancelled" else None


def assert_only_the_stray_cancelled(ws: Workspace, google: Emulator, stray: types.BatchJob, dropped) -> None:
    remote = list(google.client().batches.list(config={"page_size": 50}))
    cancelled = [job.name for job in remote if job.state == types.JobState.JOB_STATE_CANCELLED]
    assert cancelled == [stray.name]
    job, chunks, recorded, _ = journal_rows(ws)
    assert {name: row["role"] for name, row in recorded.items()} == {
        chunks[0].remote_name: "adopted", stray.name: "duplicate"}
    report = assert_invariants(ws, dropped, remote)
    assert report["duplicates_cancelled"] == 1


def test_a_stray_that_shows_up_after_its_chunk_was_fetched_is_cancelled(workspace: Workspace, daemon: DaemonRunner,
                                                                         google: Emulator):
    dropped = [Dropped.of(workspace.drop("translate.toml", TRANSLATE))]
    process = daemon.start(emulator=google)
    try:
        name = watched_name(workspace)
        workspace.wait_for(lambda: [c for c in journal_rows(workspace)[1] if c.state == "fetched"],
                           what="the chunk fetched")
        stray = create_stray(google, name)
        workspace.wait_for_delivery("translate")
        workspace.wait_for(lambda: stray_recorded(workspace, stray), what="the stray cancelled")
    finally:
        assert process.stop() == 0
    assert_only_the_stray_cancelled(workspace, google, stray, dropped)


def test_a_stray_that_shows_up_after_its_job_was_delivered_is_cancelled_and_the_summary_kept(
        workspace: Workspace, daemon: DaemonRunner, google: Emulator):
    dropped = [Dropped.of(workspace.drop("translate.toml", TRANSLATE))]
    process = daemon.start(emulator=google)
    try:
        name = watched_name(workspace)
        folder = workspace.wait_for_delivery("translate")
        summary = (folder.path / "summary.json").read_bytes()
        stray = create_stray(google, name)
        workspace.wait_for(lambda: stray_recorded(workspace, stray), what="the stray cancelled")
    finally:
        assert process.stop() == 0
    assert (folder.path / "summary.json").read_bytes() == summary, "a delivered summary is never rewritten"
    assert f"cancelling duplicate remote job {stray.name}" in process.output()
    assert_only_the_stray_cancelled(workspace, google, stray, dropped)


def test_a_stray_of_a_cancelled_jobs_skipped_chunk_is_cancelled(workspace: Workspace, daemon: DaemonRunner,
                                                                 tmp_path: Path):
    """Killed after the create intent, cancelled while down: the restart waits out the grace period and
    marks the chunk never submitted. The create did reach the service, and shows up after all that."""
    with Emulator(tmp_path / "google") as google:
        dropped = [Dropped.of(workspace.drop("one.toml", ONE))]
        crashed = daemon.start(emulator=google, BATCHD_CRASH_AT="after-intent")
        assert crashed.wait(120) == -signal.SIGKILL, crashed.output()[-3000:]
        assert workspace.batchd("cancel", "one").returncode == 0
        process = daemon.start(emulator=google)
        try:
            folder = workspace.wait_for_delivery("one")
            assert folder.state == "cancelled"
            _, chunks, _, watched = journal_rows(workspace)
            assert [c.state for c in chunks] == ["skipped"] and watched == [chunks[0].display_name]
            stray = create_stray(google, chunks[0].display_name)
            workspace.wait_for(lambda: stray_recorded(workspace, stray), what="the stray cancelled")
        finally:
            assert process.stop() == 0
        remote = list(google.client().batches.list())
        assert [(job.name, job.state) for job in remote] == [(stray.name, types.JobState.JOB_STATE_CANCELLED)]
        _, _, recorded, _ = journal_rows(workspace)
        assert {name: row["role"] for name, row in recorded.items()} == {stray.name: "duplicate"}
        assert_invariants(workspace, dropped, remote)


def test_a_stray_that_shows_up_while_batchd_is_down_is_cancelled_after_the_restart(
        workspace: Workspace, daemon: DaemonRunner, google: Emulator):
    """The watch is in the journal: a daemon started after the job was delivered still looks."""
    dropped = [Dropped.of(workspace.drop("translate.toml", TRANSLATE))]
    run = daemon.run_once(emulator=google)
    assert run.returncode == 0, run.stderr
    summary = (run.outbox["translate"].path / "summary.json").read_bytes()
    stray = create_stray(google, watched_name(workspace))

    process = daemon.start(emulator=google)
    try:
        workspace.wait_for(lambda: stray_recorded(workspace, stray), what="the stray cancelled")
    finally:
        assert process.stop() == 0
    assert (run.outbox["translate"].path / "summary.json").read_bytes() == summary
    assert_only_the_stray_cancelled(workspace, google, stray, dropped)


def test_a_journal_from_before_the_stray_watch_gains_its_column_and_table(tmp_path: Path):
    import sqlite3

    path = tmp_path / "journal.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE remote_jobs (remote_name TEXT PRIMARY KEY, job_id TEXT NOT NULL,"
                " chunk_idx INTEGER NOT NULL, display_name TEXT NOT NULL, role TEXT NOT NULL)")
    old.execute("INSERT INTO remote_jobs VALUES ('batches/a', 'j1', 0, 'batchd-x-j1-c0', 'duplicate')")
    old.commit()
    old.close()

    journal = Journal(path)
    try:
        assert journal.remote_job("batches/a")["outcome"] is None  # an old duplicate: cancelled back then
        journal.watch_name("j1", 0, "batchd-x-j1-c0", 100.0)
        journal.watch_name("j1", 0, "batchd-x-j1-c0", 200.0)
        row = journal.watched_names()["batchd-x-j1-c0"]
        assert (row["first_attempt_at"], row["last_attempt_at"]) == (100.0, 200.0)
    finally:
        journal.close()
