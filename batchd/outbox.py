"""Crash-safe filesystem primitives and the writer of a job's outbox folder.

Everything batchd puts on disk for someone else to read goes through here, so that a
``kill -9`` or a power cut at any instant leaves either the old state or the new one,
never a torn file:

- a file is written under a dotfile temp name in its own directory, fsynced, then renamed
  over its final name, and the directory is fsynced ("atomic is not durable": a rename only
  survives power loss once its parent directory is synced);
- a job's outbox folder is built whole in a staging directory on the same filesystem and
  appears in the outbox with one directory rename (:class:`JobFolder`);
- moves never overwrite: ``os.rename`` silently replaces an existing target on POSIX, so a
  file is moved with ``link`` + ``unlink`` as Maildir does, and a folder is renamed only
  into a name checked to be absent under the daemon's single-writer lock.

All of this relies on the state dir and the outbox sharing one filesystem;
:func:`check_same_filesystem` verifies that at startup.

The writers take the daemon's ``step`` (see :mod:`batchd.fs`): with one, a full disk raises an
``OSError`` naming the file (the step is retried) and a failed fsync raises
:class:`batchd.fs.StorageFailure` (the daemon exits); temp files are removed either way.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO, Callable, Iterable, Iterator

from batchd import fs

__all__ = [
    "CrossDeviceError",
    "DuplicateKeyError",
    "JobFolder",
    "JsonObjectWriter",
    "atomic_write",
    "atomic_write_json",
    "check_same_filesystem",
    "choose_folder",
    "durable_move",
    "fsync_dir",
    "numbered_paths",
    "write_temp",
]

_COPY_BLOCK = 1 << 20

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


# -- primitives -------------------------------------------------------------------------------


def fsync_dir(path: Path | str, *, step: str | None = None) -> None:
    """Make the entries of directory ``path`` (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fs.fsync(fd, path, step)
    finally:
        os.close(fd)


def _json_text(obj: Any) -> str:
    """The one JSON style of every file batchd writes.

    ``allow_nan=False`` because NaN/Infinity are not JSON: strict readers of the outbox would
    reject the file, so fail while writing instead.
    """
    return json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _temp_name(final_name: str) -> str:
    # A dotfile ending in .tmp: inbox scanning and outbox readers skip both patterns, and the
    # random part keeps a leftover from a crashed writer from colliding with the next one.
    return f".{final_name}.{secrets.token_hex(4)}.tmp"


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
                    shutil.copyfileobj(data, fh, _COPY_BLOCK)
                fh.flush()
                fs.fsync(fh.fileno(), path, step)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
    atomic_write(path, _json_text(obj))


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


def durable_move(src: Path | str, dst: Path | str, *, step: str | None = None) -> None:
    """Move ``src`` (file, symlink or directory) to ``dst`` durably, never overwriting.

    Raises ``FileNotFoundError`` if ``src`` is gone, ``FileExistsError`` if ``dst`` exists
    (unless it is the same file left by an interrupted move, which is then completed), and
    :class:`CrossDeviceError` if the two are on different filesystems. Both parent
    directories are fsynced; for a linked file the new name is made durable before the old
    one is removed, so at no instant is the file in neither place.
    """
    src, dst = Path(src), Path(dst)
    src_stat = os.lstat(src)
    fs.fault_point(step, dst)  # where a full directory refuses the new name
    try:
        # Directories cannot be hard-linked; they are renamed into an absent name.
        linked = False if stat.S_ISDIR(src_stat.st_mode) else _link_no_replace(src, dst, src_stat)
        if linked:
            fsync_dir(dst.parent, step=step)
            try:
                os.unlink(src)
            except FileNotFoundError:
                # Someone else removed the old name meanwhile; the file is at dst, which is
                # all this move promises (and the single-writer lock makes this rare).
                pass
        else:
            _rename_if_absent(src, dst)
            fsync_dir(dst.parent, step=step)
    except OSError as exc:
        if exc.errno == errno.EXDEV and not isinstance(exc, CrossDeviceError):
            raise CrossDeviceError(f"cannot move {src} to {dst}: they are on different filesystems") from exc
        raise
    if src.parent != dst.parent or linked:
        fsync_dir(src.parent, step=step)


# -- the job folder ---------------------------------------------------------------------------


def choose_folder(outbox: Path, name: str, taken: Callable[[Path], bool] | None = None) -> Path:
    """Pick the outbox folder for a job called ``name``: ``outbox/NAME``, else ``NAME-2``, ``NAME-3``, …

    ``taken`` says whether a candidate is unavailable; by default, whether it exists. A
    daemon should also treat folders reserved by its other unpublished jobs as taken.

    Contract: the caller must durably record the returned path (in its journal) *before*
    :meth:`JobFolder.publish`. After a crash between publish and the commit that follows it,
    the recorded path exists and holds this job's output: commit and move on. Choosing afresh
    instead would publish the same job a second time as ``NAME-2``.
    """
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not a usable folder name: {name!r}")
    is_taken = taken if taken is not None else os.path.lexists
    return next(path for path in numbered_paths(outbox, name) if not is_taken(path))


def numbered_paths(directory: Path, stem: str, suffix: str = "") -> Iterator[Path]:
    """``directory/STEM+SUFFIX``, then ``STEM-2+SUFFIX``, ``STEM-3+SUFFIX``, … without end."""
    yield directory / f"{stem}{suffix}"
    for number in itertools.count(2):
        yield directory / f"{stem}-{number}{suffix}"


class JobFolder:
    """One job's outbox folder, written in ``staging_dir`` and published whole.

    ``staging_dir`` must be on the outbox's filesystem (the state dir is); anything already
    there, such as the remains of a build killed before publishing, is removed; with
    ``create=False`` an existing staging folder, finished before a crash, is adopted as it
    is so that it can be published. Files are
    written directly in staging and fsynced when closed; :meth:`publish` renames the folder
    into the outbox, so readers see the complete folder or none at all. Its writes are step
    ``outbox`` and its publish step ``publish`` (:mod:`batchd.fs`); after a failed write the whole
    staging folder is written anew.
    """

    def __init__(self, staging_dir: Path, *, create: bool = True):
        self.staging_dir = Path(staging_dir)
        self.published_to: Path | None = None
        if not create:
            if not self.staging_dir.is_dir():
                raise FileNotFoundError(errno.ENOENT, "no staged job folder", str(self.staging_dir))
            return
        if self.staging_dir.exists():
            shutil.rmtree(self.staging_dir)
        with fs.naming(self.staging_dir):
            self.staging_dir.mkdir(parents=True)

    def _member_path(self, name: str) -> Path:
        relative = PurePosixPath(name)
        if self.published_to is not None:
            raise RuntimeError(f"{self.staging_dir} was already published to {self.published_to}")
        if relative.is_absolute() or not relative.parts or any(part in ("", ".", "..") for part in relative.parts):
            raise ValueError(f"not a relative file name inside the job folder: {name!r}")
        path = self.staging_dir.joinpath(*relative.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def open(self, name: str, mode: str = "w") -> Iterator[IO[Any]]:
        """Stream a new file ``name`` (``mode`` "w" for UTF-8 text or "wb"); fsynced on clean exit.

        Each name is written once: opening an existing name raises ``FileExistsError``.
        """
        if mode not in ("w", "wb"):
            raise ValueError(f"mode must be 'w' or 'wb', not {mode!r}")
        with fs.naming(self.staging_dir / name):
            path = self._member_path(name)
            # Large buffers: results.jsonl of a big job is hundreds of MB written line by line.
            fh = open(path, "xb", buffering=_COPY_BLOCK) if mode == "wb" else \
                open(path, "x", encoding="utf-8", newline="\n", buffering=_COPY_BLOCK)
            with fh:
                yield fh
                fh.flush()
                fs.fsync(fh.fileno(), path, "outbox")

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open(name, "wb") as fh:
            fh.write(data)

    def write_json(self, name: str, obj: Any) -> None:
        with self.open(name) as fh:
            fh.write(_json_text(obj))

    def copy_in(self, name: str, src_path: Path) -> None:
        """Copy ``src_path`` into the folder as ``name`` (a copy, so the source may be archived later)."""
        with open(src_path, "rb") as src, self.open(name, "wb") as dst:
            shutil.copyfileobj(src, dst, _COPY_BLOCK)

    def publish(self, dest: Path) -> Path:
        """Rename the finished folder to ``dest`` (which must not exist) and return ``dest``.

        ``dest`` comes from :func:`choose_folder` and must already be recorded by the caller.
        """
        dest = Path(dest)
        if self.published_to is not None:
            raise RuntimeError(f"{self.staging_dir} was already published to {self.published_to}")
        # Files were fsynced as they closed; their directory entries (in staging and any
        # subfolder) must be durable too before the folder becomes visible.
        for directory, _subdirs, _files in os.walk(self.staging_dir, topdown=False):
            fsync_dir(directory, step="publish")
        durable_move(self.staging_dir, dest, step="publish")
        self.published_to = dest
        return dest


class JsonObjectWriter:
    """Writes one JSON object to ``fh`` entry by entry, one entry per line.

    Values are serialized and written as they are added, so a large organized.json never has
    to exist as a dict in memory.  Keys are not remembered either (a million ids would be the
    biggest thing in memory): their uniqueness is the task's contract, and manifests reject
    duplicate ids.  Values are compact (the C encoder; an indented dump is several times
    slower), one per line, so the file stays readable and greppable.  Used as a context
    manager, the closing brace is written only on a clean exit, so an interrupted write never
    parses.
    """

    def __init__(self, fh: IO[str]):
        self._fh = fh
        self._count = 0
        self._closed = False
        self._encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode

    def add(self, key: str, value: Any) -> None:
        if self._closed:
            raise RuntimeError("JsonObjectWriter is closed")
        if not isinstance(key, str):
            raise TypeError(f"JSON object keys must be str, not {type(key).__name__}")
        # Serialize before writing anything, so an unserializable value leaves no half entry.
        entry = f"{self._encode(key)}: {self._encode(value)}"
        self._fh.write(f",\n  {entry}" if self._count else f"{{\n  {entry}")
        self._count += 1

    def extend(self, entries: Iterable[tuple[str, Any]]) -> None:
        """Add every ``(key, value)``, e.g. what a task's ``organize`` yields."""
        for key, value in entries:
            self.add(key, value)

    def close(self) -> None:
        """Finish the object (``fh`` itself stays open; its owner closes it)."""
        if not self._closed:
            self._fh.write("\n}\n" if self._count else "{}\n")
            self._closed = True

    def __enter__(self) -> JsonObjectWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
