"""Reconciliation of unconfirmed creates against the remote job list, driven in-process on the emulator.

The crash tests reach these paths by killing the daemon; here each branch is set up exactly:
a chunk whose create intent is committed, and the remote jobs the service may or may not hold.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent.futures import wait

import pytest
from google.genai import types

from batchd.config import load_settings
from batchd.daemon import Daemon
from batchd.encoding import RequestEncoder
from batchd.remote import RemoteJob
from batchd.testing import Workspace, make_client, wait_done

MODEL = "gemini-2.5-flash"
DISPLAY_NAME = "batchd-dup-j1-c0"


@pytest.fixture
def daemon(workspace: Workspace):
    # The remote jobs run until the test ends: a duplicate that has already succeeded can no longer
    # be cancelled, and with the default 0.3 s a loaded machine got there before the cancel.
    yield from daemon_with_one_chunk(workspace, job_seconds=3600)


@pytest.fixture
def quick_daemon(workspace: Workspace):
    """The same, with remote jobs that finish in half a second (for strays that must have finished)."""
    yield from daemon_with_one_chunk(workspace, job_seconds=0.5)


def daemon_with_one_chunk(workspace: Workspace, *, job_seconds: float):
    workspace.configure(job_seconds=job_seconds)
    daemon = Daemon(load_settings(workspace.config))
    daemon.start()
    assert daemon.provider  # the embedded emulator serves before the intents below are timed
    journal = daemon.journal
    journal.add_job("j1", name="dup", source="dup.toml", state="building")
    journal.add_chunk("j1", {"idx": 0, "display_name": DISPLAY_NAME, "mode": "inline",
                             "request_count": 1, "byte_size": 100})
    journal.update_job("j1", state="built", task="translate", model=MODEL)
    journal.update_chunk("j1", 0, state="submitting", intent_at=time.time())
    try:
        yield daemon
    finally:
        daemon.close()


def cancelled_soon(daemon: Daemon, name: str) -> bool:
    """Whether the remote job ``name`` ends CANCELLED (a cancel is asynchronous, as Google's)."""
    deadline = time.monotonic() + 30
    while (state := daemon.provider.get(name).state) != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.05)
    return state == "cancelled"


def create_remote(daemon: Daemon):
    return daemon.provider.create_inline(MODEL, [RequestEncoder(MODEL).inline("k", "hi")], DISPLAY_NAME)


def test_duplicates_left_by_a_crash_keep_the_oldest_and_cancel_the_rest(daemon: Daemon):
    first, second = create_remote(daemon), create_remote(daemon)

    daemon.steps.monitor.poll()

    chunk = daemon.journal.chunks("j1")[0]
    assert (chunk.state, chunk.remote_name) == ("running", first.name)
    roles = {r["remote_name"]: r["role"] for r in daemon.journal.remote_jobs("j1")}
    assert roles == {first.name: "adopted", second.name: "duplicate"}
    assert cancelled_soon(daemon, second.name)
    assert daemon.provider.get(first.name).state != "cancelled"


def test_an_intent_without_a_remote_job_waits_out_the_grace_period_then_creates_once(daemon: Daemon):
    daemon.steps.monitor.poll()
    assert not daemon.steps.submit.submissions.running, "inside the grace period nothing is created"
    assert daemon.journal.chunks("j1")[0].state == "submitting"

    daemon.journal.update_chunk("j1", 0, intent_at=time.time() - 60)
    # The spool's request file is what a create sends; this job was never built on disk.
    spool = daemon.ctx.spool("j1")
    spool.root.mkdir(parents=True)
    spool.requests_path(0).write_text(RequestEncoder(MODEL).jsonl_line("k", "hi") + "\n")
    daemon.steps.monitor.poll()
    assert len(daemon.steps.submit.submissions.running) == 1
    next(iter(daemon.steps.submit.submissions.running.values())).future.result(timeout=30)
    daemon.steps.submit.collect()

    chunk = daemon.journal.chunks("j1")[0]
    assert chunk.state == "running"
    assert [job.name for job in daemon.provider.list_jobs() if job.display_name == DISPLAY_NAME] == [chunk.remote_name]
    daemon.steps.monitor.poll()  # a second pass finds nothing left to do
    assert [job.name for job in daemon.provider.list_jobs() if job.display_name == DISPLAY_NAME] == [chunk.remote_name]


def test_a_create_that_shows_up_after_its_chunk_was_created_again_is_cancelled_and_counted(daemon: Daemon):
    """The list missed a create for longer than the grace period, so the chunk was created again; when the
    first one shows up at last, the next poll records it (its cost counts) and cancels it."""
    adopted = create_remote(daemon)
    daemon.steps.monitor.poll()
    assert daemon.journal.chunks("j1")[0].remote_name == adopted.name
    late = create_remote(daemon)  # the original create, visible only now

    daemon.steps.monitor.poll()
    daemon.steps.monitor.poll()  # a second look neither cancels again nor fails

    roles = {r["remote_name"]: r["role"] for r in daemon.journal.remote_jobs("j1")}
    assert roles == {adopted.name: "adopted", late.name: "duplicate"}
    assert cancelled_soon(daemon, late.name)
    assert daemon.provider.get(adopted.name).state != "cancelled"


def cancels_answered(daemon: Daemon) -> None:
    """Wait for the cancels on their way (the cancel pool), then record them as the loop does."""
    wait(daemon.steps.monitor.calls.futures(), timeout=30)
    daemon.steps.monitor.collect()


def remote_names(daemon: Daemon) -> list[str]:
    return [job.name for job in daemon.provider.list_jobs() if job.display_name == DISPLAY_NAME]


def test_a_cancelled_job_waits_out_the_grace_period_for_an_unconfirmed_create_and_never_creates_it(daemon: Daemon):
    """Cancel requested, create unconfirmed, no remote job listed: inside the grace period the create
    may yet show up; after it the chunk ends never submitted. Nothing is created for it either way."""
    daemon.settings.submit_grace_seconds = 30.0  # "inside" must hold on a loaded machine too (not 0.3 s)
    daemon.journal.update_job("j1", cancel_requested=1)

    daemon.steps.monitor.poll()
    assert daemon.journal.chunks("j1")[0].state == "submitting", "inside the grace period it may yet show up"

    daemon.journal.update_chunk("j1", 0, intent_at=time.time() - 60)
    daemon.steps.monitor.poll()

    assert not daemon.steps.submit.submissions.running, "a create was sent for a cancelled job"
    chunk = daemon.journal.chunks("j1")[0]
    assert (chunk.state, chunk.remote_name) == ("skipped", None)
    assert remote_names(daemon) == []


@pytest.mark.parametrize("late", [False, True], ids=["found-at-once", "shows-up-within-the-grace-period"])
def test_an_unconfirmed_create_of_a_cancelled_job_that_is_found_is_adopted_and_cancelled(daemon: Daemon, late: bool):
    """The create did reach the service: its remote job is adopted (its results, if any, are the job's)
    and cancelled at once, and nothing else is created."""
    daemon.journal.update_job("j1", cancel_requested=1)
    if late:
        daemon.settings.submit_grace_seconds = 30.0  # "within" must hold on a loaded machine too
        daemon.steps.monitor.poll()
        assert daemon.journal.chunks("j1")[0].state == "submitting"
    created = create_remote(daemon)

    daemon.steps.monitor.poll()
    cancels_answered(daemon)

    assert not daemon.steps.submit.submissions.running
    chunk = daemon.journal.chunks("j1")[0]
    assert (chunk.state, chunk.remote_name, chunk.cancel_sent) == ("running", created.name, True)
    assert cancelled_soon(daemon, created.name)
    assert remote_names(daemon) == [created.name]
    assert {r["remote_name"]: r["role"] for r in daemon.journal.remote_jobs("j1")} == {created.name: "adopted"}


def lagging_create(daemon: Daemon, lists: int):
    """A create the service took but its list leaves out of the next ``lists`` list passes."""
    client = make_client(daemon.emulator.base_url, api_key="batchd-emulator", fault=f"list-lag={lists}")
    try:
        return RemoteJob.from_sdk(client.batches.create(
            model=MODEL, src=[RequestEncoder(MODEL).inline("k", "hi")],
            config=types.CreateBatchJobConfig(display_name=DISPLAY_NAME)))
    finally:
        client.close()


def create_again(daemon: Daemon) -> None:
    """The grace period is over: reconcile creates the chunk again and records it."""
    daemon.journal.update_chunk("j1", 0, intent_at=time.time() - 60)
    spool = daemon.ctx.spool("j1")
    spool.root.mkdir(parents=True, exist_ok=True)
    spool.requests_path(0).write_text(RequestEncoder(MODEL).jsonl_line("k", "hi") + "\n")
    daemon.steps.monitor.poll()
    next(iter(daemon.steps.submit.submissions.running.values())).future.result(timeout=30)
    daemon.steps.submit.collect()


def test_a_late_stray_older_than_the_running_job_is_not_skipped_by_the_list_pass(daemon: Daemon):
    """The stray was created before the chunk was created again, so it is further down the newest-first
    list than every running job: the list pass goes on past them for a watched name."""
    daemon.journal.add_job("j2", name="other", source="other.toml", state="received")
    late = lagging_create(daemon, lists=1)  # hidden from the list pass of the reconcile below
    create_again(daemon)
    adopted = daemon.journal.chunks("j1")[0].remote_name
    assert adopted != late.name
    assert list(daemon.journal.watched_names()) == [DISPLAY_NAME]

    daemon.steps.monitor.poll()
    cancels_answered(daemon)

    roles = {r["remote_name"]: (r["role"], r["outcome"]) for r in daemon.journal.remote_jobs("j1")}
    assert roles == {adopted: ("adopted", None), late.name: ("duplicate", "cancelled")}
    assert cancelled_soon(daemon, late.name)
    assert daemon.provider.get(adopted).state != "cancelled"


def test_a_stray_found_after_it_finished_is_recorded_and_not_cancelled(quick_daemon: Daemon):
    daemon = quick_daemon
    late = lagging_create(daemon, lists=1)
    create_again(daemon)
    wait_done(make_client(daemon.emulator.base_url, api_key="batchd-emulator"), late.name)

    daemon.steps.monitor.poll()

    row = next(r for r in daemon.journal.remote_jobs("j1") if r["remote_name"] == late.name)
    assert (row["role"], row["outcome"]) == ("duplicate", "finished")
    assert daemon.provider.get(late.name).state == "succeeded"


def test_names_are_watched_only_within_the_window_after_their_last_create(daemon: Daemon):
    create_again(daemon)
    assert list(daemon.steps.monitor.watched_now()) == [DISPLAY_NAME]
    daemon.settings.stray_watch_seconds = 30  # the last create was just now: still watched
    assert list(daemon.steps.monitor.watched_now()) == [DISPLAY_NAME]
    daemon.journal.watch_name("j1", 0, "batchd-old-j0-c0", time.time() - 60)
    assert list(daemon.steps.monitor.watched_now()) == [DISPLAY_NAME]
    assert list(daemon.journal.watched_names()) == [DISPLAY_NAME], "a name past its window is forgotten"


def test_a_failed_cancel_is_retried_only_after_a_growing_backoff(workspace: Workspace):
    # Refused at once (a 503 the SDK would retry for half a minute first): each cancel is one request.
    workspace.configure(faults=["403@cancel"])
    daemon = Daemon(load_settings(workspace.config))
    daemon.start()
    try:
        remote = daemon.provider.create_inline(MODEL, [RequestEncoder(MODEL).inline("k", "hi")], DISPLAY_NAME)
        stats = f"{daemon.emulator.base_url}/_emulator/stats"

        def cancels() -> int:
            with urllib.request.urlopen(stats) as answer:  # not the Gemini API
                return json.load(answer)["routes"].get("cancel", 0)

        cancelled = []

        def cancel() -> None:
            daemon.steps.monitor.cancel(remote.name, "j1", lambda: cancelled.append(remote.name))
            cancels_answered(daemon)

        cancel()
        sent = cancels()
        assert sent == 1
        cancel()
        assert cancels() == sent, "no request within the backoff"
        backoff = daemon.steps.monitor.cancel_backoff[remote.name]
        failures, retry_at = backoff.failures, backoff.due_at
        assert failures == 1
        backoff.now()  # the backoff has run out
        cancel()
        assert cancels() == 2
        failures, second_retry_at = backoff.failures, backoff.due_at
        assert failures == 2 and second_retry_at - time.monotonic() > retry_at - time.monotonic()
        assert cancelled == [], "a refused cancel is not recorded as sent"
    finally:
        daemon.close()


def answer_came(daemon: Daemon) -> None:
    """Wait until the poll the loop started has its answer (the reader thread is gone), not yet recorded."""
    deadline = time.monotonic() + 30
    while any(thread.name == "batchd-poll" for thread in threading.enumerate()):
        assert time.monotonic() < deadline, "the poll's reader did not answer within 30 s"
        time.sleep(0.01)
    assert daemon.steps.monitor.busy(), "the answer is recorded only when the loop collects it"


@pytest.mark.parametrize("fetched_meanwhile", [True, False], ids=["fetched-meanwhile", "still-running"])
def test_a_poll_answer_is_recorded_against_the_journal_as_it_is_when_it_comes(quick_daemon: Daemon,
                                                                              fetched_meanwhile: bool):
    """The loop asks and goes on; the answer says the chunk's remote job has succeeded. If the chunk was
    fetched meanwhile (as after a webhook's get), it starts no second fetch and changes nothing; if the
    chunk still runs, its results are fetched."""
    daemon = quick_daemon
    remote = create_remote(daemon)
    daemon.steps.monitor.poll()
    wait_done(make_client(daemon.emulator.base_url, api_key="batchd-emulator"), remote.name)
    monitor = daemon.steps.monitor

    monitor.start_poll()
    assert not monitor.due(), "one poll at a time"
    answer_came(daemon)
    if fetched_meanwhile:
        daemon.journal.update_chunk("j1", 0, state="fetched", remote_state="succeeded")
    monitor.collect()

    assert not monitor.busy()
    assert daemon.steps.fetch.busy() is not fetched_meanwhile, "a fetch for a fetched chunk, or none for a finished one"
    chunk = daemon.journal.chunks("j1")[0]
    assert (chunk.state, chunk.remote_name) == ("fetched" if fetched_meanwhile else "running", remote.name)


def test_the_search_for_an_unconfirmed_create_reads_the_list_down_to_its_first_create_only(tmp_path):
    """A project keeps every batch it ever ran (unless deleted): a poll looking for an unconfirmed create's
    job reads the newest-first list down to the first create under its name, less the clock skew allowed,
    not through every page of the project's history. A batch under that name an hour older is none of
    its; with the watch begun that long ago, the same batch is found."""
    import sqlite3

    from batchd.daemon.monitor import CLOCK_SKEW_SECONDS, PollQuestion, read_remote
    from batchd.provider import Provider
    from batchd.testing import EMULATOR_API_KEY, Emulator

    state = tmp_path / "google"
    google = Emulator(state, job_seconds=0).start()
    try:
        client = google.client()
        request = {"contents": [{"parts": [{"text": "one"}], "role": "user"}], "metadata": {"key": "k"}}

        def create(display_name: str) -> types.BatchJob:
            return client.batches.create(model=MODEL, src=[request],
                                         config=types.CreateBatchJobConfig(display_name=display_name))

        old = create(DISPLAY_NAME)
        for n in range(230):  # newer: it is on the list's third page
            create(f"other-{n}")
    finally:
        google.stop()
    # An hour back: the emulator dates a batch by its own clock, as Google does.
    db = sqlite3.connect(state / "state.db")
    with db:
        for doc_id, body in db.execute("SELECT id, body FROM docs WHERE kind = 'jobs'").fetchall():
            doc = json.loads(body)
            doc["createTime"] -= 3600
            db.execute("UPDATE docs SET body = ? WHERE kind = 'jobs' AND id = ?", (json.dumps(doc), doc_id))
    db.close()
    google = Emulator(state, job_seconds=0).start()
    try:
        recent = google.client().batches.create(model=MODEL, src=[request],
                                                config=types.CreateBatchJobConfig(display_name="recent"))
        with Provider(api_key=EMULATOR_API_KEY, base_url=google.base_url) as provider:
            listed = [job.name for job in provider.list_jobs()]
            assert (listed[0], listed[-1], len(listed)) == (recent.name, old.name, 232), "newest first, 3 pages"

            def question(first_create: float) -> PollQuestion:
                return PollQuestion(running=frozenset(), names=frozenset({DISPLAY_NAME}),
                                    unconfirmed=frozenset({DISPLAY_NAME}), watching=True,
                                    oldest=first_create - CLOCK_SKEW_SECONDS)

            now = read_remote(provider, question(time.time()))
            assert now.error is None and now.listed == [], "an hour-old batch is not this create's"
            hour_ago = read_remote(provider, question(time.time() - 3600))
            assert [job.name for job in hour_ago.listed] == [old.name]
    finally:
        google.stop()
