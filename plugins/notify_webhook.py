"""The ``webhook`` notification plugin: each job event as a signed JSON POST.

Configured in ``[notify.webhook]``: ``urls`` (every event goes to each), ``secret`` (or
``BATCHD_NOTIFY__WEBHOOK__SECRET``), ``events`` (kinds to send; empty: all), ``timeout_seconds``.

The body is the event as JSON (UTF-8). Headers:

* ``X-Batchd-Signature: sha256=<hex>``: HMAC-SHA256 of the exact body bytes with the secret
  (absent when no secret is set). Verify it before trusting the body, with a constant-time
  comparison (``hmac.compare_digest``).
* ``X-Batchd-Event``: the kind; ``X-Batchd-Event-Id``: the event's stable id, the same on every
  retry: deduplicate by it.

A POST that fails (connection error, timeout, any status but 2xx) makes the call raise, so batchd
retries the event with backoff (``[notify]``), after restarts too; every URL is tried each time,
so a URL that did answer may see the event again. Error messages name the host, never the full
URL (which may carry a token) nor the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from batchd import __version__, hookimpl

SIGNATURE_HEADER = "X-Batchd-Signature"


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-Batchd-Signature`` value of ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"


@hookimpl
def job_event_kinds(settings):
    return settings.notify.webhook.event_kinds()


@hookimpl
def job_event(event, settings) -> None:
    config = settings.notify.webhook
    if not config.wants(event["kind"]):
        return
    body = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    headers = {"Content-Type": "application/json", "User-Agent": f"batchd/{__version__}",
               "X-Batchd-Event": event["kind"], "X-Batchd-Event-Id": event["id"]}
    if config.secret is not None:
        headers[SIGNATURE_HEADER] = signature(config.secret.get_secret_value().encode("utf-8"), body)
    failures = []
    for url in (url.get_secret_value() for url in config.urls):
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=config.timeout_seconds) as answer:
                answer.read()
        except urllib.error.HTTPError as error:
            failures.append(f"{_where(url)} answered HTTP {error.code}")
        except (OSError, ValueError) as error:
            failures.append(f"{_where(url)}: {type(error).__name__}: {getattr(error, 'reason', error)}")
    if failures:
        raise RuntimeError(f"webhook POST of {event['id']} failed: " + "; ".join(failures))
