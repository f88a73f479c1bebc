"""Job events and their delivery to the notification plugins (the ``job_event`` and
``job_event_batch`` hooks).

An event is committed in the journal in the same transaction as the state transition it announces
(:meth:`batchd.journal.Journal.update_job` ``events=``), together with one *pending* delivery row
per notification plugin that wants it (an outbox table). The :class:`EventDispatcher`, driven by
the daemon's loop, hands the pending deliveries to the plugins:

* each plugin has a worker of its own, a thread that calls it for the events handed to it, oldest
  first, one call at a time (one event per ``job_event`` call, up to :data:`BATCH_MAX` per
  ``job_event_batch`` call): pluggy stops a hook call at the first exception, and a plugin that is
  slow or hangs must not hold up the others or the daemon;
* the loop hands a worker a page of due deliveries at a time and tops it up before it runs dry, so
  a plugin gets its events one after another however busy the loop is; a worker holds at most
  :data:`HANDED_MAX` events (memory and each journal read stay bounded however many are pending);
* a call still running after ``notify.timeout_seconds`` counts as a failed attempt of each of its
  events: its worker is abandoned (its thread left to end on its own), the events it had not
  started go to a new worker, and a plugin with :data:`MAX_ABANDONED_CALLS` hung calls gets no more
  until one of them returns;
* a call that returns marks its events ``sent`` (but those a batch call says it could not deliver);
  one that raises or times out is retried with exponential backoff per event
  (``notify.retry_initial_seconds`` doubling up to ``notify.retry_max_seconds``) and given up, with
  a logged error, after ``notify.max_attempts`` attempts. A start makes every pending delivery due at
  once (the receiver may have been mended meanwhile), so they go out in the order of their events.

The journal is only read and written from the daemon's thread: workers hand their outcomes back,
and each pump records all of them in one transaction. A delivery made before a crash (or before
:meth:`EventDispatcher.close` gave up waiting for it) and not yet recorded is made again after the
restart with the same event id: delivery is at least once, and receivers deduplicate by ``id``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import pluggy

from batchd.costs import summary_cost
from batchd.logs import FailureRun
from batchd.plugins import single_plugin_callers

if TYPE_CHECKING:
    from batchd.config import NotifySettings, Settings
    from batchd.journal import Chunk, Job, Journal

    #: Calls a plugin with some events and settings; one error message (or None: delivered) per event.
    Deliver = Callable[[Sequence[dict], Settings], list[str | None]]

log = logging.getLogger("batchd.events")

#: Hung calls a plugin may have before it is not called again until one of them returns.
MAX_ABANDONED_CALLS = 2
#: Events a plugin's worker holds at most: handed to it and not yet recorded.
HANDED_MAX = 200
#: A worker holding this many or fewer is handed more (and wakes the loop for them), so that it
#: need not wait for the loop while events are due.
REFILL_AT = 100
#: Events per ``job_event_batch`` call at most.
BATCH_MAX = 100
#: After the first failed delivery of a run of them, a plugin's failures are summed up in one line this often
#: (a receiver down for an hour while thousands of events are retried ten times each is a few lines).
FAILURES_SAID_SECONDS = 60.0
#: The event ids a summary of given-up deliveries names, at most (the journal has every one).
GIVEN_UP_NAMED = 5


def make_event(kind: str, job: Job, *, seq: int | None = None, state: str | None = None,
               counts: dict | None = None, cost: dict | None = None, outbox: str | None = None,
               reason: str | None = None, error: Any = None, default_model: str | None = None) -> dict:
    """One event, as stored and as handed to ``job_event``: every key always present."""
    now = time.time()
    return {
        "id": f"{job.id}:{kind}" + (f":{seq}" if seq is not None else ""),
        "kind": kind,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "job_id": job.id,
        "job": job.name,
        "manifest": job.source,
        "task": job.task,
        "model": job.model or default_model,
        "state": state or job.state,
        "counts": counts,
        "cost": summary_cost(cost if cost is not None else job.cost),
        "outbox": outbox,
        "reason": reason,
        "error": error,
    }


def progress_counts(chunks: Iterable[Chunk], stats: Mapping[int, dict] | None = None) -> dict:
    """A ``progress`` event's counts over a job's chunks, from the ``batchStats`` the polls recorded.

    ``stats`` overrides the recorded stats of some chunks (by ``idx``): what a poll has just seen,
    before it is committed. ``total`` is the job's requests (known locally, also for chunks not yet
    started); ``done`` is ``succeeded + failed``.
    """
    stats = stats or {}
    total = succeeded = failed = 0
    for chunk in chunks:
        counted = stats.get(chunk.idx, chunk.stats) or {}
        total += chunk.request_count
        succeeded += counted.get("successfulRequestCount", 0)
        failed += counted.get("failedRequestCount", 0)
    return {"total": total, "succeeded": succeeded, "failed": failed, "done": succeeded + failed}


class Delivery(NamedTuple):
    """A pending delivery handed to a plugin's worker."""

    event: dict
    attempts: int  # failed attempts before this one


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _call_each(caller: pluggy.HookCaller) -> Deliver:
    """Deliver through ``job_event``, one call per event."""

    def deliver(events: Sequence[dict], settings: Settings) -> list[str | None]:
        errors: list[str | None] = []
        for event in events:
            try:
                caller(event=event, settings=settings)
                errors.append(None)
            except BaseException as error:  # noqa: BLE001 - whatever a plugin raises is its failure
                errors.append(_describe(error))
        return errors

    return deliver


def _call_batch(caller: pluggy.HookCaller) -> Deliver:
    """Deliver through ``job_event_batch``: one call for all the events; it names those it could not deliver."""

    def deliver(events: Sequence[dict], settings: Settings) -> list[str | None]:
        try:
            answers = caller(events=list(events), settings=settings)
        except BaseException as error:  # noqa: BLE001 - whatever a plugin raises is its failure
            return [_describe(error)] * len(events)
        undelivered = answers[0] if answers else {}
        if not isinstance(undelivered, Mapping):
            mistake = f"job_event_batch returned a {type(undelivered).__name__}, not a mapping of event ids"
            return [mistake] * len(events)
        return [None if event["id"] not in undelivered else str(undelivered[event["id"]]) for event in events]

    return deliver


class _Worker:
    """One plugin's deliveries: a daemon thread that calls the plugin for the events handed to it,
    in order, one call at a time.

    The loop's thread hands it deliveries (:meth:`hand`) and takes back their outcomes
    (:meth:`take`); the worker never touches the journal. It wakes the loop when it is running low
    on events or has done all it was handed, not after every call: the loop records outcomes in
    pages, and its ticks stay for the jobs.
    """

    def __init__(self, plugin: str, deliver: Deliver, batch_max: int, wake: Callable[[], None]):
        self.plugin = plugin
        self._deliver = deliver
        self._batch_max = batch_max
        self._wake = wake
        self._lock = threading.Condition()
        self._queue: deque[Delivery] = deque()  # handed, not yet started
        self._settings: Settings | None = None  # those of the latest hand
        self._calling: list[Delivery] = []
        self._call_started = 0.0  # time.monotonic()
        self._finished: list[tuple[Delivery, str | None]] = []  # outcomes the loop has not taken yet
        self._asked_for_more = False  # woke the loop for more; not again before it hands some
        self._stopping = False
        self._abandoned = False
        #: An abandoned worker whose hung call has returned at last (its result is not used).
        self.returned_late = False
        # A daemon thread: a plugin that never returns must not keep the process alive at exit.
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"batchd-notify-{plugin}")
        self.thread.start()

    # -- the loop's side ---------------------------------------------------------------------

    def hand(self, deliveries: Iterable[Delivery], settings: Settings) -> None:
        with self._lock:
            self._queue.extend(deliveries)
            self._settings = settings
            self._asked_for_more = False
            self._lock.notify()

    def held(self) -> list[str]:
        """The ids of the events handed to it whose outcome is not yet taken."""
        with self._lock:
            return ([delivery.event["id"] for delivery in (*self._queue, *self._calling)]
                    + [delivery.event["id"] for delivery, _error in self._finished])

    def call_deadline(self, timeout: float) -> float | None:
        """When the call running now times out (``time.monotonic()``); None when none is running."""
        with self._lock:
            return self._call_started + timeout if self._calling else None

    def take(self, timeout: float | None) -> tuple[list[tuple[Delivery, str | None]], list[Delivery]]:
        """The outcomes since the last take, and the deliveries of a call running for ``timeout``
        seconds or longer: then the worker is abandoned, and the deliveries it had not started are
        dropped (pending in the journal, they go to the next worker)."""
        with self._lock:
            finished, self._finished = self._finished, []
            if timeout is None or not self._calling or time.monotonic() - self._call_started < timeout:
                return finished, []
            timed_out, self._calling = self._calling, []
            self._queue.clear()
            self._abandoned = True
            return finished, timed_out

    def stop(self) -> None:
        """End the thread once its call in flight returns; the deliveries not started stay pending."""
        with self._lock:
            self._stopping = True
            self._lock.notify()

    # -- the worker's thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                batch = [self._queue.popleft() for _ in range(min(self._batch_max, len(self._queue)))]
                self._calling, self._call_started, settings = batch, time.monotonic(), self._settings
            errors = self._deliver([delivery.event for delivery in batch], settings)
            with self._lock:
                if self._abandoned:
                    self.returned_late = True
                    break
                self._finished.extend(zip(batch, errors))
                self._calling = []
                wake = not self._queue or (len(self._queue) <= REFILL_AT and not self._asked_for_more)
                self._asked_for_more = self._asked_for_more or wake
            if wake:
                self._wake()
        self._wake()  # its plugin may have been waiting for one of its hung calls to return


class _FailureLog:
    """What one plugin's failed deliveries say in the log (a :class:`batchd.logs.FailureRun`): the first of a
    run in full, then a line every :data:`FAILURES_SAID_SECONDS` summing up those since (retried, given up:
    named, the last error), and the run's end. One line per attempt flooded the log while a receiver was down."""

    def __init__(self, plugin: str):
        self.plugin = plugin
        self.run = FailureRun(FAILURES_SAID_SECONDS)
        self.given_up: list[str] = []  # since the last line, the first GIVEN_UP_NAMED of them
        self.given_up_count = 0
        self.attempts_allowed = 0
        self.last_error = ""

    def failed(self, event_id: str, attempts: int, max_attempts: int, error: str, delay: float | None) -> None:
        """A failed attempt; ``delay`` None: the last one, the event given up for this plugin."""
        if self.run.failed():
            later = f" (this plugin's further failures are summed up every {FAILURES_SAID_SECONDS:g} s)"
            if delay is None:
                log.error("plugin %s: giving up on event %s after %d attempts: %s%s", self.plugin, event_id, attempts,
                          error, later)
            else:
                log.warning("plugin %s: event %s not delivered (attempt %d of %d: %s); retrying in %.1f s%s",
                            self.plugin, event_id, attempts, max_attempts, error, delay, later)
            return
        if delay is None:
            self.given_up_count += 1
            if len(self.given_up) < GIVEN_UP_NAMED:
                self.given_up.append(event_id)
            self.attempts_allowed = attempts
        self.last_error = error

    def delivered(self) -> None:
        if self.run.failures:
            self.say(now=True)
            log.info("plugin %s delivers again (%d attempts had failed)", self.plugin, self.run.succeeded())

    def say(self, *, now: bool = False) -> None:
        """Sum up the failures since the last line, when due (or ``now``: at a stop, at the run's end)."""
        summary = self.run.summary(now=now)
        if summary is None:
            return
        failures, seconds = summary
        retried = failures - self.given_up_count
        if self.given_up_count:
            named = ", ".join(self.given_up) + (", …" if self.given_up_count > len(self.given_up) else "")
            log.error("plugin %s: gave up on %d event(s) after %d attempts (%s), and %d more attempt(s) failed, "
                      "to be retried, in the last %.0f s; the last error: %s", self.plugin, self.given_up_count,
                      self.attempts_allowed, named, retried, seconds, self.last_error)
        else:
            log.warning("plugin %s: %d more attempt(s) failed, to be retried, in the last %.0f s; the last error: %s",
                        self.plugin, retried, seconds, self.last_error)
        self.given_up, self.given_up_count = [], 0


class EventDispatcher:
    """Delivers the journal's pending events to the notification plugins (see the module docstring)."""

    def __init__(self, pm: pluggy.PluginManager, journal: Journal, settings: Callable[[], Settings],
                 wake: Callable[[], None] = lambda: None):
        """``wake`` is called from the plugins' workers when their outcomes are to be recorded or
        they need more events: it wakes the daemon's loop."""
        self.wake = wake
        self.delivers: dict[str, tuple[Deliver, int]] = {
            plugin: (_call_each(caller), 1) for plugin, caller in single_plugin_callers(pm, "job_event").items()}
        # A plugin implementing both hooks gets batches.
        self.delivers.update({plugin: (_call_batch(caller), BATCH_MAX)
                              for plugin, caller in single_plugin_callers(pm, "job_event_batch").items()})
        self.kinds_callers = {plugin: caller for plugin, caller in single_plugin_callers(pm, "job_event_kinds").items()
                              if plugin in self.delivers}
        self.journal = journal
        self.settings = settings
        self._wanted: tuple[tuple, dict[str, frozenset[str] | None]] = ((), {})
        journal.event_targets = self.targets
        self.workers: dict[str, _Worker] = {}
        #: Abandoned workers whose hung call has not returned, by plugin.
        self.hung: dict[str, list[_Worker]] = {plugin: [] for plugin in self.delivers}
        self._next_check = 0.0  # no pending delivery is due before this (time.time())
        self._deliveries_seen = -1
        self._failure_logs = {plugin: _FailureLog(plugin) for plugin in self.delivers}

    @property
    def plugins(self) -> tuple[str, ...]:
        return tuple(self.delivers)

    def targets(self, event: dict) -> list[str]:
        """The plugins that want this event (``job_event_kinds``): they get its delivery rows."""
        wanted = self.wanted_kinds()
        return [plugin for plugin in self.delivers if wanted.get(plugin) is None or event["kind"] in wanted[plugin]]

    def wanted_kinds(self) -> dict[str, frozenset[str] | None]:
        """Each plugin's ``job_event_kinds`` answer (``None``: every kind), asked again when the settings change."""
        settings = self.settings()
        # The daemon reloads [cost] and [notify] in place: they are part of what was asked about.
        asked_about = (settings, settings.cost, settings.notify)
        asked, wanted = self._wanted
        if len(asked) == len(asked_about) and all(a is b for a, b in zip(asked, asked_about)):
            return wanted
        wanted = {}
        for plugin, caller in self.kinds_callers.items():
            try:
                kinds = caller(settings=settings)
            except Exception as error:  # noqa: BLE001 - a plugin's failure must not stop the event
                log.warning("plugin %s: job_event_kinds failed (%s: %s); it gets every event",
                            plugin, type(error).__name__, error)
                kinds = None
            wanted[plugin] = None if kinds is None else frozenset(kinds)
        self._wanted = (asked_about, wanted)
        return wanted

    def pump(self) -> None:
        """:meth:`record`, then :meth:`hand_out` (the daemon's loop calls them apart, around its commit)."""
        self.record()
        self.hand_out()

    def record(self) -> None:
        """Record what the workers delivered and time out hung calls. Called inside the loop's journal
        group, the records commit with the tick's transitions: a delivery recorded later than it was
        made is at worst made again after a crash, as any delivery cut short by one."""
        if not self.delivers:
            return
        self._collect(self.settings().notify.timeout_seconds)
        if self._forget_returned_calls():
            self._next_check = 0.0  # a hung call returned: its plugin may take deliveries again

    def hand_out(self) -> None:
        """Top up each worker with the deliveries that are due (committed events only: call it outside
        a journal group, or after its commit)."""
        if not self.delivers:
            return
        now = time.time()
        if now < self._next_check and self.journal.deliveries_added == self._deliveries_seen:
            return
        self._deliveries_seen = self.journal.deliveries_added
        settings = self.settings()
        free = [plugin for plugin in self.delivers if len(self.hung[plugin]) < MAX_ABANDONED_CALLS]
        for plugin in free:
            worker = self.workers.get(plugin)
            held = worker.held() if worker is not None else []
            if len(held) > REFILL_AT:
                continue  # it wakes the loop for more once it has delivered some
            due = self.journal.due_deliveries(now, plugins=(plugin,), limit=HANDED_MAX - len(held), excluding=held)
            if not due:
                continue
            if worker is None:
                deliver, batch_max = self.delivers[plugin]
                worker = self.workers[plugin] = _Worker(plugin, deliver, batch_max, self.wake)
            worker.hand([Delivery(event, attempts) for _plugin, event, attempts in due], settings)
        upcoming = self.journal.next_delivery_at(plugins=free)
        if upcoming is None:
            self._next_check = float("inf")  # until an event is added
        elif upcoming > now:
            self._next_check = upcoming
        else:
            self._next_check = 0.0  # due ones are held by their workers, or wait for room in them: look on every tick

    def _collect(self, timeout: float | None) -> None:
        """Take the workers' outcomes (and time out calls running for ``timeout`` s or longer) and
        record them in one transaction."""
        notify = self.settings().notify
        now = time.time()
        sent: list[tuple[str, str]] = []
        failed: list[tuple[str, str, str, float | None]] = []
        for plugin, worker in list(self.workers.items()):
            finished, timed_out = worker.take(timeout)
            for delivery, error in finished:
                if error is None:
                    sent.append((delivery.event["id"], plugin))
                    self._failure_logs[plugin].delivered()
                else:
                    failed.append(self._failure(plugin, delivery, error, notify, now))
            if timed_out:
                del self.workers[plugin]
                self.hung[plugin].append(worker)
                failed.extend(self._failure(plugin, delivery, f"timed out after {timeout:g} s", notify, now)
                              for delivery in timed_out)
        if sent or failed:
            self.journal.record_deliveries(sent=sent, failed=failed)
            self._next_check = 0.0
        for failure_log in self._failure_logs.values():
            failure_log.say(now=timeout is None)

    def _failure(self, plugin: str, delivery: Delivery, error: str, notify: NotifySettings,
                 now: float) -> tuple[str, str, str, float | None]:
        """A failed attempt as :meth:`batchd.journal.Journal.record_deliveries` takes it: retried
        after its backoff, or given up after the last attempt."""
        event_id = delivery.event["id"]
        attempts = delivery.attempts + 1
        delay = None if attempts >= notify.max_attempts else \
            min(notify.retry_initial_seconds * 2 ** (attempts - 1), notify.retry_max_seconds)
        self._failure_logs[plugin].failed(event_id, attempts, notify.max_attempts, error, delay)
        return event_id, plugin, error, None if delay is None else now + delay

    def _forget_returned_calls(self) -> bool:
        """Drop the abandoned workers whose hung call has returned; whether there were any."""
        released = False
        for plugin, workers in self.hung.items():
            hung = [worker for worker in workers if not worker.returned_late]
            released = released or len(hung) < len(workers)
            self.hung[plugin] = hung
        return released

    def busy(self) -> bool:
        """Whether a delivery is in flight or still pending (what ``run --once`` waits for)."""
        return (any(worker.held() for worker in self.workers.values())
                or self.journal.next_delivery_at(plugins=self.delivers) is not None)

    def seconds_until_due(self) -> float:
        wait = self._next_check - time.time()
        if not any(worker.held() for worker in self.workers.values()):
            return max(0.0, wait)
        # Workers wake the loop when they need more events or are done (what is due now waits for
        # them); this bounds how late the outcomes in between are recorded and a hung call is timed out.
        timeout = self.settings().notify.timeout_seconds
        deadlines = [deadline for worker in self.workers.values()
                     if (deadline := worker.call_deadline(timeout)) is not None]
        bound = min(1.0, max(0.0, min(deadlines, default=float("inf")) - time.monotonic()))
        return min(wait, bound) if wait > 0 else bound

    def close(self, wait_seconds: float = 2.0) -> None:
        """Record the calls that end within ``wait_seconds``; the others, and the deliveries not yet
        started, stay pending and are delivered after a restart."""
        deadline = time.monotonic() + wait_seconds
        for worker in self.workers.values():
            worker.stop()
        for worker in self.workers.values():
            worker.thread.join(max(0.0, deadline - time.monotonic()))
        self._collect(timeout=None)
        self.workers.clear()
