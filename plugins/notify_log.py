"""The ``log`` notification plugin: one structured (JSON) line per job event.

Lines go to the ``batchd.notify`` logger at INFO, so they land wherever batchd's log goes
(stderr, journald): ``event {"id": ..., "kind": "succeeded", "job": "reviews", ...}``. The cost
is shown as its estimate, actual and currency, without the details. ``[notify.log] events``
limits the kinds (empty: all).
"""

from __future__ import annotations

import json
import logging

from batchd import hookimpl

log = logging.getLogger("batchd.notify")


@hookimpl
def job_event(event, settings) -> None:
    wanted = settings.notify.log.events
    if wanted and event["kind"] not in wanted:
        return
    line = {key: value for key, value in event.items() if value is not None}
    if event.get("cost"):
        line["cost"] = {key: event["cost"][key] for key in ("estimate", "actual", "currency")}
    log.info("event %s", json.dumps(line, ensure_ascii=False, separators=(",", ":")))
