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

A daemon's fsyncs may be made together (:class:`SyncGroup`): one ``syncfs(2)`` before the journal's
next commit stands for every fsync its steps deferred, and fails as they would have.

``BATCHD_FS_FAULT=<step>:<ERRNO>`` (e.g. ``outbox:ENOSPC``, ``results:EIO``) makes the step's writes
fail as if the disk said so, for the fault tests: ``ENOSPC`` as a full disk, ``EROFS`` as a read-only
filesystem, ``EIO`` as a failed fsync. With ``BATCHD_FS_FAULT_WHILE=<path>`` the fault lasts only while that file exists, the way a
filler file holds a real disk full: delete it and there is "space" again.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import sqlite3
import sys
import threading
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
    "sync",      # the steps' files made durable together before a commit (SyncGroup)
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


def fsync(fd: int, path: Path | str, step: str | None = None, *, deferrable: bool = True) -> None:
    """``os.fsync(fd)`` of ``path``'s file; with a ``step``, a failure is classified (see the module).

    Disk full raises ``OSError`` naming ``path`` (the caller's step is retried); anything else raises
    :class:`StorageFailure`. Without a step (the emulator, command-line tools), errors pass as they are.
    While a :class:`SyncGroup` of the file's filesystem is open, a step's fsync is left to the group's
    next :meth:`~SyncGroup.sync`, unless not ``deferrable``: what the caller does next needs it on disk
    first (a link made durable before the old name goes).
    """
    try:
        fault_point(step, path)
        groups = _deferred_to(fd) if step is not None and deferrable else ()
        for group in groups:
            group.note()
        if not groups:
            os.fsync(fd)
    except OSError as error:
        if step is None:
            raise
        if is_disk_full(error):
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise StorageFailure(step, path, error) from error


# -- syncing together ---------------------------------------------------------------------------------

#: (major, minor) of the first Linux whose syncfs(2) reports writeback errors (before, it says nothing).
SYNCFS_REPORTS_ERRORS = (5, 8)
#: Filesystems whose syncfs writes every file and folder of the filesystem and waits for it (local ones whose
#: sync_fs batchd relies on); on others (FUSE, network and stacked filesystems) each file is fsynced alone.
SYNCFS_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs"})
#: Device → the open sync groups of the filesystem on it (one per daemon running in this process).
_groups_by_device: dict[int, tuple[SyncGroup, ...]] = {}
_groups_lock = threading.Lock()


class SyncGroup:
    """A daemon's fsyncs made together: while the group is open, the fsync of a step's file or folder
    (:func:`fsync`) on the state dir's filesystem is only noted, and one ``syncfs(2)`` of that filesystem
    right before the journal's next commit (``Transactions._make_durable``) stands for all of them.

    What a step writes (a chunk's requests, a fetched chunk's results, an outbox folder) must be on the
    disk before the commit that records it, and nothing trusts it before: a crash before that commit
    leaves the step to be redone from its committed state (docs/design.md, "The steps' files, synced
    together"). So the order of a step's syncs does not matter, only that all of them are done when the
    commit is. An fsync costs a flush of the disk's cache, and a small job's files and folders took a
    dozen. Linux documents that syncfs gives "the same guarantees as fsync() called on every file in the
    filesystem", and reports writeback errors since 5.8: a failure is classified as an fsync's. The
    price: it also writes what other programs left unwritten there (``group_sync = false``).
    """

    def __init__(self, path: Path | str):
        #: A folder on the filesystem synced: the state dir (the inbox and outbox are on the same one).
        self.path = Path(path)
        self.device = os.stat(self.path).st_dev
        self._lock = threading.Lock()
        self._noted = 0  # fsyncs deferred so far
        self._synced = 0  # of those, the ones the last sync made durable
        self._fd: int | None = None  # the state dir's, while open
        #: syncfs calls made.
        self.syncs = 0

    @staticmethod
    def unavailable_because(path: Path | str) -> str | None:
        """Why the files written under ``path`` cannot be synced together here, None if they can: a Linux
        of 5.8 or later (syncfs reports write errors) and a filesystem of :data:`SYNCFS_FILESYSTEMS`."""
        if not sys.platform.startswith("linux") or not hasattr(_libc(), "syncfs"):
            return "this system has no syncfs"
        release = os.uname().release
        try:
            version = tuple(int(part) for part in release.split("-")[0].split(".")[:2])
        except ValueError:
            version = ()
        if version < SYNCFS_REPORTS_ERRORS:
            return (f"the kernel ({release}) is older than Linux {'.'.join(map(str, SYNCFS_REPORTS_ERRORS))}, whose "
                    f"syncfs reports write errors")
        kind = filesystem_type(path)
        if kind not in SYNCFS_FILESYSTEMS:
            return (f"{path} is on a filesystem of type {kind or 'unknown'}, not one whose syncfs batchd relies on "
                    f"({', '.join(sorted(SYNCFS_FILESYSTEMS))})")
        return None

    @classmethod
    def available(cls, path: Path | str) -> bool:
        return cls.unavailable_because(path) is None

    def open(self) -> SyncGroup:
        """From now on the steps' fsyncs on its filesystem are noted for :meth:`sync`."""
        # One descriptor for the group's life: syncfs reports the writeback errors that happened since the
        # descriptor was opened (a background writeback's too, before the sync), not those before.
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        with _groups_lock:
            _groups_by_device[self.device] = (*_groups_by_device.get(self.device, ()), self)
        return self

    def close(self) -> None:
        """The fsyncs on its filesystem are made at once again (once the journal is closed: every commit
        made meanwhile synced what was noted before it)."""
        with _groups_lock:
            left = tuple(group for group in _groups_by_device.get(self.device, ()) if group is not self)
            if left:
                _groups_by_device[self.device] = left
            else:
                _groups_by_device.pop(self.device, None)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SyncGroup:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def note(self) -> None:
        with self._lock:
            self._noted += 1

    def sync(self, step: str = "sync", *, anyway: bool = False) -> bool:
        """Make every fsync noted so far durable with one syncfs (the group is open); False when none was
        noted since the last (and not ``anyway``). A failure raises as :func:`fsync`'s does (disk full: ``OSError``; else
        :class:`StorageFailure`), what was noted left for the next call."""
        with self._lock:
            noted = self._noted
        if noted == self._synced and not anyway:
            return False
        try:
            fault_point(step, self.path)
            if _libc().syncfs(self._fd) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code), str(self.path))
        except OSError as error:
            if is_disk_full(error):
                raise OSError(error.errno, error.strerror, str(self.path)) from error
            raise StorageFailure(step, self.path, error) from error
        self._synced = noted
        self.syncs += 1
        return True


def filesystem_type(path: Path | str) -> str | None:
    """The type of the filesystem ``path`` is on (``ext4``, ``tmpfs``, ``fuse.sshfs`` …), from
    /proc/self/mountinfo: the mount of its device, else the longest mount point above it; None if unknown."""
    try:
        device = os.stat(path).st_dev
        mounts = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace").splitlines()
        resolved = os.path.realpath(path)
    except OSError:
        return None
    wanted = f"{os.major(device)}:{os.minor(device)}"
    longest, kind = -1, None
    for line in mounts:
        fields, _, after = line.partition(" - ")
        fields, after = fields.split(), after.split()
        if len(fields) < 5 or not after:
            continue
        if fields[2] == wanted:
            return after[0]
        # Octal escapes (a space is \040) as the kernel writes mount points.
        point = re.sub(r"\\([0-7]{3})", lambda escape: chr(int(escape[1], 8)), fields[4])
        if (resolved == point or resolved.startswith(point.rstrip("/") + "/")) and len(point) > longest:
            longest, kind = len(point), after[0]
    return kind


def _deferred_to(fd: int) -> tuple[SyncGroup, ...]:
    """The open sync groups of ``fd``'s filesystem (none: it is synced at once)."""
    if not _groups_by_device:
        return ()
    return _groups_by_device.get(os.fstat(fd).st_dev, ())


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


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
