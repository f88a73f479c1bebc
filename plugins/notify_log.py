"""The ``log`` notification plugin: one structured line per job event.

Each event is one record of the ``batchd.notify`` logger at INFO, with the event's fields as the
record's fields, so it lands wherever batchd's log goes (stderr, journald) in its format: with
``log_format = "text"``::

    level=info logger=batchd.notify msg="job translate succeeded" event=20261201-ab12cd:succeeded
    kind=succeeded job=20261201-ab12cd job_name=translate manifest=translate.toml ... outbox=/srv/outbox/translate

and with ``log_format = "json"`` one JSON object per line. ``job`` is the job id and ``job_name`` the
manifest's stem, as on batchd's other lines; the cost is shown as its estimate, actual and currency,
without the details. ``[notify.log] events`` limits the kinds (empty: all). ``held``, ``expired``,
``partial``, ``failed`` and ``rejected`` lines are warnings, and say why (the event's reason or error).

This is the one line of each event: where this plugin logs an event, the daemon's own line saying
the same (``accepted …``, ``… held: …``, ``… succeeded → outbox``) is logged at DEBUG only.
"""

from __future__ import annotations

import logging
from typing import get_args

from batchd import hookimpl
from batchd.config import EventKind

log = logging.getLogger("batchd.notify")


def fields(event) -> dict:
    """The record's fields: the event's, named as batchd's other log lines name them, unset ones left out."""
    named = {"event": event["id"], "kind": event["kind"], "job": event["job_id"], "job_name": event["job"]}
    for key in ("manifest", "task", "model", "state", "counts", "outbox", "reason", "error"):
        if event.get(key) is not None:
            named[key] = event[key]
    if event.get("cost"):
        named["cost"] = {key: event["cost"][key] for key in ("estimate", "actual", "currency")}
    return named


#: Kinds that need a look: their lines are warnings (``journalctl -p warning`` shows them).
WARNING_KINDS = frozenset({"held", "expired", "partial", "failed", "rejected"})


def level_of(kind: str) -> int:
    return logging.WARNING if kind in WARNING_KINDS else logging.INFO


def message(event) -> str:
    """``job NAME KIND``, and why for an event that has a reason or an error."""
    error = event.get("error")
    why = event.get("reason") or (error.get("message") if isinstance(error, dict) else error)
    return f"job {event['job']} {event['kind']}" + (f": {why}" if why else "")


@hookimpl
def job_event_kinds(settings):
    # Only the kinds whose line batchd's log level lets through: a line that would be dropped is not
    # queued (under --log-level WARNING, the warnings alone; the daemon's own lines stand in for none).
    wanted = settings.notify.log.events or list(get_args(EventKind))
    kinds = [kind for kind in wanted if log.isEnabledFor(level_of(kind))]
    if not settings.notify.log.events and len(kinds) == len(wanted):
        return None
    return kinds


@hookimpl
def job_event(event, settings) -> None:
    wanted = settings.notify.log.events
    if wanted and event["kind"] not in wanted:
        return
    log.log(level_of(event["kind"]), "%s", message(event), extra=fields(event))


@hookimpl
def job_event_batch(events, settings) -> None:
    # Lines are cheap; one call for many events spares the dispatcher a round trip (and a wake of the
    # daemon's loop) per event.
    for event in events:
        job_event(event, settings)
