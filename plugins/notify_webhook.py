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

Each thread keeps its connection to each URL's host open between events (HTTP/1.1 keep-alive):
batchd calls the plugin from one worker thread for as long as events are due, so a burst of events
costs one connection (and one TLS handshake), not one per event. A connection the receiver closed
while idle is opened again at once. Through a proxy (``http_proxy``/``https_proxy``, honoured as by
urllib) each POST has a connection of its own.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import socket
import threading
import urllib.error
import urllib.request
from urllib.parse import SplitResult, urlsplit

from batchd import __version__, hookimpl

SIGNATURE_HEADER = "X-Batchd-Signature"

#: Each thread's open connections, by (scheme, host, port): one thread's requests never share one.
_kept = threading.local()


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-Batchd-Signature`` value of ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"


def _origin(parts: SplitResult) -> tuple[str, str, int | None]:
    return parts.scheme, parts.hostname or "", parts.port


def _proxy_opener(parts: SplitResult) -> urllib.request.OpenerDirector | None:
    """An opener through the environment's proxy for this URL, or None where urllib would connect directly."""
    proxies = urllib.request.getproxies()
    if parts.scheme not in proxies or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.build_opener(urllib.request.ProxyHandler(proxies))


def _kept_connections(origins: set[tuple[str, str, int | None]]) -> dict:
    """This thread's open connections, but those to hosts no longer configured (closed)."""
    kept = getattr(_kept, "connections", None)
    if kept is None:
        kept = _kept.connections = {}
    for origin in kept.keys() - origins:
        kept.pop(origin).close()
    return kept


def _open(parts: SplitResult, timeout: float) -> http.client.HTTPConnection:
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, parts.port, timeout=timeout)
    connection.connect()
    # http.client writes the headers and the body apart: without this the body would wait for the
    # receiver's (delayed) acknowledgement of the headers.
    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def _send(connection: http.client.HTTPConnection, target: str, body: bytes, headers: dict) -> http.client.HTTPResponse:
    connection.request("POST", target, body=body, headers=headers)
    answer = connection.getresponse()
    answer.read()  # the whole answer, so that the connection can carry the next request
    return answer


def _post_through_proxy(opener: urllib.request.OpenerDirector, url: str, body: bytes, headers: dict,
                        timeout: float) -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with opener.open(request, timeout=timeout) as answer:
            answer.read()
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def _post(url: str, body: bytes, headers: dict, timeout: float, kept: dict) -> int:
    """POST ``body`` to ``url``, on this thread's open connection to its host if there is one;
    returns the HTTP status."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {_where(url)}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = kept.pop(_origin(parts), None)
    if connection is not None:
        connection.sock.settimeout(timeout)
        try:
            answer = _send(connection, target, body, headers)
        except ConnectionError:
            connection.close()  # the receiver closed it while it was idle: once more, on a new one
            connection = None
        except BaseException:
            connection.close()
            raise
    if connection is None:
        # Whether to go through a proxy is decided when a connection is opened (reading the
        # environment for each event would cost more than the POST itself).
        through_proxy = _proxy_opener(parts)
        if through_proxy is not None:
            return _post_through_proxy(through_proxy, url, body, headers, timeout)
        connection = _open(parts, timeout)
        try:
            answer = _send(connection, target, body, headers)
        except BaseException:
            connection.close()
            raise
    if answer.will_close:
        connection.close()
    else:
        kept[_origin(parts)] = connection
    return answer.status


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
    urls = [url.get_secret_value() for url in config.urls]
    kept = _kept_connections({_origin(urlsplit(url)) for url in urls})
    failures = []
    for url in urls:
        try:
            status = _post(url, body, headers, config.timeout_seconds, kept)
        except (OSError, ValueError, http.client.HTTPException) as error:
            failures.append(f"{_where(url)}: {type(error).__name__}: {getattr(error, 'reason', error)}")
            continue
        if not 200 <= status < 300:
            failures.append(f"{_where(url)} answered HTTP {status}")
    if failures:
        raise RuntimeError(f"webhook POST of {event['id']} failed: " + "; ".join(failures))
