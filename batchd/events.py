"""Job events and their delivery to the notification plugins (the ``job_event`` hook).

An event is committed in the journal in the same transaction as the state transition it announces
(:meth:`batchd.journal.Journal.update_job` ``events=``), together with one *pending* delivery row
per plugin implementing ``job_event`` (an outbox table). The :class:`EventDispatcher`, driven by the
daemon's loop, hands each pending delivery to its plugin:

* each plugin on its own, in its own thread: pluggy stops a hook call at the first exception, and
  a plugin that hangs must not hold up the others or the daemon;
* one call in flight per plugin, the oldest due event first; a call still running after
  ``notify.timeout_seconds`` counts as a failed attempt (its thread is abandoned, and a plugin with
  :data:`MAX_ABANDONED_CALLS` hung calls gets no more until one of them returns);
* a call that returns marks the delivery ``sent``; one that raises or times out is retried with
  exponential backoff (``notify.retry_initial_seconds`` doubling up to ``notify.retry_max_seconds``)
  and given up, with a logged error, after ``notify.max_attempts`` attempts.

The journal is only written from the daemon's thread. A delivery made just before a crash, and
not yet marked, is made again after the restart with the same event id: delivery is at least
once, and receivers deduplicate by ``id``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Callable

import pluggy

from batchd.costs import summary_cost
from batchd.plugins import single_plugin_callers

if TYPE_CHECKING:
    from batchd.config import Settings
    from batchd.journal import Chunk, Job, Journal

log = logging.getLogger("batchd.events")

#: Hung calls a plugin may have before it is not called again until one of them returns.
MAX_ABANDONED_CALLS = 2
#: Kinds that end a job; their events carry the outbox folder.
FINAL_KINDS = ("succeeded", "partial", "failed", "cancelled", "rejected")


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


class _Call:
    """One delivery attempt running in its own (daemon) thread."""

    def __init__(self, plugin: str, event: dict, caller: pluggy.HookCaller, settings: Settings,
                 on_late_return: Callable[[str], None], on_done: Callable[[], None]):
        self.plugin = plugin
        self._on_done = on_done
        self.event = event
        self.error: str | None = None
        self.done = threading.Event()
        self.abandoned = False
        self.started = time.monotonic()
        self._on_late_return = on_late_return
        self._lock = threading.Lock()
        # A daemon thread: a plugin that never returns must not keep the process alive at exit.
        self.thread = threading.Thread(target=self._run, args=(caller, settings), daemon=True,
                                       name=f"batchd-notify-{plugin}")
        self.thread.start()

    def _run(self, caller: pluggy.HookCaller, settings: Settings) -> None:
        try:
            caller(event=self.event, settings=settings)
        except BaseException as error:  # noqa: BLE001 - whatever a plugin raises is its failure
            self.error = f"{type(error).__name__}: {error}"
        finally:
            with self._lock:
                self.done.set()
                late = self.abandoned
            if late:
                self._on_late_return(self.plugin)
            else:
                self._on_done()  # the loop records it and hands the plugin its next event at once

    def abandon(self) -> bool:
        """Give up waiting; False if it finished meanwhile (then its result counts)."""
        with self._lock:
            if self.done.is_set():
                return False
            self.abandoned = True
            return True


class EventDispatcher:
    """Delivers the journal's pending events to the ``job_event`` plugins (see the module docstring)."""

    def __init__(self, pm: pluggy.PluginManager, journal: Journal, settings: Callable[[], Settings],
                 wake: Callable[[], None] = lambda: None):
        """``wake`` is called from a plugin's thread when its call returns: it wakes the daemon's loop."""
        self.wake = wake
        self.callers = single_plugin_callers(pm, "job_event")
        self.kinds_callers = {plugin: caller for plugin, caller in single_plugin_callers(pm, "job_event_kinds").items()
                              if plugin in self.callers}
        self.journal = journal
        self.settings = settings
        self._wanted: tuple[tuple, dict[str, frozenset[str] | None]] = ((), {})
        journal.event_targets = self.targets
        self.in_flight: dict[str, _Call] = {}
        self.hung: dict[str, int] = {plugin: 0 for plugin in self.callers}
        self._hung_lock = threading.Lock()
        self._next_check = 0.0  # no pending delivery is due before this (time.time())
        self._events_seen = -1

    @property
    def plugins(self) -> tuple[str, ...]:
        return tuple(self.callers)

    def targets(self, event: dict) -> list[str]:
        """The plugins that want this event (``job_event_kinds``): they get its delivery rows."""
        wanted = self.wanted_kinds()
        return [plugin for plugin in self.callers if wanted.get(plugin) is None or event["kind"] in wanted[plugin]]

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
        """Record finished calls, time out hung ones, start calls for the deliveries that are due."""
        if not self.callers:
            return
        self._collect()
        now = time.time()
        if now < self._next_check and self.journal.events_added == self._events_seen:
            return
        self._events_seen = self.journal.events_added
        with self._hung_lock:
            blocked = {plugin for plugin, count in self.hung.items() if count >= MAX_ABANDONED_CALLS}
        free = [plugin for plugin in self.callers if plugin not in self.in_flight and plugin not in blocked]
        for plugin, event, _attempts in self.journal.due_deliveries(now, plugins=free):
            if plugin in self.in_flight:
                continue  # one call per plugin at a time, oldest event first
            self.in_flight[plugin] = _Call(plugin, event, self.callers[plugin], self.settings(),
                                           self._late_return, self.wake)
        upcoming = self.journal.next_delivery_at(plugins=self.callers)
        if upcoming is None:
            self._next_check = float("inf")  # until an event is added
        elif upcoming > now:
            self._next_check = upcoming
        else:
            self._next_check = 0.0  # due ones wait for their plugin's call in flight: look on every tick

    def _collect(self) -> None:
        timeout = self.settings().notify.timeout_seconds
        for plugin, call in list(self.in_flight.items()):
            if call.done.is_set():
                self._record(call, call.error)
            elif time.monotonic() - call.started >= timeout and call.abandon():
                with self._hung_lock:
                    self.hung[plugin] += 1
                self._record(call, f"timed out after {timeout:g} s")
            else:
                continue
            del self.in_flight[plugin]
            self._next_check = 0.0

    def _late_return(self, plugin: str) -> None:
        with self._hung_lock:
            self.hung[plugin] -= 1

    def _record(self, call: _Call, error: str | None) -> None:
        event_id = call.event["id"]
        if error is None:
            self.journal.delivery_sent(event_id, call.plugin)
            return
        notify = self.settings().notify
        attempts = self.journal.delivery_attempts(event_id, call.plugin) + 1
        if attempts >= notify.max_attempts:
            log.error("plugin %s: giving up on event %s after %d attempts: %s", call.plugin, event_id, attempts, error)
            self.journal.delivery_failed(event_id, call.plugin, error, retry_at=None)
            return
        delay = min(notify.retry_initial_seconds * 2 ** (attempts - 1), notify.retry_max_seconds)
        log.warning("plugin %s: event %s not delivered (attempt %d of %d: %s); retrying in %.1f s",
                    call.plugin, event_id, attempts, notify.max_attempts, error, delay)
        self.journal.delivery_failed(event_id, call.plugin, error, retry_at=time.time() + delay)

    def busy(self) -> bool:
        """Whether a delivery is in flight or still pending (what ``run --once`` waits for)."""
        return bool(self.in_flight) or self.journal.next_delivery_at(plugins=self.callers) is not None

    def seconds_until_due(self) -> float:
        if self.in_flight:
            # A call that returns wakes the loop itself; this only bounds how late a hung one is timed out.
            timeout = self.settings().notify.timeout_seconds
            oldest = min(call.started for call in self.in_flight.values())
            return min(1.0, max(0.0, oldest + timeout - time.monotonic()))
        return max(0.0, self._next_check - time.time())

    def close(self, wait_seconds: float = 2.0) -> None:
        """Record the calls that end within ``wait_seconds``; the others are redelivered after a restart."""
        deadline = time.monotonic() + wait_seconds
        for call in list(self.in_flight.values()):
            call.done.wait(max(0.0, deadline - time.monotonic()))
        for plugin, call in list(self.in_flight.items()):
            if call.done.is_set():
                self._record(call, call.error)
                del self.in_flight[plugin]
