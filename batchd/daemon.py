"""The daemon loop: inbox → journal → task plugin → remote batch jobs → outbox.

One thread owns the journal and makes every decision; small pools only run the
slow, remote parts: a submission (upload, ``batches.create``), the download of a
finished chunk's results and the deletion of its uploaded requests file, so none holds
up building or polling.  A job's
results.jsonl and organized.json are written by a writer thread that starts once the
job is built and joins each chunk as soon as the loop says it is back, so a big job is
mostly delivered by the time its last chunk returns.  Each step reads
the job's committed state, does one effect and commits the next state, so the loop
can be killed anywhere and, started again, carries on from the journal (see
:mod:`batchd.journal` for the states and the intent-before-effect rule).

``BATCHD_CRASH_AT=<point>`` makes the process SIGKILL itself at one of the named
:data:`CRASH_POINTS` (or :data:`CANCEL_CRASH_POINTS`); the crash tests use it to prove nothing is lost
or billed twice.
With ``BATCHD_CRASH_SIGNAL=SIGTERM`` it sends itself a stop request there instead, as
systemd would at that instant.

Storage faults (see :mod:`batchd.fs` for the policy and ``BATCHD_FS_FAULT``): a full disk fails the
step that writes, leaves its job in the state it had and makes the loop back off its writes
(:class:`DiskBackoff`) until there is room; below ``min_free_mb`` no new manifest is claimed. A failed
fsync or journal commit ends the process with :data:`batchd.fs.EXIT_STORAGE`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from batchd import fs, outbox
from batchd.config import ConfigError, Settings, load_settings
from batchd.costs import CostHooks, EstimateAlongside, JobInfo, RequestStream, spend_of, summary_cost
from batchd.costs import describe as describe_cost
from batchd.events import EventDispatcher, make_event, progress_counts
from batchd.inbox import Inbox, Irregular, claim, is_temp_name, sha256_file
from batchd.journal import REMOTE_LIVE_STATES, Chunk, Job, Journal, journal_path, new_job_id
from batchd.logs import redact_data
from batchd.manifest import Manifest, ManifestError, load_manifest
from batchd.plugin_calls import InThread, OnDemand, PluginClock, PluginTimeout, Prefetch
from batchd.plugins import get_plugin_manager, task_owners, tasks_for
from batchd.provider import Provider, RemoteFile, RemoteJob, RequestEncoder, inline_results, is_retryable
from batchd.service import Notifier
from batchd.spool import ChunkLimits, JobSpool
from batchd.task import TaskResult

log = logging.getLogger("batchd")

CRASH_POINTS = (
    "after-claim",        # manifest renamed into the spool, job not yet 'received'
    "while-building",     # a second chunk recorded while the first may already be out
    "after-intent",       # create intent committed, batches.create not yet sent
    "after-upload",       # a file chunk's requests uploaded, the file's name not yet recorded
    "after-create",       # the remote job exists, its name not yet recorded
    "while-polling",      # remote jobs running, mid poll
    "after-download",     # results fetched into the spool, outbox not yet written
    "after-publish",      # outbox folder published, job not yet marked done
)
#: Crash points on the way of a cancel (reliability.md K15); reached only by a job being cancelled.
CANCEL_CRASH_POINTS = (
    "after-cancel-request",  # the cancel request committed, its NAME.cancel not yet removed, nothing sent
    "after-cancel",          # batches.cancel sent for a remote job, not yet recorded (cancel_sent)
)
#: Crash points met only when a remote batch expires and its chunk is submitted again.
RESUBMIT_CRASH_POINTS = (
    "after-resubmit-intent",  # the resubmission's create intent committed, batches.create not yet sent
    "after-resubmit-create",  # the resubmission's remote job exists, its name not yet recorded
)
MANIFEST_SUFFIXES = (".toml", ".json")
CANCEL_SUFFIX = ".cancel"
APPROVE_SUFFIX = ".approve"
#: While stopping with uploads in flight, systemd's stop timeout is extended by this much at a time.
DRAIN_EXTEND_SECONDS = 30.0
#: Seconds a thread may hold the GIL while another waits (see Daemon.run).
SWITCH_INTERVAL = 0.001
#: Job outcomes that make ``batchd run --once`` exit non-zero.
FAILED_OUTCOMES = ("failed", "rejected")
#: Exit code of ``batchd run --once`` when nothing failed but jobs are left held (over budget).
HELD_EXIT_CODE = 3
#: Exit code of ``batchd run --once`` stopped (SIGTERM, Ctrl-C) before it delivered everything;
#: EX_TEMPFAIL: running it again carries on where it stopped.
INTERRUPTED_EXIT_CODE = 75
#: Result writers at once (see Daemon.writer_pool).
WRITER_THREADS = 8
#: Held jobs are checked against the budget again at most this often.
HELD_REVIEW_SECONDS = 1.0
#: Delivered events older than ``notify.keep_days`` are forgotten at start and then this often.
PRUNE_EVENTS_SECONDS = 3600.0
#: After a write failed for lack of room, writes are tried again after this long, doubling each time
#: the disk is still full up to the maximum (a full disk is freed by a person or a cleanup job).
DISK_RETRY_SECONDS = 1.0
DISK_RETRY_MAX_SECONDS = 60.0
#: How far the service's create times may be behind this machine's clock: the stray watch reads the
#: newest-first list down to this much before a watched name's first create.
CLOCK_SKEW_SECONDS = 600.0


def upload_display_name(chunk_display_name: str) -> str:
    """The display name of a chunk's requests file on the Files API: derived from the chunk's, so a
    copy whose name was never recorded (a crash right after the upload) is found again by it."""
    return f"{chunk_display_name}-requests"


def lock_path(state_dir: Path) -> Path:
    """The file whose flock makes a state dir one daemon's."""
    return state_dir / "batchd.lock"


def lock_holder(state_dir: Path) -> int | None:
    """The pid of the daemon running on ``state_dir`` (0: running, pid unknown), or None if none is."""
    try:
        with open(lock_path(state_dir)) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = f.read().strip()
                return int(text) if text.isdigit() else 0  # held, pid not written yet
            return None
    except FileNotFoundError:
        return None


def crashpoint(name: str) -> None:
    """Die here, as abruptly as a power cut would, if the crash tests asked for it."""
    if os.environ.get("BATCHD_CRASH_AT") == name:
        signum = signal.Signals[os.environ.get("BATCHD_CRASH_SIGNAL", "SIGKILL")]
        log.warning("crash point %s: sending the process %s", name, signum.name)
        os.kill(os.getpid(), signum)


class AlreadyRunning(Exception):
    """Another batchd holds the state dir's lock: two daemons on one journal would both claim and submit."""


class Stopping(Exception):
    """Raised inside long steps when a stop was requested; the step's state stays committed as before."""


@dataclass
class PollClock:
    """Backoff between polls: doubles while nothing changes, resets when something does."""

    initial: float
    maximum: float
    interval: float = 0.0
    due_at: float = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self.due_at

    def schedule(self, changed: bool) -> None:
        self.interval = self.initial if changed or not self.interval else min(self.interval * 2, self.maximum)
        self.due_at = time.monotonic() + self.interval

    def seconds_left(self) -> float:
        return max(0.0, self.due_at - time.monotonic())


@dataclass
class DiskBackoff:
    """When the loop may write again after a full disk: doubling waits, reset once a write goes through."""

    initial: float = DISK_RETRY_SECONDS
    maximum: float = DISK_RETRY_MAX_SECONDS
    interval: float = 0.0
    due_at: float = 0.0

    def waiting(self) -> bool:
        """Whether writing steps are paused now (the last one found the disk full)."""
        return bool(self.interval) and time.monotonic() < self.due_at

    def failed(self) -> float:
        """A write found the disk full: pause, longer than last time. Returns the pause."""
        self.interval = self.initial if not self.interval else min(self.interval * 2, self.maximum)
        self.due_at = time.monotonic() + self.interval
        return self.interval

    def succeeded(self) -> bool:
        """Writes go through again; returns whether they had been failing."""
        was_failing = bool(self.interval)
        self.interval = self.due_at = 0.0
        return was_failing

    def seconds_left(self) -> float:
        return max(0.0, self.due_at - time.monotonic())


@dataclass
class Submission:
    """A create running in the pool; the journal already holds its intent.

    A file chunk's submission has two stages: ``upload`` (its requests file is uploaded, or an
    earlier copy found) and then ``create``; the loop records the file between them.
    """

    job_id: str
    idx: int
    future: Future
    stage: str = "create"


@dataclass(frozen=True)
class RequestFile:
    """A file chunk's requests on the Files API, as the upload stage found or made it."""

    name: str
    reused: bool  # an earlier upload the service still had
    sole_copy: bool  # no other copy can be out there (False: a retried transfer may have left one)


@dataclass
class Fetch:
    """A finished chunk's results being stored in the spool; the journal records them when done."""

    chunk: Chunk
    future: Future  # -> (RemoteJob, chunk error or None)


class ChunkGate:
    """Which chunks of a job have their results in the spool, told by the loop to the job's writer.

    The writer joins chunks in order and waits at each one until the loop opens it (with the
    error every request of the chunk gets when the chunk produced no results, else None).
    Index entries of a chunk that was never recorded (a build that stopped part way) have
    nothing to wait for.
    """

    def __init__(self, recorded: Iterable[int], stopping: threading.Event):
        self._waiting = set(recorded)
        self._opened: dict[int, dict | None] = {}
        self._changed = threading.Condition()
        self._stopping = stopping

    def open(self, idx: int, error: dict | None) -> None:
        with self._changed:
            if idx in self._waiting:
                self._waiting.discard(idx)
                self._opened[idx] = error
                self._changed.notify_all()

    def pending(self) -> bool:
        """Whether some recorded chunk is not back yet."""
        with self._changed:
            return bool(self._waiting)

    def error_of(self, idx: int) -> dict | None:
        """The chunk's error once it is back (None: join its results), waiting until then."""
        with self._changed:
            while idx in self._waiting:
                if self._stopping.is_set():
                    raise Stopping()
                self._changed.wait(0.5)
            return self._opened.get(idx)


@dataclass
class Delivery:
    """A job's result files being written in its spool's staging folder."""

    gate: ChunkGate
    future: Future  # -> (JobFolder, counts, tokens, organize error or None)


@dataclass
class RunReport:
    """What one ``run`` delivered, for the exit code of ``--once``."""

    outcomes: dict[str, str] = field(default_factory=dict)
    held: list[str] = field(default_factory=list)
    #: Whether everything in the inbox was delivered (False: a stop came first).
    finished: bool = False

    @property
    def exit_code(self) -> int:
        if any(outcome in FAILED_OUTCOMES for outcome in self.outcomes.values()):
            return 1
        if not self.finished:
            return INTERRUPTED_EXIT_CODE
        return HELD_EXIT_CODE if self.held else 0


class Daemon:
    def __init__(self, settings: Settings, *, once: bool = False):
        self.settings = settings
        self.once = once
        self.stopping = threading.Event()
        self.report = RunReport()
        self.journal: Journal | None = None
        self._provider: Provider | None = None
        self.emulator = None
        self.tasks = tasks_for(settings)
        self.task_owners = task_owners(settings)
        self.plugin_manager = get_plugin_manager(settings.plugins_dir, frozenset(settings.disabled_plugins))
        self.costs = CostHooks(self.plugin_manager)
        self.event_dispatcher: EventDispatcher | None = None
        self.inbox = Inbox(settings.inbox, settle_seconds=settings.settle_seconds,
                           rescan_seconds=settings.rescan_seconds, backend=settings.watch_backend,
                           temp_max_age=settings.temp_max_age_seconds,
                           suffixes=MANIFEST_SUFFIXES + (CANCEL_SUFFIX, APPROVE_SUFFIX))
        self.pool = ThreadPoolExecutor(max_workers=settings.max_concurrent_submissions,
                                       thread_name_prefix="batchd-submit")
        self.submissions: dict[tuple[str, int], Submission] = {}
        # Downloads are transfers like uploads: as many at once as submissions, in their own pool.
        self.fetch_pool = ThreadPoolExecutor(max_workers=settings.max_concurrent_submissions,
                                             thread_name_prefix="batchd-fetch")
        self.fetches: dict[tuple[str, int], Fetch] = {}
        # Request files of finished chunks being deleted (one round at a time, in the fetch pool).
        self.upload_cleanup: Future | None = None
        self._upload_cleanup_due = 0.0
        # A writer waits at each chunk still running, so a few long jobs must not hold every writer
        # while another job's results are all back: enough threads, each started only when needed.
        self.writer_pool = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="batchd-write")
        # A done job's spool is removed off the loop's thread (a kill first leaves it for the next
        # start to remove): deleting its files took a tenth of the loop's time per small job.
        self.cleanup_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchd-cleanup")
        self.deliveries: dict[str, Delivery] = {}  # job id → its result files being written
        # job id → its chunks being built in a thread of their own, while it is being built: a task plugin
        # that hangs in requests() then holds up only its own job (see batchd.plugin_calls).
        self.builders: dict[str, OnDemand] = {}
        self.estimate_timeouts: dict[str, list[PluginTimeout]] = {}  # job id → its estimate pass gave up on the task
        self.estimating_alongside: dict[str, EstimateAlongside] = {}  # job id → the estimate its build pass feeds
        self.estimating: dict[str, Future] = {}  # job id → its cost estimate, running in the pool
        self.poll_clock = PollClock(settings.poll_interval, settings.poll_max_interval)
        self.once_pending: set[str] = set()
        self._once_jobs_done_at: float | None = None
        self._held_reviewed_at = float("-inf")
        self._events_pruned_at = float("-inf")
        self._config_mtime = self._config_file_mtime()
        self._lock_file = None
        self.notifier = Notifier()
        self.advance_now = False  # a poll finished a chunk: tick again at once to deliver it
        self.disk = DiskBackoff()
        self._once_blocked = False  # --once gave up: manifests left unclaimed below min_free_mb
        self._disk_full_seen = False  # in this tick
        #: Why new manifests are not claimed (free space under min_free_mb), or None.
        self.claiming_paused: str | None = None
        #: A storage failure a pool thread hit; the loop ends the process with it.
        self.storage_failure: fs.StorageFailure | None = None
        # The list is read for watched display names at least this often when nothing runs.
        self._strays_looked_at = float("-inf")
        self.cancel_backoff: dict[str, tuple[int, float]] = {}  # remote name → (failed cancels, retry at)

    # -- lifecycle ----------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signal_handlers()
        # The loop's thread computes flat out while it builds chunks, and the transfer and writer
        # threads come back from I/O thousands of times per job; each return waits for the GIL up
        # to one switch interval (5 ms by default), which made uploads several times slower.
        sys.setswitchinterval(SWITCH_INTERVAL)
        _return_big_buffers_to_the_os()
        try:
            self.notifier.status("starting: recovering and reconciling with the remote job list")
            self.start()
            self.notifier.ready(self.status_line())
            self.loop()
        except fs.StorageFailure as failure:
            self.storage_failure = failure
            log.critical(fatal_storage_message(failure))
            self.notifier.status(f"exiting: {failure}")
        finally:
            self.close()
        if self.storage_failure is not None:
            return fs.EXIT_STORAGE
        # A service stopped by SIGTERM exits 0 whatever its jobs did (a failed job is in its
        # summary, not a failure of the service); only --once reports outcomes in its exit code.
        return self.report.exit_code if self.once else 0

    def start(self) -> None:
        s = self.settings
        for folder in (s.inbox, s.outbox, s.state_dir, s.state_dir / "jobs"):
            folder.mkdir(parents=True, exist_ok=True)
        # Claims and publishes are renames: they are only atomic within one filesystem.
        outbox.check_same_filesystem(s.inbox, s.outbox, s.state_dir)
        self._lock_state_dir()
        self.journal = Journal(journal_path(s.state_dir))
        self.event_dispatcher = EventDispatcher(self.plugin_manager, self.journal, lambda: self.settings,
                                                wake=self.inbox.wake)
        self._start_emulator()  # it boots while the inbox is scanned and the first manifest validated
        self.inbox.start()  # watch first, then scan: a file created in between is seen twice, never missed
        if self.once:
            # A manifest-named entry of any kind becomes a job (irregular ones are rejected); a
            # NAME.cancel that is not a regular file is only warned about, so it is not waited for.
            self.once_pending = {p.name for p in s.inbox.iterdir()
                                 if not is_temp_name(p.name)
                                 and (p.suffix in MANIFEST_SUFFIXES
                                      or p.suffix in (CANCEL_SUFFIX, APPROVE_SUFFIX) and _is_regular_file(p))}
        self.recover()
        self.prune_events()
        log.info("batchd ready: inbox %s, outbox %s, provider %s", s.inbox, s.outbox, s.provider)

    def _start_emulator(self) -> None:
        s = self.settings
        if s.provider == "emulator":
            from batchd.emulator.server import EmulatorProcess

            self.emulator = EmulatorProcess(
                s.emulator.state_dir or s.state_dir / "emulator",
                job_seconds=s.emulator.job_seconds,
                faults=list(s.emulator.faults),
            ).spawn()
        else:
            self._provider = Provider.from_settings(s)  # now, so a missing key is reported at start

    @property
    def provider(self) -> Provider:
        """The service's client; with the embedded emulator, ready once the emulator serves."""
        if self._provider is None:
            # The embedded emulator is reached over HTTP exactly like Google: the provider
            # only ever sees a base URL and a key.
            self.emulator.wait_ready()
            self._provider = Provider(api_key="batchd-emulator", base_url=self.emulator.base_url,
                                      api_version=self.settings.api_version)
        return self._provider

    def _lock_state_dir(self) -> None:
        path = lock_path(self.settings.state_dir)
        self._lock_file = open(path, "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(self.settings.state_dir)
            self._lock_file.close()
            self._lock_file = None
            raise AlreadyRunning(
                f"another batchd{f' (pid {holder})' if holder else ''} is already running on state dir "
                f"{self.settings.state_dir} (lock {path}); stop it first, or give this one its own state_dir"
            ) from None
        # The holder's pid, for this message and `batchd doctor`; the lock itself is the flock.
        self._lock_file.truncate(0)
        self._lock_file.write(f"{os.getpid()}\n")
        self._lock_file.flush()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum, _frame):
            log.info("received %s: stopping after the current step", signal.Signals(signum).name)
            self.stopping.set()
            self.notifier.stopping()
            # The loop may be asleep until its next rescan. Waking it takes the inbox's event lock,
            # which the interrupted main thread may hold, so another thread does it.
            threading.Thread(target=self.inbox.wake, name="batchd-wake", daemon=True).start()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def close(self) -> None:
        # Let creates already sent finish and record them, so no remote job is left unrecorded.
        self._drain_submissions()
        self.pool.shutdown(wait=True)
        # A download cut short leaves its chunk 'running': the next start fetches it again.
        self.fetch_pool.shutdown(wait=True, cancel_futures=True)
        if self.journal is not None and self.upload_cleanup is not None and not self.upload_cleanup.cancelled():
            self._collect_upload_cleanup()  # deletions not recorded would only be repeated (and found gone)
        # Writers waiting for chunks give up; a restart writes the job's staging folder anew.
        self.stopping.set()
        self.writer_pool.shutdown(wait=True, cancel_futures=True)
        self.cleanup_pool.shutdown(wait=True)
        # After a failed fsync or commit nothing more is written: creates that went out meanwhile are
        # found again by display name when the restarted daemon reconciles.
        if self.journal is not None:
            if self.storage_failure is None:
                self._collect_submissions()
                if self.event_dispatcher is not None:
                    self.event_dispatcher.close()  # calls still running are redelivered after a restart
            self.journal.close()
        self.inbox.stop()
        if self.emulator is not None:
            self.emulator.stop()
        if self._lock_file is not None:
            self._lock_file.close()

    def _drain_submissions(self) -> None:
        """Wait for the uploads and creates in flight; under systemd, ask for stop time while they run.

        Every submission starts at once (the pool is as large as the limit), so nothing is queued
        that could be withdrawn: each one may already have reached the service.
        """
        if self.submissions:
            log.info("waiting for %d submission(s) in flight before stopping", len(self.submissions))
        while self.submissions:
            self.notifier.extend_timeout(DRAIN_EXTEND_SECONDS)
            wait([s.future for s in self.submissions.values()], timeout=DRAIN_EXTEND_SECONDS / 3,
                 return_when=FIRST_COMPLETED)
            if self.journal is None:
                break
            # An upload that finished is recorded and its create sent, as it would have been.
            self._collect_submissions()

    def check_stop(self) -> None:
        # Long steps call this often on the main thread: a good place to prove the loop is alive.
        self.notifier.watchdog()
        if self.storage_failure is not None:
            raise self.storage_failure
        if self.stopping.is_set():
            raise Stopping()

    def status_line(self) -> str:
        """One line for ``systemctl status``: e.g. "3 jobs active, 2 remote batches running"."""
        jobs = self.journal.active_jobs()
        running = len(self._chunks_in("running"))
        line = f"{len(jobs)} job{'s' if len(jobs) != 1 else ''} active, " \
               f"{running} remote batch{'es' if running != 1 else ''} running"
        waiting = len(self.submissions)
        line += f", {waiting} being submitted" if waiting else ""
        if self.disk.interval:
            line += f"; disk full: writes paused, next try in {self.disk.seconds_left():.0f} s"
        if self.claiming_paused:
            line += f"; not claiming new manifests: {self.claiming_paused}"
        return line

    # -- the loop -----------------------------------------------------------------------------

    def loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.tick()
            except Stopping:
                break
            self.notifier.watchdog()
            if self.notifier.enabled:
                self.notifier.status(self.status_line())
            if self.once and self._once_done():
                self.report.finished = not self._once_blocked
                break
            self.inbox.wait(self.notifier.max_sleep(self._sleep_seconds()))

    def tick(self) -> None:
        if self.storage_failure is not None:
            raise self.storage_failure
        self.inbox.ensure_watching()
        self._reload_settings()
        self._disk_full_seen = False
        if not self.disk.waiting():
            try:
                self.intake()
            except OSError as error:
                if not fs.is_disk_full(error):
                    raise
                self._disk_full(error, "claim", None)
        self._collect_submissions()
        self.review_held()
        self._collect_fetches()
        for job in self.journal.active_jobs():
            self.check_stop()
            try:
                self.advance(job)
            except OSError as error:
                if not fs.is_disk_full(error):
                    raise
                job = self.journal.job(job.id) or job  # the step may have committed a state before it failed
                self._abandon_writes(job)
                self._disk_full(error, None, job)
        if self.poll_clock.due() and self._live_chunks() or self._stray_look_due():
            self.poll()
        self.tidy_uploads()
        self.event_dispatcher.pump()
        if time.monotonic() - self._events_pruned_at >= PRUNE_EVENTS_SECONDS:
            self.prune_events()
        # Judged at the tick's end, not its start: a pause that ran out during the tick let its
        # writes go through, and the tick that follows may be the one a stop never gets to.
        if not self._disk_full_seen and not self.disk.waiting() and self.disk.succeeded():
            log.info("writes go through again: disk space is back (%s)", self._free_space())

    # -- storage faults -------------------------------------------------------------------------

    def _disk_full(self, error: OSError, step: str | None, job: Job | None) -> None:
        """A write found no room: log where and what, and pause every writing step for a while."""
        self._disk_full_seen = True
        pause = self.disk.failed()
        where = f"job {job.id} ({job.source}) stays {job.state!r}" if job is not None else \
            "the manifest stays in the inbox"
        log.error("disk full: writing %s failed (%s)%s; %s and the step is retried in %.0f s (%s)",
                  error.filename or "?", fs.describe(error), f" during step {step}" if step else "", where, pause,
                  self._free_space(), extra={"job": job.id} if job is not None else {})

    def _abandon_writes(self, job: Job) -> None:
        """Forget what a step cut short by a full disk had begun, so that it starts afresh next time:
        its chunk generator, and its staging folder unless it was complete (``job``, as committed,
        is being published)."""
        build = self.builders.pop(job.id, None)
        if build is not None:
            build.close(wait=True)  # its thread has ended with the error, or rests between chunks
            self._drop_estimate_alongside(job.id)
        delivery = self.deliveries.get(job.id)
        if delivery is not None and delivery.future.done():
            del self.deliveries[job.id]
        if job.state in ("received", "fetched") and job.id not in self.deliveries:
            shutil.rmtree(self._spool(job.id).staging, ignore_errors=True)  # the room it took is free again

    def _free_space(self) -> str:
        free = fs.free_mb(self.settings.state_dir)
        return "free space unknown" if free is None else f"{free:.1f} MB free on {self.settings.state_dir}'s filesystem"

    def _below_free_space_floor(self) -> bool:
        """Whether the state dir's filesystem has less than ``min_free_mb`` left; says so when that changes."""
        floor = self.settings.min_free_mb
        free = fs.free_mb(self.settings.state_dir) if floor else None
        low = free is not None and free < floor
        if low and self.claiming_paused is None:
            log.warning("only %.1f MB free on %s's filesystem, below min_free_mb = %g: not claiming new "
                        "manifests until there is more room (jobs already claimed go on)",
                        free, self.settings.state_dir, floor)
        elif not low and self.claiming_paused is not None:
            log.info("%s: claiming new manifests again", self._free_space())
        self.claiming_paused = f"{free:.1f} MB free, below min_free_mb = {floor:g}" if low else None
        return low

    def prune_events(self) -> None:
        """Forget delivered events past ``notify.keep_days`` (at start, then hourly: a service runs for months)."""
        self._events_pruned_at = time.monotonic()
        keep_days = self.settings.notify.keep_days
        pruned = self.journal.prune_events(time.time() - keep_days * 86400)
        if pruned:
            log.info("forgot %d delivered events older than %g days", pruned, keep_days)

    def _in_background(self, pool: ThreadPoolExecutor, work: Callable, *args) -> Future:
        """Run ``work`` in ``pool``; when it ends the loop wakes to take the next step at once, not
        at its next look (with many small jobs those looks were most of each job's time). A storage
        failure in ``work`` ends the loop at its next step, whichever job it is busy with."""
        future = pool.submit(work, *args)
        future.add_done_callback(self._background_done)
        return future

    def _background_done(self, future: Future) -> None:
        if not future.cancelled() and isinstance(future.exception(), fs.StorageFailure):
            self.storage_failure = self.storage_failure or future.exception()
        self.inbox.wake()

    def _sleep_seconds(self) -> float:
        if self.storage_failure is not None:
            return 0.0
        if self.disk.waiting():
            # Nothing that writes may go on: wake for the retry, or sooner for creates and polls.
            self.advance_now = False
            wait = self.disk.seconds_left()
            if self.submissions or self.fetches:
                wait = min(wait, 0.05)
            if self._live_chunks():
                wait = min(wait, self.poll_clock.seconds_left())
            return min(wait, self.event_dispatcher.seconds_until_due())
        if self.advance_now or any(feed.ready() and not self._waits_for_its_estimate(job_id)
                                   for job_id, feed in self.builders.items()):
            self.advance_now = False
            return 0.0
        if self.estimating_alongside:
            return 0.05
        if any(self._step_ready(job) for job in self.journal.active_jobs()):
            return 0.0  # the next step needs no one else: take it now, not at the next rescan
        if self.submissions or self.estimating or self.fetches or self.builders or self._delivery_awaited():
            return 0.05
        if self._live_chunks():
            wait = min(self.poll_clock.seconds_left(), self.settings.rescan_seconds)
        else:
            # --once also waits for unparseable manifests to reach their grace period: look each second.
            wait = 1.0 if self.once else self.settings.rescan_seconds
            if self.journal.watched_names():
                wait = min(wait, max(0.0, self._strays_looked_at + self.settings.poll_max_interval - time.monotonic()))
        return min(wait, self.event_dispatcher.seconds_until_due())

    def _waits_for_its_estimate(self, job_id: str) -> bool:
        alongside = self.estimating_alongside.get(job_id)
        return alongside is not None and alongside.fed_all

    def _step_ready(self, job: Job) -> bool:
        """Whether the job's next step can be taken now (a fetched job's writer may still be at work)."""
        if job.id in self.estimating or self.disk.waiting():
            return False
        if job.state == "fetched":
            delivery = self.deliveries.get(job.id)
            return delivery is None or delivery.future.done()
        return job.state in ("received", "publishing")

    def _once_done(self) -> bool:
        present = {p.name for p in self.settings.inbox.iterdir()} & self.once_pending
        busy = self.journal.active_jobs() or self.submissions or self.fetches or self.upload_cleanup
        if present and self.claiming_paused and not busy:
            # Waiting for someone to free the disk is a service's job; a one-off run says so and stops.
            log.error("%d manifest(s) left in the inbox unclaimed: %s; free some space and run again",
                      len(present), self.claiming_paused)
            self._once_blocked = True
            return True
        if present or busy:
            return False
        if self.review_held(force=True):
            return False  # a job the last step made fit (another's actual cost came in) goes now
        # Jobs are done; give undelivered events a bounded time (the next run retries the rest).
        now = time.monotonic()
        if self._once_jobs_done_at is None:
            self._once_jobs_done_at = now
        if self.event_dispatcher.busy() and now - self._once_jobs_done_at < self.settings.notify.once_drain_seconds:
            return False
        held = self.journal.jobs(states=("held",))
        self.report.held = [job.id for job in held]
        for job in held:
            log.warning("job %s (%s) is held: %s; release it with `batchd approve %s`",
                        job.id, job.source, job.hold, job.name)
        return True

    def _config_file_mtime(self) -> float | None:
        config_file = self.settings.config_file
        try:
            return config_file.stat().st_mtime if config_file else None
        except OSError:
            return None

    def _reload_settings(self) -> None:
        """Take the config file's [cost] and [notify] tables anew when it changes (a raised budget)."""
        mtime = self._config_file_mtime()
        if mtime == self._config_mtime:
            return
        self._config_mtime = mtime
        try:
            fresh = load_settings(self.settings.config_file)
        except ConfigError as error:
            log.error("config file changed but cannot be used (%s); keeping the settings in force", error)
            return
        if (fresh.cost, fresh.notify) != (self.settings.cost, self.settings.notify):
            self.settings.cost, self.settings.notify = fresh.cost, fresh.notify
            log.info("config file changed: [cost] and [notify] reloaded (other settings need a restart)")

    # -- recovery -----------------------------------------------------------------------------

    def recover(self) -> None:
        """Finish what a crash interrupted; runs before the first new manifest is taken."""
        for job in self.journal.jobs(states=("claiming",)):
            self._finish_claim(job)
        self._remove_leftover_spools()
        self._take_cancel_files()
        try:
            self.reconcile()
        except Exception as error:
            if not is_retryable(error):
                raise
            # The service is down or throttling: the unconfirmed creates stay 'submitting' and every
            # poll reconciles them again, instead of the daemon exiting into a restart loop.
            log.warning("reconciling with the service failed (%s); retrying with the next poll", error)

    def _take_cancel_files(self) -> None:
        """Take the NAME.cancel files dropped while batchd was down before reconciling, so a job cancelled
        by then gets no create for a chunk whose create a crash left unconfirmed."""
        for path in sorted(self.settings.inbox.iterdir()):
            if (path.suffix == CANCEL_SUFFIX and not is_temp_name(path.name) and _is_utf8(path.name)
                    and _is_regular_file(path)):
                self._take_request_file(path)

    def _remove_leftover_spools(self) -> None:
        """Spools a crash left behind: of a job already done (killed before its spool was removed), or
        of no job at all (killed in _accept before the job's row: the spool holds only copies of its
        inputs, the manifest itself is claimed only after the row is committed)."""
        for folder in (self.settings.state_dir / "jobs").iterdir():
            job = self.journal.job(folder.name)
            if job is None or job.state == "done":
                log.info("removing the leftover spool %s", folder)
                shutil.rmtree(folder, ignore_errors=True)

    # -- intake: inbox → journal --------------------------------------------------------------

    def intake(self) -> None:
        self.inbox.reap_stale_temp_files()
        # A claim a full disk cut short (its row committed, the move refused) is finished first, so
        # the file still in the inbox is not taken for a second copy of itself.
        for job in self.journal.jobs(states=("claiming",)):
            self._finish_claim(job)
        candidates = self.inbox.scan()
        paused = self._below_free_space_floor()
        for irregular in self.inbox.take_irregular() if not paused else ():
            self._reject_irregular(irregular)
        for candidate in candidates:
            self.check_stop()
            path = candidate.path
            if paused and path.suffix not in (CANCEL_SUFFIX, APPROVE_SUFFIX):
                continue  # a cancel or approval takes no room; a new job does
            if not _is_utf8(path.name):
                # Journal, outbox folder and remote display name all need a text name: the job is
                # rejected under a readable rendering of it, the file kept in its folder.
                source = _readable_name(path.name)
                self._accept(path, None, source=source, error={
                    "code": "file_name_not_utf8", "file": source,
                    "message": f"the file name {source!r} is not valid UTF-8: rename it and drop it again"})
                continue
            if path.suffix in (CANCEL_SUFFIX, APPROVE_SUFFIX):
                self._take_request_file(path)
                continue
            try:
                # Every input row is validated before anything is claimed or sent: a bad row at the end
                # of a big file rejects the job up front instead of after some of it was billed.
                manifest = load_manifest(path, root=self.settings.inbox, tasks=self.tasks)
            except ManifestError as error:
                # A file that does not parse may still be being written: reject it only once
                # it has stayed unchanged long enough.
                if candidate.unchanged_for < self.settings.incomplete_grace_seconds:
                    continue
                self._accept(path, None, error=_manifest_error(error))
                continue
            self._accept(path, manifest)

    def _reject_irregular(self, irregular: Irregular) -> None:
        """A symlink, folder or FIFO with a manifest's name: rejected, and the entry itself (never what
        a symlink points to) moved into the rejected job's outbox folder, as a manifest would be."""
        if irregular.path.suffix not in MANIFEST_SUFFIXES:
            return  # a NAME.cancel that is no file: the warning the inbox logged is all it gets
        name = irregular.path.name
        self._accept(irregular.path, None, source=_readable_name(name), error={
            "code": "not_a_regular_file", "file": _readable_name(name), "kind": irregular.kind,
            "message": f"{_readable_name(name)} is a {irregular.kind}, not a regular file; batchd reads only "
                       f"regular files (`batchd submit FILE` copies one in). It is kept in this folder as it was"})

    def _accept(self, path: Path, manifest: Manifest | None, *, error: dict | None = None,
                source: str | None = None) -> None:
        """Claim ``path`` as a new job. ``source``: the file name the job is known by (default ``path.name``)."""
        source = source or path.name
        try:
            # Only a regular file is read: a FIFO would block, a symlink could point anywhere.
            regular = stat.S_ISREG(os.lstat(path).st_mode)
            digest = hashlib.sha256(path.read_bytes()) if regular else None
        except FileNotFoundError:
            return  # gone since the scan: nothing was claimed, nothing to record
        except OSError as unreadable:
            # Unreadable (permissions): rejected and moved aside, or it would fail every tick and restart.
            digest, manifest = None, None
            error = error or {"code": "unreadable", "file": source,
                              "message": f"{source} cannot be read: {unreadable.strerror}"}
        job_id = new_job_id()
        spool = self._spool(job_id)
        try:
            with fs.naming(spool.root):
                spool.root.mkdir(parents=True)
                for input_path in manifest.input_files() if manifest else []:
                    # Inputs are linked (or copied) into the spool before the claim, so the claimed
                    # job is self-contained; a crash here leaves only a spare copy.
                    copy = spool.inputs / input_path.name
                    fs.fault_point("claim", copy)
                    _link_or_copy(input_path, copy)
                    digest.update(b"\0" + input_path.name.encode() + b"\0" + sha256_file(copy).encode())
        except OSError as error:
            if fs.is_disk_full(error):
                shutil.rmtree(spool.root, ignore_errors=True)  # no row yet: the manifest is taken again later
            raise
        sha256 = digest.hexdigest() if digest is not None else None
        earlier = self.journal.job_with_content(sha256) if sha256 is not None else None
        if error is None and earlier is not None:
            error = {"message": f"{source} has the same content as job {earlier.id} "
                                f"({earlier.source}); it was not run again",
                     "duplicate_of": earlier.id}
        # The verdict is part of the claim's intent: recovery finishes a claim cut short by a crash
        # and must not run a duplicate, a symlink or a FIFO it never re-examines.
        self.journal.add_job(job_id, name=Path(source).stem, source=source, sha256=sha256, error=error)
        if not claim(path, spool.manifest_path(source)):
            log.warning("%s vanished before it could be claimed", source)
            self.journal.update_job(job_id, state="done", outcome="rejected",
                                    error={"message": f"{source} was removed before batchd could claim it"})
            return
        crashpoint("after-claim")
        fields: dict = {"state": "received"}
        if manifest is not None:
            fields.update(task=manifest.task, model=manifest.model or self.settings.model)
        events = []
        if error is None:
            job = self.journal.job(job_id)
            events.append(self._event("accepted", dataclasses.replace(job, **fields)))
        self.journal.update_job(job_id, events=events, **fields)
        log.info("accepted %s as job %s%s", source, job_id, " (rejected)" if error else "",
                 extra={"job": job_id, "manifest": source})

    def _finish_claim(self, job: Job) -> None:
        spool = self._spool(job.id)
        claimed = spool.manifest_path(job.source)
        source = self._inbox_path(job.source)
        # A crash between the claim's link and its unlink leaves the same file in both places, and
        # claim() finishes that move. A different file under the same name arrived after the claim
        # was complete: it is a new manifest, left for intake.
        if os.path.lexists(source) and (not os.path.lexists(claimed) or _same_file(source, claimed)):
            claim(source, claimed)
        if not os.path.lexists(claimed):
            self.journal.update_job(job.id, state="done", outcome="rejected",
                                    error={"message": f"{job.source} vanished during its claim"})
            return
        # A claim's verdict was committed with it: a duplicate or an irregular entry is no accepted job.
        events = [] if job.error else [self._event("accepted", dataclasses.replace(job, state="received"))]
        self.journal.update_job(job.id, state="received", events=events)

    def _inbox_path(self, source: str) -> Path:
        """The inbox entry a job's ``source`` name came from (it differs for a non-UTF-8 file name)."""
        path = self.settings.inbox / source
        if not os.path.lexists(path):
            for name in os.listdir(self.settings.inbox):
                if name != source and _readable_name(name) == source:
                    return self.settings.inbox / name
        return path

    def _take_request_file(self, path: Path) -> None:
        """``NAME.cancel`` (``batchd cancel``) or ``NAME.approve`` (``batchd approve``): flag NAME's unfinished jobs.

        The flag is committed before the file goes: a crash in between flags twice, harmlessly.
        """
        name = path.stem
        jobs = [job for job in self.journal.find_jobs(name) if job.state != "done"]
        waiting = [p for p in (self.settings.inbox / (name + s) for s in MANIFEST_SUFFIXES) if p.exists()]
        if not jobs and waiting:
            return  # the manifest is still settling; flag it once it is a job
        for job in jobs:
            if path.suffix == CANCEL_SUFFIX:
                self.journal.update_job(job.id, cancel_requested=1)
                log.info("cancel requested for job %s (%s)", job.id, job.source)
            else:
                self.journal.update_job(job.id, approved=1)
                log.info("job %s (%s) approved%s", job.id, job.source,
                         "" if job.state == "held" else " ahead of its budget check")
            self._held_reviewed_at = float("-inf")  # a held job is released or delivered cancelled on this tick
        if not jobs:
            log.warning("%s: no unfinished job named %r", path.name, name)
        elif path.suffix == CANCEL_SUFFIX:
            crashpoint("after-cancel-request")
        path.unlink(missing_ok=True)

    # -- per-job state machine ------------------------------------------------------------------

    def advance(self, job: Job) -> None:
        if self.disk.waiting():
            # The disk was full a moment ago: only the steps that write nothing but the journal go on.
            if job.state in ("building", "built"):
                self.submit(job)
            elif job.state == "submitted":
                self.progress(job)
            return
        if job.state == "received":
            if job.error is not None:
                self.deliver(job, without_results="rejected")
            elif job.cancel_requested:
                self.deliver(job, without_results="cancelled")
            elif job.admitted_at is None:
                self.admit(job)
            else:
                self.build(job)
        elif job.state in ("building", "built"):
            # Chunks already built go out before the next one is built, so the service works
            # on chunk n while chunk n+1 is written.
            self.submit(job)
            if job.state == "building":
                self.build(self.journal.job(job.id))
                self.submit(self.journal.job(job.id))
        elif job.state == "submitted":
            self.progress(job)
        elif job.state == "fetched":
            self.deliver(job)
        elif job.state == "publishing":
            self.publish(job)

    def _spool(self, job_id: str) -> JobSpool:
        return JobSpool(self.settings.state_dir / "jobs" / job_id)

    def _load_claimed(self, job: Job) -> Manifest:
        spool = self._spool(job.id)
        return load_manifest(spool.manifest_path(job.source), input_dir=spool.inputs, tasks=self.tasks,
                             check_inputs=False)

    # -- cost and budget: received → (held →) admitted ----------------------------------------------

    def admit(self, job: Job) -> None:
        """Estimate the job's cost, then build it if the budget allows, else hold it.

        When a budget could hold the job, the estimate streams the manifest's requests once before
        any chunk is built: chunks go out while later ones are still being built, so the whole job
        must be priced first. It runs in the pool (a big job's pass and a countTokens call take a
        while), so other jobs go on meanwhile. When no budget can hold it (none set, or the job is
        approved), the estimate is made from the build pass instead (:meth:`_start_build`).
        """
        if job.cost is None and self.costs.estimates and (job.approved or not self.costs.budget_may_hold(self.settings)):
            self.journal.update_job(job.id, admitted_at=time.time())
            self.build(self.journal.job(job.id))
            return
        if job.cost is None and self.costs.active:
            estimate = self._estimate(job)
            if estimate is None:
                return  # still running, or the manifest turned out unusable (rejected next tick)
            cost = {"estimate": estimate["result"]}
            self.journal.update_job(job.id, cost=cost, spend=spend_of(cost))
            log.info("job %s: estimated %s", job.id, describe_cost(cost["estimate"]), extra={"job": job.id})
            job = self.journal.job(job.id)
        reasons = [] if job.approved else self._budget_reasons(job)
        if reasons:
            reason = "; ".join(reasons)
            held = dataclasses.replace(job, state="held", hold=reason)
            self.journal.update_job(job.id, state="held", hold=reason,
                                    events=[self._event("held", held, reason=reason)])
            log.warning("job %s (%s) held: %s; release it with `batchd approve %s` or a higher budget",
                        job.id, job.source, reason, job.name)
            return
        self.journal.update_job(job.id, admitted_at=time.time())
        self.build(self.journal.job(job.id))

    def _estimate(self, job: Job) -> dict | None:
        """Start the job's estimate, or collect it: ``{"result": estimate}`` once it is there."""
        future = self.estimating.get(job.id)
        if future is None:
            try:
                manifest = self._load_claimed(job)
            except ManifestError as error:
                self.journal.update_job(job.id, error=_manifest_error(error))
                return None
            model = manifest.model or self.settings.model
            self.journal.update_job(job.id, task=manifest.task, model=model)
            info = JobInfo.of(dataclasses.replace(job, task=manifest.task, model=model))
            timeouts = self.estimate_timeouts[job.id] = []
            stream = RequestStream(lambda: self._watched_requests(job.id, manifest, timeouts),
                                   stopping=self.stopping.is_set)
            self.estimating[job.id] = self._in_background(
                self.pool, self.costs.estimate, info, stream, self._token_counter(model), self.settings)
            return None
        if not future.done():
            return None
        del self.estimating[job.id]
        timeouts = self.estimate_timeouts.pop(job.id, [])
        if self.stopping.is_set():
            return None  # cut short by the stop: estimated again after the restart
        if timeouts:
            # The task hung reading its requests: building it would only hang again. Rejected next tick.
            log.error("job %s: %s", job.id, timeouts[0], extra={"job": job.id})
            self.journal.update_job(job.id, error={"message": str(timeouts[0])})
            return None
        return {"result": future.result()}  # CostHooks.estimate turns a plugin's failure into an error entry

    def _plugin_clock(self, task: str, step: str) -> PluginClock:
        return PluginClock(task, self.task_owners.get(task, "?"), step)

    def _watched_requests(self, job_id: str, manifest: Manifest, timeouts: list[PluginTimeout]):
        """The manifest's requests, read in a thread of their own with a bounded wait (for the estimate pass)."""
        clock = self._plugin_clock(manifest.task, "requests()")
        feed = Prefetch(clock.iterate(manifest.requests()), clock, name=f"batchd-requests-{job_id}", batch=1000)
        try:
            yield from feed.iterate(self.settings.plugin_timeout_seconds, self.stopping.is_set)
        except PluginTimeout as error:
            timeouts.append(error)
            raise

    def _raise_if_stopping(self) -> None:
        """check_stop for threads other than the loop's (which alone pings the service watchdog)."""
        if self.stopping.is_set():
            raise Stopping()

    def review_held(self, *, force: bool = False) -> bool:
        """Release held jobs that were approved or now fit the budget; deliver cancelled ones.

        Budgets are checked at most every :data:`HELD_REVIEW_SECONDS` unless ``force``d.
        Returns whether any job left ``held``.
        """
        now = time.monotonic()
        if not force and now - self._held_reviewed_at < HELD_REVIEW_SECONDS:
            return False
        self._held_reviewed_at = now
        released = False
        for job in self.journal.jobs(states=("held",)):
            if job.cancel_requested:
                self.journal.update_job(job.id, state="received")  # delivered as cancelled next
                released = True
                continue
            if not job.approved and self._budget_reasons(job):
                continue
            why = "approved" if job.approved else "now within budget"
            self.journal.update_job(job.id, state="received", admitted_at=time.time(), hold=None)
            log.info("job %s (%s) released: %s", job.id, job.source, why)
            released = True
        return released

    def _budget_reasons(self, job: Job) -> list[str]:
        estimate = (job.cost or {}).get("estimate")
        return self.costs.budget_reasons(
            JobInfo.of(job, self.settings.model), estimate,
            lambda since: self.journal.spent_since(since, excluding=job.id), self.settings)

    def _token_counter(self, model: str):
        provider = self.provider

        def count_tokens(texts: list[str]) -> int:
            return provider.count_tokens(model, list(texts))

        return count_tokens

    def _event(self, kind: str, job: Job, **details) -> dict:
        if kind in ("progress", "expired"):  # kinds a job can meet more than once
            details["seq"] = self.journal.event_count(job.id, kind) + 1
        return make_event(kind, job, default_model=self.settings.model, **details)

    def build(self, job: Job) -> None:
        """Build the job's next chunk of requests (one per tick, so finished chunks go out meanwhile).

        A job whose cancel was requested builds no further chunk (see :meth:`_stop_building`).
        """
        if job.cancel_requested and self._stop_building(job):
            return
        try:
            feed = self.builders.get(job.id) or self._start_build(job)
            kind, chunk = feed.take()
            if kind == "waiting":
                timeout = self.settings.plugin_timeout_seconds
                if feed.clock.overdue(timeout):
                    raise feed.clock.timeout(timeout)
                return  # the next chunk is still being built; the feed wakes the loop when it is
            if kind == "error":
                raise chunk
        except Stopping:
            raise
        except ManifestError as error:
            self._build_failed(job, _manifest_error(error))
            return
        except PluginTimeout as error:  # a hung plugin: its thread is left behind, the job fails
            log.error("job %s: %s", job.id, error, extra={"job": job.id})
            self._build_failed(job, {"message": str(error)})
            return
        except Exception as error:  # a task plugin's failure rejects its job, never the daemon
            if fs.is_disk_full(error):
                raise  # no room for the chunk files: the loop backs off and the build starts again
            log.exception("job %s: building requests failed", job.id)
            self._build_failed(job, {"message": f"task {job.task!r} failed to build requests: "
                                                f"{type(error).__name__}: {error}"})
            return
        if chunk is not None:
            self._record_chunk(job, chunk)
            if chunk.idx:
                crashpoint("while-building")
            return
        fields = {}
        alongside = self.estimating_alongside.get(job.id)
        if alongside is not None:
            if not alongside.done():
                return  # every request is read; the estimate finishes in its thread (a countTokens call)
            del self.estimating_alongside[job.id]
            if not alongside.abandoned:
                fields["cost"] = {"estimate": alongside.result}
                fields["spend"] = spend_of(fields["cost"])
                log.info("job %s: estimated %s", job.id, describe_cost(alongside.result), extra={"job": job.id})
        del self.builders[job.id]
        chunks = self.journal.chunks(job.id)
        if not chunks:
            self._build_failed(job, {"message": f"task {job.task!r} produced no requests from the manifest"})
            return
        self.journal.update_job(job.id, state="built", **fields)
        log.info("job %s: %d requests in %d chunk(s)", job.id, sum(c.request_count for c in chunks), len(chunks))

    def _start_build(self, job: Job) -> OnDemand:
        """The chunks of a job, built in a thread of their own; after a crash the same chunks are built
        again, with the same limits. Only the loop's thread records them in the journal."""
        manifest = self._load_claimed(job)
        model = manifest.model or self.settings.model
        limits = job.chunk_limits or dataclasses.asdict(self._limits())
        if job.state != "building":
            self.journal.update_job(job.id, state="building", task=manifest.task, model=model, chunk_limits=limits)
        # Settings are merged per request by the manifest, so the encoder has no defaults.
        encoder = RequestEncoder(model)
        clock = self._plugin_clock(manifest.task, "requests()")
        requests = clock.iterate(manifest.requests())
        if job.cost is None and self.costs.estimates:
            # Not estimated before admission (no budget could hold it): price the requests as they are built.
            info = JobInfo.of(dataclasses.replace(job, task=manifest.task, model=model))
            counter, settings = self._token_counter(model), self.settings
            alongside = EstimateAlongside(
                lambda stream: self.costs.estimate(info, stream, counter, settings), job.id)
            self._drop_estimate_alongside(job.id)
            self.estimating_alongside[job.id] = alongside
            requests = alongside.feed(requests)
        chunks = self._spool(job.id).build(requests, encoder.encode, ChunkLimits(**limits),
                                           check_stop=self._raise_if_stopping)
        feed = self.builders[job.id] = OnDemand(chunks, clock, name=f"batchd-build-{job.id}",
                                                on_ready=self.inbox.wake, source=requests)
        return feed

    def _stop_building(self, job: Job) -> bool:
        """End the build of a job whose cancel was requested, at the chunk boundary it is at.

        The chunks recorded so far are the job (those not yet sent end skipped, never submitted);
        the requests after them are never built nor sent, and the summary says so. A build a restart
        cut off rebuilds its recorded chunks first (it returns False until then): the index that joins
        their results back is written by the build, and a kill may have left it short.
        """
        chunks = self.journal.chunks(job.id)
        build = self.builders.get(job.id)
        last = build.last if build is not None else None
        if chunks and (last is None or last.idx < chunks[-1].idx):
            return False
        if build is not None and not build.resting():
            return False  # a chunk is being built: it is recorded first, and the build stops after it
        self.builders.pop(job.id, None)
        if build is not None:
            build.close(wait=True)  # at a chunk boundary: the index holds exactly the recorded chunks
        self._drop_estimate_alongside(job.id)
        if not chunks:
            log.info("job %s (%s): cancelled before any request was built", job.id, job.source)
            self.deliver(job, without_results="cancelled")
            return True
        cut_short = not last.last
        self.journal.update_job(job.id, state="built", build_stopped=cut_short)
        log.info("job %s (%s): cancelled while being built; %s", job.id, job.source,
                 f"building stopped after chunk {last.idx}" if cut_short else "every request was built",
                 extra={"job": job.id})
        return True

    def _record_chunk(self, job: Job, chunk) -> None:
        recorded = {"idx": chunk.idx, "display_name": self._display_name(job, chunk.idx), "mode": chunk.mode,
                    "request_count": chunk.request_count, "byte_size": chunk.byte_size}
        if self.journal.add_chunk(job.id, recorded):
            return
        # Recorded before a crash, and perhaps submitted already: the rebuild must agree with it.
        before = next(c for c in self.journal.chunks(job.id) if c.idx == chunk.idx)
        if (before.request_count, before.byte_size) != (chunk.request_count, chunk.byte_size):
            raise RuntimeError(f"chunk {chunk.idx} came out different when rebuilt after a restart: "
                               f"task {job.task!r} must build the same requests from the same manifest")

    def _drop_estimate_alongside(self, job_id: str) -> None:
        alongside = self.estimating_alongside.pop(job_id, None)
        if alongside is not None:
            alongside.close()

    def _build_failed(self, job: Job, error: dict) -> None:
        feed = self.builders.pop(job.id, None)
        if feed is not None:
            feed.close()
        self._drop_estimate_alongside(job.id)
        if not self.journal.chunks(job.id):
            self.journal.update_job(job.id, state="received", error=error)  # rejected: nothing was sent
            return
        # Chunks already out may be running: their results are kept, the requests that were never
        # sent show up as errors, and the summary says why the job stopped short.
        log.error("job %s: building stopped part way: %s", job.id, error["message"])
        self.journal.update_job(job.id, state="built", error=error)

    def _limits(self) -> ChunkLimits:
        s = self.settings
        return ChunkLimits(s.chunk_max_requests, s.chunk_max_bytes, s.inline_max_requests, s.inline_max_bytes)

    @staticmethod
    def _display_name(job: Job, idx: int, resubmits: int = 0) -> str:
        # Deterministic and unique per chunk and attempt: it is the idempotency key that
        # reconciliation finds in batches.list after a crash between create and recording its answer.
        return f"batchd-{job.name[:60]}-{job.id}-c{idx}" + (f"-r{resubmits}" if resubmits else "")

    # -- submission ---------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        chunks = self.journal.chunks(job.id)
        if job.cancel_requested:
            for chunk in chunks:
                if chunk.state == "built":
                    self.journal.update_chunk(job.id, chunk.idx, state="skipped")
        for chunk in self.journal.chunks(job.id):
            if chunk.state != "built" or (job.id, chunk.idx) in self.submissions:
                continue
            if len(self.submissions) >= self.settings.max_concurrent_submissions:
                return
            self.journal.update_chunk(job.id, chunk.idx, state="submitting", intent_at=time.time(),
                                      **_upload_intent(chunk))
            crashpoint("after-intent")
            if chunk.resubmits:
                crashpoint("after-resubmit-intent")
            self._start_create(job, chunk)
        chunks = self.journal.chunks(job.id)
        if job.state == "built" and all(c.state != "built" for c in chunks):
            sent = any(c.state != "skipped" for c in chunks)  # none: cancelled before any was sent
            submitted = dataclasses.replace(job, state="submitted")
            self.journal.update_job(job.id, state="submitted", submitted_at=time.time() if sent else None,
                                    events=self._submitted_events(submitted, chunks))

    def _submitted_events(self, job: Job, chunks: list[Chunk]) -> list[dict]:
        """The ``submitted`` event of a job all of whose chunks are sent, once one remote job of it exists.

        Until then (creates in flight or unconfirmed) there is none: it comes with the first
        adoption (:meth:`_adopt`), and never for a job whose every create was refused or skipped.
        """
        if job.state != "submitted" or not any(c.remote_name for c in chunks):
            return []
        sent = [c for c in chunks if c.state != "skipped"]
        return [self._event("submitted", job, counts={"total": sum(c.request_count for c in sent), "done": 0,
                                                      "chunks": len(sent)})]

    def _start_create(self, job: Job, chunk: Chunk) -> None:
        """Send the chunk's create; a file chunk's requests file first (:meth:`_upload_requests`).

        ``chunk`` is as it was before the intent just committed: its ``upload_state`` says what
        an earlier attempt may have left on the Files API.
        """
        spool = self._spool(job.id)
        model = job.model or self.settings.model
        provider = self.provider

        def create() -> RemoteJob:
            requests = [RequestEncoder.inline_from_line(line) for line in spool.read_requests(chunk.idx)]
            return provider.create_inline(model, requests, chunk.display_name)

        if chunk.mode == "inline":
            submission = Submission(job.id, chunk.idx, self._in_background(self.pool, create))
        else:
            submission = Submission(job.id, chunk.idx, self._in_background(self.pool, self._upload_requests, chunk),
                                    stage="upload")
        self.submissions[(job.id, chunk.idx)] = submission
        log.info("job %s: submitting chunk %d (%s, %d requests)", job.id, chunk.idx, chunk.mode,
                 chunk.request_count, extra={"job": job.id, "chunk": chunk.idx, "requests": chunk.request_count})

    def _upload_requests(self, chunk: Chunk) -> RequestFile:
        """The chunk's requests file on the Files API (runs in the pool): the one an earlier attempt
        left, while the service still has it, else a new upload."""
        provider = self.provider
        display_name = upload_display_name(chunk.display_name)
        try:
            if chunk.upload_state == "uploading":
                # An earlier attempt may have uploaded copies whose names were never recorded: keep one,
                # delete the others (none was ever given to a create: a name is recorded before its create).
                # A resubmitted chunk's earlier attempts uploaded the same bytes under their own names.
                searched = _upload_display_names(chunk)
                copies = [f for f in provider.list_files() if f.display_name in searched]
                if chunk.uploaded_file and all(f.name != chunk.uploaded_file for f in copies):
                    copies += [f for f in [provider.get_file(chunk.uploaded_file)] if f]
                kept = _reusable(copies, chunk.uploaded_file, chunk.byte_size)
                spares = [copy for copy in copies if copy is not kept]
                if self.settings.delete_request_files:
                    spares = [copy for copy in spares if not self._delete_quietly(chunk, copy.name)]
                if kept is not None:
                    return RequestFile(kept.name, reused=True, sole_copy=not spares)
            elif chunk.upload_state == "uploaded" and chunk.uploaded_file:
                recorded = provider.get_file(chunk.uploaded_file)
                kept = _reusable([recorded] if recorded else [], chunk.uploaded_file, chunk.byte_size)
                if kept is not None:
                    return RequestFile(kept.name, reused=True, sole_copy=True)
        except Exception as error:
            if is_retryable(error):
                raise  # the chunk stays 'submitting': created again after the grace period
            # Looking for the earlier upload is an optimisation; a service that refuses it gets a new one.
            log.warning("job %s: looking for chunk %d's earlier upload failed (%s); uploading it again",
                        chunk.job_id, chunk.idx, error)
        uploaded = provider.upload_jsonl(self._spool(chunk.job_id).requests_path(chunk.idx), display_name)
        crashpoint("after-upload")
        # A copy an earlier, interrupted upload made may show up in the list only later: a chunk that
        # was 'uploading' before is looked up by display name again once it is done.
        sole_copy = uploaded.attempts == 1 and chunk.upload_state != "uploading"
        return RequestFile(uploaded.name, reused=False, sole_copy=sole_copy)

    def _delete_quietly(self, chunk: Chunk, name: str) -> bool:
        """Delete a spare copy of a chunk's requests file; False (and a warning) when that failed."""
        try:
            self.provider.delete_file(name)
        except Exception as error:
            log.warning("job %s: deleting %s, a spare copy of chunk %d's requests, failed (%s)",
                        chunk.job_id, name, chunk.idx, error)
            return False
        return True

    def _collect_submissions(self) -> None:
        for key, submission in list(self.submissions.items()):
            if not submission.future.done():
                continue
            del self.submissions[key]
            chunk = next(c for c in self.journal.chunks(submission.job_id) if c.idx == submission.idx)
            try:
                result = submission.future.result()
            except Exception as error:
                self._create_failed(chunk, error, submission.stage)
                continue
            if submission.stage == "upload":
                self._create_from_file(chunk, result)
                continue
            crashpoint("after-create")
            if chunk.resubmits:
                crashpoint("after-resubmit-create")
            self._adopt(chunk, result)

    def _create_from_file(self, chunk: Chunk, requests_file: RequestFile) -> None:
        """Record the chunk's requests file (so a create made again reuses it, and it is deleted once the
        chunk is done), then send the create."""
        job = self.journal.job(chunk.job_id)
        fields = {}
        if job.cancel_requested:
            # Cancelled while its requests were being uploaded: the create was never sent, so it never
            # will be; the upload is deleted as the chunk's of any finished chunk.
            fields["state"] = "skipped"
        self.journal.update_chunk(chunk.job_id, chunk.idx, uploaded_file=requests_file.name,
                                  upload_state="uploaded" if requests_file.sole_copy else "uploading", **fields)
        log.info("job %s: chunk %d's requests are %s%s%s", chunk.job_id, chunk.idx, requests_file.name,
                 " (uploaded before)" if requests_file.reused else "",
                 "; the job is cancelled, so it is never created" if fields else "",
                 extra={"job": chunk.job_id, "chunk": chunk.idx, "file": requests_file.name})
        if fields:
            return
        model, provider = job.model or self.settings.model, self.provider
        future = self._in_background(self.pool, provider.create_from_file, model, requests_file.name,
                                     chunk.display_name)
        self.submissions[(chunk.job_id, chunk.idx)] = Submission(chunk.job_id, chunk.idx, future)

    def _adopt(self, chunk: Chunk, remote: RemoteJob) -> Chunk:
        """Record ``remote`` as the chunk's remote job; returns the chunk as now recorded."""
        self.journal.record_remote_job(remote.name, chunk, "adopted")
        adopted = dataclasses.replace(chunk, state="running", remote_name=remote.name,
                                      remote_state=remote.state, stats=remote.stats)
        job = self.journal.job(chunk.job_id)
        events = []
        if job.state == "submitted" and not self.journal.event_count(job.id, "submitted"):
            # Every chunk was sent before this first create was confirmed: the job's remote work exists now.
            events = self._submitted_events(job, [adopted if c.idx == chunk.idx else c
                                                  for c in self.journal.chunks(job.id)])
        self.journal.update_chunk(chunk.job_id, chunk.idx, state="running", remote_name=remote.name,
                                  remote_state=remote.state, stats=remote.stats, events=events)
        log.info("job %s: chunk %d is remote job %s", chunk.job_id, chunk.idx, remote.name,
                 extra={"job": chunk.job_id, "chunk": chunk.idx, "remote": remote.name})
        return adopted

    def _create_failed(self, chunk: Chunk, error: Exception, stage: str = "create") -> None:
        if is_retryable(error):
            # Ambiguous: the job may exist.  It stays 'submitting' and the next reconcile
            # either finds it by display name or, after the grace period, creates it.
            log.warning("job %s: %s of chunk %d failed (%s); will reconcile", chunk.job_id, stage, chunk.idx, error)
            if stage == "create":  # a failed upload sent no create: nothing under the name to watch for
                self._watch(chunk, chunk.intent_at or time.time())
            return
        log.error("job %s: chunk %d was refused: %s", chunk.job_id, chunk.idx, error)
        self.journal.update_chunk(chunk.job_id, chunk.idx, state="fetched", remote_state="rejected",
                                  error=_error_dict(error))

    def reconcile(self) -> None:
        """Match chunks whose create is unconfirmed against the remote job list, by display name."""
        pending = {c.display_name: c for c in self._chunks_in("submitting")
                   if (c.job_id, c.idx) not in self.submissions}
        if not pending:
            return
        watched = self.journal.watched_names()
        for chunk in pending.values():
            # Its create was sent (or may have been) with no answer recorded: the name is watched from now on.
            if chunk.display_name not in watched:
                self._watch(chunk, chunk.intent_at or time.time())
        found: dict[str, list[RemoteJob]] = {}
        for remote in self.provider.list_jobs():
            if remote.display_name in pending:
                found.setdefault(remote.display_name, []).append(remote)
        for display_name, chunk in pending.items():
            job = self.journal.job(chunk.job_id)
            matches = sorted(found.get(display_name, []), key=_creation_order)
            if matches:
                adopted = self._adopt(chunk, matches[0])
                for duplicate in matches[1:]:
                    self._stray(chunk.job_id, chunk.idx, display_name, duplicate)
                if job.cancel_requested:
                    self._send_cancel(adopted)  # kept, so whatever results it has are the job's
            elif time.time() - (chunk.intent_at or 0) < self.settings.submit_grace_seconds:
                continue  # the create may have reached the service and not be listed yet
            elif job.cancel_requested:
                # A cancelled job is never created again; the grace period is what says the create
                # never reached the service, as it does before a create is sent again.
                log.info("job %s: chunk %d is cancelled and its create never showed up: never submitted",
                         chunk.job_id, chunk.idx, extra={"job": chunk.job_id, "chunk": chunk.idx})
                self.journal.update_chunk(chunk.job_id, chunk.idx, state="skipped")
            else:
                log.info("job %s: no remote job for chunk %d; creating it", chunk.job_id, chunk.idx)
                now = time.time()
                self.journal.update_chunk(chunk.job_id, chunk.idx, intent_at=now, **_upload_intent(chunk))
                self._watch(chunk, now)  # the watch runs from the last create under the name
                self._start_create(job, chunk)

    def _chunks_in(self, *states: str) -> list[Chunk]:
        return self.journal.chunks_in(states, job_states=("building", "built", "submitted"))

    def _live_chunks(self) -> list[Chunk]:
        return self._chunks_in(*REMOTE_LIVE_STATES)

    # -- request files: deleted once their chunk is done ----------------------------------------

    def tidy_uploads(self) -> None:
        """Start deleting the request files of finished chunks (``fetched`` or ``skipped``; see
        :mod:`batchd.journal`, ``upload_state``), one round at a time in the background.

        Their results are in the spool, or the job ended without any: nothing will create a batch
        from them again. A round that failed is tried again after ``poll_max_interval``; a
        failed delete never fails a job (the file expires after 48 h anyway).
        """
        if self.upload_cleanup is not None:
            if not self.upload_cleanup.done():
                return
            self._collect_upload_cleanup()
        if time.monotonic() < self._upload_cleanup_due:
            return
        chunks = self.journal.uploads_to_delete()
        if not chunks:
            return
        if not self.settings.delete_request_files:
            self.journal.set_upload_states({(c.job_id, c.idx): "kept" for c in chunks})
            return
        self.upload_cleanup = self._in_background(self.fetch_pool, self._delete_request_files, chunks)

    def _delete_request_files(self, chunks: list[Chunk]) -> tuple[dict[tuple[str, int], str], bool]:
        """Delete the chunks' request files (runs in the fetch pool): the recorded one, and for an
        ``uploading`` chunk every copy the files list shows under its upload display name.

        Returns each chunk's new ``upload_state`` (chunks left out are tried again) and whether to
        try again later.
        """
        provider = self.provider
        names = {(c.job_id, c.idx): [c.uploaded_file] if c.uploaded_file else [] for c in chunks}
        searched = {name: (c.job_id, c.idx) for c in chunks if c.upload_state == "uploading"
                    for name in _upload_display_names(c)}
        again = False
        if searched:
            try:
                for remote_file in provider.list_files():
                    key = searched.get(remote_file.display_name)
                    if key is not None and remote_file.name not in names[key]:
                        names[key].append(remote_file.name)
            except Exception as error:
                log.warning("listing files to find the request files of %d finished chunk(s) failed (%s); "
                            "retrying later", len(searched), error)
                again = True
                for key in set(searched.values()):
                    del names[key]
        outcome: dict[tuple[str, int], str] = {}
        for (job_id, idx), file_names in names.items():
            if again or self.stopping.is_set():
                # The service is failing (each delete already had the read retries), or the daemon is
                # stopping: the rest waits for the next round, so a round stays short.
                break
            state = "deleted"
            for name in file_names:
                try:
                    if provider.delete_file(name):
                        log.info("job %s: deleted %s, the requests of chunk %d", job_id, name, idx,
                                 extra={"job": job_id, "chunk": idx, "file": name})
                except Exception as error:
                    if is_retryable(error):
                        log.warning("job %s: deleting %s failed (%s); retrying later", job_id, name, error)
                        again = True
                        break
                    log.error("job %s: the service refused to delete %s (%s); it stays until it expires",
                              job_id, name, error, extra={"job": job_id, "chunk": idx, "file": name})
                    state = "kept"
            else:
                outcome[(job_id, idx)] = state
        return outcome, again

    def _collect_upload_cleanup(self) -> None:
        future, self.upload_cleanup = self.upload_cleanup, None
        try:
            outcome, again = future.result()
        except Exception:
            log.exception("deleting request files failed; retrying later")
            outcome, again = {}, True
        self.journal.set_upload_states(outcome)
        self._upload_cleanup_due = time.monotonic() + self.settings.poll_max_interval if again else 0.0

    # -- monitoring ---------------------------------------------------------------------------

    def poll(self) -> None:
        """One round of monitoring: list pages for every running job, a get only for finished ones.

        The same list pass looks for strays under the watched display names (see :meth:`_stray`);
        with nothing running it is made for them alone, every ``poll_max_interval``.
        """
        running = {c.remote_name: c for c in self._chunks_in("running")}
        by_display_name = {c.display_name: c for c in running.values()}
        live = bool(running) or bool(self._chunks_in("submitting"))  # else a look for strays alone
        changed = False
        try:
            self.reconcile()
            watched = self._watched_now()
            # Newest first: once every running job is seen, only a watched name's stray can be further
            # down, and none is older than the first create under its name.
            oldest = min((w["first_attempt_at"] for w in watched.values()), default=float("inf"))
            oldest -= CLOCK_SKEW_SECONDS
            seen: set[str] = set()
            if running or watched:
                for remote in self.provider.list_jobs():
                    chunk = running.get(remote.name)
                    if chunk is not None:
                        seen.add(remote.name)
                        changed |= self._observe(chunk, remote)
                    elif (owner := by_display_name.get(remote.display_name)) is not None:
                        self._stray(owner.job_id, owner.idx, owner.display_name, remote)
                    elif (name := watched.get(remote.display_name)) is not None:
                        self._stray(name["job_id"], name["chunk_idx"], remote.display_name, remote)
                    if len(seen) == len(running) and (not watched or remote.create_time is not None
                                                      and remote.create_time.timestamp() < oldest):
                        break  # every job we watch is accounted for, and older pages hold no stray
                self._strays_looked_at = time.monotonic()
            if live:
                crashpoint("while-polling")
            for name in running.keys() - seen:
                changed |= self._observe(running[name], self._get_or_none(name))
            self._cancel_strays()
        except Exception as error:
            if not is_retryable(error):
                raise
            log.warning("polling failed (%s); retrying later", error)
        self.poll_clock.schedule(changed)

    # -- strays: late remote jobs under a name whose create outcome was unknown ----------------

    def _watch(self, chunk: Chunk, attempt_at: float) -> None:
        self.journal.watch_name(chunk.job_id, chunk.idx, chunk.display_name, attempt_at)

    def _watched_now(self) -> dict[str, dict]:
        """The watched names to look for strays of: those still in their window (the rest are forgotten),
        but not those of a chunk still ``submitting``, which reconciliation matches (one is adopted)."""
        self.journal.forget_watched_names(time.time() - self.settings.stray_watch_seconds)
        watched = self.journal.watched_names()
        if watched:
            unconfirmed = {c.display_name for c in self._chunks_in("submitting")}
            watched = {name: row for name, row in watched.items() if name not in unconfirmed}
        return watched

    def _stray_look_due(self) -> bool:
        """Whether the list is to be read for watched names now, with no poll due for running chunks."""
        if time.monotonic() - self._strays_looked_at < self.settings.poll_max_interval:
            return False
        if self.journal.watched_names() or self.journal.remote_jobs_with_outcome("cancelling"):
            return True
        self._strays_looked_at = time.monotonic()  # nothing to look for: ask again an interval later
        return False

    def _stray(self, job_id: str, idx: int, display_name: str, remote: RemoteJob) -> None:
        """A remote job under one of our display names that is not the chunk's own: a create that reached
        the service but showed up in the list only later (after its chunk was created again, fetched or
        skipped, or its job delivered), or a duplicate a crash left. It is recorded (its cost counts),
        then cancelled unless it has ended; one that finished has results no job used, which is logged
        (an already delivered job's summary.json is never rewritten)."""
        if self.journal.remote_job(remote.name) is not None:
            return  # adopted, or recorded as a duplicate on an earlier poll (its cancel retried apart)
        extra = {"job": job_id, "chunk": idx, "remote": remote.name}
        if remote.done:
            log.warning("job %s: remote job %s under %s ended (%s) apart from the chunk's own; its results "
                        "are not used, its cost counts", job_id, remote.name, display_name, remote.state, extra=extra)
            self.journal.record_stray(remote.name, job_id=job_id, chunk_idx=idx, display_name=display_name,
                                      outcome="finished")
            return
        log.warning("job %s: cancelling duplicate remote job %s for %s", job_id, remote.name, display_name,
                    extra=extra)
        self.journal.record_stray(remote.name, job_id=job_id, chunk_idx=idx, display_name=display_name,
                                  outcome="cancelling")
        if self._cancel(remote.name, job_id):
            self.journal.set_remote_outcome(remote.name, "cancelled")

    def _cancel_strays(self) -> None:
        """Retry the cancels of recorded strays the service did not accept yet (each with its backoff)."""
        for row in self.journal.remote_jobs_with_outcome("cancelling"):
            if self._cancel(row["remote_name"], row["job_id"]):
                self.journal.set_remote_outcome(row["remote_name"], "cancelled")

    def _cancel(self, remote_name: str, job_id: str) -> bool:
        """``batches.cancel``; False if it failed or its backoff has not run out (retried later, waiting
        twice as long after each failure, up to ``poll_max_interval``). Cancelling twice is harmless."""
        failures, retry_at = self.cancel_backoff.get(remote_name, (0, 0.0))
        if time.monotonic() < retry_at:
            return False
        try:
            self.provider.cancel(remote_name)
        except Exception as error:
            if getattr(error, "code", None) == 404:
                log.warning("job %s: remote job %s to cancel no longer exists", job_id, remote_name)
                self.cancel_backoff.pop(remote_name, None)
                return True  # gone: nothing is left running to bill
            wait = min(self.settings.poll_interval * 2 ** failures, self.settings.poll_max_interval)
            self.cancel_backoff[remote_name] = (failures + 1, time.monotonic() + wait)
            log.warning("job %s: cancel of %s failed (%s); retrying in %.0f s", job_id, remote_name, error, wait)
            return False
        self.cancel_backoff.pop(remote_name, None)
        return True

    def _get_or_none(self, name: str) -> RemoteJob | None:
        try:
            return self.provider.get(name)
        except Exception as error:
            if getattr(error, "code", None) == 404:
                return None
            raise

    def _observe(self, chunk: Chunk, remote: RemoteJob | None) -> bool:
        """Record what the service says about one chunk; fetch its results once it has finished."""
        if remote is None:
            self.advance_now = True
            log.error("job %s: remote job %s has disappeared", chunk.job_id, chunk.remote_name)
            self.journal.update_chunk(chunk.job_id, chunk.idx, state="fetched", remote_state="missing",
                                      error={"code": "remote_missing",
                                             "message": f"remote job {chunk.remote_name} no longer exists"})
            return True
        changed = remote.state != chunk.remote_state or remote.stats != chunk.stats
        if remote.state == "expired":
            self._expired(chunk, remote)
            return True
        if remote.state in ("pending", "running", "unknown"):
            if changed:
                self.journal.update_chunk(chunk.job_id, chunk.idx, remote_state=remote.state, stats=remote.stats,
                                          events=self._progress_events(chunk, remote.stats))
            return changed
        self.fetch(chunk)
        self.advance_now = True
        return True

    def _expired(self, chunk: Chunk, remote: RemoteJob) -> None:
        """The service gave up on a chunk's remote job (not finished within 48 h; no results, no bill).

        While ``resubmit_expired`` allows, the chunk goes back to ``built`` under its next display
        name and is submitted again like any chunk (intent first, reconciled by that name); after
        the last attempt its requests end as ``expired`` errors. Either way an ``expired`` event
        tells the notification plugins, committed with the transition.
        """
        self.advance_now = True
        job = self.journal.job(chunk.job_id)
        allowed = self.settings.resubmit_expired
        what = f"remote batch {remote.name} (chunk {chunk.idx}, {chunk.request_count} requests) expired: the " \
               f"service did not finish it within 48 h and returned no results"
        if chunk.resubmits < allowed and not job.cancel_requested:
            display_name = self._display_name(job, chunk.idx, chunk.resubmits + 1)
            reason = f"{what}; submitted again as {display_name} " \
                     f"(resubmission {chunk.resubmits + 1} of {allowed}, resubmit_expired)"
            log.warning("job %s: %s", job.id, reason, extra={"job": job.id, "chunk": chunk.idx})
            self.journal.resubmit_chunk(chunk, display_name, events=[self._event("expired", job, reason=reason)])
            return
        tries = chunk.resubmits + 1
        error = {"code": "expired",
                 "message": f"{what}; submitted {tries} time{'s' if tries != 1 else ''} in all "
                            f"(resubmit_expired = {allowed})"}
        log.error("job %s: %s", job.id, error["message"], extra={"job": job.id, "chunk": chunk.idx})
        events = [self._event("expired", job, reason=error["message"], error=error)]
        events += self._progress_events(chunk, remote.stats, finished=True)
        self.journal.update_chunk(chunk.job_id, chunk.idx, state="fetched", remote_state="expired",
                                  stats=remote.stats, error=error, events=events)

    def fetch(self, chunk: Chunk) -> None:
        """Start storing a finished chunk's results in the spool, unless that is already under way."""
        if (chunk.job_id, chunk.idx) in self.fetches or self.disk.waiting():
            return  # under way, or no room to store the results: the next poll after the pause fetches them
        spool = self._spool(chunk.job_id)
        provider = self.provider

        def store_results() -> tuple[RemoteJob, dict | None]:
            # One get (list leaves inline output out), then the results themselves.
            remote = provider.get(chunk.remote_name)
            error = None
            if remote.responses_file:
                try:
                    provider.download(remote.responses_file, spool.results_path(chunk.idx))
                except Exception as failure:
                    if is_retryable(failure):
                        raise  # the next poll tries again
                    # A results file the service refuses for good must not stop every other job:
                    # the chunk's requests are delivered as errors that say why.
                    log.error("job %s: results of chunk %d cannot be downloaded: %s",
                              chunk.job_id, chunk.idx, failure)
                    error = {"code": "results_unavailable",
                             "message": f"{remote.responses_file} could not be downloaded: "
                                        f"{_error_dict(failure)['message']}"}
            elif remote.inlined is not None:
                spool.write_inline_results(chunk.idx, inline_results(remote.inlined))
            crashpoint("after-download")
            return remote, error

        self.fetches[(chunk.job_id, chunk.idx)] = Fetch(chunk, self._in_background(self.fetch_pool, store_results))

    def _collect_fetches(self) -> None:
        """Record the chunks whose results are now in the spool."""
        for key, fetch in list(self.fetches.items()):
            if not fetch.future.done():
                continue
            del self.fetches[key]
            chunk = fetch.chunk
            try:
                remote, error = fetch.future.result()
            except Exception as failure:
                # Transient (the network, a full disk here): still 'running' in the journal, so the
                # next poll fetches it again. Anything else fails this chunk's requests, not the daemon.
                if fs.is_disk_full(failure):
                    self._disk_full(failure, "results", self.journal.job(chunk.job_id))
                    continue
                if is_retryable(failure) or isinstance(failure, OSError):
                    log.warning("job %s: fetching chunk %d failed (%s); retrying later",
                                chunk.job_id, chunk.idx, failure)
                    continue
                log.error("job %s: results of chunk %d cannot be fetched: %s", chunk.job_id, chunk.idx, failure)
                missing = getattr(failure, "code", None) == 404
                self.journal.update_chunk(chunk.job_id, chunk.idx, state="fetched",
                                          remote_state="missing" if missing else chunk.remote_state,
                                          error={"code": "remote_missing" if missing else "results_unavailable",
                                                 "message": f"the results of {chunk.remote_name} could not be "
                                                            f"fetched: {_error_dict(failure)['message']}"},
                                          events=self._progress_events(chunk, chunk.stats, finished=True))
                continue
            self.journal.update_chunk(chunk.job_id, chunk.idx, state="fetched", remote_state=remote.state,
                                      stats=remote.stats, error=error,
                                      events=self._progress_events(chunk, remote.stats, finished=True))
            log.info("job %s: chunk %d %s", chunk.job_id, chunk.idx, remote.state,
                     extra={"job": chunk.job_id, "chunk": chunk.idx, "remote_state": remote.state})

    def _progress_events(self, moved: Chunk, stats: dict, *, finished: bool = False) -> list[dict]:
        """A ``progress`` event when the remote counts of ``moved``'s job have changed since the last one.

        At most one per job per ``notify.progress_seconds``, so a long job does not flood the journal
        and the receivers; none when the chunk that finishes is the job's last (its final event follows).
        """
        # The throttle first: it is the cheap check, and most polls of a long job stop there.
        last = self.journal.last_event(moved.job_id, "progress")
        if last is not None and time.time() - last[1] < self.settings.notify.progress_seconds:
            return []
        job = self.journal.job(moved.job_id)
        chunks = self.journal.chunks(job.id)
        if finished and job.state != "building" and all(
                c.idx == moved.idx or c.state in ("fetched", "skipped") for c in chunks):
            return []
        counts = progress_counts(chunks, {moved.idx: stats})
        before = last[0]["counts"] if last is not None else {"done": 0, "total": counts["total"]}
        if (counts["done"], counts["total"]) == (before.get("done"), before.get("total")):
            return []
        return [self._event("progress", job, counts=counts)]

    def progress(self, job: Job) -> None:
        if job.cancel_requested:
            self._cancel_remote(job, self.journal.chunks(job.id))
        chunks = self.journal.chunks(job.id)
        if any(c.state == "built" for c in chunks):  # an expired chunk to submit again
            self.submit(job)
            chunks = self.journal.chunks(job.id)
        # Once its first chunk is back, a job's results are joined while the rest run (the writer goes
        # in request order, so before that it would only hold a writer thread).
        if job.id in self.deliveries or chunks and chunks[0].state in ("fetched", "skipped") \
                and not self.disk.waiting():
            self._delivery(job, chunks)
        if all(c.state in ("fetched", "skipped") for c in chunks):
            self.journal.update_job(job.id, state="fetched", finished_at=time.time())

    def _cancel_remote(self, job: Job, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            if chunk.state == "built":
                self.journal.update_chunk(job.id, chunk.idx, state="skipped")
            elif chunk.state == "running" and not chunk.cancel_sent:
                self._send_cancel(chunk)

    def _send_cancel(self, chunk: Chunk) -> None:
        """``batches.cancel`` for a running chunk of a cancelled job; a failure is retried on a later tick,
        with a backoff (see :meth:`_cancel`).

        Sent again after a crash before ``cancel_sent`` is committed: cancelling twice is harmless.
        """
        if not self._cancel(chunk.remote_name, chunk.job_id):
            return
        crashpoint("after-cancel")
        self.journal.update_chunk(chunk.job_id, chunk.idx, cancel_sent=1)
        self.poll_clock.due_at = 0  # look again soon

    # -- delivery: spool → outbox -------------------------------------------------------------

    def deliver(self, job: Job, *, without_results: str | None = None) -> None:
        """Write the job's outbox folder in the spool, then publish it (intent first).

        ``without_results`` is the state of a job that never ran: ``rejected`` or ``cancelled``.
        Otherwise the job's writer must have finished its result files; until it has, this
        returns and the loop comes back.
        """
        spool = self._spool(job.id)
        usage = None
        self.estimating.pop(job.id, None)  # a job cancelled while its estimate ran waits for it no more
        self._drop_estimate_alongside(job.id)
        if without_results is not None:
            folder = outbox.JobFolder(spool.staging)
            summary = self._summary(job, state=without_results, counts={"total": 0, "succeeded": 0, "failed": 0})
        else:
            delivery = self._delivery(job, self.journal.chunks(job.id))
            if not delivery.future.done():
                return
            del self.deliveries[job.id]
            folder, summary, usage = self._results_summary(job, *delivery.future.result())
        if job.error is not None:
            summary["error"] = job.error
        cost = dict(job.cost or {})
        if usage is not None and self.costs.active:
            cost["actual"] = self.costs.account(JobInfo.of(job, self.settings.model), usage, self.settings)
        if cost:
            summary["cost"] = summary_cost(cost)
        manifest = spool.manifest_path(job.source)
        if _is_regular_file(manifest):
            folder.copy_in(job.source, manifest)  # anything else is moved in whole by publish()
        folder.write_json("summary.json", redact_data(summary))  # an error text may quote a secret
        destination = outbox.choose_folder(self.settings.outbox, job.name)
        self.journal.update_job(job.id, state="publishing", outbox_dir=str(destination), outcome=summary["state"],
                                cost=cost or None, spend=spend_of(cost))
        self.publish(self.journal.job(job.id))

    def _delivery(self, job: Job, chunks: list[Chunk]) -> Delivery:
        """The job's writer (started on first use), told about every chunk whose results are back."""
        delivery = self.deliveries.get(job.id)
        if delivery is None:
            gate = ChunkGate((c.idx for c in chunks), self.stopping)
            future = self._in_background(self.writer_pool, self._write_results, self._spool(job.id), gate, job.task)
            delivery = self.deliveries[job.id] = Delivery(gate, future)
        spool = self._spool(job.id)
        for chunk in chunks:
            if chunk.state in ("fetched", "skipped"):
                delivery.gate.open(chunk.idx, _chunk_error(chunk, spool))
        return delivery

    def _delivery_awaited(self) -> bool:
        """Whether a job whose chunks are all back waits for its writer."""
        return any(not d.future.done() and not d.gate.pending() for d in self.deliveries.values())

    def _write_results(self, spool: JobSpool, gate: ChunkGate, task: str):
        """results.jsonl and organized.json in a fresh staging folder (runs in the writer pool).

        Returns the folder, the counts, the token totals, the usage totals of ``account_cost``
        and the organize error, if any. A task plugin whose ``organize`` raises costs the job
        its organized.json, never its results: the files are written again with every result
        and an empty organized.json, and the summary says why.
        """
        organize_error = None
        try:
            folder = outbox.JobFolder(spool.staging)
            # In a thread of its own: a plugin that hangs in organize() holds neither this writer nor the exit.
            clock = self._plugin_clock(task, "organize()")
            writing = InThread(lambda: self._write_result_files(folder, spool, gate.error_of,
                                                                self.tasks[task].organize, clock),
                               name=f"batchd-organize-{spool.root.name}")
            counts, tokens, usage = writing.wait(clock, self.settings.plugin_timeout_seconds,
                                                 self.stopping.is_set, Stopping)
        except Stopping:
            raise
        except PluginTimeout as error:
            log.error("job %s: %s", spool.root.name, error, extra={"job": spool.root.name})
            organize_error = {"message": f"{error}; results.jsonl has every result"}
            folder = outbox.JobFolder(spool.staging)  # anew: the abandoned thread's files are left unlinked
            counts, tokens, usage = self._write_result_files(folder, spool, gate.error_of, _organize_nothing)
        except Exception as error:
            if fs.is_disk_full(error):
                raise  # not the task's fault: the folder is written again once there is room
            log.exception("job %s: task %r failed to organize its results", spool.root.name, task)
            organize_error = {"message": f"task {task!r} failed to organize the results: "
                                         f"{type(error).__name__}: {error}; results.jsonl has every result"}
            folder = outbox.JobFolder(spool.staging)
            counts, tokens, usage = self._write_result_files(folder, spool, gate.error_of, _organize_nothing)
        return folder, counts, tokens, usage, organize_error

    def _results_summary(self, job: Job, folder: outbox.JobFolder, counts: dict, tokens: dict, usage: dict,
                         organize_error: dict | None) -> tuple[outbox.JobFolder, dict, dict]:
        chunks = self.journal.chunks(job.id)
        if job.cancel_requested:
            state = "cancelled"
        elif counts["failed"] == 0:
            state = "succeeded"
        elif counts["succeeded"] == 0:
            state = "failed"
        else:
            state = "partial"
        summary = self._summary(job, state=state, counts=counts)
        summary["tokens"] = tokens
        summary["remote_batches"] = [
            {"chunk": c.idx, "name": c.remote_name, "display_name": c.display_name, "mode": c.mode,
             "requests": c.request_count, "state": c.remote_state or c.state,
             **({"resubmits": c.resubmits} if c.resubmits else {})}
            for c in chunks
        ]
        remote_jobs = self.journal.remote_jobs(job.id)
        duplicates = [r for r in remote_jobs if r["role"] == "duplicate"]
        cancelled = [r["remote_name"] for r in duplicates if r["outcome"] != "finished"]
        if cancelled:
            summary["duplicate_remote_batches_cancelled"] = cancelled
        finished = [r["remote_name"] for r in duplicates if r["outcome"] == "finished"]
        if finished:
            # Found only after they had ended: billed, their results unused.
            summary["duplicate_remote_batches_finished"] = finished
        expired = [r["remote_name"] for r in remote_jobs if r["role"] == "expired"]
        if expired:
            summary["expired_remote_batches"] = expired  # resubmitted: their chunks ran again
        if organize_error is not None:
            summary["error"] = organize_error
        warnings = []
        if job.build_stopped:
            built = sum(c.request_count for c in chunks)
            warnings.append(
                f"cancelled while it was being built: building stopped after chunk {chunks[-1].idx}; the "
                f"manifest's requests after its first {built} were never built nor sent and are not in results.jsonl")
        if counts.get("joined_by_position"):
            warnings.append(
                f"{counts['joined_by_position']} inline answers came back without their key and were matched to "
                "their requests by position, which the service does not guarantee; they are marked "
                "\"joined_by\": \"position\" in results.jsonl (file batches always carry keys: lower "
                "inline_max_requests to use them)")
        for c in chunks:
            if (c.error or {}).get("code") == "expired":
                tries = c.resubmits + 1
                warnings.append(
                    f"chunk {c.idx} ({c.request_count} requests) expired {tries} time{'s' if tries != 1 else ''}: "
                    f"the service did not finish it within 48 h, and resubmit_expired = "
                    f"{self.settings.resubmit_expired} allows no more resubmissions; its requests are errors "
                    f"with code \"expired\" in results.jsonl")
        if warnings:
            summary["warnings"] = warnings
        return folder, summary, usage

    def _write_result_files(self, folder: outbox.JobFolder, spool: JobSpool,
                            chunk_error: Callable[[int], dict | None], organize,
                            clock: PluginClock | None = None) -> tuple[dict, dict, dict]:
        """Stream every joined result into results.jsonl and through ``organize`` into organized.json.

        ``clock`` (for a task plugin's ``organize``) is stamped whenever control passes to it and back.

        Returns the counts, the token totals of summary.json and the usage totals of ``account_cost``.
        """
        counts = {"total": 0, "succeeded": 0, "failed": 0}
        tokens = {"prompt": 0, "output": 0, "thoughts": 0, "total": 0}
        extra = {"cached": 0, "with_usage": 0, "joined_by_position": 0}
        dumps = json.JSONEncoder(ensure_ascii=False).encode  # one encoder, not one per line

        def results_written():
            for n, result in enumerate(spool.joined(chunk_error)):
                # The writer's thread is not the loop's: it must not ping the service watchdog.
                if n % 10_000 == 0 and self.stopping.is_set():
                    raise Stopping()
                counts["total"] += 1
                counts["succeeded" if result.status == "ok" else "failed"] += 1
                if result.usage:
                    usage = result.usage
                    tokens["prompt"] += usage.get("promptTokenCount", 0)
                    tokens["output"] += usage.get("candidatesTokenCount", 0)
                    tokens["total"] += usage.get("totalTokenCount", 0)
                    if "thoughtsTokenCount" in usage:
                        tokens["thoughts"] += usage["thoughtsTokenCount"]
                    if "cachedContentTokenCount" in usage:
                        extra["cached"] += usage["cachedContentTokenCount"]
                    extra["with_usage"] += 1
                line = {"key": result.key, "input": result.input, "status": result.status, "text": result.text,
                        "data": result.data, "error": result.error, "usage": result.usage}
                if result.joined_by != "key":
                    line["joined_by"] = result.joined_by
                    extra["joined_by_position"] += 1
                lines.write(dumps(line) + "\n")
                yield result

        with folder.open("results.jsonl") as lines, folder.open("organized.json") as organized_file:
            organized = outbox.JsonObjectWriter(organized_file)
            entries = organize(results_written()) if clock is None else \
                clock.iterate(organize(clock.handing(results_written())))
            for key, value in entries:
                organized.add(key, value)
            organized.close()
        if extra["joined_by_position"]:
            # A summary-only count: the service's answers are in `counts`, this is about trusting them.
            counts["joined_by_position"] = extra["joined_by_position"]
        usage = {"prompt_tokens": tokens["prompt"], "output_tokens": tokens["output"],
                 "thoughts_tokens": tokens["thoughts"], "cached_tokens": extra["cached"],
                 "total_tokens": tokens["total"], "requests": extra["with_usage"]}
        return counts, tokens, usage

    def _summary(self, job: Job, *, state: str, counts: dict) -> dict:
        now = time.time()
        return {
            "job": job.id,
            "name": job.name,
            "manifest": job.source,
            "task": job.task,
            "model": job.model,
            "provider": self.settings.provider,
            "emulated": self.settings.provider == "emulator",
            "state": state,
            "counts": counts,
            "timings": {
                "received": _iso(job.created_at),
                "submitted": _iso(job.submitted_at),
                "finished": _iso(job.finished_at),
                "delivered": _iso(now),
                "seconds": round(now - job.created_at, 3),
            },
        }

    def publish(self, job: Job) -> None:
        spool = self._spool(job.id)
        destination = Path(job.outbox_dir)
        if spool.staging.exists():
            if destination.exists():
                # Taken by someone else since we chose it: pick again, intent first.
                destination = outbox.choose_folder(self.settings.outbox, job.name)
                self.journal.update_job(job.id, outbox_dir=str(destination))
            outbox.JobFolder(spool.staging, create=False).publish(destination)
        elif not destination.exists():
            # Neither staged nor published (a staging folder lost): deliver it again from the spool
            # rather than record as delivered a folder nobody can read.
            log.warning("job %s: its outbox folder is neither staged nor at %s; writing it again", job.id, destination)
            self.journal.update_job(job.id, state="fetched" if self.journal.chunks(job.id) else "received")
            return
        claimed = spool.manifest_path(job.source)
        if os.path.lexists(claimed) and not _is_regular_file(claimed):
            # Not a file to copy (a symlink, folder or FIFO that was rejected): the entry itself
            # goes into the published folder, so removing the spool loses nothing.
            outbox.durable_move(claimed, destination / job.source, step="publish")
        crashpoint("after-publish")
        self.journal.update_job(job.id, state="done", events=[self._final_event(job, destination)])
        self.cleanup_pool.submit(spool.remove)
        self.report.outcomes[job.id] = job.outcome
        self.once_pending.discard(job.source)
        log.info("job %s (%s): %s → %s", job.id, job.source, job.outcome, destination,
                 extra={"job": job.id, "outcome": job.outcome, "outbox": str(destination)})

    def _final_event(self, job: Job, destination: Path) -> dict:
        try:
            summary = json.loads((destination / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            summary = {}  # a folder that vanished (or was edited) since: the event says what the journal knows
        return self._event(job.outcome, dataclasses.replace(job, state="done"), counts=summary.get("counts"),
                           outbox=str(destination), error=summary.get("error", job.error))


def fatal_storage_message(failure: fs.StorageFailure) -> str:
    """What batchd says before it exits on a failed fsync or journal commit."""
    return (f"storage failure: {failure}. What was being written cannot be trusted to be on disk (after a "
            "failed fsync the kernel may have dropped it), so the step is not marked done and batchd exits "
            f"with status {fs.EXIT_STORAGE}; restarted (the systemd unit does that), it resumes from the last "
            "committed state. If this repeats, check the disk: free space (min_free_mb), dmesg")


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _is_utf8(name: str) -> bool:
    """Whether a file name from the OS decoded as UTF-8 (undecodable bytes arrive as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _readable_name(name: str) -> str:
    r"""A file name as valid UTF-8 text: undecodable bytes written as ``\xNN`` (``caf\xe9.toml``)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _return_big_buffers_to_the_os() -> None:
    """Make glibc give every large buffer back to the OS when it is freed.

    The SDK uploads in 8 MiB pieces and downloads in 1 MiB ones, from pool threads. glibc's
    sliding mmap threshold moves such blocks, once one is freed, into the per-thread heaps,
    which rarely shrink: the daemon's RSS then grew with every chunk of a big job. A fixed
    threshold keeps them mmapped (each costs a few page faults, nothing next to its transfer).
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc: nothing to tune
    M_MMAP_THRESHOLD = -3
    mallopt(M_MMAP_THRESHOLD, 256 * 1024)


def _organize_nothing(results: Iterator[TaskResult]) -> Iterator[tuple[str, Any]]:
    """Consume the results (so results.jsonl is written) and organize none of them."""
    for _ in results:
        pass
    yield from ()


def _chunk_error(chunk: Chunk, spool: JobSpool) -> dict | None:
    """The error every request of a chunk gets when the chunk itself produced no results."""
    if chunk.state == "skipped":
        return {"code": "cancelled", "message": "cancelled before it was submitted"}
    if chunk.error is not None:
        return chunk.error
    if not spool.results_path(chunk.idx).exists():
        return {"code": chunk.remote_state or "no_results",
                "message": f"remote batch {chunk.remote_name} ended {chunk.remote_state} with no results"}
    return None  # requests the service left out of the results show up as "missing"


def _manifest_error(error: ManifestError) -> dict:
    """A rejection as summary.json shows it: the file, the field and the line, where known."""
    details = {"message": str(error), "file": error.path.name, "field": error.field, "line": error.line,
               "column": error.column, "reason": error.message}
    return {name: value for name, value in details.items() if value is not None}


def _upload_intent(chunk: Chunk) -> dict:
    """The ``upload_state`` a create intent commits: for a file chunk, an upload may now be made."""
    return {"upload_state": "uploading"} if chunk.mode == "file" else {}


def _upload_display_names(chunk: Chunk) -> set[str]:
    """The upload display names of every attempt at a chunk: an expired chunk is submitted again under
    its next display name (``-r<n>``), and each attempt may have uploaded its requests under its own."""
    base = chunk.display_name.removesuffix(f"-r{chunk.resubmits}") if chunk.resubmits else chunk.display_name
    return {upload_display_name(base + (f"-r{n}" if n else "")) for n in range(chunk.resubmits + 1)}


def _reusable(copies: list[RemoteFile], recorded: str | None, size: int) -> RemoteFile | None:
    """The copy of a chunk's requests file to create a batch from: the recorded one if it is among
    ``copies``, else the newest; only a complete one (active, of the chunk's size)."""
    usable = [f for f in copies if f.usable and f.size_bytes in (None, size)]
    for copy in usable:
        if copy.name == recorded:
            return copy
    return max(usable, key=lambda f: (f.create_time.timestamp() if f.create_time else 0.0, f.name), default=None)


def _creation_order(remote: RemoteJob) -> tuple[float, str]:
    """Oldest first (the one to keep when a crash left duplicates); unknown times last."""
    return (remote.create_time.timestamp() if remote.create_time else float("inf"), remote.name)


def _error_dict(error: Exception) -> dict:
    return {"code": getattr(error, "code", None) or type(error).__name__,
            "message": getattr(error, "message", None) or str(error)}


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _same_file(a: Path, b: Path) -> bool:
    return os.path.samestat(os.lstat(a), os.lstat(b))


def _link_or_copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.unlink(missing_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
