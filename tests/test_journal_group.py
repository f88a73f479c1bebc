"""Group commit (batchd.journal.Journal.group): a tick's transitions commit together, and no effect
runs before the transition that announced it is committed (docs/design.md, "One commit per tick")."""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from batchd import durable, fs
from batchd.journal import Job, Journal, journal_path
from batchd.journal.rows import replace_row
from batchd.states import IllegalMove


@pytest.fixture()
def journal(tmp_path: Path):
    journal = Journal(tmp_path / "journal.sqlite3")
    yield journal
    journal.close()


def committed_states(path: Path) -> dict[str, str]:
    """Job states as another process sees them: only what is committed."""
    reader = Journal(path, readonly=True)
    try:
        return {job.id: job.state for job in reader.jobs()}
    finally:
        reader.close()


def add(journal: Journal, job_id: str) -> None:
    journal.add_job(job_id, name=job_id, source=f"{job_id}.toml")


def test_a_groups_transitions_commit_at_its_end_and_its_effects_run_after_in_order(journal: Journal):
    seen: list[tuple[str, dict]] = []

    def effect(name: str):
        return lambda: seen.append((name, committed_states(journal.path)))

    with journal.group():
        add(journal, "a")
        journal.after_commit(effect("start a"))
        add(journal, "b")
        journal.update_job("a", state="received")
        journal.after_commit(effect("start b"))
        assert committed_states(journal.path) == {}, "nothing is committed before the group ends"
        assert journal.job("a").state == "received", "the loop reads its own transitions meanwhile"
        assert seen == []

    both = {"a": "received", "b": "claiming"}
    assert seen == [("start a", both), ("start b", both)]


def test_a_failed_transition_in_a_group_is_undone_alone(journal: Journal):
    with journal.group():
        add(journal, "a")
        with pytest.raises(Exception):
            journal.update_job("a", state="published")  # not a state: refused
        with pytest.raises(Exception):
            add(journal, "a")  # the same id twice
        add(journal, "b")
    assert committed_states(journal.path) == {"a": "claiming", "b": "claiming"}


def test_a_transition_of_one_write_takes_no_savepoint_and_one_of_more_is_undone_whole(journal: Journal):
    statements: list[str] = []
    with journal.group():
        add(journal, "a")
        journal._db.set_trace_callback(statements.append)
        journal.update_job("a", state="received")  # one UPDATE: atomic by itself
        assert not [s for s in statements if "SAVEPOINT" in s], statements
        with pytest.raises(KeyError):
            # The UPDATE runs, then its event (no id) fails: the savepoint undoes the UPDATE too.
            journal.update_job("a", state="building", events=[{"kind": "accepted"}])
        journal._db.set_trace_callback(None)
        assert journal.job("a").state == "received"
    assert committed_states(journal.path) == {"a": "received"}


def test_flush_commits_mid_group_and_runs_what_waited(journal: Journal):
    ran = []
    with journal.group():
        add(journal, "a")
        journal.after_commit(lambda: ran.append(committed_states(journal.path)))
        journal.flush()
        assert ran == [{"a": "claiming"}]
        add(journal, "b")
        assert committed_states(journal.path) == {"a": "claiming"}
    assert committed_states(journal.path) == {"a": "claiming", "b": "claiming"}


def test_after_commit_outside_a_group_runs_at_once_or_after_the_open_transaction(journal: Journal):
    ran = []
    journal.after_commit(lambda: ran.append("now"))
    assert ran == ["now"]
    with journal.transaction() as db:
        db.execute("INSERT INTO jobs (id, name, source, state, created_at, updated_at)"
                   " VALUES ('a', 'a', 'a.toml', 'claiming', 0, 0)")
        journal.after_commit(lambda: ran.append(committed_states(journal.path)))
        assert ran == ["now"]
    assert ran == ["now", {"a": "claiming"}]


def test_an_error_in_a_group_keeps_what_completed_and_runs_its_effects(journal: Journal):
    ran = []
    with pytest.raises(KeyError):
        with journal.group():
            add(journal, "a")
            journal.after_commit(lambda: ran.append("effect"))
            raise KeyError("a step failed after its transition")
    assert committed_states(journal.path) == {"a": "claiming"}
    assert ran == ["effect"]


def test_a_group_the_database_refuses_commits_nothing_and_drops_its_effects(journal: Journal, monkeypatch):
    ran = []
    monkeypatch.setenv("BATCHD_FS_FAULT", "journal:EIO")  # the commit fails as on a dying disk
    with pytest.raises(fs.StorageFailure):
        with journal.group():
            add(journal, "a")
            journal.after_commit(lambda: ran.append("effect"))
    monkeypatch.delenv("BATCHD_FS_FAULT")
    assert committed_states(journal.path) == {}
    assert ran == []
    add(journal, "b")  # the journal is usable again
    assert committed_states(journal.path) == {"b": "claiming"}


def test_only_the_groups_thread_may_write_while_it_is_open(journal: Journal):
    errors = []

    def write_from_a_worker():
        try:
            add(journal, "w")
        except RuntimeError as error:
            errors.append(error)

    with journal.group():
        add(journal, "a")
        worker = threading.Thread(target=write_from_a_worker)
        worker.start()
        worker.join()
    assert len(errors) == 1 and "only by the thread" in str(errors[0])
    assert committed_states(journal.path) == {"a": "claiming"}


def test_a_directory_synced_for_the_group_is_synced_once_before_its_commit(journal: Journal, tmp_path: Path,
                                                                            monkeypatch):
    """A burst of moves into one folder (claims from the inbox, folders published to the outbox)
    costs one fsync of it a tick, and that fsync precedes the commit that records the moves."""
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    outbox.mkdir()
    synced: list[tuple[str, dict]] = []
    real_fsync = fs.os.fsync

    def watching_fsync(fd: int) -> None:
        name = Path(f"/proc/self/fd/{fd}").readlink()
        if name in (inbox, outbox):
            synced.append((name.name, committed_states(journal.path)))
        real_fsync(fd)

    add(journal, "a")
    add(journal, "b")
    monkeypatch.setattr(fs.os, "fsync", watching_fsync)
    with journal.group():
        for job_id in ("a", "b"):
            journal.update_job(job_id, state="received")
            journal.sync_before_commit(inbox, step="claim")
            journal.sync_before_commit(outbox, step="publish")
        assert synced == []  # deferred to the commit
    assert [name for name, _ in synced] == ["inbox", "outbox"]
    assert all(states == {"a": "claiming", "b": "claiming"} for _, states in synced)  # before the commit
    assert committed_states(journal.path) == {"a": "received", "b": "received"}
    journal.sync_before_commit(inbox, step="claim")  # outside a group: at once
    assert [name for name, _ in synced] == ["inbox", "outbox", "inbox"]


def test_a_directory_that_cannot_be_synced_keeps_the_groups_transitions_uncommitted(journal: Journal, tmp_path: Path,
                                                                                     monkeypatch):
    """If the moves cannot be made durable, the transitions recording them must not commit."""
    add(journal, "a")
    monkeypatch.setenv("BATCHD_FS_FAULT", "claim:EIO")
    with pytest.raises(fs.StorageFailure):
        with journal.group():
            journal.update_job("a", state="received")
            journal.sync_before_commit(tmp_path, step="claim")
    assert committed_states(journal.path) == {"a": "claiming"}


def test_a_full_disk_at_the_deferred_sync_leaves_the_group_to_commit_with_the_next_one(journal: Journal,
                                                                                      tmp_path: Path, monkeypatch):
    """Disk full is a pause, not a failure: the tick's transitions stay uncommitted and their effects
    unrun, and the next group syncs the folder, commits them and runs the effects."""
    add(journal, "a")
    ran: list[str] = []
    monkeypatch.setenv("BATCHD_FS_FAULT", "claim:ENOSPC")
    with pytest.raises(OSError) as raised:
        with journal.group():
            journal.update_job("a", state="received")
            journal.sync_before_commit(tmp_path, step="claim")
            journal.after_commit(lambda: ran.append("effect"))
    assert fs.is_disk_full(raised.value)
    assert committed_states(journal.path) == {"a": "claiming"} and ran == []
    monkeypatch.delenv("BATCHD_FS_FAULT")
    with journal.group():
        pass
    assert committed_states(journal.path) == {"a": "received"} and ran == ["effect"]


def test_the_loops_per_tick_reads_are_kept_only_while_nothing_is_written(journal: Journal):
    """count_jobs and the other per-tick reads are answered from memory while this connection wrote no
    row; a write, a rolled-back write and another process's journal are always read afresh."""
    assert journal.count_jobs(["received"]) == 0
    journal.add_job("j1", name="one", source="one.toml", state="received")
    assert journal.count_jobs(["received"]) == 1, "a write makes the next read fresh"
    assert [job.id for job in journal.jobs(states=("received",))] == ["j1"]

    with pytest.raises(RuntimeError), journal.transaction() as db:
        db.execute("UPDATE jobs SET state = 'done' WHERE id = 'j1'")
        assert journal.count_jobs(["received"]) == 0, "the transition sees its own write"
        raise RuntimeError("undone")
    assert journal.count_jobs(["received"]) == 1, "the rollback undid the write: read again"

    reader = Journal(journal.path, readonly=True)
    try:
        assert reader.count_jobs(["received"]) == 1
        with journal.transaction() as db:
            db.execute("UPDATE jobs SET state = 'done' WHERE id = 'j1'")
        assert reader.count_jobs(["received"]) == 0, "another process's writes are always seen"
    finally:
        reader.close()
    assert journal.count_jobs(["received"]) == 0 and journal.jobs(states=("received",)) == []


def test_the_writer_keeps_jobs_it_read_until_it_writes_them_and_forgets_them_on_a_rollback(journal: Journal):
    """Journal.job and jobs_by_id answer from memory what the writer read before (each query costs the
    loop a wait for the GIL); a write of the job, or any rollback, makes the next read go to the database."""
    add(journal, "a")
    assert journal.job("a").state == "claiming"
    journal.update_job("a", state="received")
    assert journal.job("a").state == "received", "a write drops what was kept"
    assert [job.state for job in journal.jobs_by_id(["a"])] == ["received"]
    with journal.group():
        journal.update_job("a", state="building")
        with pytest.raises(RuntimeError):
            with journal.transaction():
                journal.update_job("a", task="x")
                assert journal.job("a").task == "x"  # kept inside the transition that is rolled back
                raise RuntimeError("the transition fails")
        assert journal.job("a").task is None and journal.job("a").state == "building"
    assert journal.job("a").state == "building"
    # A reader never keeps jobs: another process writes them.
    reader = Journal(journal.path, readonly=True)
    try:
        assert reader.job("a").state == "building"
        journal.update_job("a", state="built")
        assert reader.job("a").state == "built"
    finally:
        reader.close()


def test_the_writer_keeps_a_job_as_its_own_update_left_it_and_reads_the_same_as_a_fresh_reader(journal: Journal,
                                                                                               monkeypatch):
    """After an UPDATE through the writer, Journal.job answers without a query, and what it answers is
    what a read of the row returns: JSON columns decoded (secrets masked as stored), flags as bools."""
    import batchd.logs

    monkeypatch.setattr(batchd.logs, "_secrets", {"AIzaSyA0123456789abcdefghijklmnopqrstuvw"})
    statements: list[str] = []
    add(journal, "a")
    journal.job("a")
    reader = Journal(journal.path, readonly=True)
    journal._db.set_trace_callback(statements.append)
    try:
        updates = [
            {"state": "received", "approved": 1, "hold": "over budget, key AIzaSyA0123456789abcdefghijklmnopqrstuvw"},
            {"cost": {"estimate": {"cost": 0.5, "currency": "USD"}}, "spend": 0.5, "admitted_at": 12.5},
            {"state": "building", "chunk_limits": {"max_requests": 10, "max_bytes": 100}},
            {"cancel_requested": 1, "error": {"message": "key AIzaSyA0123456789abcdefghijklmnopqrstuvw", "n": (1, 2)}},
            {"state": "built", "build_stopped": True, "hold": None},
        ]
        for fields in updates:
            journal.update_job("a", **fields)
            statements.clear()
            kept = journal.job("a")
            assert not [s for s in statements if s.startswith("SELECT")], "answered from memory"
            assert kept == reader.job("a")
            assert type(kept.state) is str and type(kept.cancel_requested) is bool
        assert "AIza" not in str(kept.error) and kept.error["n"] == [1, 2]
        with pytest.raises(IllegalMove):
            journal.update_job("a", state="done")  # a move the tables forbid: nothing kept, nothing written
        assert journal.job("a") == reader.job("a") and journal.job("a").state == "built"
    finally:
        journal._db.set_trace_callback(None)
        reader.close()


def test_the_writer_keeps_a_jobs_chunks_as_it_writes_them_and_forgets_them_on_a_rollback(journal: Journal):
    """chunks, chunk, built_chunks and chunk_totals answer from memory what the writer read before, and
    what its writes of the job's chunks made of it; a chunk added, a write of several jobs' chunks at
    once, or any rollback makes the next read go to the database."""
    statements: list[str] = []
    journal._db.set_trace_callback(statements.append)

    def reads() -> int:
        count = sum(1 for s in statements if s.startswith("SELECT") and "FROM chunks" in s)
        statements.clear()
        return count

    add(journal, "a")
    for idx in range(2):
        journal.add_chunk("a", {"idx": idx, "display_name": f"a-c{idx}", "mode": "inline", "request_count": 3,
                                "byte_size": 10})
    assert [c.state for c in journal.chunks("a")] == ["built", "built"] and reads() == 1
    journal.update_chunk("a", 1, state="submitting")
    assert journal.chunk("a", 1).state == "submitting" and reads() == 0, "a write updates what was kept"
    assert [c.idx for c in journal.built_chunks("a", 5)] == [0] and reads() == 0
    for _ in range(2):
        journal.chunks("a").clear()  # a caller's list is its own, read or kept
    assert len(journal.chunks("a")) == 2 and reads() == 0
    assert journal.chunk("a", 1).state == "submitting" and journal.chunk("a", 5) is None
    assert journal.chunk_totals("a") == {"chunks": 2, "requests": 6, "built": 1, "submitting": 1}
    assert reads() == 0, "answered from memory"
    with journal.group():
        with pytest.raises(RuntimeError):
            with journal.transaction():
                journal.update_chunk("a", 0, state="submitting")
                assert journal.chunks("a")[0].state == "submitting"  # read (and kept) inside the transition
                raise RuntimeError("the transition fails")
        assert journal.chunk_totals("a")["built"] == 1 and journal.chunks("a")[0].state == "built"
    for state in ("received", "building", "built"):
        journal.update_job("a", state=state)
    journal.add_pack("p", name="pack", model="m", chunk={"display_name": "p-c0", "request_count": 3, "byte_size": 10},
                     members=[journal.chunk("a", 0)])
    assert journal.chunk("a", 0).state == "packed" and journal.chunk("a", 0).packed_in == "p"
    assert journal.chunks("a")[1].upload_state is None
    journal.set_upload_states({("a", 1): "uploaded"})
    assert journal.chunk("a", 1).upload_state == "uploaded"
    journal._db.set_trace_callback(None)
    reader = Journal(journal.path, readonly=True)  # a reader never keeps chunks: another process writes them
    try:
        assert reader.chunks("a")[1].state == "submitting"
        journal.update_chunk("a", 1, state="running")
        assert reader.chunks("a")[1].state == "running"
    finally:
        reader.close()


def test_the_chunks_the_writer_keeps_are_bounded_in_all(journal: Journal, monkeypatch):
    import batchd.journal.kept

    monkeypatch.setattr(batchd.journal.kept, "KEPT_CHUNKS", 5)
    monkeypatch.setattr(batchd.journal.kept, "KEPT_CHUNKS_PER_JOB", 3)
    kept = journal.kept_rows
    counts = [2, 2, 4, 3, 1, 2]  # the job of 4 is over the per-job bound: never kept

    def kept_count() -> int:
        return sum(len(kept.chunks(f"j{n}") or ()) for n in range(len(counts)))

    for n, count in enumerate(counts):
        add(journal, f"j{n}")
        for idx in range(count):
            journal.add_chunk(f"j{n}", {"idx": idx, "display_name": f"j{n}-c{idx}", "mode": "inline",
                                        "request_count": 1, "byte_size": 1})
        assert len(journal.chunks(f"j{n}")) == count
        assert kept_count() == kept.chunk_count <= 5
        assert (kept.chunks(f"j{n}") is not None) is (count <= 3)
    journal.update_chunk("j5", 0, state="submitting")
    assert kept.chunks("j5")[0].state == "submitting" and kept.chunk_count == kept_count() <= 5


def test_a_chunk_the_writer_wrote_is_kept_as_a_read_returns_it(journal: Journal, monkeypatch):
    """After an UPDATE of a chunk through the writer, the job's kept chunks are what a read returns: JSON
    columns decoded (secrets masked as stored), the flag a bool, the state a plain string; a move the
    tables forbid keeps nothing of it."""
    import batchd.logs

    monkeypatch.setattr(batchd.logs, "_secrets", {"AIzaSyA0123456789abcdefghijklmnopqrstuvw"})
    add(journal, "a")
    for idx in range(2):
        journal.add_chunk("a", {"idx": idx, "display_name": f"a-c{idx}", "mode": "inline", "request_count": 1,
                                "byte_size": 1})
    journal.chunks("a")
    reader = Journal(journal.path, readonly=True)
    statements: list[str] = []
    journal._db.set_trace_callback(statements.append)
    try:
        updates = [
            {"state": "submitting", "intent_at": 3.5},
            {"state": "running", "remote_name": "batches/1", "remote_state": "JOB_STATE_PENDING",
             "stats": {"total": 1, "note": "key AIzaSyA0123456789abcdefghijklmnopqrstuvw"}},
            {"cancel_sent": 1},
            {"state": "fetched", "remote_state": "JOB_STATE_FAILED", "stats": None,
             "error": {"message": "key AIzaSyA0123456789abcdefghijklmnopqrstuvw", "n": (1, 2)}},
        ]
        for fields in updates:
            journal.update_chunk("a", 1, **fields)
            statements.clear()
            kept = journal.chunks("a")
            assert not [s for s in statements if s.startswith("SELECT")], "answered from memory"
            assert kept == reader.chunks("a")
            assert type(kept[1].state) is str and type(kept[1].cancel_sent) is bool
        assert "AIza" not in str(kept[1].error) and kept[1].error["n"] == [1, 2] and kept[1].stats == {}
        with pytest.raises(IllegalMove):
            journal.update_chunk("a", 0, state="fetched")  # built → fetched: refused, nothing kept of it
        assert journal.chunks("a") == reader.chunks("a") and journal.chunk("a", 0).state == "built"
    finally:
        journal._db.set_trace_callback(None)
        reader.close()


def test_rows_made_and_replaced_without_their_init_equal_those_the_dataclass_makes(tmp_path):
    """job_from_row / chunk_from_row and replace_row skip the frozen dataclasses' __init__ (the loop makes
    thousands a second): what they make equals, and hashes as, what the dataclass would, and a field
    name that is not one is refused as dataclasses.replace refuses it."""
    journal = Journal(journal_path(tmp_path))
    try:
        journal.add_job("j1", name="one", source="one.toml", state="received")
        journal.add_chunk("j1", {"idx": 0, "display_name": "batchd-one-j1-c0", "mode": "inline",
                                 "request_count": 2, "byte_size": 100})
        job, [chunk] = journal.job("j1"), journal.chunks("j1")
        values = {field.name: getattr(job, field.name) for field in dataclasses.fields(Job)}
        assert job == Job(**values) and hash(job) == hash(Job(**values))
        assert replace_row(job, state="building", hold="x") == dataclasses.replace(job, state="building", hold="x")
        assert replace_row(chunk, state="built") == dataclasses.replace(chunk, state="built")
        assert job.state == "received", "the row replaced is left as it was"
        # As small as the dataclass's own: a burst keeps thousands (a dict filled anew took three times the room).
        for made, own in ((job, Job(**values)), (replace_row(job, state="building"), Job(**values)),
                          (chunk, dataclasses.replace(chunk))):
            assert sys.getsizeof(made.__dict__) <= sys.getsizeof(own.__dict__) + 16
        with pytest.raises(TypeError, match="no fields"):
            replace_row(job, no_such_field=1)
    finally:
        journal.close()


@pytest.mark.skipif(not fs.SyncGroup.available(tempfile.gettempdir()), reason="syncfs reports errors on Linux 5.8 and later")
def test_a_commit_first_makes_what_the_steps_wrote_durable_with_one_syncfs(tmp_path: Path, monkeypatch):
    """Every commit, a group's or a transition's alone, is preceded by one syncfs when a step deferred an
    fsync since the last or a folder is to be synced (the syncfs stands for both: one filesystem)."""
    seen: list[dict] = []

    class WatchedGroup(fs.SyncGroup):
        def sync(self, step: str = "sync", *, anyway: bool = False) -> bool:
            synced = super().sync(step, anyway=anyway)
            if synced:
                seen.append(committed_states(journal.path))
            return synced

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    synced_at_once = []
    real_fsync = fs.os.fsync
    monkeypatch.setattr(fs.os, "fsync", lambda fd: (synced_at_once.append(fd), real_fsync(fd)))
    with WatchedGroup(tmp_path) as group:
        journal = Journal(tmp_path / "journal.sqlite3", sync_group=group)
        try:
            add(journal, "a")
            add(journal, "b")
            assert group.syncs == 0  # nothing written by a step yet
            durable.atomic_write(tmp_path / "a-results.jsonl", "{}\n", step="results")
            with journal.group():
                journal.update_job("a", state="received")
                journal.sync_before_commit(inbox, step="claim")
            assert seen == [{"a": "claiming", "b": "claiming"}]  # synced before the commit
            assert committed_states(journal.path)["a"] == "received"
            with journal.group():
                journal.update_job("b", state="received")
            assert group.syncs == 1  # nothing written, no folder to sync: no syncfs
            durable.atomic_write(tmp_path / "b-results.jsonl", "{}\n", step="results")
            journal.update_job("a", state="building")  # a transition alone: synced first as well
            assert group.syncs == 2 and seen[-1]["a"] == "received"
            assert synced_at_once == []
        finally:
            journal.close()
