"""The inbox: notice manifests dropped into one folder, decide when they are complete, claim them.

Filesystem events are only *hints*. watchdog drops events on inotify queue overflow
(watchdog #654), reports files while they are still being written (#586), reports some
twice (#93, #1003), misses files present before it starts (#1077), and sees nothing on
NFS/CIFS (#504). So the source of truth is a directory scan, run when a hint arrives and on
a periodic timer, as Postfix's pickup does:

    inbox = Inbox(path)
    inbox.start()                   # watch first, then scan (watchdog #1010)
    while running:
        inbox.ensure_watching()
        for candidate in inbox.scan():
            ...                     # parse, then claim(candidate.path, spool_path)
        inbox.wait(timeout)

A file written in place is a candidate only once it has *settled* (size and mtime unchanged
for a while). A file renamed into the inbox is one at once: a rename is how a careful
producer says "complete" (Maildir's tmp → new), so only inotify's report of the rename is
needed, not a second of watching the file stand still. Every candidate is taken with
:func:`claim`, a no-overwrite move into the state dir that exactly one claimant wins
(Maildir's delivery protocol, turned around for a shared drop folder).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from batchd.durable import DirSync, durable_move, fsync_dir

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "Candidate",
    "DEFAULT_SUFFIXES",
    "Inbox",
    "Irregular",
    "claim",
    "is_temp_name",
    "sha256_file",
]

DEFAULT_SUFFIXES = (".toml", ".json", ".cancel")
BACKENDS = ("auto", "inotify", "polling", "none")
_HASH_BLOCK = 1 << 20

#: Careful producers write under one of these names and rename when done (Maildir B1);
#: editors leave the others behind. None of them is ever a finished manifest.
_TEMP_SUFFIXES = (".tmp", ".part", "~", ".swp")

#: Names a producer writes under before its rename; once stale, the reaper removes them.
_PRODUCER_TEMP_SUFFIXES = (".tmp", ".part")



def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a dotfile or a temp/editor name (``*.tmp``, ``*.part``, ``*~``, ``*.swp``, ``#*#``)."""
    lowered = name.lower()
    return (
        name.startswith(".")
        or lowered.endswith(_TEMP_SUFFIXES)
        or (len(name) > 1 and name.startswith("#") and name.endswith("#"))
    )


@dataclass(frozen=True, slots=True)
class Candidate:
    """A settled regular file in the inbox, as of the scan that returned it."""

    path: Path
    size: int
    mtime_ns: int
    #: Seconds (monotonic clock) its size and mtime have been unchanged, counted from when
    #: this Inbox first saw them. Lets the daemon give up on a file that still does not parse
    #: after it has sat untouched for long enough.
    unchanged_for: float


@dataclass(frozen=True, slots=True)
class Irregular:
    """An inbox entry with a manifest's name that is not a regular file, so it is never a candidate."""

    path: Path
    kind: str  # "symlink" | "directory" | "fifo" | "socket" | "device" | "other"


class UnsafeEntry(Exception):
    """An inbox entry that cannot be read as what it was taken for: ``kind`` says what it turned out to be."""

    def __init__(self, path: Path, kind: str, message: str):
        super().__init__(message)
        self.path, self.kind = path, kind


@dataclass(frozen=True, slots=True)
class Entry:
    """An inbox file as read: its bytes (at most ``limit`` + 1 of them) and the file they came from."""

    content: bytes
    device: int
    inode: int
    size: int
    mtime_ns: int
    #: Its owner's uid.
    owner: int


def read_entry(path: Path, limit: int) -> Entry:
    """Read an inbox file through a descriptor opened without following a symlink, and check that
    descriptor (not the name, which anyone may point elsewhere meanwhile): a regular file with one
    link. What is checked is what is read. At most ``limit`` + 1 bytes are read (the caller tells a
    file over its limit by its length). Raises :class:`UnsafeEntry`, or ``OSError`` (gone, unreadable)."""
    try:
        # O_NONBLOCK: a FIFO put here opens at once (and is refused below) instead of blocking the loop.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafeEntry(path, "symlink", "a symlink: batchd never follows one") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeEntry(path, entry_kind(st.st_mode), f"a {entry_kind(st.st_mode)}, not a regular file")
        if st.st_nlink != 1:
            raise UnsafeEntry(path, "hard link", f"a file with {st.st_nlink} hard links: another name could "
                                                 f"change it after it is checked; drop a copy instead")
        chunks, left = [], limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return Entry(b"".join(chunks), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_uid)
    finally:
        os.close(fd)


@dataclass(slots=True)
class _Observation:
    size: int
    mtime_ns: int
    unchanged_since: float  # time.monotonic() when this size/mtime was first seen


#: What tells one state of a file from another: st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns.
#: ctime as well, because a write that keeps size and mtime (a restored mtime, or one within the
#: filesystem's timestamp tick) still moves it.
_Identity = tuple[int, int, int, int, int]


def _identity(st: os.stat_result) -> _Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class _MovedIn:
    """A file renamed into the inbox, as the watcher's stat() found it just after the rename."""

    identity: _Identity
    #: Order of recording. A scan forgets a record whose name it did not list only if the record
    #: is older than the listing: a file renamed in while the listing ran may be missing from it.
    seq: int


def entry_kind(mode: int) -> str:
    """What an entry is, by its mode: "symlink", "directory", "fifo", "socket", "device" or "other"."""
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "other"


#: Events after which a file's content may differ from what was renamed in. Opened, closed
#: without writing and attribute changes are absent: readers (batchd itself) cause them.
#: Closed-after-writing counts although a close writes nothing: a write through mmap(2)
#: raises no modify event, only that close.
_CONTENT_EVENTS = frozenset({EVENT_TYPE_CREATED, EVENT_TYPE_MODIFIED, EVENT_TYPE_CLOSED, EVENT_TYPE_DELETED})


def _entry_name(path: str | bytes) -> str | None:
    # The one watch is of the inbox alone, not recursive, so every file event names an entry of
    # the inbox; an empty path is the far side of a move from or to outside it.
    return os.path.basename(os.fsdecode(path)) if path else None


class _EventHints(FileSystemEventHandler):
    """Turns every event in the inbox into a wake-up hint; with ``track_moves``, also tells the
    inbox which files were renamed into it (:meth:`Inbox._note_moved_in`) and which changed since.

    Events stay hints: the scan, on the daemon's thread, decides from its own stat(). watchdog
    dispatches with no try/except, so an exception here would kill the observer thread for good
    (watchdog #427); hence the catch-all, which still sets the hint.
    """

    def __init__(self, inbox: Inbox, wake: threading.Event, *, track_moves: bool):
        super().__init__()
        self._inbox = inbox
        self._wake = wake
        self._track_moves = track_moves

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            try:
                if self._track_moves and not event.is_directory:
                    self._note(event)
            finally:
                # After the note, so that the scan this hint wakes finds the move recorded.
                self._inbox.changed = True
                self._wake.set()
        except BaseException:  # noqa: BLE001 - see class docstring
            log.exception("inbox event handler failed")

    def _note(self, event: FileSystemEvent) -> None:
        if event.event_type == EVENT_TYPE_MOVED:
            source, dest = _entry_name(event.src_path), _entry_name(event.dest_path)
            if source is not None:
                self._inbox._forget_move(source)
            if dest is None:
                return
            if source is None or not self._inbox._is_manifest_name(source):
                # From outside the inbox, or from a name scans never read (a producer's temp
                # name): the producer renamed a finished file in.
                self._inbox._note_moved_in(dest, os.fsdecode(event.dest_path))
            else:
                # From one manifest name to another: that file may have been written in place
                # and still be, so it settles like one.
                self._inbox._forget_move(dest)
        elif event.event_type in _CONTENT_EVENTS:
            self._inbox._forget_move(_entry_name(event.src_path))


class Inbox:
    """Watches, scans and settles one inbox folder (not its subfolders).

    ``settle_seconds``: how long a file's size and mtime must stay unchanged (and its mtime
    be in the past) before it is a :class:`Candidate`. ``rescan_seconds``: the longest
    :meth:`wait` sleeps without a hint, the safety net for lost events. ``backend``:
    ``"auto"`` (watchdog's native observer for this platform), ``"inotify"`` (Linux only),
    ``"polling"`` (for NFS/CIFS, where native backends see nothing; ``poll_seconds`` is its
    interval) or ``"none"`` (no watcher at all: the periodic rescan alone finds files). Only
    names ending in one of ``suffixes`` (case-insensitive) are considered. ``temp_max_age``:
    the age (seconds, by mtime) after which :meth:`reap_stale_temp_files` removes a producer's
    leftover temp file; None never removes one.

    A file renamed into the inbox needs no settling: it is a candidate as soon as a scan finds it
    as the watcher saw it just after the rename (same inode, size, mtime and ctime) with no write
    reported since. That takes inotify's move events, so only the inotify observer (``"auto"``
    on Linux, or ``"inotify"``) provides it; with ``"polling"`` (which cannot tell a rename from
    a new file reliably), ``"none"``, or other platforms' observers every file settles.
    """

    #: Renamed-in files remembered at once, at most. Anyone can drop files, so the memory is
    #: bounded; arrivals beyond it settle like files written in place. A scan forgets the names
    #: that have left the inbox, so only more than this many waiting at once reaches it.
    max_recorded_moves: int = 100_000

    def __init__(
        self,
        path: Path,
        *,
        settle_seconds: float = 1.0,
        rescan_seconds: float = 30.0,
        backend: str = "auto",
        suffixes: Iterable[str] = DEFAULT_SUFFIXES,
        poll_seconds: float = 1.0,
        temp_max_age: float | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self.path = Path(path)
        self.settle_seconds = settle_seconds
        self.rescan_seconds = rescan_seconds
        self.backend = backend
        self.suffixes = tuple(suffix.lower() for suffix in suffixes)
        self.poll_seconds = poll_seconds
        self.temp_max_age = temp_max_age
        self._next_reap = 0.0  # monotonic
        self._missing_reported = False
        self._hint = threading.Event()
        self._observer: BaseObserver | None = None
        self._observations: dict[str, _Observation] = {}
        self._irregular_seen: set[str] = set()
        self._irregular_unreported: list[Irregular] = []
        self._next_rescan = 0.0  # monotonic; 0 means "scan now"
        self._next_settle_check: float | None = None
        #: Something happened in the folder since the last scan began (set by the watcher's thread).
        self.changed = True
        # Written by the watcher's thread, read and pruned by scan() on the caller's.
        self._moves_lock = threading.Lock()
        self._moved_in: dict[str, _MovedIn] = {}
        self._move_seq = 0

    # -- watching ---------------------------------------------------------------------------

    @property
    def observer_name(self) -> str | None:
        """Class name of the running observer (e.g. "InotifyObserver", "PollingObserver"), for status."""
        return type(self._observer).__name__ if self._observer is not None else None

    def start(self) -> None:
        """Start watching. The caller scans *after* this returns.

        Watch-then-scan may report a file twice, scan-then-watch may miss one (watchdog
        #1010); duplicates are harmless because claiming is exclusive.
        """
        if self._observer is None and self.backend != "none":
            self._observer = self._start_observer()

    def _start_observer(self) -> BaseObserver:
        if self.backend != "polling":
            try:
                return self._schedule_and_start(*self._native_observer())
            except OSError as exc:
                # inotify's watch and instance limits (ENOSPC/EMFILE, watchdog #673, #846)
                # surface here; polling keeps batchd working instead of crash-looping.
                log.warning("cannot watch %s natively (%s); falling back to polling every %.1fs",
                            self.path, exc, self.poll_seconds)
        # Polling finds a rename only by pairing inodes across two snapshots, and a move from
        # outside not at all: its move events are not trusted, every file settles.
        return self._schedule_and_start(PollingObserver(timeout=self.poll_seconds), track_moves=False)

    def _native_observer(self) -> tuple[BaseObserver, bool]:
        """The platform's observer, and whether its move events mark renamed-in files."""
        from watchdog.observers import Observer

        if self.backend == "inotify" or Observer.__name__ == "InotifyObserver":
            from watchdog.observers.inotify import InotifyObserver

            # Full events: a file moved in from outside the inbox is reported as moved (with an
            # empty src_path) instead of as created, which is what tells it from a new file.
            return InotifyObserver(generate_full_events=True), True
        # FSEvents, kqueue and Windows report moves each their own way: not relied on.
        return Observer(), False

    def _schedule_and_start(self, observer: BaseObserver, track_moves: bool) -> BaseObserver:
        try:
            handler = _EventHints(self, self._hint, track_moves=track_moves)
            observer.schedule(handler, str(self.path), recursive=False)
            observer.start()  # the inotify watch itself is added here
        except BaseException:
            _stop_observer(observer)
            raise
        return observer

    def ensure_present(self) -> bool:
        """Whether the inbox folder is there. One deleted while batchd runs (by an operator, a cleanup
        job) is created again, so producers can keep dropping; one that cannot be is waited for, said
        once. The watcher of a folder that was replaced is restarted on the new one."""
        if self.path.is_dir():
            return True
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            if not self._missing_reported:
                log.error("the inbox %s is gone and cannot be created again (%s); nothing is claimed until "
                          "it is back", self.path, error.strerror or error)
                self._missing_reported = True
            return False
        self._missing_reported = False
        log.warning("the inbox %s was gone; created it again", self.path)
        if self._observer is not None:
            self._restart_observer()
        self.changed = True
        self._hint.set()
        return True

    def ensure_watching(self) -> bool:
        """Restart the observer if its thread (or its emitter) died; True if it had to.

        A restart also sets the wake-up hint, since events were lost while it was down.
        """
        if self.backend == "none":
            return False
        observer = self._observer
        if observer is None:
            raise RuntimeError("Inbox.ensure_watching() called before start()")
        if observer.is_alive() and all(emitter.is_alive() for emitter in observer.emitters):
            return False
        log.warning("the watcher of %s stopped; restarting it", self.path)
        self._restart_observer()
        self.changed = True
        self._hint.set()
        return True

    def _restart_observer(self) -> None:
        observer, self._observer = self._observer, None
        _stop_observer(observer)
        # A write to a renamed-in file may have gone unreported while no one watched.
        self._forget_all_moves()
        self._observer = self._start_observer()

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            _stop_observer(observer)
        self._forget_all_moves()  # nothing reports writes to them any more

    def __enter__(self) -> Inbox:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()

    def wake(self) -> None:
        """End a :meth:`wait` early (safe from a signal handler): the caller has something to do."""
        self._hint.set()

    def wait(self, timeout: float) -> bool:
        """Sleep until a filesystem event hint, a rescan or settle check is due, or ``timeout``.

        Returns True if woken by an event hint. Clears the hint either way: the scan that
        follows covers everything that happened before this returned. Before the first
        :meth:`scan` a rescan is already due, so it returns at once.
        """
        now = time.monotonic()
        deadline = min(now + timeout, self._next_rescan)
        if self._next_settle_check is not None:
            deadline = min(deadline, self._next_settle_check)
        hinted = self._hint.wait(max(0.0, deadline - now))
        self._hint.clear()
        return hinted

    # -- scanning ---------------------------------------------------------------------------

    def scan_due(self) -> bool:
        """Whether a scan may find what the last one did not: the watcher saw something since, a
        file is due to have settled, or the periodic rescan is due (the safety net for lost events).
        An inbox nobody watches (``backend = "none"``) is always due.

        Why it matters: the loop ticks whenever a worker finishes, hundreds of times a second in a
        busy daemon, and listing the folder each time costs it a wait for the GIL per entry.
        """
        if self._observer is None or self.changed:
            return True
        now = time.monotonic()
        return now >= self._next_rescan or self._next_settle_check is not None and now >= self._next_settle_check

    def scan(self) -> list[Candidate]:
        """List the inbox and return its manifest candidates, oldest mtime first.

        A candidate is a regular file that has settled, or that was renamed in and is still as
        the watcher saw it then. Entries with a manifest's name that are not regular files are
        logged once and kept for :meth:`take_irregular`.
        """
        self.changed = False  # first: what happens from here on is seen by the next scan too
        now = time.monotonic()
        wall_now_ns = time.time_ns()
        settle_ns = int(self.settle_seconds * 1e9)
        observations: dict[str, _Observation] = {}
        irregular_present: set[str] = set()
        settled: list[Candidate] = []
        next_settle_check: float | None = None
        with self._moves_lock:
            moved_in = dict(self._moved_in)
            moves_before_listing = self._move_seq
        changed_since_move: set[str] = set()

        with os.scandir(self.path) as entries:
            for entry in entries:
                if not self._is_manifest_name(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # gone since the listing (claimed, or renamed by its producer)
                if not stat.S_ISREG(st.st_mode):
                    irregular_present.add(entry.name)
                    self._note_irregular(entry.name, st.st_mode)
                    continue

                seen = self._observations.get(entry.name)
                if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
                    seen = _Observation(st.st_size, st.st_mtime_ns, now)
                observations[entry.name] = seen
                unchanged_for = now - seen.unchanged_since

                move = moved_in.get(entry.name)
                if move is not None:
                    if move.identity == _identity(st):
                        settled.append(Candidate(Path(entry.path), st.st_size, st.st_mtime_ns, unchanged_for))
                        continue
                    # Written to, or replaced, since it was renamed in: from now on it settles.
                    changed_since_move.add(entry.name)

                mtime_age_ns = wall_now_ns - st.st_mtime_ns
                # The mtime is only ever compared with the wall clock. An mtime ahead of our
                # clock (a skewed NFS server) tells nothing, so then the monotonic rule decides.
                still_to_settle = max(
                    self.settle_seconds - unchanged_for,
                    (settle_ns - mtime_age_ns) / 1e9 if mtime_age_ns >= 0 else 0.0,
                )
                if still_to_settle <= 0:
                    settled.append(Candidate(Path(entry.path), st.st_size, st.st_mtime_ns, unchanged_for))
                else:
                    due = now + still_to_settle
                    next_settle_check = due if next_settle_check is None else min(next_settle_check, due)

        self._observations = observations
        self._irregular_seen &= irregular_present  # forget what left, report it again if it returns
        with self._moves_lock:
            self._moved_in = {
                name: move for name, move in self._moved_in.items()
                if move.seq > moves_before_listing
                or (name in observations and name not in changed_since_move)
            }
        self._next_settle_check = next_settle_check
        self._next_rescan = now + self.rescan_seconds
        settled.sort(key=lambda candidate: (candidate.mtime_ns, candidate.path.name))
        return settled

    def _note_irregular(self, name: str, mode: int) -> None:
        if name in self._irregular_seen:
            return
        self._irregular_seen.add(name)
        irregular = Irregular(self.path / name, entry_kind(mode))
        log.warning("ignoring %s in the inbox: it is a %s, not a regular file", irregular.path, irregular.kind)
        self._irregular_unreported.append(irregular)

    def _is_manifest_name(self, name: str) -> bool:
        return not is_temp_name(name) and name.lower().endswith(self.suffixes)

    def _note_moved_in(self, name: str, path: str) -> None:
        """On the watcher's thread: ``name`` was just renamed into the inbox, so was complete then.

        Its identity is taken now, as close to the rename as can be, for scan() to compare with
        its own stat(): any later write, or another file under the name, no longer matches.
        """
        if not self._is_manifest_name(name):
            return
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            st = None  # already gone (claimed, renamed on): nothing to remember
        with self._moves_lock:
            if st is None or not stat.S_ISREG(st.st_mode) or (
                    name not in self._moved_in and len(self._moved_in) >= self.max_recorded_moves):
                self._moved_in.pop(name, None)
                return
            self._move_seq += 1
            self._moved_in[name] = _MovedIn(_identity(st), self._move_seq)

    def _forget_move(self, name: str | None) -> None:
        """On the watcher's thread: ``name`` was written to, created, removed or renamed away."""
        if name is None:
            return
        with self._moves_lock:
            self._moved_in.pop(name, None)

    def _forget_all_moves(self) -> None:
        with self._moves_lock:
            self._moved_in.clear()

    def reap_stale_temp_files(self) -> list[Path]:
        """Remove producers' temp files (``*.tmp``, ``*.part``, dotfiles included) older than ``temp_max_age``.

        Maildir's reader duty: a producer killed between writing its temp file and renaming it
        leaves the file behind for good, and nobody else will ever remove it (Maildir says 36 h
        without access). Age is the file's mtime, the one place a wall-clock age is the right
        measure. Only regular files with those suffixes go: other dotfiles (``.gitkeep``) and
        editor files (``*~``, ``*.swp``: someone's unsaved work) are left alone. Runs at most once
        per rescan period; returns what it removed.
        """
        now = time.monotonic()
        if self.temp_max_age is None or now < self._next_reap:
            return []
        self._next_reap = now + min(self.rescan_seconds, self.temp_max_age)
        oldest_ns = time.time_ns() - int(self.temp_max_age * 1e9)
        removed = []
        with os.scandir(self.path) as entries:
            for entry in entries:
                if not entry.name.lower().endswith(_PRODUCER_TEMP_SUFFIXES):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode) or st.st_mtime_ns > oldest_ns:
                        continue
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue  # renamed into place (or removed) by its producer just now
                except PermissionError:
                    # Another user's, in a folder with the sticky bit (a shared drop folder): its owner's to remove.
                    log.debug("left %s: a stale temp file batchd's user may not remove", entry.path)
                    continue
                age_hours = (time.time_ns() - st.st_mtime_ns) / 3.6e12
                log.warning("removed %s: a temp file left in the inbox %.1f h ago", entry.path, age_hours)
                removed.append(Path(entry.path))
        return removed

    def take_irregular(self) -> list[Irregular]:
        """Irregular entries found since the last call, each reported once while it stays.

        The daemon may quarantine them (:func:`batchd.durable.durable_move` moves a symlink,
        FIFO or directory itself, never what it points to) or leave them be.
        """
        found, self._irregular_unreported = self._irregular_unreported, []
        return found


def _stop_observer(observer: BaseObserver) -> None:
    # stop() also tears down the emitters and the inotify fd, which matters for an observer
    # whose dispatcher thread died: its emitter threads would otherwise keep running.
    observer.stop()
    if observer.is_alive():
        observer.join(timeout=5)


def claim(candidate_path: Path, dest: Path, *, sync: DirSync = fsync_dir) -> bool:
    """Take ``candidate_path`` out of the inbox by moving it to ``dest`` (in the state dir).

    Returns False if the file is already gone, which is how the loser of a double claim
    (a duplicate event, watchdog #93/#1003) finds out. Never overwrites: an existing,
    different ``dest`` raises ``FileExistsError``. Calling it again with the same ``dest``
    after a kill -9 mid-claim completes that claim, so a daemon that derives ``dest``
    deterministically (from a journal row written first) recovers without a duplicate. A full
    disk raises ``OSError`` (ENOSPC) with the file where it was, to be claimed again later.
    ``sync``: see :func:`batchd.durable.durable_move` (the daemon syncs the inbox once a tick).
    """
    try:
        durable_move(candidate_path, dest, step="claim", sync=sync)
    except FileNotFoundError:
        if os.path.lexists(candidate_path):
            raise  # the source is still there: it is dest's directory that is missing
        return False
    return True


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()
