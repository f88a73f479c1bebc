"""What every step of the daemon shares: settings, the journal, the service, the loop's wake-up.

Steps run on the loop's thread and may write the journal. The slow parts of a step (a transfer, a
plugin's generator, a results file) run in :class:`Workers`: bounded pools whose work functions are
given plain values (a provider, a spool, a chunk), never the journal or the context, so only the
loop's thread can commit anything. Their outcomes come back to the step's ``collect``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import queue
import stat
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Hashable, TypeVar

from batchd import fs
from batchd.backoff import Backoff
from batchd.bounded import cut_text
from batchd.config import Settings
from batchd.costs import CostHooks, spend_of, summary_cost
from batchd.events import make_event
from batchd.journal import Job, Journal
from batchd.manifest import Manifest, ManifestError
from batchd.plugin_calls import PluginClock
from batchd.provider import Provider
from batchd.spool import JobSpool

log = logging.getLogger("batchd")

#: Job outcomes that make ``batchd run --once`` exit non-zero.
FAILED_OUTCOMES = ("failed", "rejected")
#: Exit code of ``batchd run --once`` when nothing failed but jobs are left held (over budget).
HELD_EXIT_CODE = 3
#: Exit code of ``batchd run --once`` when every job was delivered, none failed or is held, but some
#: are ``partial`` (some of their requests failed: ``batchd retry NAME`` sends those again).
PARTIAL_EXIT_CODE = 4
#: Exit code of ``batchd run --once`` when every job was delivered, none failed or is held, but a task
#: plugin failed to organize the results of some (outcome ``plugin_failed``: results.jsonl is complete,
#: organized.json is empty, summary.json's ``error`` names the plugin's error).
PLUGIN_FAILED_EXIT_CODE = 5
#: Exit code of ``batchd run --once`` stopped (SIGTERM, Ctrl-C) before it delivered everything;
#: EX_TEMPFAIL: running it again carries on where it stopped.
INTERRUPTED_EXIT_CODE = 75
#: Spools remembered by :meth:`Context.spool` (their paths made once); past this many the memory is
#: started afresh, so it stays bounded whatever the number of jobs.
SPOOLS_REMEMBERED = 4096
#: Memory the manifests :class:`ClaimedManifests` keeps may take, estimated (a parsed manifest measured
#: four times its bytes and 2.5 KiB more: 1,600 small ones, or 16 of the largest kept), and the largest
#: manifest it keeps.
CLAIMED_MANIFESTS_MEMORY = 4 * 2**20
CLAIMED_MANIFEST_MAX_BYTES = 64 * 2**10
#: After a write failed for lack of room, writes are tried again after this long, doubling each time
#: the disk is still full up to the maximum (a full disk is freed by a person or a cleanup job).
DISK_RETRY_SECONDS = 1.0
DISK_RETRY_MAX_SECONDS = 60.0

#: A 429 whose answer names no longer wait (RetryInfo) is waited out ``poll_interval`` at first, doubling
#: while the service keeps refusing, up to this.
QUOTA_RETRY_MAX_SECONDS = 600.0

K = TypeVar("K", bound=Hashable)


class QuotaWait:
    """The service refused calls with 429 RESOURCE_EXHAUSTED: what waits (``"create"``: uploads and
    creates; ``"poll"``: the remote job list) and until when, for the steps, the log and ``batchd status``.

    A wait lasts what the service asked for (its RetryInfo), at least a backoff that doubles while
    the refusals go on; a refusal during a wait lengthens it without starting another.
    """

    def __init__(self, initial: float, maximum: float = QUOTA_RETRY_MAX_SECONDS):
        self._initial, self._maximum = initial, maximum
        self._backoffs: dict[str, Backoff] = {}
        self._until: dict[str, float] = {}  # what → when its wait ends (monotonic)
        self._reasons: dict[str, str] = {}

    def refused(self, what: str, asked: float, reason: str) -> float | None:
        """A call of ``what`` was refused; ``asked`` is the service's RetryInfo (0: none). Returns the wait
        when one starts now (for the one log line of the wait), None when it lengthens the wait in force."""
        backoff = self._backoffs.setdefault(what, Backoff(self._initial, self._maximum))
        started = not self.waiting(what)
        wait = min(max(asked, backoff.failed() if started else backoff.interval), max(asked, self._maximum))
        until = time.monotonic() + wait
        self._until[what] = max(until, self._until.get(what, 0.0))
        self._reasons[what] = reason
        return wait if started else None

    def waiting(self, what: str) -> bool:
        return time.monotonic() < self._until.get(what, 0.0)

    def seconds_left(self, what: str) -> float:
        """Until the wait of ``what`` ends; inf when none is in force."""
        until = self._until.get(what)
        return max(0.0, until - time.monotonic()) if until is not None and self.waiting(what) else float("inf")

    def went_through(self, what: str) -> bool:
        """A call of ``what`` succeeded: the quota is back. Returns whether it had been refused."""
        self._until.pop(what, None)
        self._reasons.pop(what, None)
        backoff = self._backoffs.get(what)
        return backoff.succeeded() if backoff is not None else False

    def notices(self) -> list[dict]:
        """One notice per wait in force, with its end in wall-clock time (``batchd status`` counts down)."""
        now, wall = time.monotonic(), time.time()
        return [{"text": f"waiting: quota ({self._reasons[what]})", "until": round(wall + until - now)}
                for what, until in sorted(self._until.items()) if until > now]



class KeyRefusal:
    """Whether the service refuses the API key (revoked or mistyped), as the last call that asked found:
    the operator's to fix, never a job's fault. Said once when it starts and once when it ends (not at
    every poll), shown by ``batchd status`` meanwhile; submissions pause while it lasts."""

    FIX = "fix GEMINI_API_KEY / GOOGLE_API_KEY and restart batchd; jobs wait in the journal meanwhile"

    def __init__(self) -> None:
        #: "the service refuses the API key (…)" while it does, else None.
        self.reason: str | None = None

    def refused(self, error: Exception, doing: str, *, logged: bool = False) -> None:
        """A call (``doing``: "polling", "reconciling unconfirmed creates", …) was refused for the key;
        ``logged``: the caller said so in a line of its own."""
        first = self.reason is None
        self.reason = f"the service refuses the API key ({error_dict(error)['message']})"
        if first and not logged:
            log.error("%s: %s; submissions paused (%s)", doing, self.reason, self.FIX)
        elif not first:
            log.debug("%s: %s", doing, self.reason)

    def accepted(self) -> None:
        """A call the key was needed for went through."""
        if self.reason is not None:
            log.info("the service accepts the API key again: submissions go on")
            self.reason = None


class FolderAccess:
    """Whether batchd's user may write a folder a step moves files out of or into (the inbox, the outbox),
    looked at as the step is about to. Its permissions changed while batchd runs (the start checks them)
    made each move raise PermissionError out of the loop; now the step waits, and the change is said once
    when it starts and once when it ends. A folder that is not there is another check's."""

    def __init__(self, doing: str, meanwhile: str):
        self._doing, self._meanwhile = doing, meanwhile  # "move files out of the inbox", "nothing is claimed"
        self._denied = False

    def allows(self, folder: Path) -> bool:
        if os.access(folder, os.W_OK | os.X_OK) or not os.path.isdir(folder):
            if self._denied:
                self._denied = False
                log.info("batchd's user may %s %s again", self._doing, folder)
            return True
        if not self._denied:
            self._denied = True
            log.error("batchd's user (uid %d) may not %s %s; %s until it may", os.geteuid(), self._doing, folder,
                      self._meanwhile)
        return False


class Stopping(Exception):
    """Raised inside long steps when a stop was requested; the step's state stays committed as before."""


@dataclass
class RunReport:
    """What one ``run`` delivered, for the exit code and closing line of ``--once``. A service delivers
    for months: nothing here grows with the jobs it delivers but ``sources``, kept for ``--once`` alone."""

    #: Jobs delivered, by outcome.
    outcomes: Counter[str] = field(default_factory=Counter)
    #: Whether the run is ``--once``, which keeps the manifest names it delivered in ``sources``.
    once: bool = False
    #: The manifest names of the jobs delivered (``run --once`` stops waiting for them).
    sources: set[str] = field(default_factory=set)
    held: list[str] = field(default_factory=list)
    #: Whether everything in the inbox was delivered (False: a stop came first).
    finished: bool = False
    #: What the delivered jobs cost (actual, else estimated), by currency.
    spent: dict[str, float] = field(default_factory=dict)

    def delivered(self, job: Job) -> None:
        self.outcomes[job.outcome] += 1
        if self.once:
            self.sources.add(job.source)
        amount = spend_of(job.cost)
        if amount is not None:
            currency = summary_cost(job.cost)["currency"] or "USD"
            self.spent[currency] = self.spent.get(currency, 0.0) + amount

    @property
    def exit_code(self) -> int:
        if any(outcome in FAILED_OUTCOMES for outcome in self.outcomes):
            return 1
        if not self.finished:
            return INTERRUPTED_EXIT_CODE
        if self.held:
            return HELD_EXIT_CODE
        if "plugin_failed" in self.outcomes:
            return PLUGIN_FAILED_EXIT_CODE
        return PARTIAL_EXIT_CODE if "partial" in self.outcomes else 0

    def summary(self, outbox: Path) -> str:
        """The closing line of ``run --once``: what it delivered, what that cost, and where it is."""
        # Ended before all was delivered: a stop, or manifests a full disk left unclaimed (logged apart).
        left = "" if self.finished else "; ended before every job was delivered: the rest go on with the next run"
        if not self.outcomes:
            return f"run --once: no job delivered{left}" if left else \
                "run --once: nothing to do (no manifest in the inbox)"
        outcomes = ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.outcomes.items()))
        cost = "; ".join(f"{amount:.6f} {currency}" for currency, amount in sorted(self.spent.items()))
        held = f"; {len(self.held)} held over budget (batchd approve NAME)" if self.held else ""
        return (f"run --once: {self.outcomes.total()} job(s) delivered ({outcomes}){held}"
                f"{f', costing {cost}' if cost else ''}; results in {outbox}{left}")


@dataclass
class Work(Generic[K]):
    """One piece of work running in a :class:`Workers` pool; ``about`` is what the step needs to record it."""

    key: K
    future: Future
    about: Any = None


class DaemonThreads:
    """What :class:`Workers` needs of a ``ThreadPoolExecutor`` (``submit``, ``shutdown``), on daemon threads
    started as work comes (``size`` at most, each reused): for calls that write nothing and whose answer
    nobody needs once the daemon stops, so that a service that never answers one holds no stop (a
    ``ThreadPoolExecutor``'s threads are joined at exit)."""

    def __init__(self, size: int, name: str):
        self._size, self._name = size, name
        self._work: queue.SimpleQueue[Callable[[], Any] | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # released by each thread that waits for work (as the executor's)
        self._lock = threading.Lock()
        self._threads = 0

    def submit(self, work: Callable[[], Any]) -> None:
        self._work.put(work)
        if self._idle.acquire(blocking=False):
            return  # a waiting thread takes it
        with self._lock:
            if self._threads >= self._size:
                return  # taken once one is free
            self._threads += 1
            name = f"{self._name}_{self._threads - 1}"
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _serve(self) -> None:
        while (work := self._work.get()) is not None:
            work()
            self._idle.release()

    def shutdown(self, *, wait: bool = True, cancel_futures: bool = False) -> None:
        """Let each thread end after what it runs now; nothing waits for them (``wait`` is not honoured: a
        piece not begun was withdrawn by :meth:`Workers.shutdown`, and one running needs no waiting for)."""
        with self._lock:
            threads = self._threads
        for _ in range(threads):
            self._work.put(None)


class Workers(Generic[K]):
    """A fixed number of threads doing one kind of slow work, each piece keyed by what it works on.

    A step starts work only while the pool has a free thread (:meth:`free`), so nothing waits in a
    queue that a stop would have to withdraw: a job waits its turn in the journal instead. (The
    monitor's calls are the exception: keyed by remote batch, at most one of each kind per batch
    alive waits, and a stop withdraws what has not begun.) When a
    piece ends, ``on_done(key)`` wakes the loop, whose step then takes the outcome (:meth:`finished`),
    calling ``on_taken(key)`` for it: the loop marks the job again then, because the mark ``on_done``
    made may already have been spent by a visit in the tick whose collect ran just before the piece
    ended (a visit that still found it running); a step that keeps the outcome in memory, with no
    journal change to mark the job, would otherwise leave it waiting for the next sweep.

    Work is an effect: it is handed to the pool through ``after_commit`` (the journal's), so it
    starts only once the transition that announced it is committed. It counts as running at once.
    """

    def __init__(self, name: str, size: int, on_done: Callable[[K, Future], None],
                 after_commit: Callable[[Callable[[], Any]], None] = lambda effect: effect(),
                 on_taken: Callable[[K], None] = lambda key: None, *, daemon: bool = False):
        self.name, self.size = name, size
        self._pool = DaemonThreads(size, f"batchd-{name}") if daemon else \
            ThreadPoolExecutor(max_workers=size, thread_name_prefix=f"batchd-{name}")
        self._on_done = on_done
        self._on_taken = on_taken
        self._after_commit = after_commit
        self.running: dict[K, Work[K]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self.running

    def __len__(self) -> int:
        return len(self.running)

    def free(self) -> int:
        return self.size - len(self.running)

    def start(self, key: K, work: Callable[..., Any], *args: Any, about: Any = None) -> Work[K]:
        future: Future = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return  # withdrawn by a stop before it began
            try:
                result = work(*args)
            except BaseException as error:  # noqa: BLE001 - the step takes it from the future
                future.set_exception(error)
            else:
                future.set_result(result)

        piece = self.running[key] = Work(key, future, about)
        future.add_done_callback(lambda done: self._on_done(key, done))
        self._after_commit(lambda: self._pool.submit(run))
        return piece

    def finished(self) -> list[Work[K]]:
        """The pieces that ended since the last call, taken off the running set (loop thread only)."""
        done = [piece for piece in self.running.values() if piece.future.done()]
        for piece in done:
            del self.running[piece.key]
            self._on_taken(piece.key)
        return done

    def futures(self) -> list[Future]:
        return [piece.future for piece in self.running.values()]

    def shutdown(self, *, cancel: bool = False) -> None:
        if cancel:
            for piece in self.running.values():
                piece.future.cancel()  # one not begun never begins; one running is waited for (not on daemon threads)
        self._pool.shutdown(wait=True, cancel_futures=cancel)


class ClaimedManifests:
    """The manifests the claims just parsed and checked, kept for the step that reads each first (its
    estimate, else its build). That step still reads the claimed file and compares its bytes with the
    hash the claim recorded (:func:`batchd.daemon.admit.load_claimed`: a producer that kept the file open
    may have changed it), but need not parse and validate them again: in a burst of small manifests
    that parse was a tenth of the daemon's work.

    Each is taken once: a later reader (the build of a job its estimate read first) parses the bytes
    anew, so no two passes of a task plugin ever share a manifest's objects. Only a manifest that names
    no input file is kept (the claim resolved its inputs in the inbox, the steps read the spool's
    copies), of :data:`CLAIMED_MANIFEST_MAX_BYTES` at most, while the kept ones take less than
    :data:`CLAIMED_MANIFESTS_MEMORY`; past that a claim keeps nothing (the jobs claimed first are built
    first: theirs are the ones to keep). One not kept, or asked for after a restart, is parsed again, so
    this changes how fast a manifest is read, never what is read. Any thread may ask.
    """

    def __init__(self, memory: int = CLAIMED_MANIFESTS_MEMORY, largest: int = CLAIMED_MANIFEST_MAX_BYTES):
        self._memory, self._largest = memory, largest
        self._kept: dict[str, tuple[str, Manifest, int]] = {}
        self._used = 0
        self._lock = threading.Lock()

    def keep(self, job_id: str, sha256: str, manifest: Manifest, size: int) -> None:
        """Keep the manifest claimed as ``job_id``, read from ``size`` bytes hashing to ``sha256``."""
        if size > self._largest or manifest.input_files():
            return
        cost = 4 * size + 2560  # its parsed objects, as measured
        with self._lock:
            if self._used + cost <= self._memory:
                self._kept[job_id] = (sha256, manifest, cost)
                self._used += cost

    def take(self, job_id: str, sha256: str | None, path: Path) -> Manifest | None:
        """The kept manifest of ``job_id`` if it was read from bytes hashing to ``sha256``, named ``path``
        (its spool copy); it is kept no longer."""
        kept = self.forget(job_id)
        if kept is None or kept[0] != sha256:
            return None
        return dataclasses.replace(kept[1], path=path)

    def forget(self, job_id: str) -> tuple[str, Manifest, int] | None:
        """Keep ``job_id``'s manifest no longer (its job ended before a step read it: cancelled,
        rejected); what was kept, if anything."""
        with self._lock:
            kept = self._kept.pop(job_id, None)
            if kept is not None:
                self._used -= kept[2]
        return kept

    def __len__(self) -> int:
        return len(self._kept)


class Context:
    """The daemon's shared services, handed to every step."""

    def __init__(self, settings: Settings, *, once: bool, stopping: threading.Event,
                 tasks: dict, task_owners: dict[str, str], costs: CostHooks,
                 provider: Callable[[], Provider], wake: Callable[[], None]):
        self.settings = settings
        self.once = once
        self.stopping = stopping
        self.tasks = tasks
        self.task_owners = task_owners
        self.costs = costs
        self._provider = provider
        self.wake = wake
        self.journal: Journal | None = None  # opened by Daemon.start, after the state dir's lock is held
        #: The steps' fsyncs, made together before each journal commit (``group_sync``; opened by Daemon.start).
        self.sync_group: fs.SyncGroup | None = None
        self.report = RunReport(once=once)
        #: Writes that found the disk full pause every writing step (see batchd.fs).
        self.disk = Backoff(DISK_RETRY_SECONDS, DISK_RETRY_MAX_SECONDS)
        #: Calls the service refused for quota (429) wait here: creates and polls apart.
        self.quota = QuotaWait(settings.poll_interval)
        #: A key the service refuses pauses submissions (see KeyRefusal).
        self.key = KeyRefusal()
        #: A storage failure a worker hit; the loop ends the process with it.
        self.storage_failure: fs.StorageFailure | None = None
        #: Called (from any thread) with a job id whose next step can be taken: set by the scheduler.
        self.mark: Callable[[str], None] = lambda job_id: None
        #: Pings the service manager's watchdog: set by the daemon.
        self.alive: Callable[[], None] = lambda: None
        self._spools: dict[str, JobSpool] = {}
        #: The manifests the claims checked, kept for the step that reads each first.
        self.claimed_manifests = ClaimedManifests()

    @property
    def provider(self) -> Provider:
        return self._provider()

    def workers(self, name: str, size: int, *, keyed_by_job: bool = True, daemon: bool = False) -> Workers:
        """A bounded pool whose finished work wakes the loop and, when its keys are job ids (or start
        with one), marks that job for the loop's next tick; ``daemon``: on :class:`DaemonThreads`."""
        def mark_job(key: Any) -> None:
            if keyed_by_job:
                self.mark(key[0] if isinstance(key, tuple) else key)

        def done(key: Any, future: Future) -> None:
            if not future.cancelled() and isinstance(future.exception(), fs.StorageFailure):
                self.storage_failure = self.storage_failure or future.exception()
            mark_job(key)
            self.wake()
        return Workers(name, size, done, after_commit=lambda effect: self.journal.after_commit(effect),
                       on_taken=mark_job, daemon=daemon)

    def spool(self, job_id: str) -> JobSpool:
        """The job's spool folder. A job's steps ask for it a dozen times; its paths are made once (a
        pathlib join is no cheap thing for the loop). Any thread may ask: each dict operation is atomic."""
        spool = self._spools.get(job_id)
        if spool is None:
            if len(self._spools) >= SPOOLS_REMEMBERED:
                self._spools.clear()
            spool = self._spools[job_id] = JobSpool(self.settings.state_dir / "jobs" / job_id)
        return spool

    def event(self, kind: str, job: Job, **details: Any) -> dict | None:
        """The event of ``kind`` about ``job``, for the journal to commit with the transition it
        announces; None for a pack, batchd's own job (batchd/daemon/pack.py): its members announce
        what happens to them, and the journal takes None for no event."""
        if job.pack:
            return None
        if kind in ("progress", "expired"):  # kinds a job can meet more than once
            details["seq"] = self.journal.event_count(job.id, kind) + 1
        return make_event(kind, job, default_model=self.settings.model, **details)

    def log_event(self, kind: str, level: int, message: str, *args: Any, **kwargs: Any) -> None:
        """Log a line of the daemon's that says what an event of ``kind`` says: at DEBUG when the ``log``
        notification plugin writes that event's own line, so each event is one line at INFO and above
        (the plugin's, with the event's fields), and the daemon's line where no plugin logs the kind."""
        if "log" in self.journal.event_targets({"kind": kind}):
            level = logging.DEBUG
        log.log(level, message, *args, **kwargs)

    def plugin_clock(self, task: str, step: str) -> PluginClock:
        return PluginClock(task, self.task_owners.get(task, "?"), step)

    def model_of(self, job: Job) -> str:
        return job.model or self.settings.model

    def check_stop(self) -> None:
        """Called often by long steps on the loop's thread: a stop or a storage failure ends the step."""
        self.alive()
        if self.storage_failure is not None:
            raise self.storage_failure
        if self.stopping.is_set():
            raise Stopping()

    def raise_if_stopping(self) -> None:
        """check_stop for threads other than the loop's (which alone pings the service watchdog)."""
        if self.stopping.is_set():
            raise Stopping()

    def writes_paused(self) -> bool:
        """Whether a full disk pauses every step that writes more than the journal."""
        return self.disk.waiting()


# -- small helpers the steps share ------------------------------------------------------------------




def error_dict(error: Exception) -> dict:
    return {"code": getattr(error, "code", None) or type(error).__name__,
            "message": getattr(error, "message", None) or str(error)}


def manifest_error(error: ManifestError, max_chars: int) -> dict:
    """A rejection as summary.json shows it: the file, the field and the line, where known; field and
    reason cut at ``max_chars`` each (``[limits] error_chars``), the full length said. The message (file,
    line, field and reason together) keeps its file and line whole and cuts field and reason to what is
    left of ``max_chars`` (at least 160 characters): about ``max_chars`` in all, however large the input."""
    capped = error.capped(max_chars)
    message = str(capped)
    if len(message) > max_chars:
        where = len(str(ManifestError(error.path, "", line=error.line, column=error.column)))
        room = max(max_chars - where, 160)
        field = error.field and cut_text(error.field, room // 2)
        reason = cut_text(error.message, max(room - len(field or ""), 80))
        message = str(ManifestError(error.path, reason, field=field, line=error.line, column=error.column))
    details = {"message": message, "file": capped.path.name, "field": capped.field, "line": capped.line,
               "column": capped.column, "reason": capped.message}
    return {name: value for name, value in details.items() if value is not None}


def is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def is_own_file(path: Path) -> bool:
    """A regular file with no other name, which batchd may read: its bytes may be copied into the outbox.
    Anything else (a symlink, a FIFO, a hard link to a file its dropper may not read, a file dropped by
    another user that batchd's user may not read) is moved there whole, unread."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and os.access(path, os.R_OK)


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


class Turns:
    """The line of jobs waiting for a free thread of a bounded pool: a job waits in its journal state,
    not in a queue of futures.

    A job that finds no free thread joins the line (:meth:`wait`). When threads free up, the jobs at
    the head of the line are marked for the loop's next tick (:meth:`call`); a job visited for any
    other reason may take a thread only if it is among the first in line for the free ones
    (:meth:`first`), so a job that changes often cannot jump the line. Jobs are visited oldest first,
    so they join the line oldest first; a job that needs a thread many times (a chunk at a time)
    joins it again at the back after each turn.
    """

    def __init__(self) -> None:
        self._line: dict[str, None] = {}  # insertion-ordered: the head of the line first

    def __len__(self) -> int:
        return len(self._line)

    def wait(self, job: Job) -> None:
        self._line.setdefault(job.id, None)

    def forget(self, job_id: str) -> None:
        self._line.pop(job_id, None)

    def first(self, job_id: str, free: int) -> bool:
        """Whether the job may take one of ``free`` threads now (taking it out of the line if so)."""
        if free <= 0:
            return False
        if job_id not in self._line:
            return len(self._line) < free
        if job_id in itertools.islice(self._line, free):
            del self._line[job_id]
            return True
        return False

    def call(self, free: int, mark: Callable[[str], None]) -> None:
        """Mark the jobs at the head of the line for as many threads as are free."""
        for job_id in itertools.islice(self._line, max(0, free)):
            mark(job_id)
