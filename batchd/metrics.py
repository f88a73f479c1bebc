"""``/metrics``: Prometheus metrics, read from the journal at scrape time.

A custom collector in a registry of its own (not prometheus_client's global one): every scrape reads
the journal through the HTTP server's read-only connection (jobs by state, requests, tokens, cost,
notification backlog) and the daemon's counters in memory (remote calls by method and their errors
by kind, poll age, queue depths, webhook deliveries). Nothing secret is exported: no URL, key or
token is a label.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from batchd.provider import REMOTE_CALLS
from batchd.states import JobState

JOB_STATES = [state.value for state in JobState]
OUTCOMES = ["succeeded", "partial", "failed", "cancelled", "rejected"]


class DaemonCollector(Collector):
    """Reads the journal's totals (``read(fn)`` runs ``fn(journal)`` under the reader's lock) and ``live()``,
    the daemon's in-memory figures, at each scrape."""

    def __init__(self, read: Callable[[Callable[[Any], Any]], Any], live: Callable[[], dict], currency: str) -> None:
        self._read = read
        self._live = live
        self._currency = currency

    def collect(self) -> Iterator[Any]:
        figures = self._read(lambda journal: journal.totals())
        live = self._live()

        up = GaugeMetricFamily("batchd_ready", "1 once recovered and watching the inbox")
        up.add_metric([], 1.0 if live.get("ready") else 0.0)
        yield up

        jobs = GaugeMetricFamily("batchd_jobs", "Jobs in the journal by state", labels=["state"])
        by_state = figures.get("jobs", {}) if figures else {}
        for state in JOB_STATES:
            jobs.add_metric([state], by_state.get(state, 0))
        yield jobs

        done = GaugeMetricFamily("batchd_jobs_done", "Finished jobs by outcome", labels=["outcome"])
        by_outcome = figures.get("outcomes", {}) if figures else {}
        for outcome in OUTCOMES:
            done.add_metric([outcome], by_outcome.get(outcome, 0))
        yield done

        requests = GaugeMetricFamily("batchd_requests", "Requests of all jobs' chunks: total, and done (answered"
                                     " or failed, per the service's counts)", labels=["state"])
        requests.add_metric(["total"], (figures or {}).get("requests_total", 0))
        requests.add_metric(["done"], (figures or {}).get("requests_done", 0))
        yield requests

        tokens = GaugeMetricFamily("batchd_tokens", "Tokens of delivered jobs (their actual usage)", labels=["kind"])
        tokens.add_metric(["input"], (figures or {}).get("input_tokens", 0))
        tokens.add_metric(["output"], (figures or {}).get("output_tokens", 0))
        yield tokens

        cost = GaugeMetricFamily("batchd_cost", "Cost of all jobs: estimate, actual (once known), and the saving"
                                 " against interactive prices", labels=["kind", "currency"])
        for kind in ("estimate", "actual", "saving"):
            cost.add_metric([kind, self._currency], (figures or {}).get(f"cost_{kind}", 0.0))
        yield cost

        backlog = GaugeMetricFamily("batchd_notification_backlog", "Event deliveries to notification plugins"
                                    " not yet made")
        backlog.add_metric([], (figures or {}).get("notification_backlog", 0))
        yield backlog

        calls, errors = REMOTE_CALLS.snapshot()
        remote = CounterMetricFamily("batchd_remote_calls", "Calls to the Gemini API by method", labels=["method"])
        for method, count in sorted(calls.items()):
            remote.add_metric([method], count)
        yield remote
        failed = CounterMetricFamily("batchd_remote_errors", "Failed calls to the Gemini API by method and kind"
                                     " (HTTP status, or the exception's type)", labels=["method", "kind"])
        for (method, kind), count in sorted(errors.items()):
            failed.add_metric([method, kind], count)
        yield failed

        lag = GaugeMetricFamily("batchd_poll_lag_seconds", "Seconds since the last poll of the remote batches")
        lag.add_metric([], max(0.0, time.monotonic() - live.get("polled_at", time.monotonic())))
        yield lag
        interval = GaugeMetricFamily("batchd_running_remote_batches", "Remote batches running")
        interval.add_metric([], (figures or {}).get("running_chunks", 0))
        yield interval

        queues = GaugeMetricFamily("batchd_queue_depth", "Work waiting or running in the daemon's bounded pools and"
                                   " queues", labels=["queue"])
        for name, depth in sorted(live.get("queues", {}).items()):
            queues.add_metric([name], depth)
        yield queues

        hooks = CounterMetricFamily("batchd_webhook_deliveries", "Gemini webhook deliveries received, by result",
                                    labels=["result"])
        for result, count in sorted(live.get("webhooks", {}).items()):
            hooks.add_metric([result], count)
        yield hooks
        healthy = GaugeMetricFamily("batchd_webhooks_healthy", "1 while a verified webhook delivery came within"
                                    " webhook_healthy_seconds (polls then wait webhook_poll_interval)")
        healthy.add_metric([], 1.0 if live.get("push_healthy") else 0.0)
        yield healthy


def registry(collector: DaemonCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
