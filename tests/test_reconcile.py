"""Reconciliation of unconfirmed creates against the remote job list, driven in-process on the emulator.

The crash tests reach these paths by killing the daemon; here each branch is set up exactly:
a chunk whose create intent is committed, and the remote jobs the service may or may not hold.
"""

from __future__ import annotations

import time

import pytest

from batchd.config import load_settings
from batchd.daemon import Daemon
from batchd.provider import RequestEncoder
from batchd.testing import Workspace

MODEL = "gemini-2.5-flash"
DISPLAY_NAME = "batchd-dup-j1-c0"


@pytest.fixture
def daemon(workspace: Workspace):
    daemon = Daemon(load_settings(workspace.config))
    daemon.start()
    assert daemon.provider  # the embedded emulator serves before the intents below are timed
    journal = daemon.journal
    journal.add_job("j1", name="dup", source="dup.toml", state="received")
    journal.add_chunk("j1", {"idx": 0, "display_name": DISPLAY_NAME, "mode": "inline",
                             "request_count": 1, "byte_size": 100})
    journal.update_job("j1", state="built", task="translate", model=MODEL)
    journal.update_chunk("j1", 0, state="submitting", intent_at=time.time())
    try:
        yield daemon
    finally:
        daemon.close()


def create_remote(daemon: Daemon):
    return daemon.provider.create_inline(MODEL, [RequestEncoder(MODEL).inline("k", "hi")], DISPLAY_NAME)


def test_duplicates_left_by_a_crash_keep_the_oldest_and_cancel_the_rest(daemon: Daemon):
    first, second = create_remote(daemon), create_remote(daemon)

    daemon.reconcile()

    chunk = daemon.journal.chunks("j1")[0]
    assert (chunk.state, chunk.remote_name) == ("running", first.name)
    roles = {r["remote_name"]: r["role"] for r in daemon.journal.remote_jobs("j1")}
    assert roles == {first.name: "adopted", second.name: "duplicate"}
    assert daemon.provider.get(second.name).state == "cancelled"
    assert daemon.provider.get(first.name).state != "cancelled"


def test_an_intent_without_a_remote_job_waits_out_the_grace_period_then_creates_once(daemon: Daemon):
    daemon.reconcile()
    assert not daemon.submissions, "inside the grace period nothing is created"
    assert daemon.journal.chunks("j1")[0].state == "submitting"

    daemon.journal.update_chunk("j1", 0, intent_at=time.time() - 60)
    # The spool's request file is what a create sends; this job was never built on disk.
    spool = daemon._spool("j1")
    spool.root.mkdir(parents=True)
    spool.requests_path(0).write_text(RequestEncoder(MODEL).jsonl_line("k", "hi") + "\n")
    daemon.reconcile()
    assert len(daemon.submissions) == 1
    next(iter(daemon.submissions.values())).future.result(timeout=30)
    daemon._collect_submissions()

    chunk = daemon.journal.chunks("j1")[0]
    assert chunk.state == "running"
    assert [job.name for job in daemon.provider.list_jobs() if job.display_name == DISPLAY_NAME] == [chunk.remote_name]
    daemon.reconcile()  # a second pass finds nothing left to do
    assert [job.name for job in daemon.provider.list_jobs() if job.display_name == DISPLAY_NAME] == [chunk.remote_name]


def test_a_create_that_shows_up_after_its_chunk_was_created_again_is_cancelled_and_counted(daemon: Daemon):
    """The list missed a create for longer than the grace period, so the chunk was created again; when the
    first one shows up at last, the next poll records it (its cost counts) and cancels it."""
    adopted = create_remote(daemon)
    daemon.reconcile()
    assert daemon.journal.chunks("j1")[0].remote_name == adopted.name
    late = create_remote(daemon)  # the original create, visible only now

    daemon.poll()
    daemon.poll()  # a second look neither cancels again nor fails

    roles = {r["remote_name"]: r["role"] for r in daemon.journal.remote_jobs("j1")}
    assert roles == {adopted.name: "adopted", late.name: "duplicate"}
    assert daemon.provider.get(late.name).state == "cancelled"
    assert daemon.provider.get(adopted.name).state != "cancelled"


def remote_names(daemon: Daemon) -> list[str]:
    return [job.name for job in daemon.provider.list_jobs() if job.display_name == DISPLAY_NAME]


def test_a_cancelled_job_waits_out_the_grace_period_for_an_unconfirmed_create_and_never_creates_it(daemon: Daemon):
    """Cancel requested, create unconfirmed, no remote job listed: inside the grace period the create
    may yet show up; after it the chunk ends never submitted. Nothing is created for it either way."""
    daemon.journal.update_job("j1", cancel_requested=1)

    daemon.reconcile()
    assert daemon.journal.chunks("j1")[0].state == "submitting", "inside the grace period it may yet show up"

    daemon.journal.update_chunk("j1", 0, intent_at=time.time() - 60)
    daemon.reconcile()

    assert not daemon.submissions, "a create was sent for a cancelled job"
    chunk = daemon.journal.chunks("j1")[0]
    assert (chunk.state, chunk.remote_name) == ("skipped", None)
    assert remote_names(daemon) == []


@pytest.mark.parametrize("late", [False, True], ids=["found-at-once", "shows-up-within-the-grace-period"])
def test_an_unconfirmed_create_of_a_cancelled_job_that_is_found_is_adopted_and_cancelled(daemon: Daemon, late: bool):
    """The create did reach the service: its remote job is adopted (its results, if any, are the job's)
    and cancelled at once, and nothing else is created."""
    daemon.journal.update_job("j1", cancel_requested=1)
    if late:
        daemon.reconcile()
        assert daemon.journal.chunks("j1")[0].state == "submitting"
    created = create_remote(daemon)

    daemon.reconcile()

    assert not daemon.submissions
    chunk = daemon.journal.chunks("j1")[0]
    assert (chunk.state, chunk.remote_name, chunk.cancel_sent) == ("running", created.name, True)
    assert daemon.provider.get(created.name).state == "cancelled"
    assert remote_names(daemon) == [created.name]
    assert {r["remote_name"]: r["role"] for r in daemon.journal.remote_jobs("j1")} == {created.name: "adopted"}
