"""Small jobs share remote batches (batchd/daemon/pack.py; docs/design.md, "Packs"): each job still
gets exactly its own results, a cancelled member drops only its share, a refused pack sends its
members alone, a failed one fails them as their own batch would have, and a kill at either pack crash
point delivers every job once without sending any request twice."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sqlite3
from collections import Counter

import pytest
from google.genai import types

from batchd import spool as spool_module
from batchd.config import load_settings
from batchd.daemon import Daemon
from batchd.daemon.crashpoints import ON_PACK
from batchd.daemon.pack import member_of, pack_key
from batchd.journal import Journal, journal_path
from batchd.testing import Workspace
from invariants import Dropped, assert_invariants
from test_cancel import tick_until
from test_daemon import remote_jobs


def small(n: int) -> str:
    """A two-request manifest whose answers say which job they belong to."""
    return f'task = "translate"\ntexts = ["Job {n} first.", "Job {n} second."]\nlanguages = ["French"]\n'


def drop_small(workspace: Workspace, count: int) -> list[Dropped]:
    return [Dropped.of(workspace.drop(f"job{n:02d}.toml", small(n))) for n in range(count)]


def journal_rows(workspace: Workspace, query: str, *args) -> list[tuple]:
    if not journal_path(workspace.state).exists():
        return []  # the daemon is starting
    db = sqlite3.connect(f"file:{journal_path(workspace.state)}?mode=ro", uri=True)
    try:
        return db.execute(query, args).fetchall()
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            return []  # the journal's file is there, its schema not yet committed
        raise
    finally:
        db.close()


def packs(workspace: Workspace) -> dict[str, list[str]]:
    """Pack id → the names of the jobs packed into it."""
    found: dict[str, list[str]] = {}
    for pack_id, name in journal_rows(workspace, "SELECT c.packed_in, j.name FROM chunks c JOIN jobs j ON j.id = c.job_id"
                                                 " WHERE c.packed_in IS NOT NULL ORDER BY j.name"):
        found.setdefault(pack_id, []).append(name)
    return found


def sent_requests(workspace: Workspace) -> int:
    """Requests in the remote batches batchd created and did not find refused: a pack's chunk or a
    job's own, never a member's (whose requests travel in its pack's)."""
    # The chunks naming a remote batch: a job's own, or a pack's with its members (the pack's is the largest).
    return journal_rows(workspace, "SELECT coalesce(sum(requests), 0) FROM (SELECT max(request_count) AS requests"
                                   " FROM chunks WHERE remote_name IS NOT NULL GROUP BY remote_name)")[0][0]


def test_a_pack_key_names_its_member_and_keeps_the_members_own_key():
    assert member_of(pack_key("20261204-abc123", 7, "row/1")) == ("20261204-abc123", 7, "row/1")
    assert member_of("no-separators") is None
    assert member_of("job/x/key") is None
    assert member_of(None) is None


def test_small_jobs_dropped_together_share_remote_batches_and_each_gets_its_own_results(workspace: Workspace):
    dropped = drop_small(workspace, 20)

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    remote = remote_jobs(workspace)
    assert 1 <= len(remote) < 20, f"{len(remote)} remote batches for 20 small jobs"
    assert any(len(members) > 1 for members in packs(workspace).values())
    assert_invariants(workspace, dropped, remote)
    names = {job.name for job in remote}
    packed = {name for members in packs(workspace).values() if len(members) > 1 for name in members}
    for n in range(20):
        folder = workspace.outbox_folder(f"job{n:02d}")
        assert folder.state == "succeeded"
        assert {line["input"]["text"] for line in folder.results} == {f"Job {n} first.", f"Job {n} second."}, \
            "a job got another job's answers"
        batch = folder.summary["remote_batches"][0]
        assert batch["name"] in names
        assert batch.get("shared", False) == (folder.name in packed)
    assert sent_requests(workspace) == 40, "a request was sent twice, or not at all"
    # The packs are batchd's own: not shown as jobs, nor counted in the metrics.
    assert sorted(job["name"] for job in workspace.status()) == [f"job{n:02d}" for n in range(20)]
    journal = Journal(journal_path(workspace.state), readonly=True)
    try:
        totals = journal.totals()
    finally:
        journal.close()
    assert totals["jobs"] == {"done": 20}
    assert totals["requests_total"] == totals["requests_done"] == 40


def a_running_pack(workspace: Workspace) -> list[str]:
    """The names of the jobs of a pack of two or more, once its batch runs."""
    shared = workspace.wait_for(lambda: [m for m in packs(workspace).values() if len(m) > 1], timeout=30,
                                what="a pack of two jobs or more")[0]
    workspace.wait_for(lambda: journal_rows(workspace, "SELECT 1 FROM chunks WHERE packed_in IS NULL AND state ="
                                                       " 'running'"), what="the pack's batch running")
    return shared


def test_a_member_cancelled_while_its_pack_runs_drops_only_its_share(workspace: Workspace):
    workspace.configure(job_seconds=6)
    drop_small(workspace, 3)
    daemon = workspace.start("run")
    try:
        shared = a_running_pack(workspace)
        cancelled, kept = shared[0], shared[1]
        assert workspace.batchd("cancel", cancelled).returncode == 0
        workspace.wait_for(lambda: {cancelled, kept} <= set(workspace.delivered()), what="both delivered")
    finally:
        assert daemon.stop() == 0
    delivered = workspace.delivered()
    assert delivered[cancelled]["state"] == "cancelled"
    assert all(line["status"] == "error" for line in workspace.outbox_folder(cancelled).results)
    assert delivered[kept]["state"] == "succeeded", "the batch it shared was cancelled with the other job"
    remote = {job.name: job for job in remote_jobs(workspace)}
    assert remote[delivered[kept]["remote_batches"][0]["name"]].state == types.JobState.JOB_STATE_SUCCEEDED


def test_a_member_whose_spool_is_removed_while_its_pack_runs_ends_failed_and_the_others_succeed(workspace: Workspace):
    """A member's spool folder removed while the pack's batch runs (an operator, a cleaner of old files): the
    job never ended (not delivered within a minute). It ends failed (spool_removed), as a job sent alone does:
    its index, which joins results to inputs, is gone; the pack's other jobs get their results."""
    workspace.configure(job_seconds=6)
    drop_small(workspace, 3)
    daemon = workspace.start("run")
    try:
        shared = a_running_pack(workspace)
        lost, kept = shared[0], shared[1]
        [(lost_id,)] = journal_rows(workspace, "SELECT id FROM jobs WHERE name = ?", lost)
        shutil.rmtree(workspace.state / "jobs" / lost_id)
        workspace.wait_for(lambda: {lost, kept} <= set(workspace.delivered()), timeout=60, what="both delivered")
        assert daemon.poll() is None
    finally:
        assert daemon.stop() == 0
    delivered = workspace.delivered()
    assert delivered[lost]["state"] == "failed" and delivered[lost]["error"]["code"] == "spool_removed"
    assert delivered[kept]["state"] == "succeeded"


def test_a_pack_whose_jobs_are_all_cancelled_is_cancelled(workspace: Workspace):
    workspace.configure(job_seconds=60)
    drop_small(workspace, 2)
    daemon = workspace.start("run")
    try:
        workspace.wait_for(lambda: journal_rows(workspace, "SELECT 1 FROM chunks WHERE packed_in IS NULL AND state ="
                                                           " 'running'"), timeout=30, what="a remote batch running")
        for name in ("job00", "job01"):
            assert workspace.batchd("cancel", name).returncode == 0
        workspace.wait_for(lambda: {"job00", "job01"} <= set(workspace.delivered()), what="both delivered")
        # The pack is done once its batch has ended: cancelled, with nobody waiting for it.
        workspace.wait_for(lambda: not journal_rows(workspace, "SELECT 1 FROM jobs WHERE state != 'done'"),
                           what="every job done, its packs included")
    finally:
        assert daemon.stop() == 0
    assert {summary["state"] for summary in workspace.delivered().values()} == {"cancelled"}
    assert [job.state for job in remote_jobs(workspace)] == [types.JobState.JOB_STATE_CANCELLED]
    assert not list((workspace.state / "jobs").iterdir()), "a spool was left behind"


def test_a_pack_the_service_refuses_sends_its_jobs_alone(workspace: Workspace):
    # The first create is refused for good (400): with six jobs claimed at once, it is a pack's.
    workspace.configure(faults=["http=400*1@create"])
    dropped = drop_small(workspace, 6)

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    refused = journal_rows(workspace, "SELECT job_id FROM chunks WHERE remote_state = 'rejected'")
    assert len(refused) == 1
    members = journal_rows(workspace, "SELECT job_id, remote_name FROM chunks WHERE packed_in = ?", refused[0][0])
    assert len(members) > 1
    assert len({remote_name for _, remote_name in members}) == len(members), "each was sent alone"
    assert "sending it alone" in result.stderr
    assert {summary["state"] for summary in workspace.delivered().values()} == {"succeeded"}
    assert_invariants(workspace, dropped, remote_jobs(workspace))
    assert sent_requests(workspace) == 12


def test_a_pack_that_fails_fails_its_jobs_as_their_own_batch_would_have(workspace: Workspace):
    workspace.configure(faults=["job-failed@batchd-pack-*"])
    dropped = drop_small(workspace, 6)

    result = workspace.batchd("run", "--once")

    assert result.returncode == 1, result.stderr  # jobs failed
    packed = {name for members in packs(workspace).values() for name in members}
    assert packed
    delivered = workspace.delivered()
    for name in packed:
        assert delivered[name]["state"] == "failed", delivered[name]
        assert delivered[name]["remote_batches"][0]["state"] == "failed"
    assert_invariants(workspace, dropped, remote_jobs(workspace))
    assert sent_requests(workspace) == 12, "a job of the failed pack was sent again"


@pytest.mark.parametrize("point", ON_PACK)
def test_kill_9_at_a_pack_crash_point_delivers_every_job_once_and_sends_nothing_twice(workspace: Workspace,
                                                                                     point: str):
    dropped = drop_small(workspace, 8)

    crashed = workspace.start("run", BATCHD_CRASH_AT=point)
    assert crashed.wait(120) == -signal.SIGKILL, f"never reached {point}:\n{crashed.output()[-2000:]}"

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert {summary["state"] for summary in workspace.delivered().values()} == {"succeeded"}
    remote = remote_jobs(workspace)
    assert_invariants(workspace, dropped, remote)
    live = Counter(job.display_name for job in remote if job.state != types.JobState.JOB_STATE_CANCELLED)
    assert all(count == 1 for count in live.values()), live
    assert sent_requests(workspace) == 16, "a request was sent twice, or not at all"
    assert len(remote) == len(live), "a remote batch was cancelled: something was sent twice"
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in workspace.outbox.iterdir()]
    assert all(s["counts"]["succeeded"] == 2 for s in summaries)


def test_a_members_share_of_the_results_is_kept_in_the_journal_until_its_job_is_done(workspace: Workspace):
    """A member's share of its pack's results is committed with its move to 'fetched', in the journal, not
    written to a file of its own (docs/design.md, "Packs"): a kill before its outbox is published finds it
    there, the restart delivers it, and it is removed in the transaction that finishes the job."""
    dropped = drop_small(workspace, 4)

    crashed = workspace.start("run", BATCHD_CRASH_AT="after-cache-store")
    assert crashed.wait(120) == -signal.SIGKILL, crashed.output()[-2000:]

    shares = journal_rows(workspace, "SELECT j.id, m.records FROM member_results m JOIN jobs j ON j.id = m.job_id")
    assert shares, "no member's share was committed"
    for job_id, records in shares:
        lines = [json.loads(line) for line in records.splitlines()]
        assert len(lines) == 2 and all("response" in line for line in lines), lines
        assert not list((workspace.state / "jobs" / job_id).glob("results-*")), "a share was written to a file"

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert_invariants(workspace, dropped, remote_jobs(workspace))
    summaries = workspace.delivered().values()
    assert len(summaries) == 4 and all(s["state"] == "succeeded" and s["counts"]["succeeded"] == 2 for s in summaries)
    assert journal_rows(workspace, "SELECT count(*) FROM member_results") == [(0,)]


def test_a_small_jobs_build_is_kept_in_the_journal_until_its_job_is_done(workspace: Workspace):
    """A small job is built in memory and its requests and index committed with its chunk, in the journal
    (docs/design.md, "Small jobs"): its spool holds no file of them. A kill once they are sealed into a pack's
    requests file, before the pack commits, finds them there; the restart seals and delivers them from the
    journal, and each is removed in the transaction that finishes its job."""
    dropped = drop_small(workspace, 4)

    crashed = workspace.start("run", BATCHD_CRASH_AT="after-pack-requests")
    assert crashed.wait(120) == -signal.SIGKILL, crashed.output()[-2000:]

    builds = journal_rows(workspace, "SELECT job_id, requests, entries FROM small_builds")
    assert len(builds) == 4, "not every small job's build was committed"
    for job_id, requests, entries in builds:
        keys = [json.loads(line)[0] for line in spool_module.json_lines(entries)]
        assert [json.loads(line)["key"] for line in spool_module.json_lines(requests)] == keys and len(keys) == 2
        assert not [path.name for path in (workspace.state / "jobs" / job_id).iterdir()
                    if path.name.startswith(("index", "requests", ".requests"))], "a small build wrote a file"

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert_invariants(workspace, dropped, remote_jobs(workspace))
    summaries = workspace.delivered().values()
    assert len(summaries) == 4 and all(s["state"] == "succeeded" and s["counts"]["succeeded"] == 2 for s in summaries)
    assert sent_requests(workspace) == 8, "each request was sent once"
    assert journal_rows(workspace, "SELECT count(*) FROM small_builds") == [(0,)]


def test_answers_without_their_keys_in_a_shared_batch_are_never_matched_by_position(workspace: Workspace):
    """Within one job an answer without its key is matched by position, a guess its results mark; in a
    shared batch that guess could hand one job another job's answer, so such answers are errors."""
    workspace.configure(faults=["drop-metadata"])
    dropped = drop_small(workspace, 4)

    workspace.batchd("run", "--once")

    packed = {name for members in packs(workspace).values() if len(members) > 1 for name in members}
    assert packed
    for name in packed:
        results = workspace.outbox_folder(name).results
        assert [line["error"]["code"] for line in results] == ["key_dropped", "key_dropped"]
        assert not any("joined_by" in line for line in results)
    assert_invariants(workspace, dropped, remote_jobs(workspace))


def test_a_pack_that_cannot_be_written_sends_its_jobs_alone_and_only_the_damaged_one_fails(workspace: Workspace,
                                                                                          caplog, monkeypatch):
    """A member's requests file gone unreadable between its build and the seal (its spool tampered
    with): no pack is recorded, the loop goes on, each job goes alone, and only the damaged one fails."""
    monkeypatch.setattr(spool_module, "SMALL_BUILD_BYTES", 0)  # built into files, as a member of 64 KiB or more is
    workspace.configure()
    drop_small(workspace, 2)
    daemon = Daemon(load_settings(workspace.config))
    daemon.start()
    pack = daemon.steps.submit.pack
    free = pack._free
    pack._free = lambda: 0  # no room to send yet: the offers wait
    try:
        tick_until(daemon, lambda: len(pack.offered) == 2, "both small jobs offered")
        (damaged_id, idx), (intact_id, _) = sorted(pack.offered)
        requests = daemon.ctx.spool(damaged_id).requests_path(idx)
        requests.unlink()
        requests.mkdir()  # reading it now fails (IsADirectoryError), as root too
        pack._free = free
        with caplog.at_level(logging.ERROR, logger="batchd"):
            tick_until(daemon, lambda: not daemon.journal.active_jobs(), "both jobs delivered")
        damaged, intact = daemon.journal.job(damaged_id), daemon.journal.job(intact_id)
    finally:
        daemon.close()
        shutil.rmtree(requests, ignore_errors=True)

    assert "could not be written" in caplog.text and "sending them alone" in caplog.text
    assert packs(workspace) == {}, "no pack was recorded"
    assert journal_rows(workspace, "SELECT count(*) FROM jobs WHERE pack = 1") == [(0,)]
    folders = workspace.delivered()
    assert folders[intact.name]["state"] == "succeeded"
    assert folders[damaged.name]["state"] == "failed"
    assert sent_requests(workspace) == 2, "only the intact job's requests were sent"
