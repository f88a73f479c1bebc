"""The request cache: successful answers kept by the hash of the request they answer, so a job with
``cache = true`` is not billed again for a request already answered.

**What is hashed.** A request's *canonical form* is the UTF-8 JSON text of ::

    {"kind": "generate"|"embed", "model": "<model without 'models/'>", "request": {…}}

with its keys sorted at every level, no whitespace (``separators=(",", ":")``) and non-ASCII
characters kept as they are (``ensure_ascii=False``). ``request`` is the wire request exactly as
batchd sends it (the ``request`` of the chunk's JSONL line, without its ``key``): the contents,
``generationConfig`` (the merged settings, a structured-output ``responseSchema`` included),
``systemInstruction``, ``safetySettings``; for an embedding the EmbedContentRequest with its config.
Its key (a name that depends on the job) is not part of it, so the same prompt with the same
settings and model hashes equal in any job. The store's key is the SHA-256 of that text, in hex.

**What is kept.** The service's ``response`` of a result that batchd read as ``ok`` (a text that
parsed, when JSON was asked for; an embedding with values), never an error, a blocked answer nor
an inline answer joined by position.

**Where and who.** ``state_dir/cache.sqlite3``, an SQLite database of its own (WAL), never the
journal: a job's result writer (the ``batchd-write`` pool) stores its answers once they are fetched,
build threads read it, ``batchd cache`` prunes it. What a job takes from the store is copied into its
spool (``cached.jsonl``) while it is built, so a store pruned or changed later never changes a job
already being built (see :class:`CacheSplit`). The store is a cache: losing its last writes (it is
written with ``synchronous=NORMAL``) only means paying for those requests once more, and a damaged
file only means sending every request until it is replaced (:class:`_DamagedStores`).

**Bounds.** ``cache_max_entries`` answers and ``cache_max_mb`` of answers at most; the oldest
stored go first, after every job's answers are stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from batchd.fs import is_damaged_database

if TYPE_CHECKING:
    from batchd.task import TaskRequest

log = logging.getLogger("batchd")

#: The store's file name in the state dir.
CACHE_FILE = "cache.sqlite3"

# -- a build's requests, as batchd/cache_split.py tags them ------------------------------------------

@dataclass(slots=True)
class CacheHit:
    """A request answered from the request cache: only its index entry is written."""

    key: str
    input: dict
    wants_json: bool


@dataclass(slots=True)
class CacheMiss:
    """A request to send, already encoded (its line) and hashed (None: the cache is off for the job)."""

    request: TaskRequest
    line: str
    digest: str | None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    response TEXT NOT NULL,
    size INTEGER NOT NULL,
    stored_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_by_age ON answers (stored_at);
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 0), entries INTEGER NOT NULL,
                                   bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
CREATE TRIGGER IF NOT EXISTS answers_added AFTER INSERT ON answers BEGIN
    UPDATE totals SET entries = entries + 1, bytes = bytes + NEW.size WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS answers_removed AFTER DELETE ON answers BEGIN
    UPDATE totals SET entries = entries - 1, bytes = bytes - OLD.size WHERE id = 0;
END;
"""

#: Answers stored in one transaction by a result writer.
STORE_BATCH = 1000
#: Answers evicted in one statement.
EVICT_BATCH = 1000


def cache_path(state_dir: Path) -> Path:
    return Path(state_dir) / CACHE_FILE


def model_name(model: str) -> str:
    return model.removeprefix("models/")


def canonical(kind: str, model: str, request: Any) -> str:
    """The canonical form of a wire request (see the module's documentation)."""
    return json.dumps({"kind": kind, "model": model_name(model), "request": request},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_hash(kind: str, model: str, request: Any) -> str:
    return hashlib.sha256(canonical(kind, model, request).encode("utf-8")).hexdigest()


def uncached(requests: Iterator, path: Path, kind: str, model: str, encode) -> Iterator:
    """``requests`` without those the store answers now (what an estimate made before the build prices).

    The build decides again, for good (:class:`batchd.cache_split.CacheSplit`): an answer stored or evicted
    in between makes the estimate a request off, never the job.
    """
    store = CacheStore.reader(path)
    if store is None:
        yield from requests
        return
    try:
        for request in requests:
            if store.get_text(request_hash(kind, model, json.loads(encode(request))["request"])) is None:
                yield request
    finally:
        store.close()


@dataclass(frozen=True)
class CacheLimits:
    """Where the store is and how big it may grow: a plain value handed to worker threads."""

    path: Path
    max_entries: int
    max_bytes: int

    @classmethod
    def of(cls, settings) -> CacheLimits:
        return cls(cache_path(settings.state_dir), settings.cache_max_entries,
                   int(settings.cache_max_mb * 1024 * 1024))


class _DamagedStores:
    """The store files this process found damaged, each with what identifies the file (its inode and
    change time): a damaged store is said once, as an error with what to do, and left alone until the
    file is replaced. Each job opening it said it again, twice (its build's read, its writer's store)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[Path, tuple[int, int]] = {}

    def holds(self, path: Path) -> bool:
        """Whether ``path`` is a file found damaged, not replaced since."""
        with self._lock:
            if path not in self._files:
                return False
            try:
                stat = path.stat()
            except OSError:
                identity = None
            else:
                identity = (stat.st_ino, stat.st_ctime_ns)
            if identity == self._files[path]:
                return True
            del self._files[path]  # moved aside or removed: a new store is made
            return False

    def found(self, path: Path, error: sqlite3.Error) -> None:
        try:
            stat = path.stat()
        except OSError:
            return
        with self._lock:
            if path in self._files:
                return
            self._files[path] = (stat.st_ino, stat.st_ctime_ns)
        log.error("%s", damage_message(path, error, "jobs send every request and keep no answers until it is replaced"))


def damage_message(path: Path, error: BaseException, meanwhile: str = "") -> str:
    """What batchd says of a damaged store, and what to do about it."""
    return f"request cache {path} is damaged ({error}){': ' + meanwhile if meanwhile else ''}; {damage_fix(path)}"


def damage_fix(path: Path) -> str:
    return (f"stop batchd and move {path.name} aside with its -wal and -shm files (the next job starts a new one), "
            f"or salvage it with `sqlite3 {path.name} .recover`")


_damaged = _DamagedStores()


class CacheStore:
    """One connection to the store, for the thread that opened it."""

    def __init__(self, path: Path, *, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30,
                                       isolation_level=None, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        self._db.execute("PRAGMA busy_timeout=30000")
        self._pending = 0
        self._warned = False

    @classmethod
    def reader(cls, path: Path) -> CacheStore | None:
        """A read-only connection, or None when there is no store yet (nothing is cached) or it is damaged."""
        path = Path(path)
        if not path.exists() or _damaged.holds(path):
            return None
        try:
            return cls(path, readonly=True)
        except sqlite3.Error as error:
            if is_damaged_database(error):
                _damaged.found(path, error)
            else:
                log.warning("request cache %s cannot be opened (%s): requests are sent", path, error)
            return None

    @classmethod
    def writer(cls, path: Path) -> CacheStore | None:
        """A connection to store answers in, or None when the store is damaged (said once)."""
        path = Path(path)
        if _damaged.holds(path):
            return None
        try:
            return cls(path)
        except sqlite3.Error as error:
            if not is_damaged_database(error):
                raise
            _damaged.found(path, error)
            return None

    def damaged(self, error: sqlite3.Error) -> bool:
        """Whether ``error``, raised by this store, says its file is damaged (then said once)."""
        if not is_damaged_database(error):
            return False
        _damaged.found(self.path, error)
        return True

    def close(self) -> None:
        self.commit()
        self._db.close()

    def __enter__(self) -> CacheStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------------

    def get(self, digest: str) -> dict | None:
        """The stored response for a request hash, or None."""
        text = self.get_text(digest)
        return json.loads(text) if text is not None else None

    def get_text(self, digest: str) -> str | None:
        """The stored response's JSON text for a request hash, or None: also when the store cannot be read
        (locked past its timeout, damaged, not made yet), since a miss only means the request is sent."""
        try:
            row = self._db.execute("SELECT response FROM answers WHERE hash = ?", (digest,)).fetchone()
            return row[0] if row is not None else None
        except sqlite3.Error as error:
            if not self.damaged(error) and not self._warned:
                self._warned = True
                log.warning("request cache %s cannot be read (%s: %s): requests are sent", self.path,
                            type(error).__name__, error)
            return None

    def stats(self) -> dict[str, Any]:
        entries, size = self._db.execute("SELECT entries, bytes FROM totals WHERE id = 0").fetchone()
        oldest, newest = self._db.execute("SELECT MIN(stored_at), MAX(stored_at) FROM answers").fetchone()
        models = dict(self._db.execute("SELECT model, COUNT(*) FROM answers GROUP BY model ORDER BY model"))
        return {"path": str(self.path), "entries": entries, "bytes": size, "oldest": oldest, "newest": newest,
                "by_model": models,
                "file_bytes": sum(os.path.getsize(p) for p in (self.path, Path(f"{self.path}-wal"))
                                  if p.exists())}

    # -- writing --------------------------------------------------------------------------------

    def put(self, digest: str, kind: str, model: str, response: dict) -> None:
        """Store an answer (a hash already stored keeps its first answer and age); committed in batches."""
        text = json.dumps(response, ensure_ascii=False, separators=(",", ":"))
        if not self._pending:
            self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                         (digest, kind, model_name(model), text, len(text.encode("utf-8")), time.time()))
        self._pending += 1
        if self._pending >= STORE_BATCH:
            self.commit()

    def commit(self) -> None:
        if self._pending:
            self._db.execute("COMMIT")
            self._pending = 0

    def evict(self, max_entries: int, max_bytes: int) -> int:
        """Remove the oldest answers until the store is within its bounds; how many were removed."""
        self.commit()
        removed = 0
        while True:
            entries, size = self._db.execute("SELECT entries, bytes FROM totals WHERE id = 0").fetchone()
            if entries <= max_entries and size <= max_bytes:
                return removed
            count = entries - max_entries if entries > max_entries else 1
            if size > max_bytes:
                # Enough of the oldest to cover the excess, judged by the average size (a few passes at most).
                average = max(size // max(entries, 1), 1)
                count = max(count, -(-(size - max_bytes) // average))
            count = max(1, min(count, EVICT_BATCH))
            with self._transaction():
                removed += self._db.execute(
                    "DELETE FROM answers WHERE hash IN (SELECT hash FROM answers ORDER BY stored_at, hash LIMIT ?)",
                    (count,)).rowcount

    def prune(self, *, older_than_days: float | None = None, everything: bool = False) -> int:
        """Remove every answer (``everything``) or those stored more than ``older_than_days`` ago."""
        self.commit()
        with self._transaction():
            if everything:
                return self._db.execute("DELETE FROM answers").rowcount
            cutoff = time.time() - older_than_days * 86400
            return self._db.execute("DELETE FROM answers WHERE stored_at < ?", (cutoff,)).rowcount

    def vacuum(self) -> None:
        """Give the room of removed answers back to the filesystem (skipped while a reader holds the store)."""
        try:
            self._db.execute("VACUUM")
        except sqlite3.OperationalError:
            pass

    def _transaction(self):
        db = self._db

        class _Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, *_):
                db.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()

    def ages(self) -> Iterator[float]:  # for tests: stored_at, oldest first
        for (stored_at,) in self._db.execute("SELECT stored_at FROM answers ORDER BY stored_at"):
            yield stored_at
