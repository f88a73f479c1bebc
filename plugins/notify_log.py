"""The ``log`` notification plugin: one structured line per job event.

Each event is one record of the ``batchd.notify`` logger at INFO, with the event's fields as the
record's fields, so it lands wherever batchd's log goes (stderr, journald) in its format: with
``log_format = "text"``::

    level=info logger=batchd.notify msg="job translate succeeded" event=20261201-ab12cd:succeeded
    kind=succeeded job=20261201-ab12cd job_name=translate manifest=translate.toml ... outbox=/srv/outbox/translate

and with ``log_format = "json"`` one JSON object per line. ``job`` is the job id and ``job_name`` the
manifest's stem, as on batchd's other lines; the cost is shown as its estimate, actual and currency,
without the details. ``[notify.log] events`` limits the kinds (empty: all).
"""

from __future__ import annotations

import logging

from batchd import hookimpl

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


@hookimpl
def job_event_kinds(settings):
    if not log.isEnabledFor(logging.INFO):
        return ()  # batchd logs at WARNING or above: a line per event would be dropped, so none is queued
    return settings.notify.log.events or None


@hookimpl
def job_event(event, settings) -> None:
    wanted = settings.notify.log.events
    if wanted and event["kind"] not in wanted:
        return
    log.info("job %s %s", event["job"], event["kind"], extra=fields(event))


@hookimpl
def job_event_batch(events, settings) -> None:
    # Lines are cheap; one call for many events spares the dispatcher a round trip (and a wake of the
    # daemon's loop) per event.
    for event in events:
        job_event(event, settings)
