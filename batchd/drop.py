"""The producer's side of the inbox: a file put in all at once, never replacing one that waits.

Maildir's delivery protocol: the copy is written and fsynced under a dotfile temp name that scans
ignore, then given its final name by a rename that never replaces a file (renameat2's
RENAME_NOREPLACE where the system has it, else link + unlink), so the daemon never sees it half
written and never loses a manifest still waiting. ``batchd submit``, ``batchd cancel`` and
``batchd retry`` drop their files this way; :mod:`batchd.inbox` is the daemon's side.
"""

from __future__ import annotations

import ctypes
import errno
import filecmp
import os
import sys
from pathlib import Path

from batchd.durable import durable_move, fsync_dir, numbered_paths, write_temp

__all__ = ["drop_bytes", "drop_file", "drop_input"]

#: renameat2(2)'s flag to fail with EEXIST rather than replace the target, and "relative to the
#: current directory" for its directory arguments.
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100

#: Errors meaning this kernel, libc, sandbox or filesystem has no renameat2 with that flag.
_NO_RENAMEAT2 = frozenset({errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP})


def _load_renameat2():
    if sys.platform != "linux":
        return None
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.4
    except (OSError, AttributeError):
        return None
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    renameat2.restype = ctypes.c_int
    return renameat2


_renameat2 = _load_renameat2()


def _rename_no_replace(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (then ``FileExistsError``), atomically.

    Returns False, having done nothing, where the system offers no such rename.
    """
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_RENAMEAT2:
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Give the finished temp file ``tmp`` its final name ``dest`` beside it, never replacing a file.

    A rename where the system can rename without replacing: the daemon's watcher sees it as a
    move in and takes the file without waiting for it to settle. Elsewhere link + unlink
    (:func:`durable_move`), which the daemon finds complete once it has settled.
    """
    if _rename_no_replace(tmp, dest):
        fsync_dir(dest.parent)  # tmp is beside dest: one directory holds both changes
    else:
        durable_move(tmp, dest)


def drop_file(src: Path, inbox: Path, *, content: bytes | None = None) -> Path:
    """Deliver a copy of ``src`` into ``inbox`` as a careful producer should, and return its path.

    The producer side of Maildir's protocol: the copy is written and fsynced under a dotfile
    temp name that scans ignore, then renamed (or linked) to its final name, so it is never
    seen half written. An existing file is never replaced: if ``NAME.toml`` is still waiting,
    the copy becomes ``NAME-2.toml`` (then ``-3``, …). ``content``: the bytes to drop instead of ``src``'s.
    """
    src, inbox = Path(src), Path(inbox)
    if content is not None:
        tmp = write_temp(inbox / src.name, content)
    else:
        with open(src, "rb") as source:
            tmp = write_temp(inbox / src.name, source)
    try:
        for dest in numbered_paths(inbox, src.stem, src.suffix):
            try:
                _move_into_place(tmp, dest)
            except FileExistsError:
                continue
            return dest
    finally:
        tmp.unlink(missing_ok=True)
    raise AssertionError("unreachable: numbered_paths never ends")


def drop_input(src: Path, dest: Path) -> bool:
    """Deliver a copy of input file ``src`` as exactly ``dest`` (a path in the inbox), the same careful way.

    Returns ``False`` when ``dest`` already holds the same bytes (nothing is written), ``True``
    once the copy is in place. A different existing file is never replaced: that raises
    ``FileExistsError``, since another manifest may be reading it.
    """
    src, dest = Path(src), Path(dest)
    if dest.exists() and (os.path.samefile(src, dest) or filecmp.cmp(src, dest, shallow=False)):
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as source:
        tmp = write_temp(dest, source)
    try:
        _move_into_place(tmp, dest)
    except FileExistsError:
        if filecmp.cmp(src, dest, shallow=False):  # the same file arrived meanwhile
            return False
        raise FileExistsError(f"{dest} already exists with different content") from None
    finally:
        tmp.unlink(missing_ok=True)
    return True


def drop_bytes(data: bytes, path: Path) -> Path:
    """Deliver ``data`` as exactly ``path`` (e.g. ``inbox/NAME.cancel``), the same careful way.

    Raises ``FileExistsError`` if ``path`` exists: that file is left as it is.
    """
    path = Path(path)
    tmp = write_temp(path, data)
    try:
        _move_into_place(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
