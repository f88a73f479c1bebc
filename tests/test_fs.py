"""batchd.fs: the classification of storage errors and the fault switch the disk-fault tests use."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import tempfile
from pathlib import Path

import pytest

from batchd import durable, fs, outbox
from batchd.backoff import Backoff
from batchd.journal import Journal


def test_a_full_disk_during_an_atomic_write_names_the_file_and_leaves_no_temp(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHD_FS_FAULT", "outbox:ENOSPC")
    target = tmp_path / "summary.json"
    with pytest.raises(OSError) as raised:
        durable.atomic_write(target, "{}", step="outbox")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert fs.is_disk_full(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_fsync_is_a_storage_failure_that_no_except_exception_catches(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHD_FS_FAULT", "outbox:EIO")
    folder = outbox.JobFolder(tmp_path / "staging")
    with pytest.raises(fs.StorageFailure) as raised:
        try:
            folder.write_json("summary.json", {})
        except Exception:  # what a step's own error handling would do
            pytest.fail("a failed fsync was handled as an ordinary error")
    assert raised.value.step == "outbox"
    assert "EIO: Input/output error" in str(raised.value) and "summary.json" in str(raised.value)


def test_without_a_step_nothing_is_injected_and_errors_pass_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHD_FS_FAULT", "outbox:EIO")
    durable.atomic_write(tmp_path / "x", "written")  # the emulator and the CLI use no step
    assert (tmp_path / "x").read_text() == "written"


def test_the_fault_lasts_only_while_its_filler_exists(tmp_path, monkeypatch):
    filler = tmp_path / "filler"
    filler.touch()
    monkeypatch.setenv("BATCHD_FS_FAULT", "results:ENOSPC")
    monkeypatch.setenv("BATCHD_FS_FAULT_WHILE", str(filler))
    with pytest.raises(OSError):
        fs.fault_point("results", tmp_path / "r")
    fs.fault_point("outbox", tmp_path / "r")  # another step is untouched
    filler.unlink()
    fs.fault_point("results", tmp_path / "r")


def test_a_journal_commit_on_a_full_disk_is_a_storage_failure_and_commits_nothing(tmp_path, monkeypatch):
    journal = Journal(tmp_path / "journal.db")
    monkeypatch.setenv("BATCHD_FS_FAULT", "journal:ENOSPC")
    with pytest.raises(fs.StorageFailure) as raised:
        journal.add_job("j1", name="a", source="a.toml")
    assert raised.value.step == "journal"
    monkeypatch.delenv("BATCHD_FS_FAULT")
    assert journal.job("j1") is None
    journal.add_job("j1", name="a", source="a.toml")  # the connection is usable again
    assert journal.job("j1").state == "claiming"
    journal.close()


def test_sqlite_full_and_ioerr_are_journal_storage_errors_others_are_not():
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13
    ioerr = sqlite3.OperationalError("disk I/O error")
    ioerr.sqlite_errorcode = 10 | (3 << 8)  # SQLITE_IOERR_WRITE
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = 5
    assert fs.is_journal_storage_error(full) and fs.is_journal_storage_error(ioerr)
    assert not fs.is_journal_storage_error(locked)


def test_disk_backoff_doubles_up_to_its_maximum_and_resets_on_success():
    backoff = Backoff(initial=1.0, maximum=4.0)
    assert not backoff.waiting()
    assert [backoff.failed() for _ in range(4)] == [1.0, 2.0, 4.0, 4.0]
    assert backoff.waiting()
    assert backoff.succeeded() and not backoff.waiting()
    assert not backoff.succeeded()
    assert backoff.failed() == 1.0


# -- syncing together (fs.SyncGroup) --------------------------------------------------------------------

needs_syncfs = pytest.mark.skipif(not fs.SyncGroup.available(tempfile.gettempdir()), reason="syncfs reports errors on Linux 5.8 and later")


def counting_fsyncs(monkeypatch) -> list[str]:
    """The names of the files and folders os.fsync is called on from now on."""
    synced: list[str] = []
    real_fsync = fs.os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(f"/proc/self/fd/{fd}").readlink().name)
        real_fsync(fd)

    monkeypatch.setattr(fs.os, "fsync", fsync)
    return synced


@needs_syncfs
def test_while_a_sync_group_is_open_its_filesystems_step_fsyncs_wait_for_one_syncfs(tmp_path, monkeypatch):
    synced = counting_fsyncs(monkeypatch)
    with fs.SyncGroup(tmp_path) as group:
        folder = outbox.JobFolder(tmp_path / "staging")
        folder.write_json("summary.json", {"state": "succeeded"})
        folder.sync()
        durable.atomic_write(tmp_path / "requests.jsonl", "{}\n", step="requests")
        assert synced == [] and group.syncs == 0  # noted, not synced
        assert json.loads((tmp_path / "staging" / "summary.json").read_text()) == {"state": "succeeded"}
        assert group.sync() is True and group.syncs == 1
        assert group.sync() is False and group.syncs == 1  # nothing noted since
        assert group.sync(anyway=True) is True and group.syncs == 2  # folders to sync: one syncfs for them too
    durable.atomic_write(tmp_path / "other.json", "{}", step="outbox")  # closed: synced at once again
    assert group.syncs == 2 and len(synced) == 2 and synced[0].startswith(".other.json.") and synced[1] == tmp_path.name


@needs_syncfs
def test_what_must_be_on_disk_at_once_is_synced_at_once_while_a_group_is_open(tmp_path, monkeypatch):
    """A file linked to its new name is durable there before its old name goes (durable_move); a write
    with no step (the emulator's, the CLI's) is no step's to defer; nor is one on another filesystem."""
    (tmp_path / "inbox").mkdir()
    (tmp_path / "spool").mkdir()
    (tmp_path / "inbox" / "a.toml").write_text("task = 'translate'\n")
    synced = counting_fsyncs(monkeypatch)
    with fs.SyncGroup(tmp_path) as group:
        durable.durable_move(tmp_path / "inbox" / "a.toml", tmp_path / "spool" / "a.toml", step="claim")
        assert synced == ["spool"]  # before the unlink from the inbox (whose own sync waits for the commit)
        durable.atomic_write(tmp_path / "notes.json", "{}")
        assert len(synced) == 3 and synced[2] == tmp_path.name
        elsewhere = Path("/dev/shm")
        if elsewhere.is_dir() and os.stat(elsewhere).st_dev != group.device:
            with tempfile.TemporaryDirectory(dir=elsewhere) as other:
                durable.atomic_write(Path(other) / "results.jsonl", "{}\n", step="results")
            assert len(synced) == 5
    assert (tmp_path / "spool" / "a.toml").exists() and not (tmp_path / "inbox" / "a.toml").exists()


@needs_syncfs
def test_two_groups_of_one_filesystem_each_sync_what_was_written_since_their_last(tmp_path):
    """Two daemons of one process (tests run several): each commit of either must find the other's files
    no less durable, so a deferred fsync is noted in both."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with fs.SyncGroup(tmp_path / "a") as first, fs.SyncGroup(tmp_path / "b") as second:
        durable.atomic_write(tmp_path / "a" / "x.json", "{}", step="outbox")
        assert first.sync() and not first.sync()
        assert second.sync() and not second.sync()


def test_the_filesystems_whose_syncfs_is_relied_on_are_told_by_their_type(tmp_path):
    """Local filesystems whose syncfs writes every file; elsewhere (proc here stands for a FUSE or network
    one) each file is fsynced alone, and the reason names the type."""
    assert fs.filesystem_type("/proc") == "proc"
    reason = fs.SyncGroup.unavailable_because("/proc")
    assert reason is not None and "type proc" in reason and "ext4" in reason
    if Path("/dev/shm").is_dir():
        assert fs.filesystem_type("/dev/shm") == "tmpfs"
    kind = fs.filesystem_type(tmp_path)
    assert kind is not None and kind == fs.filesystem_type(tmp_path.parent)  # the mount's, not the folder's


@needs_syncfs
def test_a_deferred_fsync_meets_the_faults_an_fsync_would(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHD_FS_FAULT", "outbox:EIO")
    with fs.SyncGroup(tmp_path), pytest.raises(fs.StorageFailure) as raised:
        outbox.JobFolder(tmp_path / "staging").write_json("summary.json", {})
    assert raised.value.step == "outbox"


@needs_syncfs
def test_a_failed_syncfs_is_classified_as_an_fsync_and_what_it_was_to_sync_waits_for_the_next(tmp_path, monkeypatch):
    with fs.SyncGroup(tmp_path) as group:
        durable.atomic_write(tmp_path / "results.jsonl", "{}\n", step="results")
        monkeypatch.setenv("BATCHD_FS_FAULT", "sync:ENOSPC")
        with pytest.raises(OSError) as raised:
            group.sync()
        assert fs.is_disk_full(raised.value) and raised.value.filename == str(tmp_path)
        monkeypatch.setenv("BATCHD_FS_FAULT", "sync:EIO")
        with pytest.raises(fs.StorageFailure) as failed:
            group.sync()
        assert failed.value.step == "sync" and group.syncs == 0
        monkeypatch.delenv("BATCHD_FS_FAULT")
        assert group.sync() is True and group.syncs == 1
