"""The input files a manifest names (``input = "reviews.csv"``), taken with its claim.

Each is linked into the job's spool (``inputs/``; copied where it must stay in the inbox, or where the
filesystem cannot link), reached from the inbox one folder at a time without following a symlink, and
only when it has no other name than its inbox one; :data:`INPUTS_RECORD` says which were taken, from
where, and whether they leave the inbox once the claim is committed (batchd/daemon/intake.py). One that
another manifest waiting in the inbox may name stays (:func:`pending_manifests`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

from batchd.inbox import UnsafeEntry, entry_kind
from batchd.manifest import MANIFEST_SUFFIXES

#: Files batchd writes into a job's outbox folder: an input file of the same path stays in the inbox.
OUTBOX_FILES = frozenset({"results.jsonl", "organized.json", "summary.json", "embeddings.npy",
                          "embeddings_index.jsonl"})
#: In a job's spool ``inputs/``: which input files it took, from where, and whether they left the inbox.
INPUTS_RECORD = ".batchd-inputs.json"
#: Manifests waiting in the inbox read (their first bytes) per tick to see which input files they name.
PENDING_READ_FILES = 1000
PENDING_READ_BYTES = 64 * 1024

#: Errors of an input file taken at its claim that are the file's (gone, a folder, unreadable), not the state dir's.
INPUT_GONE = frozenset({errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENXIO, errno.ENAMETOOLONG})

TOO_MANY = {}  # pending_manifests: more waiting manifests than are read


def pending_manifests(inbox: Path) -> dict[str, bytes | None]:
    """The first bytes of each manifest waiting in ``inbox`` (under a temp name too: one being
    written), by file name; None for one larger than :data:`PENDING_READ_BYTES`, and
    :data:`TOO_MANY` past :data:`PENDING_READ_FILES` of them. Only regular files are read."""
    found: dict[str, bytes | None] = {}
    try:
        names = os.listdir(inbox)
    except OSError:
        return TOO_MANY
    for name in names:
        lowered = name.lower()
        if not (lowered.endswith(MANIFEST_SUFFIXES) or any(f"{suffix}." in lowered for suffix in MANIFEST_SUFFIXES)):
            continue
        if len(found) >= PENDING_READ_FILES:
            return TOO_MANY
        try:
            fd = os.open(inbox / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            # Checked on the descriptor before a byte is read: a folder (which open() refuses), a FIFO or
            # a hard link (whose bytes may be anyone's) names nothing; intake rejects it, or leaves it.
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                text = os.read(fd, PENDING_READ_BYTES + 1)
                found[name] = text if len(text) <= PENDING_READ_BYTES else None
        except OSError:
            continue
        finally:
            os.close(fd)
    return found


def take_input(source: Path, destination: Path, inbox: Path, *, link: bool = True) -> None:
    """Link (``link``, where the filesystem can) or copy an input file into the spool, never through a
    symlink, and only a file with no other name than its inbox one: a hard link could name a file its
    dropper may not read (raises UnsafeEntry).

    ``source`` is reached from ``inbox`` one folder at a time without following a symlink (a folder on its
    path swapped for a link to elsewhere since the manifest was checked is refused, not followed)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.unlink(missing_ok=True)
    folder = _open_folder_beneath(inbox, source)
    try:
        try:
            if not link:
                raise OSError("a copy is wanted")
            os.link(source.name, destination, src_dir_fd=folder, follow_symlinks=False)
            expected_links = 2
        except OSError:  # a copy (or a filesystem without hard links), read through a checked descriptor
            fd = os.open(source.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
            st = os.fstat(fd)  # checked before open() wraps it: that refuses a folder with an error of its own
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                os.close(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise UnsafeEntry(source, entry_kind(st.st_mode),
                                      f"a {entry_kind(st.st_mode)}, not a regular file") from None
                raise UnsafeEntry(source, "hard link", f"a file with {st.st_nlink} hard links") from None
            with open(fd, "rb") as src, open(destination, "xb") as dst:
                shutil.copyfileobj(src, dst)
            expected_links = 1
    finally:
        os.close(folder)
    st = os.lstat(destination)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeEntry(source, entry_kind(st.st_mode), f"a {entry_kind(st.st_mode)}, not a regular file")
    if st.st_nlink != expected_links:
        raise UnsafeEntry(source, "hard link", f"a file with {st.st_nlink - expected_links + 1} hard links")


def _open_folder_beneath(inbox: Path, source: Path) -> int:
    """A descriptor of ``source``'s folder, opened from ``inbox`` one component at a time with
    ``O_NOFOLLOW``: what was checked to be inside the inbox is what is reached (raises UnsafeEntry)."""
    try:
        parts = source.parent.relative_to(inbox.resolve()).parts
    except ValueError:
        raise UnsafeEntry(source, "outside", "outside the inbox") from None
    folder = os.open(inbox.resolve(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            try:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=folder)
            except OSError as error:
                if error.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeEntry(source, "symlink", f"reached through {part!r}, which is no longer a "
                                                         "folder of the inbox (a symlink?)") from None
                raise
            os.close(folder)
            folder = inner
    except BaseException:
        os.close(folder)
        raise
    return folder


def read_inputs_record(inputs: Path) -> list[dict]:
    """The input files a job took (see :data:`INPUTS_RECORD`); none for a job without one."""
    try:
        with open(os.path.join(inputs, INPUTS_RECORD), encoding="utf-8") as file:  # (most jobs have none)
            record = json.loads(file.read())
    except FileNotFoundError:
        return []
    return [entry for entry in record if isinstance(entry, dict)] if isinstance(record, list) else []


def same_file(a: Path, b: Path) -> bool:
    return os.path.samestat(os.lstat(a), os.lstat(b))
