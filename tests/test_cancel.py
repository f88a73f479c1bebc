"""Cancelling a job before all of it is on the service: while it is being built, while a create is
unconfirmed, or before any remote job exists. Crashes around a cancel are in test_recovery.py (K15)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from google.genai import types

from batchd.config import load_settings
from batchd.daemon import Daemon
from batchd.daemon.build import CHUNKS_AHEAD
from batchd.journal import Chunk, Job, Journal, journal_path
from batchd.manifest import load_manifest
from batchd.testing import Workspace
from test_daemon import remote_jobs

#: Six requests: at one request a chunk, six chunks.
SIX = """\
task = "translate"
texts = ["one", "two", "three", "four", "five", "six"]
languages = ["French"]
"""

#: A budget that could hold a job: it is then estimated before it is built (every row read), so its
#: chunks go out while later ones are built. Any other job's chunks wait for its whole build pass.
SENT_WHILE_BUILDING = {"cost": {"job_budget": 1000.0}}


def journal_of(ws: Workspace, name: str) -> tuple[Job, list[Chunk], list[str]]:
    """The job named ``name``, its chunks and the kinds of its events (progress left out: how many
    there are depends on where the polls fall)."""
    journal = Journal(journal_path(ws.state), readonly=True)
    try:
        (job,) = journal.find_jobs(name)
        kinds = [entry["event"]["kind"] for entry in journal.events(job.id)
                 if entry["event"]["kind"] != "progress"]
        return job, journal.chunks(job.id), kinds
    finally:
        journal.close()


def request_keys(path: Path) -> list[str]:
    return [request.key for request in load_manifest(path).requests()]


def result_keys(ws: Workspace, name: str) -> list[str]:
    return [line["key"] for line in ws.outbox_folder(name).results]


def tick_until(daemon: Daemon, done, what: str, timeout: float = 60):
    """Run the daemon's loop in this process, one tick at a time, until ``done()`` is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        daemon.loop.tick()
        value = done()
        if value:
            return value
        daemon.inbox.wait(min(daemon.loop.sleep_seconds(), 0.05))
    raise AssertionError(f"timed out waiting for {what}")


def test_a_cancel_between_two_chunks_builds_no_further_chunk_and_sends_nothing(workspace: Workspace):
    """The cancel is taken while the first chunks are built and not yet sent: no chunk after those
    built ahead (CHUNKS_AHEAD) is built, they end never submitted, no remote job exists, and no
    `submitted` event claims otherwise. With a budget, so that chunk 0 would go out as soon as it is
    recorded."""
    workspace.configure(chunk_max_requests=1, settle_seconds=0, job_seconds=600, **SENT_WHILE_BUILDING)
    manifest = workspace.drop("long.toml", SIX)
    keys = request_keys(manifest)
    daemon = Daemon(load_settings(workspace.config))
    daemon.start()
    try:
        # The first ticks take the manifest and start building its first chunk (in the build's thread,
        # once 'building' is committed); the tick that records it would send it, unless a cancel has
        # come first.
        builders = daemon.steps.build.builders
        (job,) = tick_until(daemon, daemon.journal.active_jobs, "the job accepted")
        tick_until(daemon, lambda: job.id in builders and not builders[job.id].chunks.resting(),
                   "its first chunk asked for")
        # Built, not yet recorded (the loop is not ticked meanwhile): a cancel taken while the build's thread
        # had not begun the chunk withdraws the request, and nothing at all is built (a race under load).
        workspace.wait_for(builders[job.id].chunks.ready, what="its first chunk built")
        job = daemon.journal.job(job.id)
        assert (job.state, [c.state for c in daemon.journal.chunks(job.id)]) == ("building", [])
        (workspace.inbox / "long.cancel").write_text("")
        workspace.wait_for(lambda: daemon.inbox.changed, what="the watcher saw the cancel file")

        tick_until(daemon, lambda: daemon.journal.job(job.id).state == "done", "the job delivered")
        chunks = daemon.journal.chunks(job.id)
        kinds = [entry["event"]["kind"] for entry in daemon.journal.events(job.id)]
    finally:
        daemon.close()

    built = len(chunks)
    assert 1 <= built <= CHUNKS_AHEAD < len(keys), "a chunk was built after the cancel"
    assert [(c.idx, c.state) for c in chunks] == [(n, "skipped") for n in range(built)]
    assert remote_jobs(workspace) == []
    assert kinds == ["accepted", "cancelled"]
    folder = workspace.outbox_folder("long")
    assert folder.state == "cancelled" and folder.summary["error"]["code"] == "cancelled"
    assert folder.summary["timings"]["submitted"] is None, "nothing was submitted"
    assert [line["key"] for line in folder.results] == keys[:built]
    assert all(line["error"]["code"] == "cancelled" for line in folder.results)
    assert folder.summary["counts"] == {"total": built, "succeeded": 0, "failed": built}
    [warning] = folder.summary["warnings"]
    assert f"chunk {built - 1}" in warning and "never built" in warning


def test_a_build_holding_its_chunks_asks_for_the_next_at_once_and_a_cancel_sends_nothing(workspace: Workspace):
    """No budget: the build pass is the first to read the rows, so it holds its chunks (none recorded,
    none sent) and asks for the next one as soon as it took one (nothing recorded brings the loop
    back otherwise). A cancel stops it at a chunk boundary: nothing was sent, nothing is."""
    workspace.configure(chunk_max_requests=1, settle_seconds=0, job_seconds=600)
    workspace.drop("long.toml", SIX)
    daemon = Daemon(load_settings(workspace.config))
    daemon.start()
    try:
        builders = daemon.steps.build.builders
        (job,) = tick_until(daemon, daemon.journal.active_jobs, "the job accepted")
        builder = tick_until(daemon, lambda: job.id in builders and len(builders[job.id].held or ()) >= 2
                             and builders[job.id], "two chunks held")
        assert not builder.chunks.resting(), "the next chunk was not asked for"
        assert daemon.journal.chunks(job.id) == [], "a held chunk was recorded"
        (workspace.inbox / "long.cancel").write_text("")
        workspace.wait_for(lambda: daemon.inbox.changed, what="the watcher saw the cancel file")

        tick_until(daemon, lambda: daemon.journal.job(job.id).state == "done", "the job delivered")
        chunks = daemon.journal.chunks(job.id)
        kinds = [entry["event"]["kind"] for entry in daemon.journal.events(job.id)]
    finally:
        daemon.close()

    assert chunks == [] and remote_jobs(workspace) == []
    assert kinds == ["accepted", "cancelled"]
    folder = workspace.outbox_folder("long")
    assert folder.state == "cancelled" and folder.summary["timings"]["submitted"] is None


def test_a_cancel_of_a_job_stopped_part_way_through_its_build_builds_nothing_more(workspace: Workspace):
    """Stopped right after its second chunk was recorded (both sent), cancelled while batchd was down:
    the restart builds the recorded chunks again (their index joins the results) and nothing after
    them; both remote jobs are cancelled and the job is delivered cancelled with those two requests.
    With a budget, so that chunks go out while later ones are built."""
    workspace.configure(chunk_max_requests=1, job_seconds=600, **SENT_WHILE_BUILDING)
    manifest = workspace.drop("long.toml", SIX)
    keys = request_keys(manifest)
    stopped = workspace.start("run", BATCHD_CRASH_AT="while-building", BATCHD_CRASH_SIGNAL="SIGTERM")
    assert stopped.wait(120) == 0, stopped.output()[-3000:]
    assert workspace.batchd("cancel", "long").returncode == 0

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    job, chunks, kinds = journal_of(workspace, "long")
    # The stop came right after chunk 1 was recorded, and each chunk is sent before the next is recorded.
    assert [c.idx for c in chunks] == [0, 1], "chunks were built after the cancel"
    assert all(c.remote_name and c.cancel_sent for c in chunks)
    remote = remote_jobs(workspace)
    assert sorted(r.name for r in remote) == sorted(c.remote_name for c in chunks)
    assert all(r.state == types.JobState.JOB_STATE_CANCELLED for r in remote)
    assert kinds == ["accepted", "submitted", "cancelled"]
    folder = workspace.outbox_folder("long")
    assert folder.state == "cancelled"
    assert result_keys(workspace, "long") == keys[:2]
    assert "never built" in folder.summary["warnings"][0]


def test_a_cancel_of_a_job_whose_create_was_never_sent_creates_nothing(workspace: Workspace):
    """Killed after the create intent of chunk 0, before the create; cancelled while down. The restart
    reads the cancel before it reconciles, so the unconfirmed chunk is never created: once the grace
    period shows no remote job it ends never submitted. With a budget, so that chunk 0 goes out
    before the rest is built."""
    workspace.configure(chunk_max_requests=1, job_seconds=600, **SENT_WHILE_BUILDING)
    manifest = workspace.drop("long.toml", SIX)
    keys = request_keys(manifest)
    crashed = workspace.start("run", BATCHD_CRASH_AT="after-intent")
    assert crashed.wait(120) == -signal.SIGKILL, crashed.output()[-3000:]
    assert workspace.batchd("cancel", "long").returncode == 0

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    job, chunks, kinds = journal_of(workspace, "long")
    assert [(c.idx, c.state) for c in chunks] == [(0, "skipped")]
    assert remote_jobs(workspace) == []
    assert kinds == ["accepted", "cancelled"]
    assert workspace.outbox_folder("long").state == "cancelled"
    assert result_keys(workspace, "long") == keys[:1]


def test_hook_job_event_announces_no_submitted_for_a_job_whose_every_create_is_refused(workspace: Workspace):
    """`submitted` says remote jobs exist: a job the service refused outright goes from accepted to failed."""
    workspace.configure(faults=["400@create"])
    workspace.drop("refused.toml", SIX)

    result = workspace.batchd("run", "--once")

    assert result.returncode == 1, result.stderr
    _job, chunks, kinds = journal_of(workspace, "refused")
    assert [c.remote_state for c in chunks] == ["rejected"]
    assert kinds == ["accepted", "failed"]
    assert workspace.outbox_folder("refused").summary["timings"]["submitted"] is not None, \
        "the creates were sent"


def test_spools_of_done_jobs_are_removed_together_once_no_job_is_on_its_way(workspace: Workspace):
    """A done job's spool is not removed while other jobs are still on their way (removing files while
    others are created slows the creations down on some filesystems: batchd.daemon.deliver.Deliver.tidy);
    it goes once the last of them is done."""
    workspace.configure(settle_seconds=0, job_seconds=600)
    workspace.drop("long.toml", SIX)
    workspace.drop("bad.toml", 'task = "translate"\ntexts = [\n')  # does not parse: rejected at once
    daemon = Daemon(load_settings(workspace.config))
    daemon.start()
    try:
        journal = daemon.journal
        tick_until(daemon, lambda: len(journal.find_jobs("bad")) == 1 and journal.find_jobs("bad")[0].state == "done"
                   and journal.find_jobs("long")[0].state == "submitted", "bad delivered, long running")
        (bad,), (long,) = journal.find_jobs("bad"), journal.find_jobs("long")
        for _ in range(5):
            daemon.loop.tick()
        assert daemon.ctx.spool(bad.id).root.is_dir(), "removed while another job was on its way"

        (workspace.inbox / "long.cancel").write_text("")
        tick_until(daemon, lambda: journal.job(long.id).state == "done", "long cancelled and delivered")
        tick_until(daemon, lambda: not daemon.ctx.spool(bad.id).root.exists()
                   and not daemon.ctx.spool(long.id).root.exists(), "both spools removed")
    finally:
        daemon.close()
    assert workspace.outbox_folder("bad").state == "rejected"
    assert workspace.outbox_folder("long").state == "cancelled"
