"""Crash-safe filesystem primitives: what batchd writes for someone else to read survives a kill -9
or a power cut at any instant as either the old state or the new one, never a torn file.

- a file is written under a dotfile temp name in its own directory, fsynced, then renamed over its
  final name, and the directory is fsynced ("atomic is not durable": a rename only survives power
  loss once its parent directory is synced);
- moves never overwrite: ``os.rename`` silently replaces an existing target on POSIX, so a file is
  moved with ``link`` + ``unlink`` as Maildir does, and a folder is renamed only into a name checked
  to be absent under the daemon's single-writer lock.

All of this relies on the state dir, the inbox and the outbox sharing one filesystem;
:func:`check_same_filesystem` verifies that at startup. The writers take the daemon's ``step`` (see
:mod:`batchd.fs`): with one, a full disk raises an ``OSError`` naming the file (the step is retried)
and a failed fsync raises :class:`batchd.fs.StorageFailure` (the daemon exits); temp files are
removed either way. The job's outbox folder built on these is :mod:`batchd.outbox`.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from batchd import fs

__all__ = [
    "CrossDeviceError",
    "DirSync",
    "atomic_write",
    "atomic_write_json",
    "check_same_filesystem",
    "durable_move",
    "fsync_dir",
    "json_text",
    "numbered_paths",
    "remove_left_temps",
    "write_temp",
]

COPY_BLOCK = 1 << 20

#: ``os.link`` errors that mean "this filesystem or this file cannot be hard-linked", after
#: which a move falls back to check-then-rename. EPERM is also what Linux returns under
#: ``fs.protected_hardlinks`` for a file another user owns that we cannot write, which a
#: shared inbox can easily contain; renaming it only needs write access to the directories.
_LINK_UNSUPPORTED = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS})


class CrossDeviceError(OSError):
    """Paths that batchd renames between are on different filesystems (EXDEV)."""

    def __init__(self, message: str):
        super().__init__(errno.EXDEV, message)

    def __str__(self) -> str:
        return self.strerror


def fsync_dir(path: Path | str, *, step: str | None = None, deferrable: bool = True) -> None:
    """Make the entries of directory ``path`` (creations, renames, unlinks) durable (``deferrable``: see
    :func:`batchd.fs.fsync`)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fs.fsync(fd, path, step, deferrable=deferrable)
    finally:
        os.close(fd)


def json_text(obj: Any) -> str:
    """The one JSON style of every file batchd writes.

    ``allow_nan=False`` because NaN/Infinity are not JSON: strict readers of the outbox would
    reject the file, so fail while writing instead.
    """
    return json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


#: The longest file name (bytes) most filesystems take (NAME_MAX).
NAME_MAX = 255
#: What a temp name adds to the final one: a leading dot, and ``.<8 hex digits>.tmp``.
_TEMP_NAME_OVERHEAD = 14


def _temp_name(final_name: str) -> str:
    # A dotfile ending in .tmp: inbox scanning and outbox readers skip both patterns, and the
    # random part keeps a leftover from a crashed writer from colliding with the next one. A final
    # name near NAME_MAX is shortened in it (whole characters), or the temp could not be created.
    encoded = final_name.encode("utf-8", "surrogateescape")
    if len(encoded) > NAME_MAX - _TEMP_NAME_OVERHEAD:
        final_name = encoded[:NAME_MAX - _TEMP_NAME_OVERHEAD].decode("utf-8", "ignore") or "x"
    return f".{final_name}.{secrets.token_hex(4)}.tmp"


#: What :func:`_temp_name` makes: ``.<final name>.<8 hex digits>.tmp``.
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


def remove_left_temps(directory: Path) -> list[str]:
    """Remove the temp files a writer killed mid-write left in ``directory`` (only files named as
    :func:`_temp_name` names them); call it while no writer can be at work there (the daemon's lock).
    Returns the names removed."""
    removed = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if _TEMP_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
    return removed


def write_temp(path: Path | str, data: bytes | str | BinaryIO, *, step: str | None = None) -> Path:
    """Write ``data`` to a new fsynced dotfile temp beside ``path`` and return the temp's path.

    ``data`` is bytes, str (encoded as UTF-8) or a binary stream (copied in 1 MiB blocks).
    The caller renames the temp into place, or deletes it.
    """
    path = Path(path)
    tmp = path.with_name(_temp_name(path.name))
    # os.open rather than tempfile.mkstemp: mkstemp forces mode 0600, and files meant for
    # other users must get the usual umask-derived permissions.
    try:
        with fs.naming(path):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as fh:
                if isinstance(data, (bytes, str)):
                    fh.write(data.encode("utf-8") if isinstance(data, str) else data)
                else:
                    shutil.copyfileobj(data, fh, COPY_BLOCK)
                fh.flush()
                fs.fsync(fh.fileno(), path, step)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        fs.unwritable_is_fatal(step, error, path)
        raise
    return tmp


def atomic_write(path: Path | str, data: bytes | str, *, step: str | None = None) -> None:
    """Replace ``path`` with ``data`` (str is encoded as UTF-8) so readers see old or new, never a mix.

    Temp file in the same directory → write → fsync → ``os.replace`` → fsync the directory.
    """
    path = Path(path)
    tmp = write_temp(path, data, step=step)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent, step=step)


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """:func:`atomic_write` of ``obj`` as indented UTF-8 JSON with a trailing newline."""
    atomic_write(path, json_text(obj))


def check_same_filesystem(*paths: Path | str) -> None:
    """Raise :class:`CrossDeviceError` unless all ``paths`` (which must exist) share one filesystem.

    Claims, publishes and quarantines are renames; across filesystems a rename fails with
    EXDEV, and a copy fallback would not be atomic, so the daemon checks this at startup.
    """
    devices = {Path(p): os.stat(p).st_dev for p in paths}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{p} (device {os.major(d)}:{os.minor(d)})" for p, d in devices.items())
        raise CrossDeviceError(
            f"these paths are on different filesystems, but moves between them must be atomic renames: {listing}"
        )


def _same_file(st: os.stat_result, path: Path) -> bool:
    try:
        return os.path.samestat(st, os.lstat(path))
    except FileNotFoundError:
        return False


def _link_no_replace(src: Path, dst: Path, src_stat: os.stat_result) -> bool:
    """Give ``src``'s file the extra name ``dst``; False if the filesystem cannot hard-link it."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        if not _same_file(src_stat, dst):
            raise
        # dst is already src's other name: an earlier move was killed between link and
        # unlink. Finishing that move is the only correct outcome, so carry on.
    except OSError as exc:
        if exc.errno not in _LINK_UNSUPPORTED:
            raise
        return False
    return True


def _rename_if_absent(src: Path, dst: Path) -> None:
    # Check-then-rename is race-free only because the daemon holds the spool's single-writer
    # lock; for a directory it is also needed because rename(2) silently replaces an empty one.
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "refusing to overwrite", str(dst))
    os.rename(src, dst)


#: How a directory's entries are made durable: ``(directory, step=...)``. :func:`fsync_dir` does it
#: at once; the daemon's journal defers it to just before its next commit (``Journal.sync_before_commit``).
DirSync = Callable[..., None]


def durable_move(src: Path | str, dst: Path | str, *, step: str | None = None, sync: DirSync = fsync_dir) -> None:
    """Move ``src`` (file, symlink or directory) to ``dst`` durably, never overwriting.

    Raises ``FileNotFoundError`` if ``src`` is gone, ``FileExistsError`` if ``dst`` exists
    (unless it is the same file left by an interrupted move, which is then completed), and
    :class:`CrossDeviceError` if the two are on different filesystems. Both parent
    directories are synced (by ``sync``: at once unless the caller defers it to the commit
    that records the move); for a linked file the new name is made durable at once, before the
    old one is removed, so at no instant is the file in neither place.
    """
    src = src if isinstance(src, Path) else Path(src)
    dst = dst if isinstance(dst, Path) else Path(dst)
    src_stat = os.lstat(src)
    try:
        fs.fault_point(step, dst)  # where a full directory refuses the new name
        # Directories cannot be hard-linked; they are renamed into an absent name.
        linked = False if stat.S_ISDIR(src_stat.st_mode) else _link_no_replace(src, dst, src_stat)
        dst_parent = dst.parent
        if linked:
            fsync_dir(dst_parent, step=step, deferrable=False)  # the old name goes next
            try:
                _unlink_old_name(src, dst)
            except FileNotFoundError:
                # Someone else removed the old name meanwhile; the file is at dst, which is
                # all this move promises (and the single-writer lock makes this rare).
                pass
        else:
            # One atomic rename: its two directory entries are synced together, later if deferred.
            _rename_if_absent(src, dst)
            sync(dst_parent, step=step)
    except OSError as exc:
        if exc.errno == errno.EXDEV and not isinstance(exc, CrossDeviceError):
            raise CrossDeviceError(f"cannot move {src} to {dst}: they are on different filesystems") from exc
        fs.unwritable_is_fatal(step, exc, dst)
        raise
    src_parent = src.parent
    if linked or src_parent != dst_parent:
        sync(src_parent, step=step)


def link_first(src: Path, dst: Path, *, step: str | None = None) -> bool:
    """The first half of a move made for many files together (a tick's claims): give ``src``'s file the
    extra name ``dst``. True if it now has both (or a move killed between link and unlink left them);
    False if it was not linked, for whatever reason (gone, a folder, no hard links here, a full
    directory): :func:`durable_move` then moves it as usual and meets the error, if any, itself.

    Once the new names are durable (one sync of their folders, or of the filesystem, for all),
    :func:`unlink_old` removes each old one: at no instant is a file in neither place."""
    try:
        src_stat = os.lstat(src)
        if stat.S_ISDIR(src_stat.st_mode):
            return False
        fs.fault_point(step, dst)
        return _link_no_replace(src, dst, src_stat)
    except OSError:
        return False


def unlink_old(src: Path, dst: Path, *, step: str | None = None, sync: DirSync = fsync_dir) -> bool:
    """The second half (see :func:`link_first`), once ``dst`` is durable: remove ``src`` if it is still
    the same file (one dropped in its place meanwhile is a new file, left where it is), its folder synced
    by ``sync``. Whether the file is at ``dst``: False if the new name was removed meanwhile (``src``,
    if still there, is left, so the file is never in neither place)."""
    try:
        dst_stat = os.lstat(dst)
    except FileNotFoundError:
        return False
    try:
        if not _same_file(dst_stat, src):
            return True
        _unlink_old_name(src, dst)
    except FileNotFoundError:
        return True  # removed by someone else meanwhile: the file is at dst, which is all the move promises
    except OSError as exc:
        fs.unwritable_is_fatal(step, exc, src)
        raise
    sync(src.parent, step=step)
    return True


def _unlink_old_name(src: Path, dst: Path) -> None:
    """Remove a linked move's old name ``src``. Where it may not be removed (another user's file in a folder
    with the sticky bit, which the kernel still let this user link), the new name ``dst`` goes again before
    the error is raised: a move that failed leaves the file where it was, with no other name."""
    try:
        os.unlink(src)
    except FileNotFoundError:
        raise
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(dst)
        raise


def numbered_paths(directory: Path, stem: str, suffix: str = "") -> Iterator[Path]:
    """``directory/STEM+SUFFIX``, then ``STEM-2+SUFFIX``, ``STEM-3+SUFFIX``, … without end."""
    yield directory / f"{stem}{suffix}"
    for number in itertools.count(2):
        yield directory / f"{stem}-{number}{suffix}"
