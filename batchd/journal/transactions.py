"""How the journal commits: one transaction per transition, or one per tick for a group of them.

:class:`Transactions` owns the journal's SQLite connection (WAL, ``synchronous=FULL``) and every way a
transition reaches the disk: :meth:`~Transactions.transaction` alone, :meth:`~Transactions.group` for
the loop's tick, effects held back until the commit that promises them (:meth:`~Transactions.after_commit`),
directories synced before it (:meth:`~Transactions.sync_before_commit`) with the files the steps wrote
(``sync_group``, :class:`batchd.fs.SyncGroup`), and the reads the loop repeats
every tick kept while nothing is written. What is committed is :class:`batchd.journal.Journal`'s part;
why it is committed before every effect is in :mod:`batchd.journal`.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from batchd import fs
from batchd.durable import fsync_dir
from batchd.journal.schema import SCHEMA, migrate

log = logging.getLogger("batchd")

#: While another process holds the journal's write lock, a line says so this often (the first at once).
LOCKED_SAID_SECONDS = 60.0
#: SQLite waits this long for the write lock before an attempt fails (each failed attempt is waited again).
BUSY_TIMEOUT_MS = 5000


class JournalUnreadable(Exception):
    """The journal file is not a SQLite database, or a damaged one: batchd does not go on without the record
    of what it claimed, created and was billed for, nor start a new one over it."""

    def __init__(self, path: Path, error: sqlite3.DatabaseError):
        self.path = path
        self.reason = str(error)
        super().__init__(
            f"the journal {path} cannot be read ({error}): it is not a SQLite database, or a damaged one. batchd "
            f"keeps there which manifests it claimed and which remote batches it created, and does not go on "
            f"without them. Restore it from a backup (with its -wal file), or salvage what SQLite can read "
            f"(`sqlite3 {path.name} .recover | sqlite3 recovered.db`, then put recovered.db in its place); moving "
            f"it aside starts a new journal that knows none of the jobs")


class JournalLocked(Exception):
    """Another process held the journal's write lock while batchd was stopping: what it did meanwhile that
    was not committed is done again at its next start (each step is redone from its committed state)."""

    def __init__(self, path: Path, seconds: float):
        super().__init__(f"the journal {path} is locked by another process (for {seconds:.0f} s): stopping without "
                         f"recording the last steps; the next start redoes them")


class Transactions:
    """The journal's connection and its commits.  One writer process; readers may open it read-only."""

    def __init__(self, path: Path, *, readonly: bool = False,
                 while_locked: Callable[[float], None] = lambda seconds: None,
                 sync_group: fs.SyncGroup | None = None):
        self.path = path
        #: The steps' deferred fsyncs, made before every commit (see :meth:`_make_durable`).
        self.sync_group = sync_group
        #: Called every few seconds while another process holds the write lock, with the seconds waited so
        #: far: the daemon pings its watchdog, and raises :class:`JournalLocked` once it is stopping.
        self.while_locked = while_locked
        try:
            self._open(readonly)
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.OperationalError):
                raise  # locked, unreadable for its permissions, a full disk: not the file's content
            with contextlib.suppress(sqlite3.Error, AttributeError):
                self._db.close()
            raise JournalUnreadable(path, error) from None

    def _open(self, readonly: bool) -> None:
        path = self.path
        if readonly:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("SELECT count(*) FROM sqlite_master")  # a file that is no database fails here
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed transition survives power loss, not just a killed process.
            self._db.execute("PRAGMA synchronous=FULL")
            # Statement journals (a statement undone inside the tick's transaction) and sorts in memory:
            # in files they were a file created and deleted in /var/tmp every few ticks.
            self._db.execute("PRAGMA temp_store=MEMORY")
            # One transaction: a reader opening the file meanwhile sees the whole schema or none of it.
            # (executescript commits an open transaction first: the BEGIN is the script's.)
            with self._storage_failures():
                self._begin(lambda: self._db.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}"))
                migrate(self._db)
                self._db.execute("COMMIT")
        self._db.row_factory = sqlite3.Row
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        #: Effects waiting for the open transaction or group to commit (see :meth:`after_commit`).
        self._effects: list[Callable[[], Any]] = []
        #: Directories whose entries must be durable before the open group commits (see
        #: :meth:`sync_before_commit`), with the step each is synced for.
        self._dirs_to_sync: dict[Path, str | None] = {}
        self._group_thread: int | None = None
        self._transaction_thread: int | None = None
        #: Reads the loop makes on every tick, kept while nothing was written (see :meth:`_cached`).
        self._readonly = readonly
        self._rollbacks = 0
        self._reads: dict[tuple, tuple[tuple[int, int], Any]] = {}

    @property
    def initialized(self) -> bool:
        """False while the writer that created the file has not yet committed its schema."""
        return self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone() is not None

    def close(self) -> None:
        self._db.close()

    def damage(self, error: BaseException) -> JournalUnreadable | None:
        """What to say when ``error``, raised while the journal was in use, is this file found damaged: a
        page the start did not read (an old job's, an index's) can be damaged without its open failing.
        None for any other error, and for damage found in another SQLite file (the request cache's): the
        journal is checked before it is blamed."""
        if not fs.is_damaged_database(error) or self.check() is None:
            return None
        return JournalUnreadable(self.path, error)

    def check(self) -> str | None:
        """What SQLite's ``quick_check`` finds wrong with the file (its first problem), None when nothing."""
        return fs.damage_found(self._db)

    @contextmanager
    def transaction(self, *, one_write: bool = False) -> Iterator[sqlite3.Connection]:
        """One state transition: all of it is committed, or none of it.

        Inside :meth:`group` the transition is a savepoint of the group's transaction, committed with
        the group. A transition the database file cannot take (disk full, I/O error) raises
        :class:`batchd.fs.StorageFailure`: the daemon must not go on from a state it did not commit.

        ``one_write``: the transition writes with one statement at most (reads aside). SQLite undoes a
        statement that fails, so in a group it needs no savepoint: two statements fewer, and each
        statement the loop makes waits for the GIL.
        """
        if self._grouped():
            with self._storage_failures():
                if not self._db.in_transaction:
                    self._begin()
                if one_write:
                    try:
                        yield self._db
                    except BaseException:
                        self._rollbacks += 1  # nothing to undo; what the writer kept is dropped all the same
                        raise
                    return
                self._db.execute("SAVEPOINT transition")
                try:
                    yield self._db
                except BaseException:
                    self._rollbacks += 1
                    with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                        self._db.execute("ROLLBACK TO transition")
                        self._db.execute("RELEASE transition")
                    raise
                self._db.execute("RELEASE transition")
            return
        if self._group_thread is not None:
            raise RuntimeError("the journal is written only by the thread whose group is open (the loop's)")
        with self._storage_failures():
            self._begin()
            self._transaction_thread = threading.get_ident()
            try:
                try:
                    yield self._db
                except BaseException:
                    self._rollbacks += 1
                    with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                        self._db.execute("ROLLBACK")
                    raise
                self._make_durable()
                self._commit()
            finally:
                self._transaction_thread = None
        self._run_effects()

    # -- group commit: many transitions, one fsync -------------------------------------------------

    @contextmanager
    def group(self) -> Iterator[None]:
        """Commit every transition made inside in one transaction, at the end (or at :meth:`flush`).

        Each commit costs an fsync; the loop makes dozens of transitions a tick, each of which may
        stand alone. Intent before effect still holds because an effect that must follow a
        transition is handed to :meth:`after_commit`, which runs it once the group has committed;
        an effect the loop performs itself calls :meth:`flush` first. Only the thread that opened
        the group may write meanwhile. A step that raises inside keeps what it committed before:
        the transitions that completed are committed and their effects run, then the error goes on.
        """
        if self._group_thread is not None:
            raise RuntimeError("journal groups do not nest")
        self._group_thread = threading.get_ident()
        try:
            yield
        except fs.StorageFailure:
            # The database cannot take the group (SQLite may have rolled it back already): none of it
            # happened, nor will its effects; the daemon stops on this error.
            self._effects.clear()
            self._dirs_to_sync.clear()
            self._rollbacks += 1
            with contextlib.suppress(sqlite3.Error):
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            raise
        except BaseException:
            self.flush()
            raise
        else:
            self.flush()
        finally:
            self._group_thread = None

    def flush(self) -> None:
        """Commit the open group's transitions now and run the effects waiting for them (a no-op
        outside a group, or when called from another thread, such as a worker at a crash point)."""
        if self._group_thread != threading.get_ident():
            return
        self._make_durable()
        if self._db.in_transaction:
            with self._storage_failures():
                try:
                    self._commit()
                except BaseException:
                    self._effects.clear()
                    raise
        self._run_effects()

    def after_commit(self, effect: Callable[[], Any]) -> None:
        """Run ``effect`` once the transitions made so far are committed: at once when none is pending."""
        if self._grouped() or self._transaction_thread == threading.get_ident():
            self._effects.append(effect)
        else:
            effect()

    def sync_before_commit(self, directory: Path, *, step: str | None = None) -> None:
        """Make the entries of ``directory`` (a file moved in or out) durable before the transitions
        made so far commit: in a group, once for every move of the tick into or out of it (a burst
        claimed from the inbox, or published to the outbox, costs one fsync of it, not one a job);
        outside one, at once. ``step`` classifies a failure as for :func:`batchd.durable.fsync_dir`."""
        if self._grouped():
            self._dirs_to_sync.setdefault(directory if isinstance(directory, Path) else Path(directory), step)
        else:
            fsync_dir(directory, step=step)

    def _make_durable(self) -> None:
        """Before a commit: with a sync group, one syncfs for what the steps wrote since the last (their
        fsyncs were deferred to it) and for the folders to sync (the inbox, outbox and state dir share a
        filesystem, checked at the start); without, the folders to sync one by one."""
        if self.sync_group is not None:
            if self.sync_group.sync(anyway=bool(self._dirs_to_sync)):
                self._dirs_to_sync.clear()
            return
        self._sync_dirs()

    def _sync_dirs(self) -> None:
        while self._dirs_to_sync:
            directory, step = next(iter(self._dirs_to_sync.items()))
            fsync_dir(directory, step=step)  # a failure leaves it (and the rest) for the next flush
            del self._dirs_to_sync[directory]

    def _begin(self, begin: Callable[[], Any] | None = None) -> None:
        """BEGIN IMMEDIATE (the write lock; ``begin`` runs it), waited for as long as another process holds it:
        a `sqlite3` shell left with a transaction open, a tool writing the file. Nothing of the transaction
        has happened yet, so waiting changes nothing but time; the daemon's one writer meanwhile claims,
        sends and delivers nothing (that would need the journal), and says so once a minute."""
        begin = begin or (lambda: self._db.execute("BEGIN IMMEDIATE"))
        started = time.monotonic()
        try:
            begin()
            return
        except sqlite3.OperationalError as error:
            if not fs.is_locked_database(error):
                raise
            reason = error
        said_at = time.monotonic()
        log.warning("the journal %s is locked by another process (%s): waiting for it; nothing is claimed, sent or "
                    "delivered meanwhile (a `sqlite3` shell with a transaction open?)", self.path, reason)
        while True:
            waited = time.monotonic() - started
            self.while_locked(waited)
            if time.monotonic() - said_at >= LOCKED_SAID_SECONDS:
                said_at = time.monotonic()
                log.warning("the journal %s is still locked by another process, for %.0f s now", self.path, waited)
            try:
                begin()  # (waits up to BUSY_TIMEOUT_MS inside SQLite)
            except sqlite3.OperationalError as error:
                if not fs.is_locked_database(error):
                    raise
                continue
            log.info("the journal %s is free again, after %.0f s locked", self.path, time.monotonic() - started)
            return

    def _grouped(self) -> bool:
        return self._group_thread is not None and self._group_thread == threading.get_ident()

    def _commit(self) -> None:
        try:
            fs.fault_point("journal", self.path)
            self._db.execute("COMMIT")
        except BaseException:
            self._rollbacks += 1
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise

    def _cached(self, key: tuple, read: Callable[[], Any]) -> Any:
        """``read()``, or what it returned last time if this connection changed no row since.

        For the few queries the loop makes on every tick: each costs the loop a wait for the GIL, and
        most ticks change nothing they count. Sound because one daemon alone writes its journal (the
        state dir's lock) and every write goes through this connection: ``total_changes`` moves with
        each row written, and a rollback (which undoes rows without moving it) is counted apart. A
        read-only journal (another process writes it) never keeps a read. Callers must not change what
        they are given.
        """
        if self._readonly:
            return read()
        written = (self._db.total_changes, self._rollbacks)
        kept = self._reads.get(key)
        if kept is not None and kept[0] == written:
            return kept[1]
        value = read()
        self._reads[key] = (written, value)
        return value

    def _run_effects(self) -> None:
        """Run the waiting effects in the order they were asked for; one that fails does not keep the
        others from running (each was promised by a committed transition), its error is raised after."""
        failure = None
        while self._effects:
            effects, self._effects = self._effects, []
            for effect in effects:
                try:
                    effect()
                except BaseException as error:
                    failure = failure or error
        if failure is not None:
            raise failure

    @contextmanager
    def _storage_failures(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.OperationalError, OSError) as error:
            if not fs.is_journal_storage_error(error):
                raise
            raise fs.StorageFailure("journal", self.path, error) from error
