"""The HTTP face of the emulator: routing, auth, faults, and one handler per Gemini API route.

Every path is accepted under any ``v1*`` version (``v1``, ``v1beta``, ``v1alpha``), optionally after
a path prefix, and under ``upload/`` and ``download/`` for the media routes. Request bodies are
normalized to camelCase on the way in (``wire.to_camel_case``); answers are camelCase, success is
always HTTP 200 (google-genai treats 201/204 as errors), failures use Google's error envelope.

A request goes: route match -> API key -> faults (``X-Emulator-Fault`` and server faults) -> handler.
Handlers doing disk or CPU work run in the thread pool; the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.parser
import email.policy
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from batchd.emulator import shapes
from batchd.emulator.answers import Answerer, check_embed_request, check_generate_request
from batchd.emulator.errors import ApiError, invalid, invalid_api_key, not_found
from batchd.emulator.faults import HEADER as FAULT_HEADER
from batchd.emulator.faults import FaultInjector, job_faults_for
from batchd.emulator.files import CHUNK_GRANULARITY, Uploads, render_file
from batchd.emulator.jobs import (ActiveJobs, BatchRunner, JobView, job_faults, needs_processing, render_operation,
                                  view_job, write_inline_input)
from batchd.emulator.models import ModelCatalog
from batchd.emulator.responder import Responder
from batchd.emulator.store import Store
from batchd.emulator.webhooks import JWKS_PATH, WebhookService, check_webhook_config
from batchd.emulator.wire import double_quoted, has_snake_case_keys, new_id, to_camel_case
from batchd.jsonfast import dumps as encode
from batchd.jsonfast import loads as decode

log = logging.getLogger("batchd.emulator")

#: "total request size under 20MB" for inline batches; also the cap on any JSON body.
MAX_INLINE_BYTES = 20 * 1024 * 1024

DEFAULT_BATCH_PAGE_SIZE, MAX_BATCH_PAGE_SIZE = 50, 1000
DEFAULT_FILE_PAGE_SIZE, MAX_FILE_PAGE_SIZE = 10, 100
DEFAULT_MODEL_PAGE_SIZE, MAX_MODEL_PAGE_SIZE = 50, 1000
#: How often the files past their expiry are looked for and removed (on the first request after that).
EXPIRED_LOOK_SECONDS = 600.0
#: Answer headers a browser page may read: the resumable upload protocol's.
CORS_EXPOSED_HEADERS = ("X-Goog-Upload-URL", "X-Goog-Upload-Status", "X-Goog-Upload-Size-Received",
                        "X-Goog-Upload-Chunk-Granularity")

_VERSIONED_PATH = re.compile(r"^(?:/[^/]+)*?/(?:(?P<area>upload|download)/)?(?P<version>v1[a-z0-9]*)/(?P<rest>.+)$")


@dataclass(frozen=True)
class EmulatorSettings:
    job_seconds: float = 2.0
    expire_seconds: float = 48 * 3600
    api_key: str | None = None
    #: Accept exactly the model list, not also Google's current families by pattern (models.py).
    strict_models: bool = False
    #: Seconds from a cancel request to CANCELLED (None: a tenth of job_seconds, at most 5 s).
    cancel_seconds: float | None = None
    #: Batch jobs pending or running at once, as Google's "concurrent batch requests" (0: no limit).
    concurrent_batches: int = 100

    #: Webhook deliveries: seconds before the first retry (doubling after), and tries in all.
    webhook_retry_seconds: float = 1.0
    webhook_attempts: int = 8

    @property
    def cancel_delay(self) -> float:
        return self.cancel_seconds if self.cancel_seconds is not None else min(5.0, self.job_seconds / 10)


@dataclass
class Call:
    """One routed request."""

    request: Request
    version: str
    params: dict[str, str]
    route: str
    job_faults: tuple[str, ...] = ()

    @property
    def base_url(self) -> str:
        # The client reached us under this scheme and host, so upload URLs and URIs use them too.
        host = self.request.headers.get("host") or f"{self.request.url.hostname}:{self.request.url.port}"
        return f"{self.request.url.scheme}://{host}"

    def query(self, camel: str, snake: str) -> str | None:
        return self.request.query_params.get(camel) or self.request.query_params.get(snake)


Handler = Callable[["EmulatorApp", Call], Awaitable[Response]]
_ROUTES: list[tuple[str, str | None, re.Pattern, str, Handler]] = []


def route(method: str, area: str | None, pattern: str, name: str):
    """Register a handler for ``method`` on ``{area/}{version}/pattern``; ``name`` is the fault route name."""

    def register(handler: Handler) -> Handler:
        _ROUTES.append((method, area, re.compile(f"^{pattern}$"), name, handler))
        return handler

    return register


#: Stands for a stored list of inline responses in a rendered Operation, replaced by its text (no
#: rendered value can contain it: NUL characters are escaped in JSON).
_SPLICED = "\x00inlined responses\x00"
_SPLICED_JSON = json.dumps(_SPLICED)


def json_response(data: Any, headers: dict[str, str] | None = None, status: int = 200) -> Response:
    body = encode(data).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


class _BigFileResponse(FileResponse):
    chunk_size = 1024 * 1024  # fewer, larger writes for multi-hundred-MB outputs


class EmulatorApp:
    """The emulator's state and behaviour behind one Starlette application."""

    def __init__(self, state_dir: Path, settings: EmulatorSettings, *, models: list[str] | None,
                 faults: list[str] | tuple[str, ...], responder: Responder) -> None:
        self.settings = settings
        self.store = Store(state_dir)
        self.catalog = ModelCatalog(models, strict=settings.strict_models)
        self.faults = FaultInjector(faults)
        self.answerer = Answerer(responder, file_exists=lambda file_id: self._live_file(file_id) is not None)
        self.responder = responder
        self.runner = BatchRunner(self.store, self.answerer)
        self.uploads = Uploads(self.store)
        self.route_counts: Counter[str] = Counter()
        self.creates_by_display_name: Counter[str] = Counter()
        self.uploads_by_display_name: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        #: When expired files were last forgotten (see :meth:`_forget_expired_files`).
        self._expired_looked_at = float("-inf")
        self.runner.resume()
        self.active = ActiveJobs(settings.concurrent_batches, self._ended)
        self.active.add_existing(list(self.store.jobs))
        self.webhooks = WebhookService(
            self.store, view=lambda job, now: view_job(job, now, self.runner.progress(job["id"]), settings.expire_seconds),
            retry_seconds=settings.webhook_retry_seconds, attempts=settings.webhook_attempts)
        self.webhooks.start()
        self.asgi = Starlette(routes=[
            Route("/_emulator/stats", self.stats, methods=["GET"]),
            Route(JWKS_PATH, self.jwks, methods=["GET"]),
            Route("/{path:path}", self.dispatch, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        ], middleware=[
            # Browsers reach Google's API from any page (the browser build of the JS SDK): preflights
            # are answered, and answers let the page read them and the upload headers it needs.
            Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"],
                       expose_headers=list(CORS_EXPOSED_HEADERS), max_age=3600),
        ])

    def close(self) -> None:
        self.webhooks.stop()
        self.runner.stop()
        self.store.close()

    # -- dispatch ---------------------------------------------------------------------------------

    async def dispatch(self, request: Request) -> Response:
        path = request.url.path
        found = _VERSIONED_PATH.match(path)
        name = None
        self._forget_expired_files()
        try:
            if found is None:
                raise not_found(f"The requested URL {path} was not found on this server.")
            area, version, rest = found["area"], found["version"], found["rest"]
            for method, route_area, pattern, name, handler in _ROUTES:
                match = pattern.match(rest)
                if match and method == request.method and route_area == area:
                    break
            else:
                name = None
                raise not_found(f"The requested URL {path} was not found on this server.")
            if area == "upload" and request.query_params.get("upload_id"):
                name, handler = "upload-chunk", EmulatorApp.upload_chunk  # the id is the authorisation
            else:
                self._check_api_key(request)
            with self._counts_lock:
                self.route_counts[name] += 1
            fault_header = request.headers.get(FAULT_HEADER)
            if name == "upload-chunk" and fault_header is None:
                # google-genai sends a client's headers with the start only: its faults hold for the session.
                session = self.store.uploads.get(request.query_params["upload_id"]) or {}
                fault_header = session.get("faultHeader")
            decided = self.faults.decide(name, fault_header)
            if decided.delay:
                await asyncio.sleep(decided.delay)
            if decided.error is not None:
                raise decided.error
            call = Call(request, version, match.groupdict(), name, decided.job_faults)
            response = await handler(self, call)
            if decided.late:
                await asyncio.sleep(decided.late)  # done, but the answer may reach nobody
            return response
        except ApiError as error:
            headers = {"X-Goog-Upload-Status": "final"} if name in ("upload-start", "upload-chunk") else None
            return json_response(error.envelope(), headers=headers, status=error.code)

    def _check_api_key(self, request: Request) -> None:
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        if not key:
            raise ApiError(403, "Method doesn't allow unregistered callers (callers without established identity). "
                                "Please use API Key or other form of API consumer identity to call this API.",
                           "PERMISSION_DENIED")
        if self.settings.api_key is not None and key != self.settings.api_key:
            raise invalid_api_key()

    async def stats(self, request: Request) -> Response:
        """Not part of the Gemini API: counters for tests (``GET /_emulator/stats``)."""
        with self._counts_lock:
            routes = dict(self.route_counts)
            creates = dict(self.creates_by_display_name)
            uploads = dict(self.uploads_by_display_name)
        stored = Counter(job.get("displayName") or "" for job in list(self.store.jobs.values()))
        return json_response({"routes": routes, "createsByDisplayName": creates, "uploadsByDisplayName": uploads,
                              "jobsByDisplayName": dict(stored), "jobs": len(self.store.jobs),
                              "files": len(self.store.files)})

    # -- request bodies ---------------------------------------------------------------------------

    async def read_json(self, call: Call, *, camel: bool = True) -> dict:
        """The request body as camelCase JSON (as it came with ``camel=False``: the WebhookService
        speaks snake_case); refuses bodies over 20 MB without reading them whole."""
        return self.parse_json(await self._read_body(call), camel=camel)

    @staticmethod
    async def _read_body(call: Call) -> bytes:
        chunks, size = [], 0
        async for chunk in call.request.stream():
            size += len(chunk)
            if size > MAX_INLINE_BYTES:
                raise invalid(f"Request payload size exceeds the limit: {MAX_INLINE_BYTES} bytes.")
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def parse_json(raw: bytes, *, camel: bool = True) -> dict:
        """A JSON object, as Google's proto-JSON parser reads one: single-quoted strings included (its
        own curl samples send them); renamed to camelCase."""
        if not raw.strip():
            return {}
        try:
            body = decode(raw)
        except ValueError as error:
            try:
                body = json.loads(double_quoted(raw.decode("utf-8")))
            except ValueError:
                raise invalid(f"Invalid JSON payload received. {error}") from None
            raw = b"_"  # renamed below, whatever it holds
        if not isinstance(body, dict):
            raise invalid("Invalid JSON payload received. Expected an object.")
        return to_camel_case(body) if camel and has_snake_case_keys(raw) else body

    # -- batches ----------------------------------------------------------------------------------

    @route("POST", None, r"(?P<model>(?:models|tunedModels)/[^/:]+):batchGenerateContent", "create")
    async def create_generate_batch(self, call: Call) -> Response:
        return await self._create_batch(call, "generate", "batchGenerateContent")

    @route("POST", None, r"(?P<model>models/[^/:]+):asyncBatchEmbedContent", "create")
    async def create_embed_batch(self, call: Call) -> Response:
        return await self._create_batch(call, "embed", "asyncBatchEmbedContent")

    async def _create_batch(self, call: Call, kind: str, method: str) -> Response:
        body = await self.read_json(call)
        model = self.catalog.resolve(call.params["model"], method, call.version)
        batch = body.get("batch")
        if not isinstance(batch, dict):
            raise invalid("* BatchGenerateContentRequest.batch: batch is not specified")
        # Every name and value in the body, inline requests included, before anything is stored.
        await run_in_threadpool(shapes.check, body, shapes.batch_create_request(kind))
        operation = await run_in_threadpool(self._store_new_job, batch, kind, model, call.job_faults)
        return json_response(operation)

    def _store_new_job(self, batch: dict, kind: str, model: str, job_faults: tuple[str, ...]) -> dict:
        """Count the job against the limit of batch jobs at once (a 429 at the door stores nothing), then
        validate and store it."""
        job_id = new_id(36)
        self.active.reserve(job_id)
        try:
            return self._store_job(job_id, batch, kind, model, job_faults)
        except BaseException:
            self.active.release(job_id)
            raise

    def _store_job(self, job_id: str, batch: dict, kind: str, model: str, job_faults: tuple[str, ...]) -> dict:
        """Validate, then make the job durable *before* answering: a job the client heard of survives a kill."""
        input_config = batch.get("inputConfig") or {}
        file_name = input_config.get("fileName")
        inline = (input_config.get("requests") or {}).get("requests")
        check_webhook_config(batch.get("webhookConfig"))
        job = {
            "id": job_id, "kind": kind, "model": model, "displayName": batch.get("displayName"),
            "createTime": time.time(), "jobSeconds": self.settings.job_seconds, "inputFile": None,
            "requestCount": 0, "faults": job_faults_for(job_faults, batch.get("displayName")), "succeeded": 0, "failed": 0,
        }
        if file_name:
            file_id = file_name.removeprefix("files/")
            if self._live_file(file_id) is None:
                raise not_found(f"File {file_name} not found.")
            job["inputFile"] = file_id
            job["requestCount"] = _count_lines(self.store.blob(file_id))
        elif inline is not None:
            items = _checked_inline_requests(inline, kind)
            job["requestCount"] = len(items)
            write_inline_input(self.store, job_id, items)
        else:
            raise invalid("* BatchGenerateContentRequest.batch.input_config: input_config is not specified")
        # The job exists from now, once its input is checked (a large body or file takes a while): its
        # clock starts here, and the create answers PENDING, as Google's does, however long that took.
        job["createTime"] = time.time()
        if batch.get("webhookConfig"):
            job["webhookConfig"] = batch["webhookConfig"]
        job.update(self.webhooks.job_created(job) or {})
        self.store.save_job(job)
        if job.get("webhookWatch"):
            self.webhooks.watch(job_id)
        with self._counts_lock:
            self.creates_by_display_name[job["displayName"] or ""] += 1
        if needs_processing(job):
            self.runner.submit(job)
        return render_operation(job, JobView("PENDING", job["createTime"], None, 0, 0), None)

    def _ended(self, job_id: str) -> bool:
        """Whether a job no longer counts against ``concurrent_batches``: it ended, or was deleted."""
        job = self.store.jobs.get(job_id)
        return job is None or view_job(job, time.time(), self.runner.progress(job_id),
                                       self.settings.expire_seconds).terminal

    def _listed_operation(self, job: dict) -> dict:
        """The job's Operation in a list answer: the real service leaves inlined responses out of those;
        clients must get each job."""
        view = view_job(job, time.time(), self.runner.progress(job["id"]), self.settings.expire_seconds)
        return render_operation(job, view, None)

    def _job(self, call: Call) -> dict:
        job = self.store.jobs.get(call.params["id"])
        if job is None:
            raise not_found()
        return job

    @route("GET", None, r"batches/(?P<id>[^/:]+)", "get")
    async def get_batch(self, call: Call) -> Response:
        job = self._job(call)
        return await run_in_threadpool(self._operation_response, job)

    def _operation_response(self, job: dict) -> Response:
        """The job's Operation; a finished inline job's responses are spliced in as stored (their JSON
        text), not decoded and encoded again on every get."""
        view = view_job(job, time.time(), self.runner.progress(job["id"]), self.settings.expire_seconds)
        if view.state != "SUCCEEDED" or job.get("inputFile"):
            return json_response(render_operation(job, view, None))
        stored = self.store.inline_output_json(job["id"])
        body = encode(render_operation(job, view, _SPLICED))
        return Response(body.replace(_SPLICED_JSON, stored).encode(), media_type="application/json")

    @route("GET", None, r"batches", "list")
    async def list_batches(self, call: Call) -> Response:
        first_page = not call.query("pageToken", "page_token")
        jobs = await run_in_threadpool(self._listed_jobs, first_page)
        jobs.sort(key=lambda j: (-j["createTime"], j["id"]))
        page, token = _page(jobs, call, DEFAULT_BATCH_PAGE_SIZE, MAX_BATCH_PAGE_SIZE,
                            lambda j: (-j["createTime"], j["id"]))
        body: dict = {"operations": [self._listed_operation(job) for job in page]}
        if token:
            body["nextPageToken"] = token
        return json_response(body)

    def _listed_jobs(self, first_page: bool) -> list[dict]:
        """The jobs a list shows: all but those a ``list-lag`` fault still hides (list lag of the
        real service). A list pass (a list without a page token) counts against ``list-lag=N``; the
        count is stored with the job, so a restarted emulator goes on from it."""
        now, shown = time.time(), []
        for job in list(self.store.jobs.values()):
            faults = job_faults(tuple(job["faults"]))
            if faults.list_lag_seconds and now < job["createTime"] + faults.list_lag_seconds:
                continue
            if faults.list_lag_lists:
                passes = job.get("listPasses", 0)
                if first_page and passes <= faults.list_lag_lists:
                    passes += 1  # this pass; no more writes once the job is shown
                    self.store.update_job(job["id"], listPasses=passes)
                if passes <= faults.list_lag_lists:
                    continue
            shown.append(job)
        return shown

    @route("POST", None, r"batches/(?P<id>[^/:]+):cancel", "cancel")
    async def cancel_batch(self, call: Call) -> Response:
        job = self._job(call)
        view = view_job(job, time.time(), self.runner.progress(job["id"]), self.settings.expire_seconds)
        if not view.terminal and job.get("cancelTime") is None:  # cancelling a finished job changes nothing
            # Asynchronous, as Google's: the job is CANCELLED once the cancel takes effect, a moment later.
            await run_in_threadpool(self.store.update_job, job["id"], cancelTime=time.time() + self.settings.cancel_delay,
                                    succeeded=view.succeeded, failed=view.failed)
        return json_response({})

    @route("DELETE", None, r"batches/(?P<id>[^/:]+)", "delete")
    @route("POST", None, r"batches/(?P<id>[^/:]+):delete", "delete")
    async def delete_batch(self, call: Call) -> Response:
        job = self._job(call)
        self.runner.abandon(job["id"])
        await run_in_threadpool(self.store.delete_job, job["id"])
        return json_response({})

    # -- webhooks ---------------------------------------------------------------------------------

    @route("POST", None, r"webhooks", "webhooks")
    async def create_webhook(self, call: Call) -> Response:
        body = await self.read_json(call, camel=False)
        return json_response(await run_in_threadpool(self.webhooks.create, body))

    @route("GET", None, r"webhooks", "webhooks")
    async def list_webhooks(self, call: Call) -> Response:
        webhooks = self.webhooks.list()
        page, token = _page(webhooks, call, DEFAULT_MODEL_PAGE_SIZE, MAX_MODEL_PAGE_SIZE, lambda w: (0.0, w["id"]))
        return json_response({"webhooks": page, **({"next_page_token": token} if token else {})})

    @route("GET", None, r"webhooks/(?P<id>[^/:]+)", "webhooks")
    async def get_webhook(self, call: Call) -> Response:
        return json_response(self.webhooks.get(call.params["id"]))

    @route("PATCH", None, r"webhooks/(?P<id>[^/:]+)", "webhooks")
    async def update_webhook(self, call: Call) -> Response:
        body = await self.read_json(call, camel=False)
        mask = call.query("updateMask", "update_mask")
        return json_response(await run_in_threadpool(self.webhooks.update, call.params["id"], body, mask))

    @route("DELETE", None, r"webhooks/(?P<id>[^/:]+)", "webhooks")
    async def delete_webhook(self, call: Call) -> Response:
        await run_in_threadpool(self.webhooks.delete, call.params["id"])
        return json_response({})

    @route("POST", None, r"webhooks/(?P<id>[^/:]+):ping", "webhooks")
    async def ping_webhook(self, call: Call) -> Response:
        await run_in_threadpool(self.webhooks.ping, call.params["id"])
        return json_response({})

    @route("POST", None, r"webhooks/(?P<id>[^/:]+):rotateSigningSecret", "webhooks")
    async def rotate_webhook_secret(self, call: Call) -> Response:
        body = await self.read_json(call, camel=False)
        secret = await run_in_threadpool(self.webhooks.rotate, call.params["id"], body.get("revocation_behavior"))
        return json_response({"secret": secret})

    async def jwks(self, request: Request) -> Response:
        """The keys that sign per-job webhook deliveries (public, like Google's)."""
        return json_response(self.webhooks.signer.jwks())

    # -- models (online) --------------------------------------------------------------------------

    @route("GET", None, r"models", "model-list")
    async def list_models(self, call: Call) -> Response:
        models = self.catalog.listed()
        page, token = _page(models, call, DEFAULT_MODEL_PAGE_SIZE, MAX_MODEL_PAGE_SIZE, lambda m: (0.0, m["name"]))
        body: dict = {"models": page}
        if token:
            body["nextPageToken"] = token
        return json_response(body)

    @route("GET", None, r"models/(?P<model>[^/:]+)", "model-get")
    async def get_model(self, call: Call) -> Response:
        return json_response(self.catalog.get(call.params["model"], call.version))

    @route("POST", None, r"(?P<model>models/[^/:]+):countTokens", "count-tokens")
    async def count_tokens(self, call: Call) -> Response:
        body = await self.read_json(call)
        self.catalog.resolve(call.params["model"], "countTokens", call.version)
        shapes.check(body, shapes.count_tokens_request())
        request = body.get("generateContentRequest") or body
        check_generate_request(request, "CountTokensRequest", shape=False)
        total = await run_in_threadpool(self.responder.count_tokens, request["contents"])
        return json_response({"totalTokens": total})

    @route("POST", None, r"(?P<model>(?:models|tunedModels)/[^/:]+):generateContent", "generate")
    async def generate_content(self, call: Call) -> Response:
        body = await self.read_json(call)
        model = self.catalog.resolve(call.params["model"], "generateContent", call.version)
        return json_response(await run_in_threadpool(self.answerer.generate, body, model))

    @route("POST", None, r"(?P<model>models/[^/:]+):embedContent", "embed")
    async def embed_content(self, call: Call) -> Response:
        body = await self.read_json(call)
        model = self.catalog.resolve(call.params["model"], "embedContent", call.version)
        answer = await run_in_threadpool(self.answerer.embed, body, model)
        return json_response({"embedding": answer["embedding"]})

    @route("POST", None, r"(?P<model>models/[^/:]+):batchEmbedContents", "embed")
    async def batch_embed_contents(self, call: Call) -> Response:
        """The synchronous multi-text embedding call google-genai's ``models.embed_content`` makes."""
        body = await self.read_json(call)
        model = self.catalog.resolve(call.params["model"], "batchEmbedContents", call.version)
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            raise invalid("* BatchEmbedContentsRequest.requests: requests must not be empty")
        for index, request in enumerate(requests):
            check_embed_request(request, f"BatchEmbedContentsRequest.requests[{index}]", path=f"requests[{index}]")

        def embed_all() -> list:  # every request was checked above: the responder answers them
            return [self.responder.embed(request, model)["embedding"] for request in requests]

        return json_response({"embeddings": await run_in_threadpool(embed_all)})

    # -- files ------------------------------------------------------------------------------------

    def _forget_expired_files(self) -> None:
        """Remove the files past their expiry, bytes and all, as the Files API deletes them (at most every
        :data:`EXPIRED_LOOK_SECONDS`, or ``expire_seconds`` if shorter): no call shows one any more, and
        a results file kept for ever would fill the disk of an emulator that runs for months."""
        now = time.time()
        if now - self._expired_looked_at < min(EXPIRED_LOOK_SECONDS, self.settings.expire_seconds):
            return
        self._expired_looked_at = now
        # A job still to run reads its input file when it runs; that one stays until the job has ended.
        needed = {job["inputFile"] for job in list(self.store.jobs.values())
                  if job.get("inputFile") and not self._ended(job["id"])}
        for file_id, doc in list(self.store.files.items()):
            if doc["createTime"] + self.settings.expire_seconds <= now and file_id not in needed:
                self.store.delete_file(file_id)

    def _live_file(self, file_id: str) -> dict | None:
        """A stored file that has not expired (files are kept for ``expire_seconds``, 48 h by default)."""
        doc = self.store.files.get(file_id)
        if doc is None or doc["createTime"] + self.settings.expire_seconds <= time.time():
            return None
        return doc

    def _file(self, call: Call) -> dict:
        doc = self._live_file(call.params["id"])
        if doc is None:
            raise not_found(f"File files/{call.params['id']} not found.")
        return doc

    def _own_file(self, call: Call) -> dict:
        """The file ``files.get`` and ``files.delete`` name. As on the real service, one that does not
        exist (never did, was deleted, or expired) is answered 403, not 404: Google does not tell a
        missing file from someone else's (googleapis/python-genai#1218)."""
        doc = self._live_file(call.params["id"])
        if doc is None:
            raise ApiError(403, f"You do not have permission to access the File {call.params['id']} "
                                f"or it may not exist.", "PERMISSION_DENIED")
        return doc

    def _render_file(self, call: Call, doc: dict) -> dict:
        return render_file(doc, call.base_url, call.version, self.settings.expire_seconds)

    @route("POST", "upload", r"files", "upload-start")
    async def upload_start(self, call: Call) -> Response:
        """``files.upload``: a resumable upload's start (what google-genai sends), or a whole upload in
        one request, as Google also takes: simple (the raw bytes, typed by Content-Type) or multipart
        (``multipart/related``: the File's JSON, then the bytes)."""
        headers = call.request.headers
        protocol = (headers.get("x-goog-upload-protocol") or call.query("uploadType", "upload_type")
                    or "resumable").lower()
        if protocol in ("raw", "media"):
            meta = {"mimeType": headers.get("content-type", "").partition(";")[0].strip()}
            return self._uploaded(call, await self.uploads.whole(meta, headers, call.request.stream()))
        if protocol == "multipart":
            meta, data = await self._multipart(call)
            return self._uploaded(call, await self.uploads.whole(meta, headers, _once(data)))
        if protocol != "resumable":
            raise invalid(f"Unknown upload protocol {protocol!r}: use resumable, multipart or raw.")
        body = await self.read_json(call)
        shapes.check(body, shapes.create_file_request())
        upload_id = await run_in_threadpool(self.uploads.start, body, call.request.headers,
                                            call.request.headers.get(FAULT_HEADER))
        url = f"{call.base_url}/upload/{call.version}/files?upload_id={upload_id}&upload_protocol=resumable"
        return Response(b"", headers={"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active",
                                      "X-Goog-Upload-Chunk-Granularity": str(CHUNK_GRANULARITY)})

    async def upload_chunk(self, call: Call) -> Response:
        result = await self.uploads.chunk(call.request.query_params["upload_id"], call.request)
        headers = {"X-Goog-Upload-Status": result.status, "X-Goog-Upload-Size-Received": str(result.received)}
        if result.file is None:
            return Response(b"", headers=headers)
        return self._uploaded(call, result.file, headers)

    def _uploaded(self, call: Call, file: dict, headers: dict[str, str] | None = None) -> Response:
        with self._counts_lock:
            self.uploads_by_display_name[file.get("displayName") or ""] += 1
        return json_response({"file": self._render_file(call, file)},
                             headers=headers or {"X-Goog-Upload-Status": "final"})

    async def _multipart(self, call: Call) -> tuple[dict, bytes]:
        """The File's fields and bytes of a ``multipart/related`` upload (read whole: at most 20 MB,
        as a JSON body; larger files go resumable or raw, which stream)."""
        content_type = call.request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/"):
            raise invalid("A multipart upload needs Content-Type: multipart/related; boundary=...")
        raw = await self._read_body(call)
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw)
        parts = list(message.iter_parts()) if message.is_multipart() else []
        if len(parts) != 2:
            raise invalid("A multipart upload has two parts: the File's JSON metadata, then the file's bytes.")
        try:
            body = self.parse_json(parts[0].get_payload(decode=True) or b"{}")
        except ApiError:
            raise invalid("The first part of a multipart upload must be the File's JSON metadata.") from None
        shapes.check(body, shapes.create_file_request())
        meta = dict(body.get("file") or {})
        meta.setdefault("mimeType", parts[1].get_content_type())
        return meta, parts[1].get_payload(decode=True) or b""

    @route("GET", None, r"files/(?P<id>[^/:]+)", "file-get")
    async def get_file(self, call: Call) -> Response:
        return json_response(self._render_file(call, self._own_file(call)))

    @route("GET", None, r"files", "file-list")
    async def list_files(self, call: Call) -> Response:
        files = [doc for doc in sorted(self.store.files.values(), key=lambda d: (-d["createTime"], d["id"]))
                 if self._live_file(doc["id"]) is not None]
        page, token = _page(files, call, DEFAULT_FILE_PAGE_SIZE, MAX_FILE_PAGE_SIZE,
                            lambda d: (-d["createTime"], d["id"]))
        body: dict = {"files": [self._render_file(call, doc) for doc in page]}
        if token:
            body["nextPageToken"] = token
        return json_response(body)

    @route("DELETE", None, r"files/(?P<id>[^/:]+)", "file-delete")
    async def delete_file(self, call: Call) -> Response:
        doc = self._own_file(call)
        await run_in_threadpool(self.store.delete_file, doc["id"])
        return json_response({})

    @route("GET", None, r"files/(?P<id>[^/:]+):download", "download")
    @route("GET", "download", r"files/(?P<id>[^/:]+):download", "download")
    async def download_file(self, call: Call) -> Response:
        doc = self._file(call)
        if doc["source"] != "GENERATED":
            # As on the real service: uploaded files have metadata, but their bytes cannot be fetched.
            raise invalid(f"File files/{doc['id']} was uploaded; only generated files can be downloaded.")
        return _BigFileResponse(self.store.blob(doc["id"]), media_type=doc["mimeType"])


# ------------------------------------------------------------------------------------------------
# helpers


def _checked_inline_requests(items: Any, kind: str) -> list[dict]:
    """Inline requests are small (<= 20 MB), so the whole list is checked before the job exists."""
    if not isinstance(items, list) or not items:
        raise invalid("* BatchGenerateContentRequest.batch.input_config.requests.requests: "
                      "requests must not be empty")
    checked = []
    for index, item in enumerate(items):
        where = f"InlinedRequest.requests[{index}].request"
        if not isinstance(item, dict):
            raise invalid(f"* {where}: an inlined request must be a JSON object")
        request = item.get("request")
        # The body's shape is checked already (BatchGenerateContentRequest), this is what Google checks beyond it.
        if kind == "embed":
            check_embed_request(request, where, shape=False)
        else:
            check_generate_request(request, where, shape=False)
        entry: dict = {"request": request}
        metadata = item.get("metadata")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise invalid(f"* InlinedRequest.requests[{index}].metadata: must be an object")
            # A google.protobuf.Struct: it comes back as it was sent, numbers, booleans and nested objects
            # included, as Google's does (google-genai's own types only send and read strings).
            entry["metadata"] = metadata
        checked.append(entry)
    return checked


async def _once(data: bytes):
    yield data


def _count_lines(path: Path) -> int:
    """Requests in a JSONL file: non-blank lines, counted in one streaming pass."""
    count = 0
    with open(path, "rb") as lines:
        for line in lines:
            if not line.isspace():
                count += 1
    return count


def _page(items: list, call: Call, default_size: int, max_size: int, sort_key) -> tuple[list, str | None]:
    """One page of ``items`` (sorted by ``sort_key``) after the cursor in ``pageToken``."""
    size_text = call.query("pageSize", "page_size")
    try:
        size = int(size_text) if size_text else default_size
    except ValueError:
        raise invalid(f"Invalid page size {size_text!r}.") from None
    size = default_size if size <= 0 else min(size, max_size)
    start = 0
    token = call.query("pageToken", "page_token")
    if token:
        try:
            cursor = tuple(json.loads(base64.urlsafe_b64decode(token.encode())))
            after = (float(cursor[0]), str(cursor[1]))
        except (ValueError, TypeError, IndexError, binascii.Error):
            raise invalid("Invalid page token.") from None
        start = next((i for i, item in enumerate(items) if sort_key(item) > after), len(items))
    page = items[start:start + size]
    if start + size >= len(items):
        return page, None
    last = sort_key(page[-1])
    return page, base64.urlsafe_b64encode(json.dumps(list(last)).encode()).decode()
