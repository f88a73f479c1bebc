"""The host side of the cost hooks: what the daemon hands ``estimate_cost``, ``check_budget`` and
``account_cost`` (see :mod:`batchd.hookspecs`), and how it calls them.

A cost plugin that raises must not take a job, or the daemon, down with it: every call here is
guarded, and a failure reads as "no estimate" (which a budget then treats as unknown) or "no
actual cost", with the error logged and kept in the job's ``cost`` record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import pluggy

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

    @classmethod
    def of(cls, job: Job, default_model: str | None = None) -> JobInfo:
        return cls(id=job.id, name=job.name, manifest=job.source, task=job.task, model=job.model or default_model)

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

    def __iter__(self) -> Iterator[TaskRequest]:
        for n, request in enumerate(self._open()):
            if n % 10_000 == 0 and self._stopping():
                return
            yield request


class CostHooks:
    """Calls the cost hooks of one plugin manager, each failure contained."""

    def __init__(self, pm: pluggy.PluginManager):
        from batchd.plugins import single_plugin_callers

        self.hook = pm.hook
        self.budget_checks = single_plugin_callers(pm, "check_budget")

    @property
    def active(self) -> bool:
        """Whether any plugin estimates costs (when none does, jobs are never held)."""
        return bool(self.hook.estimate_cost.get_hookimpls() or self.hook.check_budget.get_hookimpls())

    def estimate(self, job: JobInfo, requests: RequestStream, count_tokens, settings: Settings) -> dict | None:
        if not self.hook.estimate_cost.get_hookimpls():
            return None
        try:
            estimate = self.hook.estimate_cost(job=job, requests=requests, count_tokens=count_tokens,
                                               settings=settings)
        except Exception as error:
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
    """The ``cost`` block of summary.json and of events: estimate, actual and currency, plus details."""
    if not cost:
        return None
    estimate, actual = cost.get("estimate") or {}, cost.get("actual") or {}
    return {
        "estimate": estimate.get("cost"),
        "actual": actual.get("cost"),
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
