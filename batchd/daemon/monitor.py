"""Monitor: remote batches running → finished (``running → fetched``, or ``built`` again when expired).

One list pass per poll covers every running chunk (a get only for those the list did not show); the
same pass looks for *strays*: remote batches under a display name whose create outcome was once
unknown that are not the chunk's own (a create that reached the service but was listed late, or a
duplicate a crash left). Each is recorded before it is cancelled. Polls back off while nothing
changes (``poll_interval`` doubling up to ``poll_max_interval``); with nothing running the list is
read for the watched names alone, every ``poll_max_interval``. The same pass gives reconciliation
(batchd.daemon.submit) the remote jobs under the names of unconfirmed creates.

The loop never waits for the service here: a poll is a question (:class:`PollQuestion`, made from the
journal on the loop) that one reader thread answers (:func:`read_remote`: the list's pages and the
gets, never the journal), and the loop records the answer (:meth:`Monitor.collect`) the tick after it
came, against the journal as it is then: a chunk fetched, cancelled or created meanwhile is taken as
it now is, not as it was when the question was asked. A service slow to answer, or hung until the
calls' timeout, holds no claim, create or delivery meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from batchd.backoff import Backoff
from batchd.daemon.context import Context
from batchd.daemon.crashpoints import crashpoint
from batchd.daemon.naming import chunk_display_name
from batchd.events import progress_counts
from batchd.journal import Chunk
from batchd.logs import FailureRun
from batchd.provider import Provider, is_auth_error, is_retryable, quota_delay
from batchd.remote import RemoteJob
from batchd.states import (CHUNK_DONE_STATES, JOB_STATES_WITH_REMOTE_WORK, REMOTE_LIVE_CHUNK_STATES, ChunkState, JobState,
                           StrayOutcome)

log = logging.getLogger("batchd")

#: A run of failed polls is said once, then once every this long while it lasts.
POLL_FAILURES_SAID_SECONDS = 600.0

#: Cancels and webhooks' gets on their way at once (the monitor's pool): a job of many chunks cancelled
#: at once sends one cancel a chunk, and a burst of webhooks asks one get each. The rest wait in the
#: pool's queue, at most one of each kind per remote batch (they are keyed by its name): bounded by the
#: batches alive, not by how many webhooks or cancel requests come.
CALLS_AT_ONCE = 4
#: How far the service's create times may be behind this machine's clock: the stray watch and the search
#: for an unconfirmed create's job read the newest-first list down to this much before the first create
#: under the name (a remote job older than that is none of theirs).
CLOCK_SKEW_SECONDS = 600.0


@dataclass(frozen=True)
class PollQuestion:
    """What one poll asks the service, made from the journal on the loop."""

    #: Remote names of the running chunks: each is looked for in the list, else asked for with a get.
    running: frozenset[str]
    #: Display names whose remote jobs are wanted too: running chunks' (strays), watched names, unconfirmed creates.
    names: frozenset[str]
    #: Display names of unconfirmed creates: the list is then read down to ``oldest`` whatever was seen
    #: before (an absence is a finding).
    unconfirmed: frozenset[str]
    #: Whether strays of watched names are looked for; how far down the newest-first list (create time) a
    #: watched name's stray or an unconfirmed create's job may be.
    watching: bool
    oldest: float

    @property
    def empty(self) -> bool:
        return not (self.running or self.names)


@dataclass
class PollAnswer:
    """What the service said (:func:`read_remote`): the listed remote jobs the question wants, in list
    order, and the gets' answers (None: no such job). ``error``: the call that failed, and ended the
    reading there (what was read before it is kept)."""

    listed_at: float
    listed: list[RemoteJob] = field(default_factory=list)
    got: dict[str, RemoteJob | None] = field(default_factory=dict)
    error: Exception | None = None


def read_remote(provider: Provider, question: PollQuestion) -> PollAnswer:
    """Answer ``question`` with the list's pages, newest first, and a get for each running chunk the list
    did not show (runs in the monitor's reader thread, or the caller's: never touches the journal)."""
    answer = PollAnswer(listed_at=time.time())
    if question.empty:
        return answer
    seen: set[str] = set()
    try:
        for remote in provider.list_jobs():
            if remote.name in question.running:
                seen.add(remote.name)
                answer.listed.append(remote)
            elif remote.display_name in question.names:
                answer.listed.append(remote)
            # Newest first: once every running job is seen, only a watched name's stray or an unconfirmed
            # create's job can be further down, and none is older than the first create under its name. (A
            # project keeps every batch it ever ran unless deleted: read whole, it is pages of calls a poll.)
            if (len(seen) == len(question.running)
                    and (not (question.watching or question.unconfirmed) or remote.create_time is not None
                         and remote.create_time.timestamp() < question.oldest)):
                break  # every job we look for is accounted for, and older pages hold none of them
        for name in question.running - seen:
            answer.got[name] = get_or_none(provider, name)
    except Exception as error:  # noqa: BLE001 - the loop classifies it (Monitor.collect)
        answer.error = error
    return answer


def get_or_none(provider: Provider, name: str) -> RemoteJob | None:
    """``batches.get`` of ``name``, asked once; None when the service has no such job."""
    try:
        return provider.get(name, once=True)
    except Exception as error:
        if getattr(error, "code", None) == 404:
            return None
        raise


class Monitor:
    def __init__(self, ctx: Context, *, unconfirmed: Callable[[], dict[str, Chunk]],
                 reconcile: Callable[[dict[str, Chunk], list[RemoteJob], float], None], fetch: Callable[..., None]):
        self.ctx = ctx
        settings = ctx.settings
        self.poll_clock = Backoff(settings.poll_interval, settings.poll_max_interval)
        self._unconfirmed = unconfirmed
        self._reconcile = reconcile
        self._fetch = fetch
        #: The poll whose answer the reader thread is making, if one is: its question and the answer to come.
        self._reading: tuple[PollQuestion, Future[PollAnswer]] | None = None
        #: Remote names a webhook had looked at (a get) while that poll was read: its older word is not taken.
        self._looked_at_meanwhile: set[str] = set()
        self._strays_looked_at = float("-inf")
        #: Polls failing in a row (not for the key or the quota).
        self._poll_failures = FailureRun(POLL_FAILURES_SAID_SECONDS)
        #: When the last verified webhook delivery came (monotonic), and the last poll ended.
        self.push_seen_at = float("-inf")
        self.polled_at = time.monotonic()
        #: The calls on their way that the loop made no poll for, by ``("cancel" | "look", remote name)``: a
        #: ``batches.cancel`` (``about``: the job, and what records it), a webhook's ``batches.get``.
        self.calls = ctx.workers("monitor", CALLS_AT_ONCE, keyed_by_job=False, daemon=True)
        #: remote name → the backoff of its failed cancels
        self.cancel_backoff: dict[str, Backoff] = {}

    def chunks_in(self, *states: str) -> list[Chunk]:
        return self.ctx.journal.chunks_in(states, job_states=JOB_STATES_WITH_REMOTE_WORK)

    def anything_live(self) -> bool:
        """Whether a remote batch runs, or may (one query, however many there are)."""
        return bool(self.ctx.journal.count_chunks_in(REMOTE_LIVE_CHUNK_STATES, job_states=JOB_STATES_WITH_REMOTE_WORK,
                                                     limit=1))

    def running_count(self) -> int:
        return self.ctx.journal.count_chunks_in((ChunkState.RUNNING,), job_states=JOB_STATES_WITH_REMOTE_WORK)

    def push_healthy(self) -> bool:
        """Whether webhooks are delivering (one verified within ``webhook_healthy_seconds``)."""
        return time.monotonic() - self.push_seen_at < self.ctx.settings.webhook_healthy_seconds

    def _poll_seconds_left(self) -> float:
        """The poll clock's wait; while webhooks are healthy, at least ``webhook_poll_interval`` since the
        last poll (the poll stays as the safety net), unless a poll was asked for at once."""
        left = self.poll_clock.seconds_left()
        if self.poll_clock.due_at and self.push_healthy():
            left = max(left, self.polled_at + self.ctx.settings.webhook_poll_interval - time.monotonic())
        return left

    def due(self) -> bool:
        if self._reading is not None or self.ctx.quota.waiting("poll"):
            return False
        return self._poll_seconds_left() <= 0 and self.anything_live() or self._stray_look_due()

    def seconds_until_due(self) -> float:
        """When the next poll (or look for strays) is due; inf when nothing is to be watched, or while a poll's
        answer is on its way (it wakes the loop)."""
        if self._reading is not None:
            return float("inf")
        if self.anything_live():
            return self._poll_seconds_left()
        if self.ctx.journal.watched_names():
            return max(0.0, self._strays_looked_at + self.ctx.settings.poll_max_interval - time.monotonic())
        return float("inf")

    def poll(self) -> None:
        """One round of monitoring, now, on the caller's thread (the loop starts one with :meth:`start_poll`
        instead, and records it with :meth:`collect`)."""
        question = self._question()
        self._record(question, read_remote(self.ctx.provider, question))

    def start_poll(self) -> None:
        """Ask the service in the reader thread; :meth:`collect` records the answer once it has come."""
        question = self._question()
        answer: Future[PollAnswer] = Future()
        answer.add_done_callback(lambda _: self.ctx.wake())
        self._reading = (question, answer)
        self._looked_at_meanwhile.clear()
        # A daemon thread, one at a time: a call the service never answers (until its timeout) keeps
        # nothing from stopping, and it writes nothing, so nothing is lost when a stop leaves it behind.
        def read() -> None:
            try:
                answer.set_result(read_remote(self.ctx.provider, question))
            except BaseException as error:  # noqa: BLE001 - a bug: the loop raises it (collect)
                answer.set_exception(error)
        threading.Thread(target=read, name="batchd-poll", daemon=True).start()

    def collect(self) -> None:
        """Record the cancels and webhooks' gets the service answered, and the answer of the poll started
        last if it has come."""
        self._collect_calls()
        if self._reading is None or not self._reading[1].done():
            return
        (question, answer), self._reading = self._reading, None
        self._record(question, answer.result())

    def busy(self) -> bool:
        return self._reading is not None or bool(len(self.calls))

    def close(self) -> None:
        # A call on its way, or not begun, is left: a service that never answers holds no stop. What it
        # would have recorded is done again after the next start: a stray whose outcome is unrecorded, and
        # a cancelled job's chunk without cancel_sent, are cancelled again (cancelling twice is harmless);
        # the next poll looks at what a webhook announced.
        self.calls.shutdown(cancel=True)

    def _question(self) -> PollQuestion:
        running = self.chunks_in(ChunkState.RUNNING)
        unconfirmed = self._unconfirmed()
        watched = self.watched_now()
        # An unconfirmed create's name is watched from its first create on (Submit.unconfirmed); its own intent
        # counts too, and one without (recorded by an older batchd) has the whole list read.
        firsts = [w["first_attempt_at"] for w in watched.values()]
        firsts += [c.intent_at if c.intent_at is not None else float("-inf") for c in unconfirmed.values()]
        oldest = min(firsts, default=float("inf")) - CLOCK_SKEW_SECONDS
        return PollQuestion(running=frozenset(c.remote_name for c in running),
                            names=frozenset({c.display_name for c in running} | watched.keys() | unconfirmed.keys()),
                            unconfirmed=frozenset(unconfirmed), watching=bool(watched), oldest=oldest)

    def _record(self, question: PollQuestion, answer: PollAnswer) -> None:
        """Record what the service said, against the journal as it is now: a chunk that is no longer running
        under the name asked about (fetched after a webhook, cancelled, expired) is left as it is."""
        ctx = self.ctx
        changed = False
        live = self.anything_live()
        try:
            if question.unconfirmed and answer.error is None:
                # Those still unconfirmed (none is created again before the grace period is over at the
                # time the list was read: batchd.daemon.submit).
                pending = {name: c for name, c in self._unconfirmed().items() if name in question.unconfirmed}
                if pending:
                    self._reconcile(pending, answer.listed, answer.listed_at)
            running = {c.remote_name: c for c in self.chunks_in(ChunkState.RUNNING)}
            by_display_name = {c.display_name: c for c in running.values()}
            watched = self.watched_now()
            for remote in answer.listed:
                chunk = running.get(remote.name)
                if chunk is not None:
                    if remote.name not in self._looked_at_meanwhile:
                        changed |= self._observe(chunk, remote)
                elif (owner := by_display_name.get(remote.display_name)) is not None:
                    self.stray(owner.job_id, owner.idx, owner.display_name, remote)
                elif (name := watched.get(remote.display_name)) is not None:
                    self.stray(name["job_id"], name["chunk_idx"], remote.display_name, remote)
            if answer.error is not None:
                raise answer.error
            if not question.empty:
                self._strays_looked_at = time.monotonic()
            if live:
                crashpoint("while-polling")
            for name, remote in answer.got.items():
                chunk = running.get(name)
                if chunk is not None and name not in self._looked_at_meanwhile:
                    changed |= self._observe(chunk, remote, got=True)
            self._cancel_strays()
        except Exception as error:
            if not (is_retryable(error) or is_auth_error(error)):
                raise
            if not question.empty:
                # A failed look is a look: the next waits for the poll clock, or for an interval, like any
                # poll's (else a watched name made every tick poll, a thousand times a second in an outage).
                self._strays_looked_at = time.monotonic()
            asked = quota_delay(error)
            if asked is not None:
                # The list is refused for quota: no poll before the service's quota is back.
                wait = ctx.quota.refused("poll", asked, "429 RESOURCE_EXHAUSTED on poll")
                if wait is not None:
                    log.warning("polling refused: quota exhausted (%s); waiting: quota, polls retry in %.0f s",
                                getattr(error, "message", None) or error, wait, extra={"wait": wait})
                self.poll_clock.next_after(changed)
                left = ctx.quota.seconds_left("poll")
                if left != float("inf"):
                    self.poll_clock.due_at = max(self.poll_clock.due_at, time.monotonic() + left)
                return
            if is_auth_error(error):
                # A key revoked while jobs run: they keep running remotely; the poll goes on asking,
                # and says so once, not at every poll.
                ctx.key.refused(error, "polling and reconciling unconfirmed creates" if question.unconfirmed
                                else "polling")
            else:
                self._poll_failed(error)
        else:
            ctx.key.accepted()
            if ctx.quota.went_through("poll"):
                log.info("the service answers polls again: the quota wait is over")
            if failed := self._poll_failures.succeeded():
                log.info("the service answers polls again, after %d failed", failed)
        self.poll_clock.next_after(changed)
        self.polled_at = time.monotonic()

    def _poll_failed(self, error: Exception) -> None:
        if self._poll_failures.failed():
            log.warning("polling failed (%s); retrying at the poll interval (further failures are summed up "
                        "every %g s)", error, POLL_FAILURES_SAID_SECONDS)
        elif summary := self._poll_failures.summary():
            log.warning("polling failed %d more time(s) in the last %.0f s, %d in a row; the last error: %s",
                        *summary, self._poll_failures.failures, error)
        else:
            log.debug("polling failed (%s); %d in a row", error, self._poll_failures.failures)

    def pushed(self, remote_name: str | None) -> bool:
        """A verified webhook delivery about ``remote_name``: look at that batch now (a get in the monitor's
        pool; the loop records its answer, and fetches the results of a batch that has finished). False
        when no running chunk has that name yet (the caller tries again)."""
        self.push_seen_at = time.monotonic()
        if not remote_name:
            return True  # a ping: webhooks work
        chunk = self.ctx.journal.chunk_by_remote_name(remote_name)
        if chunk is None:
            return False
        if chunk.state != ChunkState.RUNNING:
            return True  # fetched already, or being created again
        job = self.ctx.journal.job(chunk.job_id)
        if job is None or job.state not in JOB_STATES_WITH_REMOTE_WORK:
            return True
        if ("look", remote_name) not in self.calls:
            self.calls.start(("look", remote_name), get_or_none, self.ctx.provider, remote_name)
        return True

    def _looked(self, remote_name: str, answer: Future[RemoteJob | None]) -> None:
        """Record what a webhook's get answered, if its chunk still runs under that name (a poll may have
        seen it finish meanwhile, or a cancel ended its job)."""
        chunk = self.ctx.journal.chunk_by_remote_name(remote_name)
        if chunk is None or chunk.state != ChunkState.RUNNING:
            return
        job = self.ctx.journal.job(chunk.job_id)
        if job is None or job.state not in JOB_STATES_WITH_REMOTE_WORK:
            return
        if self._reading is not None:
            self._looked_at_meanwhile.add(remote_name)  # the poll on its way may have read it earlier
        try:
            remote = answer.result()
        except Exception as error:
            if not (is_retryable(error) or is_auth_error(error)):
                raise
            log.warning("job %s: looking at %s after its webhook failed (%s); polling soon", chunk.job_id,
                        remote_name, error)
            self.poll_clock.now()
            return
        self._observe(chunk, remote, got=True)

    # -- strays: late remote jobs under a name whose create outcome was unknown ----------------

    def watch(self, chunk: Chunk, attempt_at: float) -> None:
        self.ctx.journal.watch_name(chunk.job_id, chunk.idx, chunk.display_name, attempt_at)

    def watched_now(self) -> dict[str, dict]:
        """The watched names to look for strays of: those still in their window (the rest are forgotten),
        but not those of a chunk still ``submitting``, which reconciliation matches (one is adopted)."""
        journal = self.ctx.journal
        journal.forget_watched_names(time.time() - self.ctx.settings.stray_watch_seconds)
        watched = journal.watched_names()
        if watched:
            unconfirmed = {c.display_name for c in self.chunks_in(ChunkState.SUBMITTING)}
            watched = {name: row for name, row in watched.items() if name not in unconfirmed}
        return watched

    def _stray_look_due(self) -> bool:
        """Whether the list is to be read for watched names now, with no poll due for running chunks."""
        journal = self.ctx.journal
        if time.monotonic() - self._strays_looked_at < self.ctx.settings.poll_max_interval:
            return False
        if journal.watched_names() or journal.remote_jobs_with_outcome(StrayOutcome.CANCELLING):
            return True
        self._strays_looked_at = time.monotonic()  # nothing to look for: ask again an interval later
        return False

    def stray(self, job_id: str, idx: int, display_name: str, remote: RemoteJob) -> None:
        """A remote job under one of our display names that is not the chunk's own: a create that reached
        the service but showed up in the list only later (after its chunk was created again, fetched or
        skipped, or its job delivered), or a duplicate a crash left. It is recorded (its cost counts),
        then cancelled unless it has ended; one that finished has results no job used, which is logged
        (an already delivered job's summary.json is never rewritten)."""
        journal = self.ctx.journal
        if journal.remote_job(remote.name) is not None:
            return  # adopted, or recorded as a duplicate on an earlier poll (its cancel retried apart)
        extra = {"job": job_id, "chunk": idx, "remote": remote.name}
        if remote.done:
            log.warning("job %s: remote job %s under %s ended (%s) apart from the chunk's own; its results "
                        "are not used, its cost counts", job_id, remote.name, display_name, remote.state, extra=extra)
            journal.record_stray(remote.name, job_id=job_id, chunk_idx=idx, display_name=display_name,
                                 outcome=StrayOutcome.FINISHED)
            return
        log.warning("job %s: cancelling duplicate remote job %s for %s", job_id, remote.name, display_name,
                    extra=extra)
        journal.record_stray(remote.name, job_id=job_id, chunk_idx=idx, display_name=display_name,
                             outcome=StrayOutcome.CANCELLING)
        self._cancel_stray(remote.name, job_id)

    def _cancel_strays(self) -> None:
        """Retry the cancels of recorded strays the service did not accept yet (each with its backoff)."""
        for row in self.ctx.journal.remote_jobs_with_outcome(StrayOutcome.CANCELLING):
            self._cancel_stray(row["remote_name"], row["job_id"])

    def _cancel_stray(self, remote_name: str, job_id: str) -> None:
        self.cancel(remote_name, job_id,
                    lambda: self.ctx.journal.set_remote_outcome(remote_name, StrayOutcome.CANCELLED))

    def cancel(self, remote_name: str, job_id: str, cancelled: Callable[[], None]) -> None:
        """``batches.cancel``, sent from the monitor's pool once what it follows from (a stray recorded, a cancel
        request) is committed; ``cancelled`` records it on the loop when the service has taken it (or has
        no such job: nothing is left running to bill). A failure is retried at the next ask once its
        backoff has run out (twice as long after each failure, up to ``poll_max_interval``); one on its
        way is not sent again. Cancelling twice is harmless."""
        backoff = self.cancel_backoff.get(remote_name)
        if ("cancel", remote_name) in self.calls or backoff is not None and not backoff.due():
            return
        self.calls.start(("cancel", remote_name), self.ctx.provider.cancel, remote_name, about=(job_id, cancelled))

    def _collect_calls(self) -> None:
        settings = self.ctx.settings
        for work in self.calls.finished():
            what, remote_name = work.key
            if what == "look":
                self._looked(remote_name, work.future)
                continue
            job_id, cancelled = work.about
            try:
                work.future.result()
            except Exception as error:
                if getattr(error, "code", None) != 404:
                    backoff = self.cancel_backoff.setdefault(
                        remote_name, Backoff(settings.poll_interval, settings.poll_max_interval))
                    wait = backoff.failed()
                    log.warning("job %s: cancel of %s failed (%s); retrying in %.0f s", job_id, remote_name, error,
                                wait)
                    continue
                log.warning("job %s: remote job %s to cancel no longer exists", job_id, remote_name)
            self.cancel_backoff.pop(remote_name, None)
            cancelled()

    def send_cancel(self, chunk: Chunk) -> None:
        """``batches.cancel`` for a running chunk of a cancelled job (see :meth:`cancel`); ``cancel_sent`` is
        recorded once the service has taken it, and the chunk is polled soon after.

        Sent again after a crash before ``cancel_sent`` is committed: cancelling twice is harmless.
        """
        def sent() -> None:
            crashpoint("after-cancel")
            self.ctx.journal.update_chunk(chunk.job_id, chunk.idx, cancel_sent=1)
            self.poll_clock.now()  # look again soon

        self.cancel(chunk.remote_name, chunk.job_id, sent)

    # -- what the service says about one chunk ------------------------------------------------------

    def _observe(self, chunk: Chunk, remote: RemoteJob | None, *, got: bool = False) -> bool:
        """Record what the service says about one chunk; fetch its results once it has finished (``got``: the
        remote came from a ``get``, inline output and all, and the fetch uses it instead of asking again)."""
        journal = self.ctx.journal
        if remote is None:
            log.error("job %s: remote job %s has disappeared", chunk.job_id, chunk.remote_name)
            journal.update_chunk(chunk.job_id, chunk.idx, state=ChunkState.FETCHED, remote_state="missing",
                                 error={"code": "remote_missing",
                                        "message": f"remote job {chunk.remote_name} no longer exists"})
            return True
        changed = remote.state != chunk.remote_state or remote.stats != chunk.stats
        if remote.state == "expired":
            self._expired(chunk, remote)
            return True
        if remote.state in ("pending", "running", "unknown"):
            if changed:
                journal.update_chunk(chunk.job_id, chunk.idx, remote_state=remote.state, stats=remote.stats,
                                     events=self.progress_events(chunk, remote.stats))
            return changed
        self._fetch(chunk, remote if got else None)
        return True

    def _expired(self, chunk: Chunk, remote: RemoteJob) -> None:
        """The service gave up on a chunk's remote job (not finished within 48 h; no results, no bill).

        While ``resubmit_expired`` allows, the chunk goes back to ``built`` under its next display
        name and is submitted again like any chunk (intent first, reconciled by that name); after
        the last attempt its requests end as ``expired`` errors. Either way an ``expired`` event
        tells the notification plugins, committed with the transition.
        """
        ctx = self.ctx
        job = ctx.journal.job(chunk.job_id)
        allowed = ctx.settings.resubmit_expired
        what = f"remote batch {remote.name} (chunk {chunk.idx}, {chunk.request_count} requests) expired: the " \
               f"service did not finish it within 48 h and returned no results"
        if chunk.resubmits < allowed and not job.cancel_requested:
            display_name = chunk_display_name(job, chunk.idx, chunk.resubmits + 1)
            reason = f"{what}; submitted again as {display_name} " \
                     f"(resubmission {chunk.resubmits + 1} of {allowed}, resubmit_expired)"
            ctx.log_event("expired", logging.WARNING, "job %s: %s", job.id, reason,
                          extra={"job": job.id, "chunk": chunk.idx})
            ctx.journal.resubmit_chunk(chunk, display_name, events=[ctx.event("expired", job, reason=reason)])
            return
        tries = chunk.resubmits + 1
        error = {"code": "expired",
                 "message": f"{what}; submitted {tries} time{'s' if tries != 1 else ''} in all "
                            f"(resubmit_expired = {allowed})"}
        ctx.log_event("expired", logging.ERROR, "job %s: %s", job.id, error["message"],
                      extra={"job": job.id, "chunk": chunk.idx})
        events = [ctx.event("expired", job, reason=error["message"], error=error)]
        events += self.progress_events(chunk, remote.stats, finished=True)
        ctx.journal.update_chunk(chunk.job_id, chunk.idx, state=ChunkState.FETCHED, remote_state="expired",
                                 stats=remote.stats, error=error, events=events)

    def progress_events(self, moved: Chunk, stats: dict, *, finished: bool = False) -> list[dict]:
        """A ``progress`` event when the remote counts of ``moved``'s job have changed since the last one.

        At most one per job per ``notify.progress_seconds``, so a long job does not flood the journal
        and the receivers; none when the chunk that finishes is the job's last (its final event follows).
        """
        ctx = self.ctx
        # The throttle first: it is the cheap check, and most polls of a long job stop there.
        last = ctx.journal.last_event(moved.job_id, "progress")
        if last is not None and time.time() - last[1] < ctx.settings.notify.progress_seconds:
            return []
        job = ctx.journal.job(moved.job_id)
        if job.state != JobState.SUBMITTED:
            return []  # its chunks still going out: the `submitted` event comes first, and tells what they did
        chunks = ctx.journal.chunks(job.id)
        if finished and all(
                c.idx == moved.idx or c.state in CHUNK_DONE_STATES for c in chunks):
            return []
        counts = progress_counts(chunks, {moved.idx: stats})
        before = last[0]["counts"] if last is not None else {"done": 0, "total": counts["total"]}
        if (counts["done"], counts["total"]) == (before.get("done"), before.get("total")):
            return []
        return [ctx.event("progress", job, counts=counts)]
