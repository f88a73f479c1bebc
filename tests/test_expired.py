"""Remote batches that expire (the service did not finish them within 48 h): resubmitted, then given up.

The embedded emulator expires the jobs whose display name matches a fault's glob
(``job-expired@*-c0``): a chunk's first remote job expires, the one created again under the
chunk's next display name (``…-c0-r1``) runs normally. The daemon runs as a real process.
"""

from __future__ import annotations

import json
import signal
from collections import Counter

import pytest
from google import genai
from google.genai import types

from batchd.emulator.server import EmulatorServer
from batchd.journal import Journal, journal_path
from batchd.testing import Workspace

TRANSLATE = """\
task = "translate"
texts = ["Hello, how are you?", "The meeting is at 3 pm."]
languages = ["Spanish", "French"]
"""


def remote_jobs(ws: Workspace) -> list[types.BatchJob]:
    """Every remote job the embedded emulator holds, read through the SDK after the daemon stopped."""
    with EmulatorServer(ws.state / "emulator") as emulator:
        client = genai.Client(api_key="check", http_options=types.HttpOptions(base_url=emulator.base_url))
        return list(client.batches.list(config={"page_size": 50}))


def results(ws: Workspace, name: str) -> list[dict]:
    return [json.loads(line) for line in (ws.outbox / name / "results.jsonl").read_text().splitlines()]


def events_of(ws: Workspace, kind: str) -> list[dict]:
    journal = Journal(journal_path(ws.state), readonly=True)
    try:
        return [e["event"] for e in journal.events() if e["event"]["kind"] == kind]
    finally:
        journal.close()


def test_an_expired_chunk_is_submitted_again_and_the_job_succeeds(workspace: Workspace):
    workspace.configure(faults=["job-expired@*-c0"])
    workspace.drop("translate.toml", TRANSLATE)

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    summary = workspace.delivered()["translate"]
    assert summary["state"] == "succeeded" and summary["counts"]["succeeded"] == 4, summary
    assert "warnings" not in summary
    [batch] = summary["remote_batches"]
    assert batch["display_name"].endswith("-c0-r1") and batch["resubmits"] == 1 and batch["state"] == "succeeded"
    jobs = {job.display_name: job for job in remote_jobs(workspace)}
    assert sorted(jobs) == sorted([batch["display_name"].removesuffix("-r1"), batch["display_name"]])
    expired = jobs[batch["display_name"].removesuffix("-r1")]
    assert expired.state == types.JobState.JOB_STATE_EXPIRED
    assert summary["expired_remote_batches"] == [expired.name]
    assert all(line["status"] == "ok" for line in results(workspace, "translate"))
    [event] = events_of(workspace, "expired")
    assert event["job"] == "translate" and expired.name in event["reason"] and "submitted again" in event["reason"]
    assert event["error"] is None


@pytest.mark.parametrize("resubmits", [0, 1])
def test_a_chunk_that_keeps_expiring_ends_as_expired_errors_with_a_warning(workspace: Workspace, resubmits: int):
    # Two chunks: the first expires every time, the second runs normally. Two globs, not "*-c0*":
    # the job's id (…-c07361) may itself hold "-c0", and then every chunk would match.
    workspace.configure(faults=["job-expired@*-c0", "job-expired@*-c0-r*"], chunk_max_requests=2, resubmit_expired=resubmits)
    workspace.drop("translate.toml", TRANSLATE)

    result = workspace.batchd("run", "--once")

    assert result.returncode == 4, result.stderr  # partial: not failed, but not all done either
    assert "1 job(s) delivered (1 partial)" in result.stderr
    summary = workspace.delivered()["translate"]
    assert summary["state"] == "partial" and summary["counts"] == {"total": 4, "succeeded": 2, "failed": 2}
    lines = results(workspace, "translate")
    expired = [line for line in lines if line["status"] == "error"]
    assert len(expired) == 2 and all(line["error"]["code"] == "expired" for line in expired)
    assert "48 h" in expired[0]["error"]["message"] and f"{resubmits + 1} time" in expired[0]["error"]["message"]
    [warning] = summary["warnings"]
    assert "chunk 0" in warning and "expired" in warning and "resubmit_expired" in warning
    names = Counter(job.display_name.rsplit("-c", 1)[1] for job in remote_jobs(workspace)
                    if job.state == types.JobState.JOB_STATE_EXPIRED)
    assert names == Counter({"0": 1, **({"0-r1": 1} if resubmits else {})})
    kinds = [event["error"] for event in events_of(workspace, "expired")]
    assert len(kinds) == resubmits + 1 and kinds[-1]["code"] == "expired" and all(k is None for k in kinds[:-1])


def test_every_request_expiring_fails_the_job(workspace: Workspace):
    workspace.configure(faults=["job-expired"], resubmit_expired=1)
    workspace.drop("translate.toml", TRANSLATE)

    result = workspace.batchd("run", "--once")

    assert result.returncode == 1, result.stderr
    summary = workspace.delivered()["translate"]
    assert summary["state"] == "failed" and "expired" in summary["warnings"][0]
    assert summary["error"]["code"] == "requests_failed" and "all 4 requests failed (expired" in summary["error"]["message"]
    assert all(line["error"]["code"] == "expired" for line in results(workspace, "translate"))
    assert len(remote_jobs(workspace)) == 2


@pytest.mark.parametrize("mode", ["inline", "file"])
@pytest.mark.parametrize("point", ["after-resubmit-intent", "after-resubmit-create"])
def test_kill_9_while_resubmitting_leaves_one_live_remote_job_and_delivers_once(workspace: Workspace, point: str,
                                                                              mode: str):
    workspace.configure(faults=["job-expired@*-c0"], **({"inline_max_bytes": 0} if mode == "file" else {}))
    workspace.drop("translate.toml", TRANSLATE)

    crashed = workspace.start("run", BATCHD_CRASH_AT=point)
    assert crashed.wait(120) == -signal.SIGKILL, f"the daemon did not reach crash point {point}"
    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    delivered = workspace.delivered()
    assert list(delivered) == ["translate"] and delivered["translate"]["state"] == "succeeded", delivered
    assert not list(workspace.inbox.iterdir())
    jobs = remote_jobs(workspace)
    live = Counter(job.display_name for job in jobs if job.state not in (
        types.JobState.JOB_STATE_CANCELLED, types.JobState.JOB_STATE_EXPIRED))
    assert len(live) == 1 and all(count == 1 for count in live.values()), live
    [resubmitted] = live
    assert resubmitted.endswith("-c0-r1")
    assert [job.state for job in jobs if job.display_name == resubmitted.removesuffix("-r1")] == [
        types.JobState.JOB_STATE_EXPIRED]
    assert len(events_of(workspace, "expired")) == 1  # the restart found the resubmission, did not decide again


def test_a_journal_from_before_resubmissions_gains_the_chunks_column(tmp_path):
    import sqlite3

    from batchd.journal.schema import SCHEMA

    path = tmp_path / "journal.db"
    old_schema = SCHEMA.replace("    resubmits     INTEGER NOT NULL DEFAULT 0,  -- times it was submitted again "
                                "after its remote job expired\n", "")
    assert "resubmits" not in old_schema.split("CREATE TABLE IF NOT EXISTS remote_jobs")[0]
    with sqlite3.connect(path) as db:
        db.executescript(old_schema)
        db.execute("INSERT INTO jobs (id, name, source, state, created_at, updated_at)"
                   " VALUES ('old', 'old', 'old.toml', 'submitted', 1, 1)")
        db.execute("INSERT INTO chunks (job_id, idx, display_name, mode, request_count, byte_size, state)"
                   " VALUES ('old', 0, 'batchd-old-old-c0', 'inline', 2, 10, 'running')")

    journal = Journal(path)
    try:
        [chunk] = journal.chunks("old")
        assert chunk.resubmits == 0
        journal.resubmit_chunk(chunk, "batchd-old-old-c0-r1")
        [chunk] = journal.chunks("old")
        assert (chunk.state, chunk.resubmits, chunk.display_name) == ("built", 1, "batchd-old-old-c0-r1")
    finally:
        journal.close()
