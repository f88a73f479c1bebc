"""A job's outbox folder: written whole in a staging directory on the outbox's filesystem, then made
to appear in the outbox with one directory rename (:class:`JobFolder`), so a reader sees the complete
folder or none at all. The crash-safe primitives it is built on are :mod:`batchd.durable`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO, Callable, Iterable, Iterator

from batchd import fs
from batchd.durable import COPY_BLOCK, DirSync, durable_move, fsync_dir, json_text

__all__ = ["DuplicateKeyError", "JobFolder", "JsonObjectWriter", "choose_folder"]


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

    def candidate(number: int) -> Path:
        return outbox / (name if number == 1 else f"{name}-{number}")

    if not is_taken(candidate(1)):
        return candidate(1)
    # A name is reused job after job (a producer that drops report.toml every hour): NAME-2, NAME-3, …
    # fill up in order, and trying them one by one would cost each delivery as many lookups as there were
    # jobs of that name before it. Doubling until one is free, then halving back to the end of the taken
    # run, takes 2 log2(N) lookups. A hole a user made in the run may be chosen: any free name will do.
    taken_number, free_number = 1, 2
    while is_taken(candidate(free_number)):
        taken_number, free_number = free_number, free_number * 2
    while free_number - taken_number > 1:
        middle = (taken_number + free_number) // 2
        if is_taken(candidate(middle)):
            taken_number = middle
        else:
            free_number = middle
    return candidate(free_number)


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
        if len(relative.parts) > 1:  # the folder itself exists: a file at its top needs no mkdir
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
            fh = open(path, "xb", buffering=COPY_BLOCK) if mode == "wb" else \
                open(path, "x", encoding="utf-8", newline="\n", buffering=COPY_BLOCK)
            with fh:
                yield fh
                fh.flush()
                fs.fsync(fh.fileno(), path, "outbox")

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open(name, "wb") as fh:
            fh.write(data)

    def write_json(self, name: str, obj: Any) -> None:
        with self.open(name) as fh:
            fh.write(json_text(obj))

    def copy_in(self, name: str, src_path: Path) -> None:
        """Copy ``src_path`` into the folder as ``name`` (a copy, so the source may be archived later)."""
        with open(src_path, "rb") as src, self.open(name, "wb") as dst:
            shutil.copyfileobj(src, dst, COPY_BLOCK)

    def link_in(self, name: str, src_path: Path) -> None:
        """Put ``src_path`` into the folder as ``name``: a hard link where the filesystem has them, else a copy.

        A linked file's data is synced as a copy's would be: it came from a producer that may never have
        synced it, and after a power cut the published folder must still hold its bytes."""
        with fs.naming(self.staging_dir / name):
            path = self._member_path(name)
            try:
                os.link(src_path, path, follow_symlinks=False)
            except OSError as error:
                if error.errno in (errno.EEXIST, errno.ENOENT) or fs.is_disk_full(error):
                    raise
            else:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    fs.fsync(fd, path, "outbox")
                finally:
                    os.close(fd)
                return
        self.copy_in(name, src_path)

    def sync(self) -> None:
        """Make the folder's entries durable (in it and any subfolder; files were fsynced as they closed)."""
        for directory, _subdirs, _files in os.walk(self.staging_dir, topdown=False):
            fsync_dir(directory, step="publish")

    def publish(self, dest: Path, *, sync: DirSync = fsync_dir, synced: bool = False) -> Path:
        """Rename the finished folder to ``dest`` (which must not exist) and return ``dest``.

        ``dest`` comes from :func:`choose_folder` and must already be recorded by the caller.
        ``sync`` makes the rename durable (see :func:`batchd.durable.durable_move`); ``synced``: the
        folder's own entries were made durable (:meth:`sync`) since its last file was written.
        """
        dest = Path(dest)
        if self.published_to is not None:
            raise RuntimeError(f"{self.staging_dir} was already published to {self.published_to}")
        if not synced:
            self.sync()
        durable_move(self.staging_dir, dest, step="publish", sync=sync)
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
