"""Hook specifications of batchd plugins.

Plugins implement these with ``from batchd import hookimpl`` and are found through the
``batchd`` entry-point group (or a ``plugins_dir`` of one-off modules). Hooks accept any subset
of the documented arguments, so new arguments can be added without breaking plugins.

Every hook is documented, with an example, in docs/plugins.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from batchd.config import Settings
    from batchd.costs import JobInfo
    from batchd.task import Task, TaskRequest

hookspec = pluggy.HookspecMarker("batchd")


# --- Registration hooks, called once when the plugin registry is first used -------------------


@hookspec
def register_tasks(register: Callable[[Task], None]) -> None:
    """Register task types: call ``register(task)`` once per :class:`batchd.task.Task` instance.

    :param register: validates the task and adds it under ``task.name``; a name already taken by
        another plugin is an error.
    """


# --- Cost hooks, called by the daemon around a job's submission --------------------------------


@hookspec(firstresult=True)
def estimate_cost(
    job: JobInfo,
    requests: Iterable[TaskRequest],
    count_tokens: Callable[[list[str]], int] | None,
    settings: Settings,
    observed_output: dict[str, int] | None,
) -> dict[str, Any] | None:
    """Estimate what a job will cost: before any of it is built when a budget could hold it, else
    in a thread while it is built (from the requests the build reads).

    The first plugin that returns a dict wins. Called once per job (again after a crash that
    came before the estimate was committed).

    :param job: the job: ``id``, ``name``, ``manifest``, ``task``, ``model``, ``kind`` ("generate",
        or "embed": embeddings have no output tokens).
    :param requests: the job's requests, streamed in constant memory: iterate once.
    :param count_tokens: the provider's token counter for ``job.model`` (``countTokens``): the
        total tokens of the given prompt texts; ``None`` when the provider has none. It may raise
        (network, quota): fall back to a local estimate. A small count is answered from the
        characters-per-token ratio earlier calls measured for the model, without a call (see
        ``batchd.daemon.admit.TokenCounter``); its ``method`` attribute says how the last count was
        made: ``"countTokens"``, or ``"countTokens ratio (… characters a token)"``.
    :param settings: the daemon's settings (``settings.cost``).
    :param observed_output: what earlier delivered jobs of the same task and model came back with:
        ``{"requests": n, "output_tokens": m}`` (answer and thinking tokens, summed; older jobs
        count less over time), or ``None`` before the first one.
    :return: ``{"cost": float | None, "currency": str, "input_tokens": int,
        "output_tokens": int, "requests": int, "method": str}`` and any other JSON fields;
        ``cost`` is ``None`` when the model has no price. The built-in plugin adds
        ``standard_cost`` (the same tokens at the interactive price) and ``saving``.
    """


@hookspec
def check_budget(
    job: JobInfo,
    estimate: dict[str, Any] | None,
    spent_since: Callable[[float], float],
    settings: Settings,
) -> str | None:
    """Say whether a job may be submitted now: ``None`` lets it go, a string holds it (the reason).

    Every plugin is asked; one reason is enough to hold the job. A held job is asked about again on
    every tick (so a raised budget or a day's spending leaving the window releases it), until
    ``batchd approve NAME`` releases it for good. Not called for an approved job.

    :param job: the job (see ``estimate_cost``).
    :param estimate: what ``estimate_cost`` returned, or ``None`` if no plugin could estimate.
    :param spent_since: ``spent_since(timestamp)``: the cost of the other jobs let through since
        ``timestamp`` (their actual cost once delivered, else their estimate).
    :param settings: the daemon's settings, re-read from the config file when it changes.
    """


@hookspec(firstresult=True)
def budget_applies(settings: Settings) -> bool | None:
    """Whether this plugin's ``check_budget`` could hold a job under ``settings``.

    Asked of each plugin that implements ``check_budget``, on its own, before a job is built. When
    no plugin's budget applies, batchd need not estimate a job before building it: it estimates
    while it builds (one pass over the requests instead of two). Not implementing this hook, or
    returning ``None`` (or raising), means the budget may apply.

    :param settings: the daemon's settings (``settings.cost``).
    :return: ``False`` when ``check_budget`` would let every job go now.
    """


@hookspec(firstresult=True)
def account_cost(job: JobInfo, usage: dict[str, int], settings: Settings) -> dict[str, Any] | None:
    """The actual cost of a finished job, from the ``usageMetadata`` of its results.

    The first plugin that returns a dict wins. Called when the job's outbox folder is written.

    :param job: the job (see ``estimate_cost``).
    :param usage: token totals over every result: ``prompt_tokens``, ``output_tokens``
        (candidates), ``thoughts_tokens``, ``cached_tokens``, ``total_tokens`` and ``requests``
        (results that carried usage).
    :param settings: the daemon's settings.
    :return: ``{"cost": float | None, "currency": str, ...}``; the built-in plugin adds
        ``standard_cost`` (the same tokens at the interactive price) and ``saving``.
    """


# --- Notification hooks ----------------------------------------------------------------------


@hookspec
def job_event(event: dict[str, Any], settings: Settings) -> None:
    """Deliver one job event (email, chat, webhook, log, ...).

    Each plugin is called from a worker thread of its own, one event per call, oldest due first,
    with a timeout (``notify.timeout_seconds``): raising or hanging changes no job state and does
    not stop or delay the other plugins. A call that returns counts as delivered and is recorded in
    the journal; one that raises or times out is retried with backoff, across restarts, up to
    ``notify.max_attempts`` times. Delivery is at least once: deduplicate by ``event["id"]``. Its
    worker keeps calling it as long as events are due: a plugin may keep a connection open between
    calls of the same thread.

    :param event: JSON-ready: ``id`` (stable across retries and restarts), ``kind`` (accepted,
        rejected, held, submitted, progress, succeeded, partial, plugin_failed, failed, cancelled), ``time``
        (ISO 8601 UTC), ``job_id``, ``job`` (the manifest's name), ``manifest``, ``task``,
        ``model``, ``state``, ``counts``, ``cost`` (estimate, actual, currency), ``outbox``
        (the delivered folder, on final kinds), and ``reason`` (held) or ``error`` where there is one.
    :param settings: the daemon's settings (``settings.notify``).
    """


@hookspec
def job_event_batch(events: list[dict[str, Any]], settings: Settings) -> Mapping[str, str] | None:
    """Deliver several job events in one call, for a plugin that can send many at once more cheaply
    than one by one (a bulk API, one chat message for many events).

    Called instead of ``job_event`` for a plugin that implements it, as ``job_event`` is (a worker
    thread of its own, one call at a time, retries, at least once), with up to 100 due events of the
    plugin, oldest first (``batchd.events.BATCH_MAX``). The timeout (``notify.timeout_seconds``) is per call: a call that hangs is
    a failed attempt of each of its events.

    :param events: the events, each as ``job_event`` gets it.
    :param settings: the daemon's settings (``settings.notify``).
    :return: ``None`` (or an empty mapping) when every event was delivered; else
        ``{event id: why}`` of those that were not: they are retried with backoff, the others count
        as delivered. Raising counts as a failed attempt of every event.
    """


@hookspec(firstresult=True)
def job_event_kinds(settings: Settings) -> Iterable[str] | None:
    """Which event kinds this plugin's ``job_event`` (or ``job_event_batch``) wants under ``settings``.

    Asked of each plugin that implements ``job_event`` or ``job_event_batch``, on its own, when an
    event is committed (with the settings of that moment): a plugin gets a delivery row, and calls,
    only for the kinds it names. An empty collection means none (e.g. a notifier with nothing
    configured); ``None``, or not implementing this hook, means every kind. A plugin that raises
    here gets every kind.

    :param settings: the daemon's settings, re-read from the config file when it changes.
    :return: event kinds (see ``job_event``), or ``None`` for all of them.
    """
