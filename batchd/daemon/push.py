"""Push: what the HTTP server's thread hands to the loop (Gemini webhook deliveries, dashboard actions).

The server never writes the journal (only the loop's thread does, docs/design.md rule 2): it verifies a
delivery (:mod:`batchd.webhooks`) and puts it in :class:`Inbound`, a bounded queue whose ``put`` wakes
the loop; a full queue answers 503 and the sender retries. On its next tick the loop takes them
(:meth:`Push.take`): each delivery's ``webhook-id`` is recorded in the journal's
``webhook_deliveries`` (a delivery seen before is acknowledged and dropped), and the remote batch it
names is looked at at once (a ``get``, then its results fetched), so a job is delivered the moment
its batch ends instead of at the next poll. A delivery for a batch whose create is not yet recorded
is kept for :data:`EARLY_SECONDS` and looked at again each tick.

Dashboard buttons go the same way as ``batchd cancel`` / ``approve`` / ``retry``: the loop drops the
``NAME.cancel`` / ``NAME.approve`` file or the retry manifest into the inbox, and answers the server
through a future.
"""

from __future__ import annotations

import logging
import queue
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from batchd.daemon.context import Context

log = logging.getLogger("batchd")

#: Deliveries and actions waiting for the loop, at most (the server answers 503 beyond).
INBOUND_MAX = 1000
#: A delivery for a remote batch not yet recorded (its create's answer not collected yet) is kept this long.
EARLY_SECONDS = 120.0
#: Items taken in one tick at most (each delivery costs journal writes, and a get in the monitor's pool);
#: the rest next tick.
TAKE_PER_TICK = 100
#: Taken webhook ids are remembered this long (Google retries a delivery for less).
KEEP_WEBHOOK_IDS_SECONDS = 7 * 86400.0
#: Deliveries the loop remembers not to have matched (bounded: a flood of unknown names is dropped).
EARLY_MAX = 1000


@dataclass(frozen=True)
class Delivery:
    """A verified webhook delivery."""

    webhook_id: str
    event_type: str
    remote_name: str | None
    #: From the per-job webhook's user_metadata (None for static webhooks).
    job_id: str | None = None


@dataclass
class Action:
    """A dashboard button: ``cancel``, ``approve`` or ``retry`` of job ``name``; the loop answers ``done``."""

    verb: str
    name: str
    done: Future = field(default_factory=Future)


class Inbound:
    """The bounded queue from the HTTP server's thread to the loop's."""

    def __init__(self, wake: Callable[[], None], maxsize: int = INBOUND_MAX) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._wake = wake

    def put(self, item: Delivery | Action) -> bool:
        """False when the queue is full (the caller answers 503)."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return False
        self._wake()
        return True

    def take(self, limit: int) -> list[Any]:
        items = []
        while len(items) < limit:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def __len__(self) -> int:
        return self._queue.qsize()


class Push:
    """The loop's side: takes deliveries and actions (loop thread only)."""

    def __init__(self, ctx: Context, inbound: Inbound, *, pushed: Callable[[str | None], bool],
                 act: Callable[[Action], str]) -> None:
        self.ctx = ctx
        self.inbound = inbound
        self._pushed = pushed
        self._act = act
        self._early: dict[str, float] = {}
        self._forgotten_at = float("-inf")
        #: Deliveries taken and acted on, and duplicates dropped, since the start (for /metrics).
        self.taken = 0
        self.duplicates = 0

    def take(self) -> None:
        journal = self.ctx.journal
        now = time.monotonic()
        for name, seen_at in list(self._early.items()):
            if now - seen_at > EARLY_SECONDS or self._pushed(name):
                del self._early[name]
        for item in self.inbound.take(TAKE_PER_TICK):
            if isinstance(item, Action):
                try:
                    item.done.set_result(self._act(item))
                except Exception as error:  # noqa: BLE001 - the server shows it; the loop goes on
                    item.done.set_exception(error)
                continue
            if not journal.record_webhook(item.webhook_id, item.remote_name, item.event_type):
                self.duplicates += 1
                log.info("webhook delivery %s taken before: acknowledged, not acted on again", item.webhook_id)
                continue
            self.taken += 1
            log.info("webhook %s: %s %s", item.webhook_id, item.event_type, item.remote_name or "",
                     extra={"remote": item.remote_name, **({"job": item.job_id} if item.job_id else {})})
            if not self._pushed(item.remote_name) and item.remote_name and len(self._early) < EARLY_MAX:
                self._early[item.remote_name] = now
        if now - self._forgotten_at > 3600:
            self._forgotten_at = now
            journal.forget_webhooks(time.time() - KEEP_WEBHOOK_IDS_SECONDS)

    def seconds_until_due(self) -> float:
        return 1.0 if self._early else float("inf")


def act(ctx: Context, action: Action) -> str:
    """Do a dashboard button's action the way ``batchd cancel`` / ``approve`` / ``retry`` does; returns what
    to tell the operator. Raises ValueError for a request that cannot be done."""
    from batchd.drop import drop_bytes
    from batchd.retry import RetryError, finished_job, retry

    name = action.name
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or len(name) > 255:
        raise ValueError(f"{name[:80]!r} is not a job name or id")
    if action.verb in ("cancel", "approve"):
        noun = "cancel" if action.verb == "cancel" else "approval"
        try:
            drop_bytes(b"", ctx.settings.inbox / f"{name}.{action.verb}")
        except FileExistsError:
            return f"{noun} of {name} was already requested"
        return f"{noun} requested for {name}"
    if action.verb == "retry":
        try:
            job = finished_job(ctx.journal, name)
            made = retry(ctx.settings, ctx.journal, ctx.tasks, job, failed=True, expired=True)
        except RetryError as error:
            raise ValueError(str(error)) from None
        if made.manifest is None:
            return f"job {job.id}: nothing to retry"
        return f"retrying {made.failed + made.expired} request(s) of job {job.id} as {made.manifest.name}"
    raise ValueError(f"unknown action {action.verb!r}")
