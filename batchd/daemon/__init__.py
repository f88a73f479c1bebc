"""The daemon: inbox → journal → task plugin → remote batch jobs → outbox.

One module per step of the data path, each owning its state and its bounded pool:

=========================  ==========================================================================
:mod:`.intake`             inbox → ``claiming`` → ``received``; ``NAME.cancel`` / ``NAME.approve``
:mod:`.claim_inputs`       the input files a manifest names, taken into its spool with the claim
:mod:`.admit`              cost estimate and budget: → admitted, or ``held``
:mod:`.build`              requests → chunk files: ``building`` → ``built``
:mod:`.submit`             uploads and creates, reconciliation by display name: chunks → ``running``
:mod:`.monitor`            polls, strays, remote cancels, expiry
:mod:`.fetch`              results → the spool: chunks → ``fetched``
:mod:`.deliver`            result files, summary, publish: ``fetched`` → ``publishing`` → ``done``
:mod:`.uploads`            request files, media and remote batches deleted once nothing needs them
:mod:`.cancel`             what a cancel request does, state by state
:mod:`.schedule`           the loop: job state → step, and when to sleep
=========================  ==========================================================================

This module is the lifecycle around them: the state dir's lock, signals, the service (or the
embedded emulator, reached over HTTP exactly like Google), start, recovery and a clean stop.
The loop's thread alone writes the journal (docs/design.md has the invariants and crash points).

Storage faults (see :mod:`batchd.fs`): a full disk fails the step that writes, leaves its job in
the state it had and pauses writes (with a backoff) until there is room; below ``min_free_mb`` no
new manifest is claimed. A failed fsync or journal commit ends the process with
:data:`batchd.fs.EXIT_STORAGE`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import logging
import json
import os
import signal
import sqlite3
import sys
import threading
import time

from batchd import durable, fs
from batchd.config import ConfigError, Settings
from batchd.costs import CostHooks
from batchd.daemon import crashpoints
from batchd.daemon.context import Context
from batchd.daemon.control_files import CONTROL_SUFFIXES
from batchd.daemon.intake import once_candidates
from batchd.daemon.schedule import Loop, Steps
from batchd.emulator.process import EmulatorProcess
from batchd.statedir import lock_holder, lock_path, notices_path, render_notice
from batchd.events import EventDispatcher
from batchd.inbox import Inbox
from batchd.journal import Journal, JournalLocked, journal_path
from batchd.manifest import MANIFEST_SUFFIXES
from batchd.plugins import get_plugin_manager, task_owners, tasks_for
from batchd.provider import Provider
from batchd.service import ServiceManager
from batchd.states import ACTIVE_JOB_STATES

log = logging.getLogger("batchd")

#: Seconds a thread may hold the GIL while another waits (see Daemon.run).
SWITCH_INTERVAL = 0.001

__all__ = ["AlreadyRunning", "Daemon", "fatal_storage_message", "lock_holder"]


class AlreadyRunning(Exception):
    """Another batchd holds the state dir's lock: two daemons on one journal would both claim and submit."""


class Daemon:
    def __init__(self, settings: Settings, *, once: bool = False, emulator: EmulatorProcess | None = None):
        """``emulator``: the embedded emulator (``provider = "emulator"``), if the caller spawned it already
        (``batchd run`` does, before it imports the daemon, so that it boots meanwhile); the daemon stops it."""
        self.settings = settings
        self.once = once
        self.stopping = threading.Event()
        self.emulator = emulator
        self._provider: Provider | None = None
        self._provider_lock = threading.Lock()
        self._lock_file = None
        self.service_manager = ServiceManager()
        self.plugin_manager = get_plugin_manager(settings.plugins_dir, frozenset(settings.disabled_plugins))
        self.inbox = Inbox(settings.inbox, settle_seconds=settings.settle_seconds,
                           rescan_seconds=settings.rescan_seconds, backend=settings.watch_backend,
                           temp_max_age=settings.temp_max_age_seconds,
                           suffixes=MANIFEST_SUFFIXES + CONTROL_SUFFIXES)
        self.ctx = Context(settings, once=once, stopping=self.stopping, tasks=tasks_for(settings),
                           task_owners=task_owners(settings), costs=CostHooks(self.plugin_manager),
                           provider=lambda: self.provider, wake=self.inbox.wake)
        self.ctx.alive = self.service_manager.watchdog
        self.steps = Steps(self.ctx, self.inbox)
        self.events: EventDispatcher | None = None
        self.loop: Loop | None = None
        #: The HTTP server (``http``), and whether start() finished (recovered, reconciled, watching).
        self.web = None
        self.ready = False
        #: Found damaged while running, or locked by another process through a stop: the stop writes nothing
        #: more into it.
        self._journal_unusable = False

    @property
    def journal(self) -> Journal | None:
        return self.ctx.journal

    @property
    def report(self):
        return self.ctx.report

    # -- lifecycle ----------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signal_handlers()
        # The loop's thread computes flat out while it builds chunks, and the transfer and writer
        # threads come back from I/O thousands of times per job; each return waits for the GIL up
        # to one switch interval (5 ms by default), which made uploads several times slower.
        sys.setswitchinterval(SWITCH_INTERVAL)
        _return_big_buffers_to_the_os()
        try:
            self.service_manager.status("starting: recovering")
            self.start()
            if self.settings.one_cpu:
                _keep_threads_on_one_cpu()  # after start: the embedded emulator keeps every CPU
            # What is alive now (modules, the SDK's types, plugins, settings) lives as long as the
            # process: the cyclic collector stops walking it on every full collection, 7 % of the
            # daemon's CPU under a burst of small jobs (perf). Only a cycle made at start that dies
            # later is never collected; what the loop makes is collected as before.
            gc.freeze()
            self.ready = True
            self.service_manager.ready(self.status_line())
            self.loop.run()
        except fs.StorageFailure as failure:
            self.ctx.storage_failure = failure
            log.critical(fatal_storage_message(failure))
            self.service_manager.status(f"exiting: {failure}")
        except sqlite3.DatabaseError as error:
            # A damaged page the start did not read (an old job's, an index's): as at a start, the daemon
            # does not go on without its record, and a restart would only meet the same page again.
            damage = self.ctx.journal.damage(error) if self.ctx.journal is not None else None
            if damage is None:
                raise
            self._journal_unusable = True
            self.service_manager.status("exiting: the journal is damaged")
            raise damage from None
        except JournalLocked as locked:
            self._journal_unusable = True
            log.error("%s", locked)
        finally:
            self.close()
        if self.ctx.storage_failure is not None:
            return fs.EXIT_STORAGE
        # A service stopped by SIGTERM exits 0 whatever its jobs did (a failed job is in its
        # summary, not a failure of the service); only --once reports outcomes in its exit code.
        if not self.once:
            return 0
        log.info("%s", self.report.summary(self.settings.outbox))
        return self.report.exit_code

    def start(self) -> None:
        s = self.settings
        try:
            for name, folder in (("inbox", s.inbox), ("outbox", s.outbox), ("state_dir", s.state_dir),
                                 ("state_dir", s.state_dir / "jobs")):
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except (FileExistsError, NotADirectoryError):
                    # A file where the folder (or a folder above it) should be: the settings' to fix.
                    raise ConfigError(f"{name} {folder} is not a folder (a file is in its way): point {name} at a "
                                      f"folder, or move the file") from None
            self._lock_state_dir()
            for folder in (s.inbox, s.outbox):  # claims move files out of one, publishes into the other
                if not os.access(folder, os.W_OK | os.X_OK):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
        except PermissionError as error:
            raise fs.StorageFailure("start", error.filename or s.state_dir, error) from error
        except OSError as error:
            fs.unwritable_is_fatal("start", error, error.filename or s.state_dir)
            raise
        # Claims and publishes are renames: they are only atomic within one filesystem.
        durable.check_same_filesystem(s.inbox, s.outbox, s.state_dir)
        # The state dir's own files (notices.json, models.json) are written whole from a temp file; one a
        # kill left behind, mid-write, is nobody's now that this process holds the lock.
        for name in durable.remove_left_temps(s.state_dir):
            log.info("removed %s, left in the state dir by a writer that was stopped mid-write", name)
        self._start_emulator()  # (if not spawned yet) it boots while the journal is opened and recovery done
        if s.group_sync:
            why_not = fs.SyncGroup.unavailable_because(s.state_dir)
            if why_not is None:
                self.ctx.sync_group = fs.SyncGroup(s.state_dir).open()
            else:
                log.info("group_sync: %s; every file a step writes is fsynced alone", why_not)
        journal = self.ctx.journal = Journal(journal_path(s.state_dir), while_locked=self._while_journal_locked,
                                             sync_group=self.ctx.sync_group)
        self.events = EventDispatcher(self.plugin_manager, journal, lambda: self.settings, wake=self.inbox.wake)
        self.loop = Loop(self.ctx, self.inbox, self.steps, self.events, self.service_manager)
        journal.on_change = self.loop.changed
        crashpoints.commit_pending = journal.flush
        self.loop.status_line = self.status_line
        self.loop.notices = self.notices
        self.loop.publish_notices = self.publish_notices
        last_webhook = journal.last_webhook_at()
        if last_webhook is not None:  # webhooks worked before this start: polls stay stretched while they may
            self.steps.monitor.push_seen_at = time.monotonic() - max(0.0, time.time() - last_webhook)
        if s.http:
            self._start_web()
        if self.web is not None:
            self.web.warm()
        self.inbox.start()  # watch first, then scan: a file created in between is seen twice, never missed
        if self.once:
            self.loop.once_pending = once_candidates(s.inbox)
        self.recover()
        self.loop.prune_history()
        self.loop.sweep()
        if self.emulator is not None:
            # Booted meanwhile (in a tenth of a second): one that cannot start ends the start here, saying
            # why, rather than failing the first step that calls it from a worker.
            self.emulator.wait_ready()
        log.info("batchd ready: inbox %s, outbox %s, provider %s", s.inbox, s.outbox, s.provider)

    def recover(self) -> None:
        """Finish what a crash interrupted; runs before the first new manifest is taken."""
        self.steps.intake.recover()
        self.steps.intake.control_files.take_cancel_files()
        self.steps.uploads.recover()  # remote batches of delivered work the last run had not deleted yet
        # A start is when a receiver that refused events may have been mended: what waits out a backoff
        # goes now, each plugin's in the order the events were committed (each event's backoff differs:
        # a job's `submitted`, refused more often, would come after its `succeeded`).
        self.ctx.journal.retry_pending_now(time.time())
        # Unconfirmed creates are matched by the first poll, started at the first tick (the poll clock is due
        # at once) and read in the monitor's reader thread: a service that answers its list slowly, or not
        # at all, holds neither the start (READY) nor the claims, as it would if the list were read here.

    def _start_web(self) -> None:
        from batchd.web import DaemonView, WebServer

        steps = self.steps

        def live() -> dict:
            monitor = steps.monitor
            return {"ready": self.ready, "polled_at": monitor.polled_at, "push_healthy": monitor.push_healthy(),
                    "queues": {"inbound": len(steps.inbound), "submit": len(steps.submit.submissions),
                               "fetch": len(steps.fetch.fetches), "write": len(steps.deliver.writers),
                               "estimate": len(steps.admit.estimates), "build": len(steps.build.builders),
                               "jobs_marked": len(self.loop._ready) if self.loop else 0},
                    "webhooks": {**self.web.view.webhook_counts, "taken": steps.push.taken,
                                 "duplicate_in_loop": steps.push.duplicates}}

        view = DaemonView(ticked_at=lambda: self.loop.ticked_at, ready=lambda: self.ready,
                          stopping=self.stopping.is_set, live=live, provider_base_url=self._provider_base_url)
        self.web = WebServer(self.settings, steps.inbound, view)
        try:
            self.web.start()
        except OSError as error:
            self.web = None
            from batchd.config import ConfigError

            raise ConfigError(str(error)) from None

    def _provider_base_url(self) -> str | None:
        if self.settings.provider == "emulator":
            if self.emulator is None:
                raise RuntimeError("the embedded emulator has not started yet")
            return self.emulator.wait_ready().base_url
        return os.environ.get("GOOGLE_GEMINI_BASE_URL")

    def _start_emulator(self) -> None:
        s = self.settings
        if s.provider == "emulator":
            self.emulator = (self.emulator or EmulatorProcess.embedded(s)).spawn()
        else:
            self._provider = Provider.from_settings(s)  # now, so a missing key is reported at start

    @property
    def provider(self) -> Provider:
        """The service's client; with the embedded emulator, ready once the emulator serves."""
        if self._provider is None:
            with self._provider_lock:  # asked for by the loop and by worker threads (a token count)
                if self._provider is None:
                    # The embedded emulator is reached over HTTP exactly like Google: the provider
                    # only ever sees a base URL and a key.
                    self.emulator.wait_ready()
                    self._provider = Provider.from_settings(self.settings, base_url=self.emulator.base_url,
                                                            api_key="batchd-emulator")
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
            self.service_manager.stopping()
            # The loop may be asleep until its next rescan. Waking it takes the inbox's event lock,
            # which the interrupted main thread may hold, so another thread does it.
            threading.Thread(target=self.inbox.wake, name="batchd-wake", daemon=True).start()

        def request_reload(_signum, _frame):
            # (Unhandled, SIGHUP would end the process on the spot: a daemon's SIGHUP is "read your config".)
            if self.loop is not None:
                self.loop.reload_requested = True
                threading.Thread(target=self.inbox.wake, name="batchd-wake", daemon=True).start()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGHUP, request_reload)

    def close(self) -> None:
        steps, ctx = self.steps, self.ctx
        # Let creates already sent finish and record them, so no remote job is left unrecorded.
        if ctx.journal is not None and not self._journal_unusable:
            steps.submit.drain(self.service_manager)
        steps.submit.close()
        steps.fetch.close()
        steps.monitor.close()
        steps.uploads.close()
        # Writers waiting for chunks give up; a restart writes the job's staging folder anew.
        self.stopping.set()
        steps.deliver.close()
        steps.admit.close()
        steps.build.close()
        # After a failed fsync or commit nothing more is written: creates that went out meanwhile are
        # found again by display name when the restarted daemon reconciles.
        if ctx.journal is not None:
            if ctx.storage_failure is None and not self._journal_unusable:
                steps.submit.collect()
                if self.events is not None:
                    self.events.close()  # calls still running are redelivered after a restart
            ctx.journal.close()
        if ctx.sync_group is not None:
            ctx.sync_group.close()
        if self.web is not None:
            self.web.stop()
        self.inbox.stop()
        if self.emulator is not None:
            self.emulator.stop()
        if self._lock_file is not None:
            self._lock_file.close()

    def _while_journal_locked(self, seconds: float) -> None:
        """Another process holds the journal's write lock (batchd.journal.transactions): the loop waits, alive
        for the watchdog, until a stop, which then gives up after a few seconds (a kill loses nothing either)."""
        self.service_manager.watchdog()
        if self.stopping.is_set():
            raise JournalLocked(journal_path(self.settings.state_dir), seconds)

    def status_line(self) -> str:
        """One line for ``systemctl status``: e.g. "3 jobs active, 2 remote batches running"."""
        jobs = self.journal.count_jobs(ACTIVE_JOB_STATES, packs=False)
        running = self.steps.monitor.running_count()
        line = f"{jobs} job{'s' if jobs != 1 else ''} active, " \
               f"{running} remote batch{'es' if running != 1 else ''} running"
        waiting = len(self.steps.submit.submissions)
        line += f", {waiting} being submitted" if waiting else ""
        return "; ".join([line, *(render_notice(notice) for notice in self.notices())])

    def notices(self) -> list[str | dict]:
        """What the daemon waits on that its operator must know: each a reason and, where it helps, a fix;
        a wait with an end is ``{"text", "until"}`` (wall-clock seconds), which ``batchd status`` counts down."""
        notices: list[str | dict] = list(self.ctx.quota.notices())
        if self.ctx.disk.interval:
            notices.append(f"disk full on {self.settings.state_dir}'s filesystem: writes paused and tried again "
                           "with a growing wait (up to a minute) until there is room")
        if self.steps.intake.claiming_paused:
            notices.append(f"not claiming new manifests: {self.steps.intake.claiming_paused}")
        if self.steps.submit.remote_full:
            notices.append(f"{self.settings.max_remote_batches} remote batches pending or running, as many as "
                           "max_remote_batches allows (Gemini runs 100 per project): further chunks wait their turn")
        if self.steps.submit.refusal is not None:
            notices.append(f"submissions paused: {self.steps.submit.refusal}; jobs wait in the journal until the "
                           "key is fixed (GEMINI_API_KEY / GOOGLE_API_KEY, then restart batchd)")
        return notices

    def publish_notices(self, notices: list[str | dict]) -> None:
        """Write the notices for ``batchd status`` (on change only; not part of the journal: a crash may leave
        them behind, and :func:`read_notices` ignores them once no daemon holds the state dir)."""
        try:
            durable.atomic_write(notices_path(self.settings.state_dir),
                                 json.dumps({"pid": os.getpid(), "notices": notices}))
        except OSError as error:  # a full disk: the log says the same
            log.debug("cannot write %s: %s", notices_path(self.settings.state_dir), error)


def fatal_storage_message(failure: fs.StorageFailure) -> str:
    """What batchd says before it exits on a failed fsync or journal commit, or a filesystem it cannot write."""
    if failure.read_only or isinstance(failure.error, PermissionError):
        return (f"storage failure: {failure}. batchd cannot write there: make the filesystem writable (mounted "
                "read-only, or remounted so by the kernel after disk errors: see dmesg) or give batchd's user "
                f"the folder; batchd exits with status {fs.EXIT_STORAGE} and, restarted (the systemd unit does "
                "that), resumes from the last committed state")
    return (f"storage failure: {failure}. What was being written cannot be trusted to be on disk (after a "
            "failed fsync the kernel may have dropped it), so the step is not marked done and batchd exits "
            f"with status {fs.EXIT_STORAGE}; restarted (the systemd unit does that), it resumes from the last "
            "committed state. If this repeats, check the disk: free space (min_free_mb), dmesg")


def _keep_threads_on_one_cpu() -> None:
    """Keep every thread of this process, and every thread it starts later, on the CPU it runs on now
    (``one_cpu``).

    The daemon's threads take turns on one GIL however many CPUs run them. On several CPUs each turn
    handed over wakes a thread on another CPU: under a burst of small jobs a quarter of the daemon's
    CPU time went to those wake-ups (futex and scheduler, measured with perf), and 1,000 small jobs on
    tmpfs took three quarters of the time on one CPU. The embedded emulator, a process of its own
    started before, keeps every CPU; the kernel's work for the daemon's file I/O runs on the daemon's
    CPU (docs/design.md says where that costs). Other processes are moved off the CPU by the scheduler
    as it balances; the daemon's threads are not.
    """
    if not hasattr(os, "sched_setaffinity"):
        return  # not Linux: nothing to tune
    try:
        allowed = os.sched_getaffinity(0)
        if len(allowed) < 2:
            return
        with open("/proc/thread-self/stat") as stat:
            cpu = int(stat.read().rpartition(")")[2].split()[36])  # field 39, "processor": where it runs now
        cpu = cpu if cpu in allowed else min(allowed)
        for tid in os.listdir("/proc/self/task"):  # the threads started so far; later ones inherit it
            try:
                os.sched_setaffinity(int(tid), {cpu})
            except ProcessLookupError:
                pass  # ended meanwhile
    except (OSError, ValueError, IndexError) as error:
        log.debug("the daemon's threads stay on every CPU: %s", error)
        return
    log.debug("the daemon's threads run on CPU %d (one_cpu)", cpu)


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
