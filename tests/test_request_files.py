"""The life cycle of the requests files batchd uploads to the Files API for file chunks.

Each is recorded in the journal (``chunks.uploaded_file``) before ``batches.create``, reused when a
chunk is created again, and deleted once the chunk's batch has ended and its results are fetched.
Everything goes through the real google-genai SDK to an emulator on 127.0.0.1: the daemon as a real
process where crashes are the subject, in-process where one branch of the re-create is set up exactly.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
import urllib.request
from pathlib import Path

import pytest
from google.genai import types

from batchd.config import load_settings
from batchd.daemon import Daemon
from batchd.daemon.naming import upload_display_name
from batchd.journal import journal_path
from batchd.encoding import RequestEncoder
from batchd.provider import Provider
from batchd.testing import Emulator, Workspace
from test_daemon import SENTIMENT, TRANSLATE

#: Every chunk is uploaded as a file; two requests a chunk, so translate has two and sentiment two.
FILE_CHUNKS = {"provider": "gemini", "inline_max_requests": 0, "chunk_max_requests": 2}
MODEL = "gemini-2.5-flash"


def stats(emulator: Emulator) -> dict:
    with urllib.request.urlopen(f"{emulator.base_url}/_emulator/stats") as answer:
        return json.load(answer)


def request_files(emulator: Emulator) -> dict[str, str]:
    """The uploaded files the service holds, name → display name (results files are GENERATED)."""
    return {f.name: f.display_name for f in emulator.client().files.list(config={"page_size": 100})
            if f.source == types.FileSource.UPLOADED}


def chunk_rows(ws: Workspace) -> list[dict]:
    db = sqlite3.connect(f"file:{journal_path(ws.state)}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in db.execute("SELECT * FROM chunks ORDER BY job_id, idx")]
    finally:
        db.close()


def drop_jobs(ws: Workspace) -> None:
    ws.drop("translate.toml", TRANSLATE)
    ws.drop("sentiment.toml", SENTIMENT)


def assert_delivered_once_and_tidy(ws: Workspace, emulator: Emulator) -> None:
    """Both jobs delivered, succeeded; one upload and one create per chunk; no request file left."""
    delivered = ws.delivered()
    assert set(delivered) == {"translate", "sentiment"}, delivered
    assert all(summary["state"] == "succeeded" for summary in delivered.values()), delivered
    chunks = chunk_rows(ws)
    assert len(chunks) == 4 and all(c["mode"] == "file" for c in chunks)
    counts = stats(emulator)
    for chunk in chunks:
        assert counts["createsByDisplayName"].get(chunk["display_name"]) == 1, counts
        assert counts["uploadsByDisplayName"].get(upload_display_name(chunk["display_name"])) == 1, counts
        assert chunk["uploaded_file"] and chunk["upload_state"] == "deleted", chunk
    assert request_files(emulator) == {}


def test_a_file_job_leaves_no_request_file_on_the_service(workspace: Workspace, emulator: Emulator, daemon):
    workspace.configure(**FILE_CHUNKS)
    drop_jobs(workspace)

    run = daemon.run_once(emulator=emulator)

    assert run.returncode == 0, run.stderr
    assert_delivered_once_and_tidy(workspace, emulator)
    # The recorded names are the files the creates used (and the only uploads there were).
    assert stats(emulator)["routes"]["upload-start"] == 4
    assert "deleted files/" in run.stderr


def test_with_delete_request_files_off_they_are_left_to_expire(workspace: Workspace, emulator: Emulator, daemon):
    workspace.configure(**FILE_CHUNKS, delete_request_files=False)
    drop_jobs(workspace)

    run = daemon.run_once(emulator=emulator)

    assert run.returncode == 0, run.stderr
    chunks = chunk_rows(workspace)
    assert {c["upload_state"] for c in chunks} == {"kept"}
    assert set(request_files(emulator)) == {c["uploaded_file"] for c in chunks}
    assert "file-delete" not in stats(emulator)["routes"]


@pytest.mark.parametrize("point", ["after-upload", "after-create"])
def test_killed_around_a_create_the_restart_uploads_nothing_again_and_leaves_nothing(
        workspace: Workspace, emulator: Emulator, daemon, point: str):
    """after-upload: the file is on the service, its name not recorded: the restart finds it by its
    display name and creates the batch from it. after-create: the name is recorded and the batch
    exists: reconcile adopts it. Either way: one upload, one create, one delivery, nothing left."""
    workspace.configure(**FILE_CHUNKS)
    drop_jobs(workspace)
    env = daemon._emulator_env(emulator)

    crashed = workspace.start("run", BATCHD_CRASH_AT=point, **env)
    assert crashed.wait(120) == -signal.SIGKILL, crashed.output()[-3000:]
    if point == "after-upload":
        orphans = [c for c in chunk_rows(workspace) if c["upload_state"] == "uploading" and not c["uploaded_file"]]
        assert orphans, "the killed upload's chunk records no file"
        # Other chunks' uploads may have been under way too (and not reached the service): the one
        # whose upload finished, the kill's, is on the service under its display name, recorded nowhere.
        on_service = set(request_files(emulator).values())
        assert any(upload_display_name(c["display_name"]) in on_service for c in orphans)

    run = daemon.run_once(emulator=emulator)

    assert run.returncode == 0, run.stderr
    assert_delivered_once_and_tidy(workspace, emulator)


@pytest.mark.parametrize("fault, outcome", [
    ("job-failed", "failed"),    # the batch ends FAILED, no results
    ("job-expired", "failed"),   # EXPIRED, no results
    ("http=400@create", "failed"),  # the create is refused: the upload is all there is
])
def test_a_batch_that_ends_without_results_has_its_request_file_deleted_too(
        workspace: Workspace, tmp_path: Path, daemon, fault: str, outcome: str):
    with Emulator(tmp_path / "service", faults=[fault]) as emulator:
        workspace.configure(**{**FILE_CHUNKS, "chunk_max_requests": 4})
        workspace.drop("translate.toml", TRANSLATE)

        run = daemon.run_once(emulator=emulator)

        assert workspace.delivered()["translate"]["state"] == outcome, run.stderr
        assert stats(emulator)["uploadsByDisplayName"], "the chunk went as a file"
        assert request_files(emulator) == {}
        assert [c["upload_state"] for c in chunk_rows(workspace)] == ["deleted"]


def test_an_expired_file_chunk_is_resubmitted_from_its_upload_and_leaves_no_request_file(
        workspace: Workspace, tmp_path: Path, daemon):
    """The first remote job expires (``job-expired@*-c0``); the chunk is created again as ``-c0-r1``
    from the requests file its first attempt uploaded (the same bytes, still on the service), and
    that one file is deleted once the chunk is done."""
    with Emulator(tmp_path / "service", faults=["job-expired@*-c0"]) as emulator:
        workspace.configure(**{**FILE_CHUNKS, "chunk_max_requests": 4})
        workspace.drop("translate.toml", TRANSLATE)

        run = daemon.run_once(emulator=emulator)

        assert run.returncode == 0, run.stderr
        summary = workspace.delivered()["translate"]
        assert summary["state"] == "succeeded" and summary["counts"]["succeeded"] == 4, summary
        [chunk] = chunk_rows(workspace)
        assert chunk["display_name"].endswith("-c0-r1") and chunk["resubmits"] == 1, chunk
        assert chunk["mode"] == "file" and chunk["upload_state"] == "deleted", chunk
        first_attempt = chunk["display_name"].removesuffix("-r1")
        counts = stats(emulator)
        assert counts["createsByDisplayName"] == {first_attempt: 1, chunk["display_name"]: 1}, counts
        assert counts["uploadsByDisplayName"] == {upload_display_name(first_attempt): 1}, counts
        assert "(uploaded before)" in run.stderr
        assert request_files(emulator) == {}


def test_a_cancelled_job_has_its_request_files_deleted(workspace: Workspace, tmp_path: Path, daemon):
    with Emulator(tmp_path / "service", faults=["stuck-pending"]) as emulator:
        workspace.configure(**FILE_CHUNKS)
        workspace.drop("translate.toml", TRANSLATE)
        process = daemon.start(emulator=emulator)
        workspace.wait_for(lambda: len(request_files(emulator)) == 2 and len(chunk_rows(workspace)) == 2
                           and all(c["state"] == "running" for c in chunk_rows(workspace)),
                           what="both chunks running")
        assert workspace.batchd("cancel", "translate").returncode == 0
        workspace.wait_for(lambda: "translate" in workspace.delivered(), what="cancelled job delivered")
        workspace.wait_for(lambda: not request_files(emulator), what="request files deleted")
        assert process.stop() == 0
        assert workspace.delivered()["translate"]["state"] == "cancelled"


def test_a_create_sent_again_reuses_the_recorded_upload(workspace: Workspace, tmp_path: Path, daemon):
    """The first create fails with a 503 (nothing created, but batchd cannot know): after the grace
    period the chunk is created again, from the file it recorded (files.get says it is still there)."""
    with Emulator(tmp_path / "service", faults=["503*1@create"]) as emulator:
        workspace.configure(**{**FILE_CHUNKS, "chunk_max_requests": 4})
        workspace.drop("translate.toml", TRANSLATE)

        run = daemon.run_once(emulator=emulator)

        assert run.returncode == 0, run.stderr
        counts = stats(emulator)
        [chunk] = chunk_rows(workspace)
        assert counts["routes"]["create"] == 2, "the refused create, and the one made again"
        assert counts["uploadsByDisplayName"] == {upload_display_name(chunk["display_name"]): 1}
        assert counts["routes"]["file-get"] >= 1
        assert workspace.delivered()["translate"]["state"] == "succeeded"
        assert request_files(emulator) == {}


def test_a_failing_delete_is_retried_and_never_fails_the_job(workspace: Workspace, tmp_path: Path, daemon):
    """Two 500s: the SDK's read retries carry the delete through. The job is delivered either way."""
    with Emulator(tmp_path / "service", faults=["500*2@file-delete"]) as emulator:
        workspace.configure(**{**FILE_CHUNKS, "chunk_max_requests": 4})
        workspace.drop("translate.toml", TRANSLATE)

        run = daemon.run_once(emulator=emulator)

        assert run.returncode == 0, run.stderr
        assert workspace.delivered()["translate"]["state"] == "succeeded"
        assert stats(emulator)["routes"]["file-delete"] == 3
        assert request_files(emulator) == {}
        assert [c["upload_state"] for c in chunk_rows(workspace)] == ["deleted"]


@pytest.mark.slow  # an edge case; the slow step runs it
def test_a_delete_that_keeps_failing_is_left_for_a_later_round(workspace: Workspace, tmp_path: Path, daemon):
    """Every retry of the first round fails: the job is still delivered; the next start deletes the file."""
    with Emulator(tmp_path / "service", faults=["500*5@file-delete"]) as emulator:
        workspace.configure(**{**FILE_CHUNKS, "chunk_max_requests": 4})
        workspace.drop("translate.toml", TRANSLATE)

        first = daemon.run_once(emulator=emulator)

        assert first.returncode == 0, first.stderr
        assert workspace.delivered()["translate"]["state"] == "succeeded"
        [chunk] = chunk_rows(workspace)
        assert chunk["upload_state"] == "uploaded"
        assert set(request_files(emulator)) == {chunk["uploaded_file"]}

        second = daemon.run_once(emulator=emulator)

        assert second.returncode == 0, second.stderr
        assert request_files(emulator) == {}
        assert [c["upload_state"] for c in chunk_rows(workspace)] == ["deleted"]


# -- the re-create's upload stage, set up exactly (in-process, on the embedded emulator) -------------


@pytest.fixture
def inproc(workspace: Workspace):
    """A started daemon whose journal holds one file chunk with its create intent committed long ago."""
    workspace.configure(provider="emulator", inline_max_requests=0, submit_grace_seconds=0)
    daemon = Daemon(load_settings(workspace.config))
    daemon.start()
    journal = daemon.journal
    journal.add_job("j1", name="again", source="again.toml", state="building")
    spool = daemon.ctx.spool("j1")
    spool.root.mkdir(parents=True)
    line = RequestEncoder(MODEL).jsonl_line("k", "hi") + "\n"
    spool.requests_path(0).write_text(line)
    journal.add_chunk("j1", {"idx": 0, "display_name": "batchd-again-j1-c0", "mode": "file",
                             "request_count": 1, "byte_size": len(line)})
    journal.update_job("j1", state="built", task="translate", model=MODEL)
    journal.update_chunk("j1", 0, state="submitting", intent_at=time.time() - 60)
    try:
        yield daemon
    finally:
        daemon.close()


def created_again(daemon: Daemon):
    """Reconcile (no remote job: the chunk is created again) and run the submission to its end."""
    daemon.steps.monitor.poll()
    assert daemon.steps.submit.submissions.running
    while daemon.steps.submit.submissions.running:
        for submission in list(daemon.steps.submit.submissions.running.values()):
            submission.future.result(timeout=30)
        daemon.steps.submit.collect()
    chunk = daemon.journal.chunks("j1")[0]
    assert chunk.state == "running"
    return chunk


def upload_copy(daemon: Daemon) -> str:
    provider: Provider = daemon.provider
    return provider.upload_jsonl(daemon.ctx.spool("j1").requests_path(0), "batchd-again-j1-c0-requests").name


def files_named(daemon: Daemon, display_name: str) -> list[str]:
    return sorted(f.name for f in daemon.provider.list_files() if f.display_name == display_name)


def test_a_recorded_upload_the_service_no_longer_has_is_uploaded_again(inproc: Daemon):
    inproc.journal.update_chunk("j1", 0, uploaded_file="files/expired0000", upload_state="uploaded")

    chunk = created_again(inproc)

    assert chunk.uploaded_file != "files/expired0000" and chunk.upload_state == "uploaded"
    assert files_named(inproc, "batchd-again-j1-c0-requests") == [chunk.uploaded_file]


def test_copies_nobody_recorded_are_found_by_display_name_one_reused_the_rest_deleted(inproc: Daemon):
    """Killed between upload and record, twice: two copies under the chunk's upload display name."""
    older, newer = upload_copy(inproc), upload_copy(inproc)
    inproc.journal.update_chunk("j1", 0, upload_state="uploading")

    chunk = created_again(inproc)

    assert (chunk.uploaded_file, chunk.upload_state) == (newer, "uploaded")
    assert files_named(inproc, "batchd-again-j1-c0-requests") == [newer]
    assert inproc.provider.get_file(older) is None


def test_killed_after_a_resubmission_intent_the_earlier_attempts_upload_is_reused(inproc: Daemon):
    """An expired chunk's resubmission intent was committed (``uploading``, next display name) and the
    daemon was killed: its first attempt's file, under that attempt's upload display name, is reused
    rather than left behind while a second copy is uploaded under the new name."""
    first = upload_copy(inproc)
    inproc.journal.update_chunk("j1", 0, display_name="batchd-again-j1-c0-r1", resubmits=1,
                                uploaded_file=first, upload_state="uploading")

    chunk = created_again(inproc)

    assert (chunk.uploaded_file, chunk.upload_state) == (first, "uploaded")
    assert files_named(inproc, "batchd-again-j1-c0-r1-requests") == []
    assert files_named(inproc, "batchd-again-j1-c0-requests") == [first]


def test_a_job_cancelled_while_its_requests_upload_is_never_created_and_its_upload_goes(inproc: Daemon):
    chunk = inproc.journal.chunks("j1")[0]
    inproc.steps.submit.start(inproc.journal.job("j1"), chunk)
    next(iter(inproc.steps.submit.submissions.running.values())).future.result(timeout=30)
    inproc.journal.update_job("j1", cancel_requested=1)

    inproc.steps.submit.collect()

    chunk = inproc.journal.chunks("j1")[0]
    assert not inproc.steps.submit.submissions.running, "no create was sent"
    assert (chunk.state, chunk.upload_state) == ("skipped", "uploaded") and chunk.uploaded_file
    assert not [j for j in inproc.provider.list_jobs() if j.display_name == "batchd-again-j1-c0"]
    inproc.steps.uploads.tidy()
    inproc.steps.uploads.rounds.futures()[0].result(timeout=30)
    inproc.steps.uploads.tidy()
    assert inproc.journal.chunks("j1")[0].upload_state == "deleted"
    assert inproc.provider.get_file(chunk.uploaded_file) is None


def test_finished_chunks_copies_are_all_deleted_by_display_name(inproc: Daemon):
    """A finished chunk whose transfer was retried: the recorded file and the unrecorded copy both go."""
    recorded, stray = upload_copy(inproc), upload_copy(inproc)
    inproc.journal.update_chunk("j1", 0, state="fetched", remote_state="succeeded", uploaded_file=recorded,
                                upload_state="uploading")

    inproc.steps.uploads.tidy()
    inproc.steps.uploads.rounds.futures()[0].result(timeout=30)
    inproc.steps.uploads.tidy()  # collects the round

    assert inproc.journal.chunks("j1")[0].upload_state == "deleted"
    assert files_named(inproc, "batchd-again-j1-c0-requests") == []
    assert inproc.journal.uploads_to_delete() == []


def test_a_transfer_retried_after_its_answer_was_lost_says_so(tmp_path: Path):
    """The first upload is finalized but its answer comes too late for the client: the retry makes
    a second copy, and the attempts tell the caller that a copy it has no name for may exist."""
    from batchd.provider import RetryPolicy

    path = tmp_path / "r.jsonl"
    path.write_text(RequestEncoder(MODEL).jsonl_line("k", "hi") + "\n")
    with Emulator(tmp_path / "service", faults=["late=3*1@upload-chunk"]) as emulator, \
            Provider(api_key=emulator.api_key, base_url=emulator.base_url, timeout_s=1,
                     retry=RetryPolicy(attempts=3, initial_delay=0.01)) as provider:
        uploaded = provider.upload_jsonl(path, "lost-answer")
        assert uploaded.attempts == 2
        copies = [f.name for f in provider.list_files() if f.display_name == "lost-answer"]
        assert uploaded.name in copies and len(copies) == 2


def test_provider_files_calls_through_the_sdk(emulator: Emulator, tmp_path: Path):
    path = tmp_path / "r.jsonl"
    path.write_text(RequestEncoder(MODEL).jsonl_line("k", "hi") + "\n")
    with Provider(api_key=emulator.api_key, base_url=emulator.base_url) as provider:
        uploaded = provider.upload_jsonl(path, "provider-files")
        assert uploaded.attempts == 1
        found = provider.get_file(uploaded.name)
        assert (found.display_name, found.size_bytes, found.usable) == ("provider-files", path.stat().st_size, True)
        assert [f.name for f in provider.list_files(page_size=1) if f.display_name == "provider-files"] == [uploaded.name]
        assert provider.delete_file(uploaded.name) is True
        assert provider.delete_file(uploaded.name) is False, "already gone counts as done"
        assert provider.get_file(uploaded.name) is None



def test_a_journal_from_before_upload_states_gains_the_column(tmp_path: Path):
    from batchd.journal import Journal
    from batchd.journal.schema import SCHEMA

    path = tmp_path / "journal.db"
    old_schema = "\n".join(line for line in SCHEMA.splitlines() if not line.split()[:1] == ["upload_state"])
    with sqlite3.connect(path) as db:
        db.executescript(old_schema)
        db.execute("INSERT INTO jobs (id, name, source, state, created_at, updated_at)"
                   " VALUES ('old', 'old', 'old.toml', 'done', 1, 1)")
        db.execute("INSERT INTO chunks (job_id, idx, display_name, mode, request_count, byte_size, state)"
                   " VALUES ('old', 0, 'batchd-old-c0', 'file', 1, 10, 'fetched')")
        assert "upload_state" not in {row[1] for row in db.execute("PRAGMA table_info(chunks)")}

    journal = Journal(path)
    try:
        assert journal.chunks("old")[0].upload_state is None
        assert journal.uploads_to_delete() == [], "a file recorded by no one is not looked for"
        journal.update_chunk("old", 0, uploaded_file="files/abc", upload_state="uploaded")
        assert [c.uploaded_file for c in journal.uploads_to_delete()] == ["files/abc"]
        journal.set_upload_states({("old", 0): "deleted"})
        assert journal.uploads_to_delete() == []
    finally:
        journal.close()


def test_a_journal_from_before_upload_states_and_the_stray_watch_gains_both(tmp_path: Path):
    from batchd.journal import Journal
    from batchd.journal.schema import SCHEMA

    path = tmp_path / "journal.db"
    old_schema = "\n".join(line for line in SCHEMA.splitlines()
                           if line.split()[:1] != ["upload_state"] and "of a duplicate found" not in line
                           and not line.strip().startswith("-- accepted)"))
    old_schema = old_schema.replace("role          TEXT NOT NULL,", "role          TEXT NOT NULL")
    for table in ("watched_names", "done_totals"):  # tables that came later
        start = old_schema.index(f"CREATE TABLE IF NOT EXISTS {table}")
        old_schema = old_schema[:start] + old_schema[old_schema.index(");", start) + 2:]
    with sqlite3.connect(path) as db:
        db.executescript(old_schema)
        db.execute("INSERT INTO jobs (id, name, source, state, created_at, updated_at)"
                   " VALUES ('old', 'old', 'old.toml', 'done', 1, 1)")
        db.execute("INSERT INTO chunks (job_id, idx, display_name, mode, request_count, byte_size, state)"
                   " VALUES ('old', 0, 'batchd-old-c0', 'file', 1, 10, 'fetched')")
        db.execute("INSERT INTO remote_jobs VALUES ('batches/a', 'old', 0, 'batchd-old-c0', 'adopted')")
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "watched_names" not in tables and "done_totals" not in tables
        assert "upload_state" not in {row[1] for row in db.execute("PRAGMA table_info(chunks)")}
        assert "outcome" not in {row[1] for row in db.execute("PRAGMA table_info(remote_jobs)")}

    journal = Journal(path)
    try:
        assert journal.chunks("old")[0].upload_state is None
        assert journal.remote_job("batches/a")["outcome"] is None
        journal.update_chunk("old", 0, uploaded_file="files/abc", upload_state="uploaded")
        assert [c.uploaded_file for c in journal.uploads_to_delete()] == ["files/abc"]
        journal.watch_name("old", 0, "batchd-old-c0", 100.0)
        assert list(journal.watched_names()) == ["batchd-old-c0"]
        journal.set_remote_outcome("batches/a", "cancelled")
        assert journal.remote_jobs_with_outcome("cancelled")[0]["remote_name"] == "batches/a"
        assert journal.totals()["jobs"] == {"done": 1} and journal.totals()["requests_total"] == 1  # summed once
    finally:
        journal.close()


def test_the_lookup_of_request_files_to_delete_does_not_walk_every_finished_chunk(tmp_path: Path):
    """``uploads_to_delete`` runs on every tick that wrote. Finished chunks pile up by the thousand and
    nearly none holds a request file: the lookup reads the partial index of those that do, so its cost
    does not grow with the rest (measured in SQLite's VM steps, which do not depend on the machine)."""
    from batchd.journal import Journal

    def vm_steps_with_finished_chunks(count: int) -> int:
        path = tmp_path / f"journal-{count}.db"
        Journal(path).close()
        with sqlite3.connect(path) as db:
            db.execute("INSERT INTO jobs (id, name, source, state, created_at, updated_at)"
                       " VALUES ('old', 'old', 'old.toml', 'done', 1, 1)")
            db.executemany("INSERT INTO chunks (job_id, idx, display_name, mode, request_count, byte_size, state,"
                           " upload_state) VALUES ('old', ?, ?, 'file', 1, 10, 'fetched', ?)",
                           [(n, f"batchd-old-c{n}", "uploaded" if n == 0 else "deleted") for n in range(count)])
        journal = Journal(path)
        steps = []
        try:
            journal._db.set_progress_handler(lambda: steps.append(1), 10)
            assert [c.idx for c in journal.uploads_to_delete()] == [0]
        finally:
            journal.close()
        return len(steps)

    assert vm_steps_with_finished_chunks(5000) < 2 * vm_steps_with_finished_chunks(10) + 5


def test_remote_batches_waiting_for_their_deletion_are_bounded_in_the_journal_too(inproc: Daemon, monkeypatch,
                                                                                   caplog):
    """Past BATCHES_WAITING (a service refusing deletes for days while jobs are delivered) the oldest are
    left listed, as every batch was before: dropped from the journal as from memory, said in one line,
    so neither grows with the jobs delivered meanwhile."""
    import batchd.daemon.uploads

    monkeypatch.setattr(batchd.daemon.uploads, "BATCHES_WAITING", 3)
    monkeypatch.setattr(inproc.settings, "delete_finished_batches", True)  # (off in the tests' config)
    uploads, journal = inproc.steps.uploads, inproc.journal
    for n in range(5):
        with journal.group():  # as a delivery's transition: committed with it, waiting once it is
            uploads.batches_done([f"batches/b{n}", ""])
    assert len(journal.batches_to_delete()) == 5
    with caplog.at_level("WARNING", logger="batchd"), journal.group():
        uploads.tidy()  # (no round: a job is on its way and none has waited long)
    assert [name for name, _ in journal.batches_to_delete()] == ["batches/b2", "batches/b3", "batches/b4"]
    assert "3 remote batches wait for their deletion already: 2 older ones are left listed" in caplog.text
