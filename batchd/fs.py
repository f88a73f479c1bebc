"""Storage faults: which write errors batchd retries, which end the process, and a switch to inject them.

Every write of the daemon's data path goes through :mod:`batchd.outbox`'s primitives, the spool and
the journal, and each of those names the *step* it belongs to (:data:`STEPS`). What a failure means
depends on its kind, never on the job (reliability.md B8, "Filesystem faults"):

- **Disk full** (``ENOSPC``, ``EDQUOT``) while writing a claim, a job's spool (its requests, the
  results it fetched) or its outbox folder is not the job's fault: the step fails, its temp files are
  removed, the journal keeps the job in the state it had, and the daemon backs off and tries the
  step again until there is room (:class:`batchd.backoff.Backoff`, ``Context.disk``). Nothing is fetched or created
  again because of it: results already in the spool stay there.
- **A failed fsync** (``EIO`` or any error other than disk full) is fatal: :class:`StorageFailure`.
  Linux may drop the dirty pages of a failed writeback and mark them clean, so a second fsync would
  "succeed" over lost data (PostgreSQL's fsync-gate, 2018). The step is not marked done; the process
  exits with :data:`EXIT_STORAGE` and the service manager restarts it; recovery then redoes the step
  from its committed state, re-reading everything from disk.
- **A read-only filesystem** (``EROFS``: mounted so, or remounted read-only by the kernel after disk
  errors) is fatal the same way, at start-up too: batchd says so in one line and exits; restarted by
  the service manager, it goes on once it can write again.
- **A journal commit that fails** because the disk is full or the database cannot be written
  (``SQLITE_FULL``, ``SQLITE_IOERR``, ``SQLITE_READONLY``) is fatal too: the commit is the acknowledgement point, and a
  transaction that may or may not have reached the disk cannot be reasoned about by a process that
  goes on. The free-space floor (``min_free_mb``) keeps room for the journal by refusing new
  manifests first.

``BATCHD_FS_FAULT=<step>:<ERRNO>`` (e.g. ``outbox:ENOSPC``, ``results:EIO``) makes the step's writes
fail as if the disk said so, for the fault tests: ``ENOSPC`` as a full disk, ``EROFS`` as a read-only
filesystem, ``EIO`` as a failed fsync. With ``BATCHD_FS_FAULT_WHILE=<path>`` the fault lasts only while that file exists, the way a
filler file holds a real disk full: delete it and there is "space" again.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

#: Steps that write, in data-path order (the names BATCHD_FS_FAULT takes).
STEPS = (
    "claim",     # a manifest (and its input files) moved into its job's spool
    "requests",  # a job's chunk files and index written into its spool
    "results",   # a finished chunk's results downloaded into the spool
    "outbox",    # the job's outbox folder written in the spool's staging folder
    "publish",   # the staging folder renamed into the outbox
    "journal",   # a journal commit
)
#: Exit status after a :class:`StorageFailure` (sysexits.h EX_IOERR): the unit restarts the service.
EXIT_STORAGE = 74
#: Errors that mean "no room now", retried once there is room again.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# SQLite's primary result codes (https://sqlite.org/rescode.html; extended codes keep them in the low byte).
_SQLITE_FULL = 13
_SQLITE_IOERR = 10
_SQLITE_READONLY = 8
_SQLITE_CANTOPEN = 14
_SQLITE_CORRUPT = 11  # a damaged page
_SQLITE_BUSY = 5  # locked by another connection
_SQLITE_NOTADB = 26  # no database at all
#: Errors that mean nothing can be written here at all: retrying the step cannot help.
UNWRITABLE_ERRNOS = frozenset({errno.EROFS})


class StorageFailure(BaseException):
    """A failed fsync or journal commit: the process must end (:data:`EXIT_STORAGE`) and be restarted.

    A BaseException, like SystemExit, so that no handler of a step's ordinary failures (a task
    plugin's, a download's) takes it for one: it must reach the loop (``Context.storage_failure``, see batchd/daemon/context.py).
    """

    def __init__(self, step: str | None, path: Path | str, error: BaseException):
        super().__init__(step, str(path), error)
        self.step = step
        self.path = str(path)
        self.error = error

    def __str__(self) -> str:
        what = {"journal": "committing to the journal"}.get(self.step or "", f"writing {self.path}")
        return f"{what} failed ({describe(self.error)}) during step {self.step or 'unknown'}" + (
            f" [{self.path}]" if self.step == "journal" else "")

    @property
    def read_only(self) -> bool:
        """Whether the filesystem refused every write (``EROFS``, ``SQLITE_READONLY``)."""
        return is_unwritable(self.error) or getattr(self.error, "sqlite_errorcode", 0) & 0xFF == _SQLITE_READONLY


def is_unwritable(error: BaseException) -> bool:
    """Whether ``error`` says nothing can be written there (a read-only filesystem)."""
    return isinstance(error, OSError) and error.errno in UNWRITABLE_ERRNOS


def unwritable_is_fatal(step: str | None, error: BaseException, path: Path | str | None = None) -> None:
    """Raise :class:`StorageFailure` for ``error`` if it says the filesystem is read-only and the write
    belongs to a daemon ``step`` (its ordinary failure handling, a job's or a plugin's, must not take it).
    ``path`` defaults to the file the error names."""
    if step is not None and is_unwritable(error):
        raise StorageFailure(step, path or getattr(error, "filename", None) or "", error) from error


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` says the filesystem has no room (for now)."""
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def describe(error: BaseException) -> str:
    """``ENOSPC: No space left on device`` for an OSError; SQLite's code name and message for its errors."""
    if isinstance(error, OSError) and error.errno:
        return f"{errno.errorcode.get(error.errno, error.errno)}: {error.strerror or os.strerror(error.errno)}"
    if isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorname", None):
        return f"{error.sqlite_errorname}: {error}"
    return f"{type(error).__name__}: {error}"


def is_journal_storage_error(error: BaseException) -> bool:
    """Whether a SQLite error means the database file cannot be written (full disk, I/O error, read-only)."""
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(error, sqlite3.OperationalError) and code is not None:
        return code & 0xFF in (_SQLITE_FULL, _SQLITE_IOERR, _SQLITE_READONLY, _SQLITE_CANTOPEN)
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS | UNWRITABLE_ERRNOS | {errno.EIO}


def is_locked_database(error: BaseException) -> bool:
    """Whether ``error`` is SQLite finding the database locked by another connection (SQLITE_BUSY), past the
    connection's busy timeout."""
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(error, sqlite3.OperationalError) and code is not None and code & 0xFF == _SQLITE_BUSY


def is_damaged_database(error: BaseException) -> bool:
    """Whether ``error`` is SQLite finding a damaged file (a page that is not what it should be, or no
    database at all), not a lock, a full disk or a constraint."""
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(error, sqlite3.DatabaseError) and code is not None and code & 0xFF in (
        _SQLITE_CORRUPT, _SQLITE_NOTADB)


def damage_found(db: sqlite3.Connection) -> str | None:
    """What SQLite's ``quick_check`` finds wrong with ``db``'s file (its first problem, one line), None when
    nothing. Reads every page: for a check on demand (``batchd doctor``, an error to explain), not a step."""
    try:
        verdict = [row[0] for row in db.execute("PRAGMA quick_check(1)")]
    except sqlite3.DatabaseError as error:
        if not is_damaged_database(error):
            raise
        return str(error)
    if verdict == ["ok"]:
        return None
    # e.g. "*** in database main ***\nPage 183: btreeInitPage() returns error code 11": its last line
    return verdict[0].strip().splitlines()[-1]


def fsync(fd: int, path: Path | str, step: str | None = None) -> None:
    """``os.fsync(fd)`` of ``path``'s file; with a ``step``, a failure is classified (see the module).

    Disk full raises ``OSError`` naming ``path`` (the caller's step is retried); anything else raises
    :class:`StorageFailure`. Without a step (the emulator, command-line tools), errors pass as they are.
    """
    try:
        fault_point(step, path)
        os.fsync(fd)
    except OSError as error:
        if step is None:
            raise
        if is_disk_full(error):
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise StorageFailure(step, path, error) from error


#: Errors of writing a file that :func:`naming` names the file in (a buffered write's have no name).
_WRITE_ERRNOS = DISK_FULL_ERRNOS | {errno.EIO, errno.EROFS, errno.EFBIG}


@contextmanager
def naming(path: Path | str) -> Iterator[None]:
    """Give a write error raised inside without a file name (a buffered write's) ``path`` as its name."""
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno in _WRITE_ERRNOS:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def fault_point(step: str | None, path: Path | str) -> None:
    """Fail here if ``BATCHD_FS_FAULT`` names ``step`` (tests only; see the module docstring)."""
    spec = os.environ.get("BATCHD_FS_FAULT")
    if not spec or step is None:
        return
    fault_step, _, name = spec.partition(":")
    if fault_step != step:
        return
    holder = os.environ.get("BATCHD_FS_FAULT_WHILE")
    if holder and not os.path.exists(holder):
        return
    code = getattr(errno, name or "ENOSPC")
    error = OSError(code, os.strerror(code), str(path))
    if code in DISK_FULL_ERRNOS | UNWRITABLE_ERRNOS:
        raise error  # as the OS raises it: the caller classifies it
    raise StorageFailure(step, path, error)


def free_mb(path: Path | str) -> float | None:
    """Megabytes an unprivileged process may still write on ``path``'s filesystem (None: unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize / 1e6
