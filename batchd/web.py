"""The daemon's HTTP server (``http = "HOST:PORT"`` or ``batchd run --http``): one uvicorn server in a
thread of its own, serving a Starlette app.

=====================  ================================================================================
``/healthz``           200 while the loop ticks (it ticked within :data:`HEALTHY_TICK_SECONDS`), else 503
``/readyz``            200 once recovered, reconciled and watching the inbox; 503 before, and while stopping
``/metrics``           Prometheus text format (:mod:`batchd.metrics`)
``/webhooks/gemini``   Gemini webhook deliveries (:mod:`batchd.webhooks`), handed to the loop
``/``, ``/jobs/ID``    the dashboard (:mod:`batchd.dashboard`), ``/api/jobs`` its JSON
``/files/ID/PATH``     a delivered job's outbox files, read-only
``POST /api/jobs/NAME/VERB``  cancel, approve, retry: only with ``http_token``, sent as a Bearer token
=====================  ================================================================================

Rules it keeps: the server never writes the journal. It reads through a read-only connection of its
own, and hands webhook deliveries and button actions to the loop through a bounded queue that wakes
it (:mod:`batchd.daemon.push`). Threads are bounded: the event loop's thread plus
:data:`WORKER_THREADS` for blocking work (journal reads, the JWKS fetch, files). A bad request gets a
short error and never stops the daemon; bodies are capped. Secrets (``http_token``,
``webhook_secret``) are never rendered, logged or exported.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from batchd import dashboard
from batchd.config import Settings, parse_address
from batchd.daemon.push import Action, Delivery, Inbound
from batchd.fs import is_damaged_database
from batchd.journal import Journal, journal_path
from batchd.webhooks import MAX_BODY_BYTES, Refused, Verifier, job_of, remote_name_of

log = logging.getLogger("batchd")

#: Blocking work of the server (journal reads, JWKS fetches, files) runs in at most this many threads.
WORKER_THREADS = 4
#: /healthz fails when the loop has not ended a tick for this long (it ticks at least every
#: rescan_seconds; a long step pings too).
HEALTHY_TICK_SECONDS = 120.0
#: How long a button's POST waits for the loop to take its action.
ACTION_TIMEOUT_SECONDS = 10.0
#: Connections served at once (uvicorn answers 503 beyond).
MAX_CONNECTIONS = 64


@dataclass
class DaemonView:
    """What the server may know of the daemon besides the journal: callables read on the server's threads
    (each reads a value the loop sets; nothing here writes)."""

    ticked_at: Callable[[], float]
    ready: Callable[[], bool]
    stopping: Callable[[], bool]
    live: Callable[[], dict]
    provider_base_url: Callable[[], str | None]
    webhook_counts: dict = field(default_factory=lambda: {"accepted": 0, "duplicate": 0, "refused": 0,
                                                          "busy": 0})


class JournalReader:
    """The server's own read-only journal connection, one reader at a time."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._journal: Journal | None = None
        self._lock = threading.Lock()

    def read(self, fn: Callable[[Journal], Any]) -> Any:
        with self._lock:
            if self._journal is None:
                self._journal = Journal(self._path, readonly=True)
            return fn(self._journal)

    def close(self) -> None:
        with self._lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None


class WebServer:
    def __init__(self, settings: Settings, inbound: Inbound, view: DaemonView) -> None:
        self.settings = settings
        self.inbound = inbound
        self.view = view
        self.reader = JournalReader(journal_path(settings.state_dir))
        self._pool = ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="batchd-http")
        self._token = settings.http_token.get_secret_value() if settings.http_token else None
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        self._verifier_args = {"secret": secret, "audience": settings.webhook_public_url}
        self._verifier: Verifier | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None
        from batchd.metrics import DaemonCollector, registry

        self.registry = registry(DaemonCollector(self.reader.read, view.live, settings.cost.currency))
        self.app = self._app()

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind (an error here stops the start with a clear message) and serve in a thread."""
        import uvicorn

        host, port = parse_address(self.settings.http)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            sock.close()
            raise OSError(error.errno, f"cannot serve HTTP at {self.settings.http}: {error.strerror}") from None
        sock.listen(128)
        self.address = sock.getsockname()[:2]
        # h11 (not httptools, which uvicorn would pick): its bound on a request's head is what keeps a
        # hostile client's endless headers out of memory.
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off", server_header=False,
                                limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=5, http="h11",
                                h11_max_incomplete_event_size=64 * 1024)
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).setLevel(logging.WARNING)  # its start/stop lines; errors still show
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="batchd-http",
                                        daemon=True)
        self._thread.start()
        shown = f"[{self.address[0]}]" if ":" in self.address[0] else self.address[0]
        log.info("serving HTTP at http://%s:%d (dashboard /, /metrics, /healthz, /readyz, /webhooks/gemini)",
                 shown, self.address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.reader.close()

    def warm(self) -> None:
        """Import the verifiers and fetch the JWKS in the background (once the provider's address is known),
        so the first delivery is not the one that waits."""
        self._pool.submit(self._warm)

    def _warm(self) -> None:
        try:
            import jwt  # noqa: F401
            import standardwebhooks  # noqa: F401

            if self.settings.webhook_public_url:
                self.verifier.prefetch()
        except Exception as error:  # noqa: BLE001 - fetched again at the first delivery
            log.debug("webhook keys not fetched ahead: %s", error)

    @property
    def verifier(self) -> Verifier:
        if self._verifier is None:
            from batchd.webhooks import jwks_url_for

            self._verifier = Verifier(**self._verifier_args,
                                      jwks_url=jwks_url_for(self.settings, self.view.provider_base_url()))
        return self._verifier

    async def _run(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- the app ------------------------------------------------------------------------------------

    def _app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.routing import Route

        routes = [
            Route("/healthz", self.healthz, methods=["GET", "HEAD"]),
            Route("/readyz", self.readyz, methods=["GET", "HEAD"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/webhooks/gemini", self.webhook, methods=["POST"]),
            Route("/", self.index, methods=["GET"]),
            Route("/api/jobs", self.api_jobs, methods=["GET"]),
            Route("/jobs/{job_id}", self.job_page, methods=["GET"]),
            Route("/api/jobs/{name}/{verb}", self.action, methods=["POST"]),
            Route("/files/{job_id}/{path:path}", self.outbox_file, methods=["GET"]),
        ]
        return Starlette(routes=routes, exception_handlers={Exception: self._error, 404: self._not_found,
                                                            405: self._not_allowed})

    async def _error(self, request: Any, error: Exception) -> Any:
        if is_damaged_database(error):
            # The pages this request read are damaged (the daemon stops when it meets them: batchd.daemon).
            log.warning("HTTP %s %s failed: the journal is damaged (%s); `batchd doctor` checks it",
                        request.method, request.url.path[:200], error)
            return _json({"error": f"the journal is damaged ({error}): see `batchd doctor`"}, 503)
        log.warning("HTTP %s %s failed: %s", request.method, request.url.path[:200], type(error).__name__)
        return _json({"error": "internal error"}, 500)

    async def _not_found(self, request: Any, error: Exception) -> Any:
        return _json({"error": "not found"}, 404)

    async def _not_allowed(self, request: Any, error: Exception) -> Any:
        return _json({"error": "method not allowed"}, 405)

    async def healthz(self, request: Any) -> Any:
        since = time.monotonic() - self.view.ticked_at()
        alive = since < max(HEALTHY_TICK_SECONDS, 3 * self.settings.rescan_seconds)
        return _json({"status": "ok" if alive else "stalled", "last_tick_seconds_ago": round(since, 3)},
                     200 if alive else 503)

    async def readyz(self, request: Any) -> Any:
        if self.view.stopping():
            return _json({"status": "stopping"}, 503)
        if not self.view.ready():
            return _json({"status": "starting: recovering and reconciling"}, 503)
        return _json({"status": "ready"}, 200)

    async def metrics(self, request: Any) -> Any:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response

        body = await self._run(generate_latest, self.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # -- webhooks -----------------------------------------------------------------------------------

    async def webhook(self, request: Any) -> Any:
        counts = self.view.webhook_counts
        body = await _body(request, MAX_BODY_BYTES)
        if body is None:
            counts["refused"] += 1
            return _json({"error": f"body over {MAX_BODY_BYTES} bytes"}, 413)
        try:
            headers = dict(request.headers)
            verified = await self._run(lambda: self.verifier.verify(body, headers))
        except Refused as refused:
            counts["refused"] += 1
            log.warning("webhook delivery refused: %s", refused)
            return _json({"error": f"refused: {refused}"}, 401)
        event = verified.event
        seen = await self._run(self.reader.read, lambda journal: journal.webhook_seen(verified.webhook_id))
        if seen:
            counts["duplicate"] += 1
            return _json({"status": "duplicate"}, 200)
        delivery = Delivery(verified.webhook_id, str(event.get("type"))[:100], remote_name_of(event), job_of(event))
        if not self.inbound.put(delivery):
            counts["busy"] += 1
            return _json({"error": "busy; deliver again later"}, 503)
        counts["accepted"] += 1
        return _json({"status": "accepted"}, 200)

    # -- the dashboard ------------------------------------------------------------------------------

    def _page_values(self) -> dict:
        return {"actions": self._token is not None, "nonce": secrets.token_urlsafe(12)}

    def _html(self, text: str, nonce: str | None = None) -> Any:
        from starlette.responses import HTMLResponse

        script = f"'nonce-{nonce}'" if nonce else "'none'"
        return HTMLResponse(text, headers={
            "Content-Security-Policy": f"default-src 'self'; script-src {script}; style-src 'unsafe-inline'; "
                                       "img-src 'self' data:; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})

    async def index(self, request: Any) -> Any:
        part = request.query_params.get("part")
        values = self._page_values()

        def build(journal: Journal) -> dict:
            now = time.time()
            rows = dashboard.cost_by_day(journal, self.settings.model, now)
            return {"jobs": dashboard.recent_jobs(journal, now),
                    "chart": dashboard.cost_chart(rows, self.settings.cost.currency)}

        values.update(await self._run(self.reader.read, build))
        if part in ("jobs", "chart"):
            return self._html(dashboard.render(part, **values))
        return self._html(dashboard.render("index", **values), values["nonce"])

    async def api_jobs(self, request: Any) -> Any:
        jobs = await self._run(self.reader.read, lambda journal: dashboard.recent_jobs(journal, time.time()))
        return _json({"jobs": jobs}, 200)

    async def job_page(self, request: Any) -> Any:
        job_id = request.path_params["job_id"]
        values = self._page_values()

        def build(journal: Journal) -> dict | None:
            job = journal.job(job_id) if len(job_id) < 100 else None
            if job is None:
                return None
            return {"job": dashboard.shown_job(journal, job, time.time()),
                    "chunks": dashboard.chunk_rows(journal, job.id), "remote": journal.remote_jobs(job.id),
                    "events": dashboard.event_rows(journal, job.id),
                    "files": dashboard.outbox_files(self._outbox_dir(job.outbox_dir) if job.state == "done" else None)}

        found = await self._run(self.reader.read, build)
        if found is None:
            return _json({"error": "no such job"}, 404)
        values.update(found)
        if request.query_params.get("part") == "job":
            return self._html(dashboard.render("job_body", **values))
        return self._html(dashboard.render("job", **values), values["nonce"])

    def _outbox_dir(self, outbox_dir: str | None) -> Path | None:
        """A job's outbox folder, only if it is inside the outbox."""
        if not outbox_dir:
            return None
        folder = Path(outbox_dir).resolve()
        return folder if folder.is_relative_to(self.settings.outbox.resolve()) else None

    async def outbox_file(self, request: Any) -> Any:
        from starlette.responses import FileResponse

        job_id, relative = request.path_params["job_id"], request.path_params["path"]

        def locate() -> Path | None:
            job = self.reader.read(lambda journal: journal.job(job_id) if len(job_id) < 100 else None)
            if job is None or job.state != "done":
                return None
            folder = self._outbox_dir(job.outbox_dir)
            if folder is None or not relative or "\0" in relative or len(relative) > 1024:
                return None
            target = (folder / relative).resolve()
            if not target.is_relative_to(folder) or not target.is_file():
                return None
            return target

        target = await self._run(locate)
        if target is None:
            return _json({"error": "no such file"}, 404)
        media = {".json": "application/json", ".npy": "application/octet-stream"}.get(target.suffix,
                                                                                        "text/plain; charset=utf-8")
        return FileResponse(target, media_type=media, headers={
            "X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox; default-src 'none'"})

    async def action(self, request: Any) -> Any:
        if self._token is None:
            return _json({"error": "the dashboard is read-only (no http_token configured)"}, 403)
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), self._token.encode()):
            return _json({"error": "a valid token is needed (Authorization: Bearer …)"}, 401)
        verb, name = request.path_params["verb"], request.path_params["name"]
        if verb not in ("cancel", "approve", "retry"):
            return _json({"error": "unknown action: use cancel, approve or retry"}, 404)
        action = Action(verb, name)
        if not self.inbound.put(action):
            return _json({"error": "busy; try again"}, 503)
        try:
            message = await asyncio.wait_for(asyncio.wrap_future(action.done), ACTION_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            return _json({"error": "the daemon did not take the action in time; it may still"}, 504)
        except ValueError as error:
            return _json({"error": str(error)}, 400)
        log.info("dashboard: %s", message)
        return _json({"message": message}, 200)


async def _body(request: Any, limit: int) -> bytes | None:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _json(value: Any, status: int) -> Any:
    from starlette.responses import Response

    return Response(json.dumps(value, default=str), status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
