"""The host side of the cost hooks: what the daemon hands ``estimate_cost``, ``check_budget`` and
``account_cost`` (see :mod:`batchd.hookspecs`), and how it calls them.

A cost plugin that raises must not take a job, or the daemon, down with it: every call here is
guarded, and a failure reads as "no estimate" (which a budget then treats as unknown) or "no
actual cost", with the error logged and kept in the job's ``cost`` record.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from batchd.plugin_calls import run_in_own_thread

if TYPE_CHECKING:
    from batchd.config import Settings
    from batchd.journal import Job
    from batchd.task import TaskRequest

log = logging.getLogger("batchd.costs")

#: The window of ``cost.daily_budget``: a rolling day.
DAY_SECONDS = 24 * 3600


@dataclass(frozen=True)
class JobInfo:
    """The job as cost and notification hooks see it."""

    id: str
    name: str
    manifest: str
    task: str | None
    model: str | None
    #: ``"generate"`` or ``"embed"`` (its task's :attr:`~batchd.task.Task.kind`): embeddings have no output tokens.
    kind: str = "generate"

    @classmethod
    def of(cls, job: Job, default_model: str | None = None) -> JobInfo:
        return cls(id=job.id, name=job.name, manifest=job.source, task=job.task, model=job.model or default_model,
                   kind=job.kind)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RequestStream:
    """A job's requests, re-read from its manifest on every iteration (constant memory).

    ``stopping`` is asked every 10,000 requests: when the daemon is stopping the stream ends early,
    so a long estimate does not hold up a shutdown (the host then discards that estimate).
    """

    def __init__(self, open_requests: Callable[[], Iterator[TaskRequest]],
                 stopping: Callable[[], bool] = lambda: False):
        self._open = open_requests
        self._stopping = stopping
        #: What stopped the requests being read (a bad row, a failing task), if anything: the job's
        #: problem, which its host reports, not the estimating plugin's.
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[TaskRequest]:
        try:
            for n, request in enumerate(self._open()):
                if n % 10_000 == 0 and self._stopping():
                    return
                yield request
        except Exception as error:
            self.error = error
            raise


class EstimateAlongside:
    """A job's estimate made from the requests its build pass reads, instead of a pass of its own.

    For a job whose budget decision does not need the estimate first (no budget can hold it): the
    builder's requests go through :meth:`feed` on their way to the chunks, and ``estimate(requests)``
    (``estimate_cost``) iterates them in its own thread, in batches through a bounded queue, so
    memory stays flat. An estimator that falls :data:`STALL_SECONDS` behind is given up on (the job
    then goes without an estimate) rather than holding up the build.
    """

    BATCH = 1000
    STALL_SECONDS = 30.0
    _END = None

    def __init__(self, estimate: Callable[[Iterable[TaskRequest]], dict | None], job_id: str,
                 on_done: Callable[[], None] = lambda: None):
        """``on_done`` is called from the estimate's thread when it ends (the job can then be sent)."""
        self.job_id = job_id
        self._on_done = on_done
        self.fed_all = False  # the build pass has read every request
        self.result: dict | None = None
        self.abandoned = False
        self._closed = False
        self._queue: queue.Queue[list | None] = queue.Queue(maxsize=16)
        self._done = threading.Event()
        run_in_own_thread(lambda: self._run(estimate), f"batchd-estimate-{job_id}")

    def _requests(self) -> Iterator[TaskRequest]:
        while (batch := self._queue.get()) is not self._END:
            yield from batch

    def _run(self, estimate: Callable[[Iterable[TaskRequest]], dict | None]) -> None:
        try:
            self.result = estimate(self._requests())
        finally:
            self._done.set()
            self._on_done()

    def _put(self, item: list | None) -> None:
        waited_since = time.monotonic()
        while not (self._done.is_set() or self.abandoned):
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if time.monotonic() - waited_since >= self.STALL_SECONDS:
                    log.warning("job %s: the cost estimate fell %g s behind the build; going without it",
                                self.job_id, self.STALL_SECONDS)
                    self.abandoned = True

    def feed(self, requests: Iterable[TaskRequest]) -> Iterator[TaskRequest]:
        """``requests``, unchanged, each also handed to the estimate; from a request-cache split
        (:class:`batchd.cache_split.CacheSplit`), only those to be sent are."""
        from batchd.cache import CacheHit, CacheMiss

        batch: list = []
        try:
            for request in requests:
                kind = type(request)
                if kind is CacheHit:
                    yield request  # answered from the cache: never sent, never paid
                    continue
                batch.append(request.request if kind is CacheMiss else request)
                if len(batch) == self.BATCH:
                    self._put(batch)
                    batch = []
                yield request
            self._put(batch)
            self.fed_all = True
        finally:
            self.close()

    def close(self) -> None:
        """End the estimate's stream (at the end of the build, or when the build stops short)."""
        if self._closed:
            return
        self._closed = True
        self._put(self._END)
        if not self.fed_all:
            self.abandoned = True  # a partial stream: its estimate is not the job's

    def done(self) -> bool:
        return self._done.is_set() or self.abandoned


class CostHooks:
    """Calls the cost hooks of one plugin manager, each failure contained."""

    def __init__(self, pm: pluggy.PluginManager):
        from batchd.plugins import single_plugin_callers

        self.hook = pm.hook
        self.budget_checks = single_plugin_callers(pm, "check_budget")
        self.budget_answers = single_plugin_callers(pm, "budget_applies")

    def budget_may_hold(self, settings: Settings) -> bool:
        """Whether a ``check_budget`` plugin could hold a job now, so it must be estimated before it is built.

        Each ``check_budget`` plugin says so through its own ``budget_applies`` (one without it might).
        """
        for plugin in self.budget_checks:
            caller = self.budget_answers.get(plugin)
            if caller is None:
                return True
            try:
                if caller(settings=settings) is not False:
                    return True
            except Exception as error:  # a plugin's mistake must not let an over-budget job through
                log.warning("plugin %s: budget_applies failed (%s: %s); its budget is checked",
                            plugin, type(error).__name__, error)
                return True
        return False

    @property
    def active(self) -> bool:
        """Whether any plugin estimates costs (when none does, jobs are never held)."""
        return bool(self.hook.estimate_cost.get_hookimpls() or self.hook.check_budget.get_hookimpls())

    @property
    def estimates(self) -> bool:
        """Whether any plugin estimates costs."""
        return bool(self.hook.estimate_cost.get_hookimpls())

    def estimate(self, job: JobInfo, requests: Iterable[TaskRequest], count_tokens,
                 settings: Settings, observed_output: dict | None = None) -> dict | None:
        if not self.hook.estimate_cost.get_hookimpls():
            return None
        try:
            estimate = self.hook.estimate_cost(job=job, requests=requests, count_tokens=count_tokens,
                                               settings=settings, observed_output=observed_output)
        except Exception as error:
            if isinstance(requests, RequestStream) and requests.error is error:
                return {"cost": None, "error": f"its requests could not be read: {error}"}  # rejected by its host
            log.exception("job %s: estimate_cost failed", job.id)
            estimate = {"cost": None, "error": f"{type(error).__name__}: {error}"}
        return estimate

    def budget_reasons(self, job: JobInfo, estimate: dict | None, spent_since: Callable[[float], float],
                       settings: Settings) -> list[str]:
        """Why the job must be held; empty when it may go. A failing check holds (never spends blindly)."""
        reasons = []
        for plugin, check in self.budget_checks.items():
            try:
                answers = check(job=job, estimate=estimate, spent_since=spent_since, settings=settings)
            except Exception as error:
                log.exception("job %s: check_budget of plugin %s failed", job.id, plugin)
                answers = [f"the budget check of plugin {plugin!r} failed: {type(error).__name__}: {error}"]
            reasons.extend(str(answer) for answer in answers if answer)
        return reasons

    def account(self, job: JobInfo, usage: dict[str, int], settings: Settings) -> dict | None:
        if not self.hook.account_cost.get_hookimpls():
            return None
        try:
            return self.hook.account_cost(job=job, usage=usage, settings=settings)
        except Exception as error:
            log.exception("job %s: account_cost failed", job.id)
            return {"cost": None, "error": f"{type(error).__name__}: {error}"}


def summary_cost(cost: dict | None) -> dict | None:
    """The ``cost`` block of summary.json and of events: estimate, actual and currency; the standard
    (interactive) price of the same tokens and the saving, of the actual cost once known, else of the
    estimate; plus details."""
    if not cost:
        return None
    estimate, actual = cost.get("estimate") or {}, cost.get("actual") or {}
    priced = actual if actual.get("cost") is not None else estimate
    return {
        "estimate": estimate.get("cost"),
        "actual": actual.get("cost"),
        "standard": priced.get("standard_cost"),
        "saving": priced.get("saving"),
        "currency": actual.get("currency") or estimate.get("currency"),
        "estimate_details": estimate or None,
        "actual_details": actual or None,
    }


def spend_of(cost: dict | None) -> float | None:
    """What a job counts against budgets: its actual cost once known, else its estimate."""
    if not cost:
        return None
    for part in ("actual", "estimate"):
        value = (cost.get(part) or {}).get("cost")
        if value is not None:
            return float(value)
    return None


def describe(estimate: dict | None) -> str:
    """An estimate or actual cost for a log line: ``0.001234 USD (how)`` or ``an unknown cost``."""
    if not estimate or estimate.get("cost") is None:
        why = (estimate or {}).get("error")
        return f"an unknown cost ({why})" if why else "an unknown cost"
    text = f"{estimate['cost']:.6f} {estimate.get('currency', '')}".strip()
    return f"{text} ({estimate['method']})" if estimate.get("method") else text
