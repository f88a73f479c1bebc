"""batchd.fs: the classification of storage errors and the fault switch the disk-fault tests use."""

from __future__ import annotations

import errno
import sqlite3

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
