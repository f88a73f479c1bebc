"""Recovery after crashes and stops (reliability.md B8): I6 idempotent recovery, K15 kill -9 around a
cancel, K16 SIGTERM at each crash point, and a claim's verdict surviving a kill right after the claim."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sqlite3
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from google.genai import types

from batchd.config import load_settings
from batchd.daemon import Daemon
from batchd.daemon.crashpoints import ON_CANCEL as CANCEL_CRASH_POINTS
from batchd.daemon.crashpoints import ON_EVERY_JOB as CRASH_POINTS
from batchd.journal import journal_path
from batchd.manifest import load_manifest
from batchd.testing import Emulator, Workspace
from invariants import Dropped, assert_invariants
from test_daemon import SENTIMENT, TRANSLATE, remote_jobs


def creates_by_display_name(emulator: Emulator) -> dict[str, int]:
    with urllib.request.urlopen(f"{emulator.base_url}/_emulator/stats") as answer:
        return json.load(answer)["createsByDisplayName"]


def journal_rows(ws: Workspace) -> dict[str, list[tuple]]:
    """Every row of every journal table, as they are (updated_at included: a no-op must not touch it)."""
    db = sqlite3.connect(f"file:{journal_path(ws.state)}?mode=ro", uri=True)
    try:
        return {table: sorted(db.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
                for table in ("jobs", "chunks", "remote_jobs")}
    finally:
        db.close()


def files(ws: Workspace) -> dict[str, str]:
    """Inbox, outbox and job spools: each path with its kind and, for files, a digest of its bytes."""
    tree = {}
    for top in (ws.inbox, ws.outbox, ws.state / "jobs"):
        for path in sorted(top.rglob("*")):
            kind = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            tree[str(path.relative_to(ws.root))] = kind
    return tree


def recover_once(settings, emulator: Emulator) -> None:
    """Start a daemon in this process (start() runs recovery), let the creates it sent finish, close it."""
    daemon = Daemon(settings)
    daemon.start()
    try:
        while daemon.steps.submit.submissions.running:  # a file chunk's upload, then its create
            for submission in list(daemon.steps.submit.submissions.running.values()):
                submission.future.result(timeout=60)
            daemon.steps.submit.collect()
        daemon.recover()  # a second pass within the same process changes nothing either
        assert not daemon.steps.submit.submissions.running, "a second recovery pass sent a create"
    finally:
        daemon.close()


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_recovery_run_twice_is_idempotent(workspace: Workspace, emulator: Emulator, monkeypatch,
                                                    point: str):
    """I6: recovering after a crash at ``point`` twice leaves the journal, the files and the service
    as recovering once did, and the second recovery creates nothing."""
    # Chunks of two requests go as files, single ones inline: both kinds meet every crash point.
    workspace.configure(provider="gemini", chunk_max_requests=2, inline_max_requests=1, submit_grace_seconds=0)
    workspace.drop("translate.toml", TRANSLATE)
    workspace.drop("sentiment.toml", SENTIMENT)
    service = {"GEMINI_API_KEY": emulator.api_key, "GOOGLE_GEMINI_BASE_URL": emulator.base_url}
    crashed = workspace.start("run", BATCHD_CRASH_AT=point, BATCHD_PROVIDER="gemini", **service)
    assert crashed.wait(120) == -signal.SIGKILL, f"never reached {point}:\n{crashed.output()[-2000:]}"

    for name, value in service.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(workspace.config)
    recover_once(settings, emulator)
    once = (journal_rows(workspace), files(workspace), creates_by_display_name(emulator),
            Counter(job.display_name for job in emulator.client().batches.list()))
    recover_once(settings, emulator)
    twice = (journal_rows(workspace), files(workspace), creates_by_display_name(emulator),
             Counter(job.display_name for job in emulator.client().batches.list()))

    assert twice[0] == once[0], "the journal changed"
    assert twice[1] == once[1], "the files changed"
    assert twice[2] == once[2], "the second recovery created remote jobs"
    assert twice[3] == once[3]
    assert all(count == 1 for count in once[2].values()), once[2]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigterm_at_each_crash_point_exits_0_and_a_restart_creates_nothing_extra(workspace: Workspace,
                                                                                 point: str):
    """K16: a stop request at any of the crash points ends the process cleanly (exit 0); the restart
    delivers everything with exactly one remote job per chunk: no cancelled duplicate, no re-create."""
    workspace.configure(chunk_max_requests=2, inline_max_requests=1)  # files and inline chunks
    dropped = [Dropped.of(workspace.drop("translate.toml", TRANSLATE)),
               Dropped.of(workspace.drop("sentiment.toml", SENTIMENT))]

    stopped = workspace.start("run", BATCHD_CRASH_AT=point, BATCHD_CRASH_SIGNAL="SIGTERM")
    assert stopped.wait(120) == 0, stopped.output()[-3000:]
    assert f"crash point {point}: sending the process SIGTERM" in stopped.output()

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    jobs = remote_jobs(workspace)
    per_chunk = Counter(job.display_name for job in jobs)
    assert all(count == 1 for count in per_chunk.values()), per_chunk
    assert len(per_chunk) == 4, "translate: 4 requests, sentiment: 3, at 2 a chunk"
    assert_invariants(workspace, dropped, jobs)


#: Six requests: at one request a chunk, six chunks.
SIX = """\
task = "translate"
texts = ["one", "two", "three", "four", "five", "six"]
languages = ["French"]
"""


@pytest.mark.parametrize("point", CANCEL_CRASH_POINTS)
@pytest.mark.parametrize("when", ["running", "building"])
def test_kill_9_around_a_cancel_ends_cancelled_with_every_remote_job_stopped(workspace: Workspace, when: str,
                                                                             point: str):
    """K15: killed after a cancel request is committed (batches.cancel not yet sent) or after batches.cancel
    was sent (not yet recorded). The restart carries the cancel through: the job is delivered once, as
    cancelled, and every remote job of it is cancelled on the service (they would run for 10 minutes).

    ``running``: every chunk is built and running when the cancel comes. ``building``: batchd was
    stopped right after the second of six chunks was recorded and sent, and the cancel is taken on the
    restart that is killed; the chunks after those two are never built (results for those two only).
    That one runs with a budget, so that chunks go out while later ones are built (a job no pass read
    before its build waits for its whole build pass).
    """
    if when == "running":
        workspace.configure(job_seconds=600, chunk_max_requests=2)
    else:
        workspace.configure(job_seconds=600, chunk_max_requests=1, cost={"job_budget": 1000.0})
    path = workspace.drop("long.toml", TRANSLATE if when == "running" else SIX)
    dropped = Dropped.of(path)
    built_keys = [request.key for request in load_manifest(path).requests()]
    if when == "running":
        killed = cancel_both_running_chunks(workspace, BATCHD_CRASH_AT=point)
        assert killed.returncode == -signal.SIGKILL, f"never reached {point}:\n{killed.output()[-3000:]}"
    else:
        stopped = workspace.start("run", BATCHD_CRASH_AT="while-building", BATCHD_CRASH_SIGNAL="SIGTERM")
        assert stopped.wait(120) == 0, stopped.output()[-3000:]
        assert workspace.batchd("cancel", "long").returncode == 0
        crashed = workspace.start("run", BATCHD_CRASH_AT=point)
        assert crashed.wait(120) == -signal.SIGKILL, f"never reached {point}:\n{crashed.output()[-3000:]}"
        # Only the two chunks recorded before the stop are ever built: their requests are the results.
        dropped = dataclasses.replace(dropped, keys=frozenset(built_keys[:2]))

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert workspace.delivered()["long"]["state"] == "cancelled"
    jobs = remote_jobs(workspace)
    assert len(jobs) == 2 and all(job.state == types.JobState.JOB_STATE_CANCELLED for job in jobs), \
        [(job.display_name, job.state) for job in jobs]
    assert_invariants(workspace, [dropped], jobs)
    # Taken before the kill (its record committed with the flag), the request left is removed, not taken again.
    assert not (workspace.inbox / "long.cancel").exists()
    if point == "after-cancel-request":
        assert "cancel requested for job" not in result.stderr, result.stderr


def cancel_both_running_chunks(ws: Workspace, **env: str):
    """Run batchd until both chunks of long.toml run, cancel it, and wait for the process to end."""
    daemon = ws.start("run", **env)
    try:
        ws.wait_for(lambda: [b["name"] is not None for job in ws.status() for b in job["remote_batches"]]
                    == [True, True], what="both remote jobs created")
        assert ws.batchd("cancel", "long").returncode == 0
        daemon.wait(120)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    return daemon


@pytest.mark.parametrize("point", CANCEL_CRASH_POINTS)
def test_sigterm_around_a_cancel_exits_0_and_the_restart_finishes_the_cancel(workspace: Workspace, point: str):
    """K16 at the cancel's crash points: a stop request there ends the process cleanly; the restart
    delivers the job cancelled with both remote jobs cancelled and nothing created again."""
    workspace.configure(job_seconds=600, chunk_max_requests=2)
    dropped = Dropped.of(workspace.drop("long.toml", TRANSLATE))
    stopped = cancel_both_running_chunks(workspace, BATCHD_CRASH_AT=point, BATCHD_CRASH_SIGNAL="SIGTERM")
    assert stopped.returncode == 0, stopped.output()[-3000:]
    assert f"crash point {point}: sending the process SIGTERM" in stopped.output()

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert workspace.delivered()["long"]["state"] == "cancelled"
    jobs = remote_jobs(workspace)
    assert len(jobs) == 2 and all(job.state == types.JobState.JOB_STATE_CANCELLED for job in jobs)
    assert_invariants(workspace, [dropped], jobs)


@pytest.mark.slow  # an edge of recovery; the slow step runs it
def test_a_duplicate_killed_right_after_its_claim_is_still_a_duplicate(workspace: Workspace):
    """The verdict of a claim is committed with it: recovery finishes the claim, never re-runs the content."""
    workspace.drop("one.toml", TRANSLATE)
    assert workspace.batchd("run", "--once").returncode == 0
    workspace.drop("again.toml", TRANSLATE)

    crashed = workspace.start("run", BATCHD_CRASH_AT="after-claim")
    assert crashed.wait(120) == -signal.SIGKILL
    workspace.batchd("run", "--once")

    delivered = workspace.delivered()
    assert delivered["again"]["state"] == "rejected"
    assert delivered["again"]["error"]["duplicate_of"] == delivered["one"]["job"]
    assert len(remote_jobs(workspace)) == 1, "the same content was billed twice"


@pytest.mark.slow  # an edge of recovery; the slow step runs it
def test_a_new_manifest_under_the_name_of_one_killed_after_its_claim_is_a_job_of_its_own(workspace: Workspace):
    """Killed right after a claim; a producer then drops another file under the same name. Recovery
    finishes the first claim without touching the newcomer, which becomes a job of its own."""
    workspace.drop("job.toml", TRANSLATE)
    crashed = workspace.start("run", BATCHD_CRASH_AT="after-claim")
    assert crashed.wait(120) == -signal.SIGKILL
    workspace.drop("job.toml", SENTIMENT)

    result = workspace.batchd("run", "--once", timeout=120)

    assert result.returncode == 0, result.stderr
    tasks = sorted(summary["task"] for summary in workspace.delivered().values())
    assert tasks == ["sentiment", "translate"]


def test_a_fifo_killed_right_after_its_claim_is_delivered_rejected_not_opened(workspace: Workspace):
    """Were recovery to forget the verdict it would open the FIFO to build requests and hang for good."""
    os.mkfifo(workspace.inbox / "pipe.toml")
    crashed = workspace.start("run", BATCHD_CRASH_AT="after-claim")
    assert crashed.wait(120) == -signal.SIGKILL

    result = workspace.batchd("run", "--once", timeout=60)

    assert result.returncode == 1, result.stderr
    assert workspace.delivered()["pipe"]["error"]["code"] == "not_a_regular_file"
    assert (workspace.outbox / "pipe" / "pipe.toml").is_fifo()
    assert Path(workspace.state / "jobs").exists() and not list((workspace.state / "jobs").iterdir())


@pytest.mark.slow  # an edge of recovery; the slow step runs it
def test_spools_a_crash_left_behind_are_removed_at_start(workspace: Workspace):
    """Killed between a job's 'done' commit and removing its spool, or between making a spool and
    recording its job: recovery removes those spools, and only those."""
    workspace.drop("translate.toml", TRANSLATE)
    assert workspace.batchd("run", "--once").returncode == 0
    [job] = json.loads(workspace.batchd("list", "--json").stdout)
    jobs = workspace.state / "jobs"
    (jobs / job["id"] / "inputs").mkdir(parents=True)           # a done job's spool
    (jobs / "20990101000000-abcdef" / "inputs").mkdir(parents=True)  # a spool with no job
    (jobs / "20990101000000-abcdef" / "inputs" / "items.csv").write_text("id,text\n")
    workspace.drop("sentiment.toml", SENTIMENT)

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert list(jobs.iterdir()) == []
    assert set(workspace.delivered()) == {"translate", "sentiment"}


def test_a_daemon_that_rejected_a_manifest_still_stops_with_exit_0(workspace: Workspace, daemon):
    """Exit codes for failed jobs are --once's answer; systemd must not see a stop on request as a failure."""
    process = daemon.start()
    workspace.drop("broken.toml", 'task = "translate"\ntexts = ["a"\n')
    workspace.wait_for_delivery("broken")
    assert workspace.delivered()["broken"]["state"] == "rejected"
    assert process.stop() == 0, process.output()[-2000:]


def test_a_temp_file_a_kill_left_in_the_state_dir_is_removed_at_the_next_start(workspace: Workspace):
    """notices.json and models.json are written from a temp file (a kill -9 mid-write leaves it, and the model
    list is written from a thread a stop does not wait for): the next start removes such leftovers, and only
    them."""
    workspace.state.mkdir(parents=True, exist_ok=True)
    left = [workspace.state / ".models.json.0123abcd.tmp", workspace.state / ".notices.json.deadbeef.tmp"]
    for path in left:
        path.write_text('{"torn')
    kept = [workspace.state / ".models.json.tmp", workspace.state / "notes.0123abcd.tmp"]
    for path in kept:
        path.write_text("not batchd's")
    (workspace.state / ".link.0123abcd.tmp").symlink_to(kept[0])

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert not any(path.exists() for path in left)
    assert all(path.read_text() == "not batchd's" for path in kept)
    assert (workspace.state / ".link.0123abcd.tmp").is_symlink()
    assert "removed .models.json.0123abcd.tmp" in result.stderr


def test_a_journal_that_is_no_database_stops_the_start_with_what_to_do_and_exit_78(workspace: Workspace):
    """A journal.db that is not SQLite (overwritten, or damaged on disk): batchd neither crashes with a traceback
    nor starts a new journal over it, which would forget what it claimed and created. `run` says what to do and
    exits 78 (the systemd unit does not restart it in a loop: a restart cannot mend it), `status` says the same,
    and the file and the inbox are left as they were."""
    workspace.drop("translate.toml", TRANSLATE)
    workspace.state.mkdir(parents=True, exist_ok=True)
    damaged = b"not a database " * 600
    journal_path(workspace.state).write_bytes(damaged)

    refused = workspace.batchd("run", "--once")
    status = workspace.batchd("status")

    assert refused.returncode == 78, refused.stderr[-3000:]
    for result in (refused, status):
        assert "cannot be read" in result.stderr and ".recover" in result.stderr, result.stderr[-3000:]
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) <= 2, result.stderr[-3000:]
    assert status.returncode == 1
    assert journal_path(workspace.state).read_bytes() == damaged
    assert (workspace.inbox / "translate.toml").exists() and not workspace.outbox_folders()


def damage_sqlite_pages(path: Path, *names: str) -> None:
    """Overwrite the root page of each named table or index of an SQLite file (the whole of a small one)."""
    with sqlite3.connect(path) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        roots = [db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
                 for name in names]
    db.close()
    with path.open("r+b") as file:
        for root in roots:
            file.seek((root - 1) * page_size)
            file.write(b"\xde\xad\xbe\xef" * (page_size // 4))


def test_a_journal_page_damaged_where_the_start_does_not_read_stops_the_daemon_when_met(workspace: Workspace):
    """A damaged page the start does not read (the index of manifests' contents, met at the next claim; an old
    job's chunks, met by `status`): the daemon stops there with the start's one line and exit 78 (a restart would
    meet the page again: systemd must not loop), the manifest it was claiming stays in the inbox, `status` says
    the same line and `doctor` names the page. Before, each was a traceback, and the unit restarted the daemon
    into the same page for ever."""
    workspace.drop("translate.toml", TRANSLATE)
    assert workspace.batchd("run", "--once").returncode == 0
    journal = journal_path(workspace.state)
    damage_sqlite_pages(journal, "jobs_by_sha", "chunks")
    workspace.drop("sentiment.toml", SENTIMENT)

    stopped = workspace.batchd("run", "--once")
    status = workspace.batchd("status")
    doctor = workspace.batchd("doctor")

    assert stopped.returncode == 78, stopped.stderr[-3000:]
    for result in (stopped, status):
        said = [line for line in result.stderr.splitlines() if "level=info" not in line]
        assert said[0].startswith("Error: the journal") and len(said) == 1, result.stderr[-3000:]
        assert "cannot be read (database disk image is malformed)" in said[0], result.stderr[-3000:]
    assert status.returncode == 1
    assert (workspace.inbox / "sentiment.toml").exists() and list(workspace.outbox_folders()) == ["translate"]
    assert doctor.returncode == 1
    assert "FAIL  journal:" in doctor.stdout and "is damaged: Page" in doctor.stdout and ".recover" in doctor.stdout


@pytest.mark.slow  # 20 s of waiting for the lock on purpose
def test_a_journal_locked_by_another_process_is_waited_for_and_a_stop_meanwhile_loses_nothing(workspace: Workspace):
    """Another process holding the journal's write lock (an operator's `sqlite3` shell with a transaction
    open): the daemon waits, says so, and goes on once it is released; a stop while it waits ends it within
    seconds, the manifest dropped meanwhile still in the inbox, delivered by the next run. Before, the first
    write after five seconds raised "database is locked" out of the loop: a traceback and a dead daemon."""
    import time

    def lock() -> sqlite3.Connection:
        holder = sqlite3.connect(journal_path(workspace.state), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        return holder

    workspace.configure(settle_seconds=0)
    process = workspace.start("run")
    try:
        workspace.wait_for(lambda: "batchd ready" in process.output(), what="the daemon ready")
        holder = lock()
        workspace.drop("translate.toml", TRANSLATE)
        workspace.wait_for(lambda: "is locked by another process" in process.output(), what="the wait said")
        time.sleep(2)
        assert process.poll() is None and not workspace.outbox_folders()
        holder.rollback()
        holder.close()
        workspace.wait_for(lambda: "translate" in workspace.outbox_folders(), what="the job delivered")
        assert "is free again, after" in process.output()

        holder = lock()
        workspace.drop("sentiment.toml", SENTIMENT)
        workspace.wait_for(lambda: process.output().count("is locked by another process") >= 2, what="the second wait")
        started = time.monotonic()
        assert process.stop(timeout=30) == 0
        assert time.monotonic() - started < 15
    finally:
        if process.poll() is None:
            process.kill()
    holder.rollback()
    holder.close()
    said = process.output()
    assert "stopping without recording the last steps" in said and "Traceback" not in said, said[-3000:]
    assert (workspace.inbox / "sentiment.toml").exists()
    assert workspace.batchd("run", "--once").returncode == 0
    assert set(workspace.outbox_folders()) == {"translate", "sentiment"}


def test_an_embedded_emulator_whose_state_is_damaged_stops_the_start_saying_so(workspace: Workspace):
    """The embedded emulator's state.db damaged: its error and the daemon's are one line each, no traceback, and
    nothing of the manifest waiting in the inbox is lost; once the state is moved aside, as the error says, the
    manifest is delivered (before, the emulator's traceback and then the daemon's, from the first step that
    called it in a worker thread)."""
    workspace.drop("sentiment.toml", SENTIMENT)
    assert workspace.batchd("run", "--once").returncode == 0
    emulator_state = workspace.state / "emulator"
    for leftover in emulator_state.glob("state.db-*"):
        leftover.unlink()
    (emulator_state / "state.db").write_bytes(b"not a database " * 600)
    workspace.drop("translate.toml", TRANSLATE)

    refused = workspace.batchd("run", "--once", timeout=60)

    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "the emulator's state" in refused.stderr and "Move it aside" in refused.stderr, refused.stderr[-3000:]
    assert "the embedded emulator" in refused.stderr and "did not start" in refused.stderr, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr and "Fatal Python error" not in refused.stderr, refused.stderr[-3000:]
    assert len(refused.stderr.splitlines()) <= 3, refused.stderr[-3000:]
    assert (workspace.inbox / "translate.toml").exists()

    (emulator_state / "state.db").rename(emulator_state / "state.db.damaged")
    delivered = workspace.batchd("run", "--once")

    assert delivered.returncode == 0, delivered.stderr[-3000:]
    assert workspace.outbox_folder("translate").state == "succeeded"


def test_an_embedded_emulator_killed_while_batchd_runs_is_started_again_and_the_jobs_go_on(workspace: Workspace):
    """The embedded emulator is batchd's child: killed (an OOM kill, an operator's kill -9), it is started again
    on the same port, which is all the daemon's client knows, with the batches its state holds; calls made
    meanwhile failed and are retried, as in an outage of the service. Before, every call failed from then on
    until batchd was restarted."""
    import time

    workspace.configure(settle_seconds=0, poll_interval=0.2, poll_max_interval=1)
    daemon = workspace.start("run")
    try:
        workspace.drop("before.toml", SENTIMENT)
        workspace.wait_for_delivery("before")
        children = Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split()
        [emulator] = [int(pid) for pid in children if b"batchd.emulator" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(emulator, signal.SIGKILL)
        workspace.drop("after.toml", TRANSLATE)
        workspace.wait_for_delivery("after", timeout=90)
        deadline = time.monotonic() + 10
        while "serves again" not in daemon.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert daemon.poll() is None
    finally:
        assert daemon.stop() == 0, daemon.output()[-3000:]
    output = daemon.output()
    assert "the embedded emulator exited (status -9)" in output and "serves again" in output, output[-3000:]
    assert {name: folder.state for name, folder in workspace.outbox_folders().items()} == {
        "before": "succeeded", "after": "succeeded"}
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and _is_emulator_of(pid, workspace)]


def _is_emulator_of(pid: str, workspace: Workspace) -> bool:
    try:
        return str(workspace.state) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_a_job_whose_spool_is_removed_while_it_runs_is_delivered_failed_saying_so(workspace: Workspace):
    """The job's folder in state/jobs removed while its batch runs (an operator, a cleaner of old files in a
    state dir kept under /tmp): its requests, manifest and index (what joins results to inputs) are gone, so
    it cannot be finished. Its fetch failed at every poll, forever, and the job never ended; it is now
    delivered failed with error code spool_removed, and the daemon goes on with the next job."""
    import shutil

    workspace.configure(settle_seconds=0, job_seconds=2, poll_interval=0.2, poll_max_interval=1)
    daemon = workspace.start("run")
    try:
        workspace.drop("lost.toml", TRANSLATE)
        workspace.wait_for(lambda: [job["state"] for job in workspace.status()] == ["submitted"], timeout=60,
                           what="the job submitted")
        for spool in (workspace.state / "jobs").iterdir():
            shutil.rmtree(spool)
        lost = workspace.wait_for_delivery("lost")
        workspace.drop("next.toml", SENTIMENT)
        workspace.wait_for_delivery("next")
        assert daemon.poll() is None
    finally:
        assert daemon.stop() == 0, daemon.output()[-3000:]
    assert lost.state == "failed" and lost.summary["error"]["code"] == "spool_removed", lost.summary
    assert "was removed while it ran" in lost.summary["error"]["message"]
    assert "failed to organize" not in daemon.output()  # not the task's fault
    assert workspace.outbox_folder("next").state == "succeeded"
