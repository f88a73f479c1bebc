"""The loop: which job takes which step, and when the loop sleeps.

One thread runs the loop and alone writes the journal. A tick first collects what the worker pools
finished (the only place their outcomes reach the journal), then claims what the inbox holds, then
visits the jobs that can move, oldest first, each through the step its state calls for
(:attr:`Loop.steps`), then polls the service when due and tidies uploaded request files; it commits
all of that as one transaction (docs/design.md, "One commit per tick") and then hands events to the
notification plugins.

A job is visited when something about it changed: the journal reports every committed change of a
job or its chunks (``Journal.on_change``), and workers mark the job whose work ended. Jobs waiting
for a free worker are marked when one frees up (:class:`batchd.daemon.context.Turns`). So a tick
costs what moved, not what is waiting, however many jobs are in the journal; a slow sweep over
every active job backs that up.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from batchd import fs
from batchd.backoff import Backoff
from batchd.config import ConfigError, load_settings
from batchd.daemon.admit import Admit
from batchd.daemon.build import CHUNKS_AHEAD, Build
from batchd.daemon.cancel import Cancel
from batchd.daemon.context import DISK_RETRY_MAX_SECONDS, DISK_RETRY_SECONDS, Context, Stopping
from batchd.daemon.deliver import Deliver
from batchd.daemon.fetch import Fetch
from batchd.daemon.intake import Intake, free_space
from batchd.daemon.monitor import Monitor
from batchd.daemon.push import Inbound, Push, act
from batchd.daemon.submit import Submit
from batchd.daemon.uploads import Uploads
from batchd.events import EventDispatcher
from batchd.inbox import Inbox
from batchd.journal import Job
from batchd.journal.retention import FORGET_PER_TRANSACTION
from batchd.states import ACTIVE_JOB_STATES, CHUNK_DONE_STATES, ChunkState, JobState

log = logging.getLogger("batchd")

#: Delivered events older than ``notify.keep_days``, and jobs finished before ``forget_jobs_after_days``, are
#: forgotten at start and then this often (a backlog of jobs a round per tick: batchd/journal/retention.py).
PRUNE_SECONDS = 3600.0
#: Jobs being built are looked at least this often, to give up on a task plugin that hangs.
BUILD_CHECK_SECONDS = 1.0
#: How often a tick looks whether the inbox folder is still there (and watched) and whether the config
#: file changed: each look is a system call, which costs a busy loop a wait for the GIL.
SURROUNDINGS_CHECK_SECONDS = 1.0
#: Times a tick visits again the jobs marked during its visits that it did not change (see Loop._steps).
SAME_TICK_ROUNDS = 2


class Steps:
    """The daemon's steps, in the order of the data path, wired to each other."""

    def __init__(self, ctx: Context, inbox: Inbox):
        self.admit = Admit(ctx)
        self.intake = Intake(ctx, inbox, on_flag=self.admit.review_now)
        self.build = Build(ctx, self.admit.tokens)
        self.monitor = Monitor(ctx, unconfirmed=lambda: self.submit.unconfirmed(),
                               reconcile=lambda *answer: self.submit.match(*answer),
                               fetch=lambda c, remote=None: self.fetch.start(c, remote))
        self.submit = Submit(ctx, watch=self.monitor.watch, stray=self.monitor.stray,
                             cancel_adopted=self.monitor.send_cancel)
        self.pack = self.submit.pack
        # The loop owns the disk-full pause; it plugs itself in as on_disk_full.
        self.fetch = Fetch(ctx, progress_events=self.monitor.progress_events,
                           disk_full=lambda error, step, job: self.on_disk_full(error, step, job))
        self.uploads = Uploads(ctx)
        self.uploads.in_flight = lambda: self.submit.media.in_flight
        self.uploads.on_media_deleted = self.submit.media.wake
        self.deliver = Deliver(ctx, forget=self._forget)
        self.pack.remove_spool = self.deliver.remove_spool
        self.deliver.batches_done = self.pack.batches_done = self.uploads.batches_done
        self.cancel = Cancel(ctx, build=self.build, deliver=self.deliver, monitor=self.monitor)
        #: Webhook deliveries and dashboard actions from the HTTP server's thread (batchd.web).
        self.inbound = Inbound(ctx.wake)
        self.push = Push(ctx, self.inbound, pushed=self.monitor.pushed, act=lambda action: act(ctx, action))
        self.on_disk_full: Callable = lambda error, step, job: None

    def _forget(self, job_id: str) -> None:
        """A job delivered without results: the steps before delivery drop what they hold for it."""
        self.admit.forget(job_id)
        self.build.forget(job_id)
        self.pack.forget(job_id)

    def collect(self) -> None:
        """Take what the workers finished, in the order of the path."""
        self.admit.collect()
        self.submit.collect()
        self.monitor.collect()
        self.fetch.collect()
        self.deliver.collect()


class Loop:
    def __init__(self, ctx: Context, inbox: Inbox, steps: Steps, events: EventDispatcher, service_manager):
        self.ctx = ctx
        self.inbox = inbox
        self.s = steps
        self.events = events
        self.service_manager = service_manager
        #: One line for ``systemctl status`` (set by the daemon).
        self.status_line: Callable[[], str] = lambda: ""
        #: Hands what the daemon waits on (the daemon's notices) to ``batchd status``; called on change.
        self.publish_notices: Callable[[list], None] = lambda notices: None
        self.notices: Callable[[], list] = lambda: []
        self._published_notices: list | None = None
        steps.on_disk_full = self.disk_full
        self._ready: set[str] = set()
        self._changed: set[str] = set()  # jobs the tick wrote (loop thread only)
        #: When the last tick ended (monotonic): /healthz.
        self.ticked_at = time.monotonic()
        self._ready_lock = threading.Lock()
        self._swept_at = float("-inf")
        self._builds_checked_at = float("-inf")
        self._surroundings_checked_at = float("-inf")
        self._inbox_present = False
        self._pruned_at = float("-inf")
        self._forgetting = False  # a round of old jobs was forgotten, and more may be left
        self._forgotten = 0  # jobs forgotten since the first round
        self._disk_full_seen = False
        #: Jobs whose own write found no room: each waits out its own backoff, which only its own progress
        #: resets (the shared pause of every writer is reset by any write that goes through, so a job too
        #: big for the room left would otherwise try, and log, every second or two forever).
        self._disk_waits: dict[str, _DiskWait] = {}
        self._config_mtime = _mtime(ctx.settings.config_file)
        #: Set by SIGHUP (``systemctl reload``): the config file is read again on the next tick, changed or not.
        self.reload_requested = False
        #: ``run --once``: the inbox entries it waits for, and whether it gave up on some.
        self.once_pending: set[str] = set()
        self._once_jobs_done_at: float | None = None
        self._once_blocked = False
        ctx.mark = self.mark
        #: Job state → its step. Cancel requests are applied first (batchd.daemon.cancel).
        self.steps: dict[str, Callable[[Job], None]] = {
            JobState.CLAIMING: steps.intake.finish_claim,
            JobState.RECEIVED: self._received,
            JobState.BUILDING: self._building,
            JobState.BUILT: steps.submit.step,
            JobState.SUBMITTED: self._submitted,
            JobState.FETCHED: steps.deliver.step,
            JobState.PUBLISHING: steps.deliver.publish,
        }

    def changed(self, job_id: str) -> None:
        """The tick wrote the job or its chunks (``Journal.on_change``): its later rounds leave it to the next tick."""
        self._changed.add(job_id)
        self.mark(job_id)

    def mark(self, job_id: str) -> None:
        """The job can take a step (called from any thread)."""
        with self._ready_lock:
            self._ready.add(job_id)

    def _take_ready(self) -> set[str]:
        with self._ready_lock:
            ready, self._ready = self._ready, set()
        return ready

    def run(self) -> None:
        ctx = self.ctx
        while not ctx.stopping.is_set():
            try:
                self.tick()
            except Stopping:
                break
            self.ticked_at = time.monotonic()
            self.service_manager.watchdog()
            if self.service_manager.enabled:
                self.service_manager.status(self.status_line())
            notices = self.notices()
            if notices != self._published_notices:
                self._published_notices = notices
                self.publish_notices(notices)
            if ctx.once and self._once_done():
                ctx.report.finished = not self._once_blocked
                break
            self.inbox.wait(self.service_manager.max_sleep(self.sleep_seconds()))

    def sweep(self) -> None:
        """Visit every active job on the next tick (at start, after a disk pause, and now and then)."""
        self._swept_at = time.monotonic()
        active = set()
        for job in self.ctx.journal.jobs(states=ACTIVE_JOB_STATES, packs=True):
            active.add(job.id)
            self.mark(job.id)
        for job_id in self._disk_waits.keys() - active:  # finished or cancelled meanwhile
            del self._disk_waits[job_id]

    def tick(self) -> None:
        ctx = self.ctx
        if ctx.storage_failure is not None:
            raise ctx.storage_failure
        now = time.monotonic()
        if now - self._surroundings_checked_at >= SURROUNDINGS_CHECK_SECONDS or not self._inbox_present:
            self._surroundings_checked_at = now
            self._inbox_present = self.inbox.ensure_present()
            if self._inbox_present:
                self.inbox.ensure_watching()
            self._reload_settings()
        if self.reload_requested:
            self.reload_requested = False
            self._reload_settings(asked=True)
        inbox_present = self._inbox_present
        self._disk_full_seen = False
        # A tick's transitions commit together (one fsync), each effect once what announced it is
        # committed (batchd.journal.Journal.group); the events are handed out after that commit.
        try:
            with ctx.journal.group():
                self._steps(inbox_present)
                self.events.record()  # what the notification workers delivered commits with the tick
        except OSError as error:
            # A folder the tick moved files into or out of could not be synced before the commit
            # (Journal.sync_before_commit): nothing of the tick is committed or done yet; the next
            # tick's commit tries again, once the pause is over.
            if not fs.is_disk_full(error):
                raise
            self.disk_full(error, "commit", None)
        self.events.hand_out()
        if self._forgetting or time.monotonic() - self._pruned_at >= PRUNE_SECONDS:
            self.prune_history()
        # Judged at the tick's end, not its start: a pause that ran out during the tick let its
        # writes go through, and the tick that follows may be the one a stop never gets to.
        if not self._disk_full_seen and not ctx.disk.waiting() and ctx.disk.succeeded():
            log.info("writes go through again: disk space is back (%s)", free_space(ctx.settings.state_dir))
            self.sweep()

    def _steps(self, inbox_present: bool) -> None:
        ctx, s = self.ctx, self.s
        self._changed.clear()
        s.collect()
        if not ctx.writes_paused():
            # Offers left waiting take a free thread first, as one job would (the rest: at the tick's end).
            s.pack.seal(most=1)
        s.push.take()
        if inbox_present and not ctx.writes_paused():
            try:
                s.intake.take()
            except OSError as error:
                fs.unwritable_is_fatal("claim", error)
                if not fs.is_disk_full(error):
                    raise
                self.disk_full(error, "claim", None)
        s.admit.review_held()
        if time.monotonic() - self._swept_at >= ctx.settings.rescan_seconds:
            self.sweep()
        now = time.monotonic()
        if now - self._builds_checked_at >= BUILD_CHECK_SECONDS:
            # A build is looked at now and then (its plugin may hang); else the build marks its job
            # itself when a chunk or its estimate is done.
            self._builds_checked_at = now
            for job_id in s.build.builders:
                self.mark(job_id)
        for job_id, wait in self._disk_waits.items():
            if not wait.retried and wait.backoff.due():
                wait.retried = True
                self.mark(job_id)
        self._visit(self._take_ready())
        # Jobs marked during the visits that the tick did not change (a build's thread came free for
        # the next in line, a chunk is built) are visited again at once rather than a tick later. A job
        # the tick changed waits for the commit: its next step may act on what the change intends.
        for _ in range(SAME_TICK_ROUNDS):
            again = self._take_ready()
            later = again & self._changed
            if later:
                with self._ready_lock:
                    self._ready |= later
            if len(again) == len(later):
                break
            self._visit(again - later)
        if not ctx.writes_paused():
            s.pack.seal()  # the small jobs this tick's visits offered, while the pool has room
        if s.monitor.due():
            s.monitor.start_poll()
        s.uploads.tidy()
        s.deliver.tidy()

    def _visit(self, job_ids: set[str]) -> None:
        ctx, s = self.ctx, self.s
        for job in ctx.journal.jobs_by_id(job_ids):
            ctx.check_stop()
            wait = self._disk_waits.get(job.id)
            if wait is not None and wait.state != job.state:
                del self._disk_waits[job.id]  # it moved on: its write went through
            elif wait is not None and wait.backoff.waiting():
                continue  # marked again once its own wait is over
            try:
                self.advance(job)
            except OSError as error:
                fs.unwritable_is_fatal(job.state, error)
                if not fs.is_disk_full(error):
                    raise
                job = ctx.journal.job(job.id) or job  # the step may have committed a state before it failed
                s.build.abandon(job.id)
                s.deliver.abandon(job)
                self.disk_full(error, None, job)

    def advance(self, job: Job) -> None:
        """Take the job's next step."""
        ctx, s = self.ctx, self.s
        # A pack (batchd's own job carrying small jobs' chunks) has a step of its own in every state.
        step = s.pack.step if job.pack else self.steps[job.state]
        if ctx.writes_paused():
            # The disk was full a moment ago: only the steps that write nothing but the journal go on.
            if job.state in (JobState.BUILT, JobState.SUBMITTED):
                if job.cancel_requested:
                    s.cancel.apply(job)
                step(job)
            elif job.state == JobState.BUILDING and s.build.sends_while_building(job.id):
                s.submit.step(job)
            return
        if job.cancel_requested and s.cancel.apply(job):
            return
        step(job)

    # -- the steps that take more than one module -----------------------------------------------------

    def _received(self, job: Job) -> None:
        s = self.s
        if job.error is not None:
            s.deliver.without_results(job, "rejected")
            return
        if job.admitted_at is None:
            s.admit.step(job)
            job = self.ctx.journal.job(job.id)
            if job.state != JobState.RECEIVED or job.admitted_at is None:
                return  # held, or its estimate still runs
        s.build.step(job)

    def _building(self, job: Job) -> None:
        # Chunks already built go out while the next one is built, so the service works on chunk n
        # while chunk n+1 is written; unless this pass is the first to read the job's rows (then its
        # chunks are held until the last row is read and priced: batchd.daemon.build). A visit takes the
        # chunks built meanwhile, a few at most, each sent before the next is recorded.
        s = self.s
        for _ in range(CHUNKS_AHEAD):
            if s.build.step(job) != job.state:
                job = self.ctx.journal.job(job.id)  # it moved on: built, or rejected
            if job.state == JobState.BUILT or job.state == JobState.BUILDING and s.build.sends_while_building(job.id):
                s.submit.step(job)
            if job.state != JobState.BUILDING or not s.build.has_chunk(job.id):
                return
            self.ctx.check_stop()  # a stop is taken at the next chunk boundary, as between two jobs

    def _submitted(self, job: Job) -> None:
        """Remote batches run: an expired chunk is sent again; once the first chunk is back, the job's
        results are written while the rest run; once every chunk is back, the job is ``fetched``."""
        ctx, s = self.ctx, self.s
        chunks = ctx.journal.chunks(job.id)
        if any(c.state == ChunkState.BUILT for c in chunks):
            s.submit.step(job)
            chunks = ctx.journal.chunks(job.id)
        # The writer goes in request order, so before the first chunk is back it would only hold a thread.
        if job.id in s.deliver.gates or chunks and chunks[0].state in CHUNK_DONE_STATES \
                and not ctx.writes_paused():
            s.deliver.join(job, chunks)
        if all(c.state in CHUNK_DONE_STATES for c in chunks):
            ctx.journal.update_job(job.id, state=JobState.FETCHED, finished_at=time.time())

    # -- storage faults -----------------------------------------------------------------------------

    def disk_full(self, error: OSError, step: str | None, job: Job | None) -> None:
        """A write found no room: log where and what, and pause every writing step for a while."""
        ctx = self.ctx
        self._disk_full_seen = True
        pause = ctx.disk.failed()
        if job is not None:
            wait = self._disk_waits.get(job.id)
            if wait is None or wait.state != job.state:
                wait = self._disk_waits[job.id] = _DiskWait(job.state, Backoff(DISK_RETRY_SECONDS,
                                                                               DISK_RETRY_MAX_SECONDS))
            wait.retried = False
            pause = max(pause, wait.backoff.failed())
        if job is not None:
            where = f"job {job.id} ({job.source}) stays {job.state!r}"
        elif step == "commit":
            where = "the tick's transitions stay uncommitted"
        else:
            where = "the manifest stays in the inbox"
        log.error("disk full: writing %s failed (%s)%s; %s and the step is retried in %.0f s (%s)",
                  error.filename or "?", fs.describe(error), f" during step {step}" if step else "", where, pause,
                  free_space(ctx.settings.state_dir), extra={"job": job.id} if job is not None else {})

    # -- sleeping -------------------------------------------------------------------------------------

    def sleep_seconds(self) -> float:
        ctx, s = self.ctx, self.s
        if ctx.storage_failure is not None:
            return 0.0
        with self._ready_lock:
            if self._ready or len(s.inbound) or s.intake.backlog and not s.intake.claiming_paused:
                return 0.0
        if self._forgetting:
            return 0.0
        # --once also waits for manifests written in place to settle: look each second.
        wait = 1.0 if ctx.once else ctx.settings.rescan_seconds
        wait = min(wait, self._swept_at + ctx.settings.rescan_seconds - time.monotonic())
        if s.build.builders:
            wait = min(wait, BUILD_CHECK_SECONDS)
        wait = min(wait, s.monitor.seconds_until_due(), self.events.seconds_until_due(), s.submit.seconds_until_free(),
                   s.push.seconds_until_due(), s.deliver.seconds_until_tidy())
        if s.pack.offered and s.submit.free() and not ctx.writes_paused():
            wait = min(wait, s.pack.seconds_until_due())  # offers waiting for company, and room to send them
        if ctx.disk.interval:
            wait = min(wait, ctx.disk.seconds_left())
        for job_wait in self._disk_waits.values():
            if not job_wait.retried:
                wait = min(wait, job_wait.backoff.seconds_left())
        return max(0.0, wait)

    # -- run --once -----------------------------------------------------------------------------------

    def _once_done(self) -> bool:
        ctx, s = self.ctx, self.s
        # The pools first: asked on every tick, the journal would cost the loop a wait for the GIL.
        if s.submit.busy() or s.fetch.busy() or s.uploads.busy() or ctx.journal.count_jobs(ACTIVE_JOB_STATES, limit=1):
            return False  # (the inbox is listed only then: a burst would list it on every tick)
        try:
            listed = {p.name for p in ctx.settings.inbox.iterdir()}
        except FileNotFoundError:
            listed = set()  # the inbox is gone: nothing in it is waited for
        present = listed & (self.once_pending - ctx.report.sources)
        if present and s.intake.claiming_paused:
            # Waiting for someone to free the disk is a service's job; a one-off run says so and stops.
            log.error("%d manifest(s) left in the inbox unclaimed: %s; free some space and run again",
                      len(present), s.intake.claiming_paused)
            self._once_blocked = True
            return True
        if present:
            return False
        if s.admit.review_held(force=True):
            return False  # a job the last step made fit (another's actual cost came in) goes now
        # Jobs are done; give undelivered events a bounded time (the next run retries the rest).
        now = time.monotonic()
        if self._once_jobs_done_at is None:
            self._once_jobs_done_at = now
        if self.events.busy() and now - self._once_jobs_done_at < ctx.settings.notify.once_drain_seconds:
            return False
        held = ctx.journal.jobs(states=(JobState.HELD,))
        ctx.report.held = [job.id for job in held]
        for job in held:
            log.warning("job %s (%s) is held: %s; release it with `batchd approve %s`",
                        job.id, job.source, job.hold, job.name)
        return True

    # -- housekeeping ---------------------------------------------------------------------------------

    def prune_history(self) -> None:
        """Forget delivered events past ``notify.keep_days`` and jobs finished before ``forget_jobs_after_days``
        (at start, then hourly: a service runs for months). Jobs go a round per call; while rounds are full,
        the next tick comes at once and forgets the next (a first start with the setting on a long history)."""
        ctx = self.ctx
        if not self._forgetting:
            self._pruned_at = time.monotonic()
            keep_days = ctx.settings.notify.keep_days
            pruned = ctx.journal.prune_events(time.time() - keep_days * 86400)
            if pruned:
                log.info("forgot %d delivered events older than %g days", pruned, keep_days)
        days = ctx.settings.forget_jobs_after_days
        if not days:
            return
        forgotten = ctx.journal.forget_finished(time.time() - days * 86400)
        self._forgotten += forgotten
        self._forgetting = forgotten == FORGET_PER_TRANSACTION
        if not self._forgetting and self._forgotten:
            log.info("forgot %d jobs finished more than %g days ago (forget_jobs_after_days)", self._forgotten, days)
            self._forgotten = 0

    def _reload_settings(self, *, asked: bool = False) -> None:
        """Take the config file's [cost] and [notify] tables anew when it changes (a raised budget), or when
        ``asked`` (SIGHUP: ``systemctl reload``), changed or not."""
        settings = self.ctx.settings
        mtime = _mtime(settings.config_file)
        if mtime == self._config_mtime and not asked:
            return
        self._config_mtime = mtime
        what = "reload asked for (SIGHUP)" if asked else "config file changed"
        if settings.config_file is None:
            log.info("%s, but batchd runs without a config file: nothing to read", what)
            return
        try:
            fresh = load_settings(settings.config_file)
        except Exception as error:  # noqa: BLE001 - an edit in progress, or any bytes: the daemon goes on
            log.error("%s but the file cannot be used (%s); keeping the settings in force", what,
                      error if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}")
            return
        if (fresh.cost, fresh.notify) != (settings.cost, settings.notify):
            settings.cost, settings.notify = fresh.cost, fresh.notify
            log.info("%s: [cost] and [notify] reloaded (other settings need a restart)", what)
        elif asked:
            log.info("%s: [cost] and [notify] unchanged (other settings need a restart)", what)


def _mtime(path) -> float | None:
    try:
        return path.stat().st_mtime if path else None
    except OSError:
        return None


@dataclass
class _DiskWait:
    """A job whose write, in ``state``, found no room: when to try its step again."""

    state: str
    backoff: Backoff
    retried: bool = False  # marked for its retry; a new failure starts the next wait
