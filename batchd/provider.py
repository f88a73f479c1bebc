"""The Gemini Batch API provider: the only module of batchd that talks to the service (what its answers
mean, remote jobs and files and result records, is :mod:`batchd.remote`).

Everything goes through the google-genai SDK over HTTP, exactly as to Google; the local emulator is just
another ``base_url``. Two SDK clients share the same settings and differ only in retries:

* ``_retrying_client`` has SDK retries on (exponential backoff on 408/429/5xx, timeouts, connect errors). It
  serves the calls that are safe to repeat and made from worker threads: a fetch's get, count_tokens.
  The calls the daemon paces itself go out once (``list_jobs``, ``get(once=True)``, ``cancel``): the
  poll clock and each cancel's backoff retry them, and a call sitting in the SDK's backoff held every
  job, and a stop, for about 15 s with the service unreachable. They (and the model list and gets)
  also time out sooner: :data:`ASKED_ONCE_TIMEOUT_SECONDS`.
* ``_single_shot_client`` never retries. ``batches.create`` is not idempotent: a retry after an ambiguous
  5xx or timeout can create a second job, so batchd reconciles by display name instead (the
  daemon matches ``list_jobs`` against the display names of its unconfirmed creates). Uploads and downloads also use it, wrapped in batchd's own retry loop around the
  *whole* transfer: the SDK retries neither chunk uploads nor downloads, and one retry layer instead of
  two keeps the worst-case wait bounded. A repeated upload may leave an orphan file (an attempt whose answer was
  lost); ``Uploaded.attempts`` says so, and the daemon finds such copies by their display name
  (``list_files``) and deletes them. A repeated download overwrites a temp file.

Two clients rather than per-call ``http_options``: google-genai 3.3.0 does honour per-call
``retry_options`` (``BaseApiClient._request``), but a client without ``retry_options`` is the SDK's
documented "never retry" default, so create cannot pick up retries by a missed argument or by a change
in how per-call options are merged.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import logging
import os
import re
import ssl
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import tenacity
from google import genai
from google.genai import errors, types
from google.genai._common import ExperimentalWarning

from batchd import fs
from batchd.durable import fsync_dir
from batchd import jsonfast
from batchd.encoding import inline_embeddings_source, inlined_request
from batchd.remote import RemoteFile, RemoteJob, Uploaded


log = logging.getLogger(__name__)

#: The Files API needs an explicit type: ``.jsonl`` is unknown to ``mimetypes``; Google's docs use "jsonl".
JSONL_MIME_TYPE = "jsonl"
#: Bytes sent per request of a resumable upload. The SDK reads parts of 8 MiB and holds each twice while
#: it is sent (~17 MB per upload in flight, most of batchd's peak memory on a large job); 2 MiB parts
#: hold a quarter of that, and are still a multiple of 256 KiB, as the upload protocol requires.
UPLOAD_PART_BYTES = 2 * 1024 * 1024

#: HTTP statuses worth retrying: the SDK's own default set.
RETRYABLE_STATUS_CODES = (408, 429, 500, 502, 503, 504)
#: How long each connect, read or write of a call asked once may take (the poll's list pages, a get the
#: list left out, a cancel, the model list). None is the loop's, but each holds what waits for it (the
#: next poll, the next cancel of that batch, the jobs of that model): a service that accepts a call and
#: never answers held them for the clients' 60 s. A healthy service answers such a call in well under a
#: second; one that timed out is asked again on the daemon's own clock (the next poll, the cancel's
#: backoff, the model check's retry), as any failed call is.
ASKED_ONCE_TIMEOUT_SECONDS = 10.0
_ASKED_ONCE = types.HttpOptions(timeout=int(ASKED_ONCE_TIMEOUT_SECONDS * 1000))

_BATCH_NAME = re.compile(r"batches/[A-Za-z0-9_-]+")
_FILE_NAME = re.compile(r"files/[a-z0-9-]+")

_Result = TypeVar("_Result")

# batches.create_embeddings warns on every call that it is experimental: batchd uses it knowingly (it is
# the SDK's only door to asyncBatchEmbedContent), and a warning per chunk would only clutter the log.
warnings.filterwarnings("ignore", message=r"batches\.create_embeddings\(\) is experimental",
                        category=ExperimentalWarning)


class ProviderError(RuntimeError):
    """A provider-level failure that is not an HTTP error from the service."""


# --------------------------------------------------------------------------------------------------
# Error classification


def _transient_transport_errors() -> tuple[type[BaseException], ...]:
    # The SDK picks httpx2 or httpx at runtime (GOOGLE_GENAI_HTTP_CLIENT), so accept either. Unlike the
    # SDK's own list, read errors and dropped connections count too: they are what a long download sees.
    found: list[type[BaseException]] = [TimeoutError, ConnectionError]
    for module_name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found += [module.TimeoutException, module.NetworkError, module.RemoteProtocolError]
    return tuple(found)


_TRANSIENT_TRANSPORT_ERRORS = _transient_transport_errors()


def is_retryable(exc: BaseException) -> bool:
    """True for failures that may succeed later: 408/429/5xx, timeouts, connection errors.

    400/401/403/404 and client-side validation errors (``ValueError``) are permanent.
    """
    if isinstance(exc, errors.APIError):
        return exc.code in RETRYABLE_STATUS_CODES
    return isinstance(exc, _TRANSIENT_TRANSPORT_ERRORS)


def quota_delay(exc: BaseException) -> float | None:
    """For a 429 RESOURCE_EXHAUSTED, the seconds the service asks the client to wait (its ``RetryInfo``'s
    ``retryDelay``; 0.0 when it names none); None for any other error.

    A 429 refuses the request at the door (a quota is checked before anything is done): a create
    answered so created nothing.
    """
    if not isinstance(exc, errors.APIError) or exc.code != 429:
        return None
    body = exc.details if isinstance(exc.details, dict) else {}
    for detail in (body.get("error") or {}).get("details") or ():
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            try:
                return max(0.0, float(str(detail.get("retryDelay", "0s")).removesuffix("s")))
            except ValueError:
                return 0.0
    return 0.0


def is_auth_error(exc: BaseException) -> bool:
    """True when the service rejected the credentials.

    Google answers a bad key with 400 INVALID_ARGUMENT "API key not valid", not 401, hence the message check.
    """
    if not isinstance(exc, errors.APIError):
        return False
    if exc.code in (401, 403):
        return True
    return exc.code == 400 and "api key" in (exc.message or "").lower()


# --------------------------------------------------------------------------------------------------
# Retries


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """One backoff policy for both the SDK's retries and batchd's own transfer retries."""

    attempts: int = 5  # including the first
    initial_delay: float = 1.0  # seconds
    max_delay: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts counts the first try, so it must be at least 1")

    def sdk_options(self, status_codes: tuple[int, ...] = RETRYABLE_STATUS_CODES) -> types.HttpRetryOptions:
        return types.HttpRetryOptions(
            attempts=self.attempts,
            initial_delay=self.initial_delay,
            max_delay=self.max_delay,
            jitter=self.initial_delay,  # the SDK's default of 1 s would dominate small test delays
            http_status_codes=list(status_codes),
        )

    def retrying(self, what: str, retry_on: Callable[[BaseException], bool] | None = None) -> tenacity.Retrying:
        """A blocking retry of a whole operation: exponential with jitter, like the SDK's, on the
        errors ``retry_on`` accepts (:func:`is_retryable`); the last error is raised as it was."""
        return tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_exponential(multiplier=self.initial_delay, max=self.max_delay)
            + tenacity.wait_random(0, self.initial_delay),
            retry=tenacity.retry_if_exception(retry_on or is_retryable),
            before_sleep=lambda state: log.warning(
                "%s failed (%s); attempt %d of %d in %.1f s", what, state.outcome.exception(),
                state.attempt_number + 1, self.attempts, state.next_action.sleep),
            reraise=True,
        )


def _with_retries(operation: Callable[[], _Result], policy: RetryPolicy, what: str,
                  on_attempt: Callable[[int], None] = lambda attempt: None,
                  retry_on: Callable[[BaseException], bool] | None = None) -> _Result:
    for attempt in policy.retrying(what, retry_on):
        with attempt:
            on_attempt(attempt.retry_state.attempt_number)
            result = operation()
    return result


# --------------------------------------------------------------------------------------------------
# Remote names


def _checked_batch_name(name: str) -> str:
    # The name becomes a URL path; refuse anything but "batches/<id>" before it gets there.
    if not _BATCH_NAME.fullmatch(name):
        raise ProviderError(f"not a batch job name: {name!r} (expected 'batches/<id>')")
    return name


def _checked_file_name(name: str) -> str:
    if not _FILE_NAME.fullmatch(name):
        raise ProviderError(f"not a file name: {name!r} (expected 'files/<id>')")
    return name


def is_gone(exc: BaseException) -> bool:
    """True when the service says a file (or job) does not exist.

    For a file it does not always say 404: Google's Files API answers a file that expired or was deleted
    with 403 PERMISSION_DENIED "You do not have permission to access the File … or it may not exist"
    (googleapis/python-genai#1218, google-gemini/deprecated-generative-ai-js#236).
    """
    if not isinstance(exc, errors.APIError):
        return False
    if exc.code == 404:
        return True
    return exc.code == 403 and "may not exist" in (exc.message or "")


class RemoteCalls:
    """Calls to the service by method, and their errors by method and kind, since the process started
    (``/metrics``: ``batchd_remote_calls_total``, ``batchd_remote_errors_total``). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.errors: dict[tuple[str, str], int] = {}

    def count(self, method: str) -> None:
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1

    def failed(self, method: str, error: BaseException) -> None:
        code = getattr(error, "code", None)
        kind = str(code) if isinstance(code, int) else type(error).__name__
        with self._lock:
            self.errors[(method, kind)] = self.errors.get((method, kind), 0) + 1

    def snapshot(self) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
        with self._lock:
            return dict(self.calls), dict(self.errors)

    def total(self) -> int:
        with self._lock:
            return sum(self.calls.values())


#: This process's calls to the service (one daemon per process).
REMOTE_CALLS = RemoteCalls()


def _counted(method: str) -> Callable[[Callable[..., _Result]], Callable[..., _Result]]:
    """Count each call of a Provider method (and its failure) in :data:`REMOTE_CALLS`."""
    def wrap(function: Callable[..., _Result]) -> Callable[..., _Result]:
        @functools.wraps(function)
        def counted(*args: Any, **kwargs: Any) -> _Result:
            REMOTE_CALLS.count(method)
            try:
                return function(*args, **kwargs)
            except Exception as error:
                REMOTE_CALLS.failed(method, error)
                raise
        return counted
    return wrap


def webhook_config(uri: str | None, job_id: str, chunk_idx: int) -> dict[str, Any] | None:
    """A create's ``webhook_config``: the daemon's public webhook URL, with the job and chunk it is for."""
    if not uri:
        return None
    return {"uris": [uri], "user_metadata": {"batchd_job": job_id, "batchd_chunk": str(chunk_idx)}}


class _UploadParts(io.RawIOBase):
    """A file handed to the SDK's upload: each ``read`` returns at most :data:`UPLOAD_PART_BYTES`, so
    that is what one upload request holds (the SDK sends what one read returns as one part)."""

    def __init__(self, file: io.BufferedReader):
        self._file = file

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def read(self, size: int = -1) -> bytes:
        return self._file.read(UPLOAD_PART_BYTES if size is None or size < 0 else min(size, UPLOAD_PART_BYTES))


def _raw_json(client: genai.Client, method: str, path: str, body: dict[str, Any] | bytes | None = None,
              http_options: types.HttpOptions | None = None) -> dict[str, Any]:
    """Call ``path`` through the SDK's private API client and return the JSON body unparsed by the SDK.

    Why: google-genai 3.3.0's ``BatchJob`` drops ``metadata.batchStats`` (python-genai#1323) and the
    operation-level ``error``, which batchd needs for progress and failure reasons; and its
    ``batches.create`` converts every inline request through pydantic models (~0.5 ms a request, more
    CPU than everything else batchd does for a small job), although batchd's requests are already in
    the wire form (:func:`inline_batch_request`). Going through the SDK's own API client keeps base
    URL, API version, auth header, timeout, retry policy and error types identical to the public
    calls. ``_api_client`` is private: this is the only place batchd touches it, and
    tests/test_provider.py::test_sdk_private_request_api_is_unchanged fails loudly if the SDK changes it.

    ``body`` as bytes is sent as it is (an inline create, :func:`inline_batch_request`): the request is
    built by the SDK as for any call, then its data replaced, which its sender passes through unchanged.
    """
    api = client._api_client
    if not isinstance(body, bytes):
        text = api.request(method, path, body or {}, http_options).body
    else:
        request = api._build_request(method, path, {}, http_options)
        request.data = body
        stream = api._request(request, http_options, stream=False).response_stream
        text = stream[0] if stream else ""
    return jsonfast.loads(text) if text else {}


def inline_batch_request(model: str, lines: Iterable[str], display_name: str,
                         webhook: Mapping[str, Any] | None = None) -> tuple[str, bytes]:
    """The path and body of ``batches.create`` with inline requests, from the lines of a requests file
    (``{"key": …, "request": GenerateContentRequest}``): the JSON the SDK sends for the same requests
    given as InlinedRequest dicts (tests/test_provider.py compares them), the key travelling in each
    request's ``metadata``, the requests' text passed through (:func:`batchd.encoding.inlined_request`)."""
    model_path = model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"
    batch: dict[str, Any] = {"displayName": display_name}
    if webhook:
        batch["webhookConfig"] = {"uris": list(webhook["uris"]),
                                  "userMetadata": dict(webhook.get("user_metadata") or {})}
    head = json.dumps(batch, ensure_ascii=False, separators=(",", ":"))[:-1]  # the batch's object, left open
    requests = ",".join(map(inlined_request, lines))
    body = f'{{"batch":{head},"inputConfig":{{"requests":{{"requests":[{requests}]}}}}}}}}'
    return f"{model_path}:batchGenerateContent", body.encode("utf-8")


# --------------------------------------------------------------------------------------------------
# The provider


@functools.lru_cache(maxsize=1)
def tls_context() -> ssl.SSLContext:
    """The trust google-genai would set up on its own: ``SSL_CERT_FILE``/``SSL_CERT_DIR`` when set, else
    the operating system's store (httpx2's default), made once per process."""
    if os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE"), capath=os.environ.get("SSL_CERT_DIR"))
    try:
        import httpx2
    except ImportError:  # an SDK build on plain httpx
        return ssl.create_default_context()
    return httpx2.create_ssl_context()


class Provider:
    """Submit, reconcile, poll, fetch and cancel Gemini batch jobs."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        api_version: str = "v1beta",
        retry: RetryPolicy = RetryPolicy(),
        timeout_s: float = 60.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """``base_url`` None lets the SDK choose (``GOOGLE_GEMINI_BASE_URL``, else Google).

        ``timeout_s`` bounds each connect/read/write, not a whole transfer; with the retries, one
        call on the daemon's loop stays well inside the service unit's ``WatchdogSec``. ``headers`` are sent with every
        JSON request (proxies, tracing).
        """
        self._retry = retry
        # One TLS context for both clients and all their transports: left to itself, the SDK loads the
        # CA bundle three times a client (sync, async, websocket), a quarter of a second per daemon start.
        tls = tls_context()
        options: dict[str, Any] = {"api_version": api_version, "timeout": int(timeout_s * 1000),
                                   "client_args": {"verify": tls}, "async_client_args": {"verify": tls, "ssl": tls}}
        if base_url:
            options["base_url"] = base_url
        if headers:
            options["headers"] = dict(headers)
        self._retrying_client = genai.Client(
            api_key=api_key, http_options=types.HttpOptions(**options, retry_options=retry.sdk_options())
        )
        self._single_shot_client = genai.Client(api_key=api_key, http_options=types.HttpOptions(**options))
        # A fetch's get retries what the SDK retries but a 429: the daemon waits out a quota itself, as long
        # as the service asks and visibly (batchd status), instead of sitting in the SDK's backoff.
        self._get_options = types.HttpOptions(retry_options=retry.sdk_options(
            tuple(code for code in RETRYABLE_STATUS_CODES if code != 429)))

    @classmethod
    def from_settings(cls, settings: Any, *, base_url: str | None = None, api_key: str | None = None) -> Provider:
        """Build from batchd settings (``provider``, ``api_version``, ``retry``, ``gemini_api_key()``).

        ``api_key`` None asks ``settings.gemini_api_key()``, which raises a clear error when none is set.
        """
        if settings.provider == "emulator" and not (base_url or os.environ.get("GOOGLE_GEMINI_BASE_URL")):
            # Without a URL the SDK would send the emulator's jobs to Google.
            raise ProviderError("provider 'emulator' needs the emulator's base URL")
        return cls(
            api_key=api_key if api_key is not None else settings.gemini_api_key(),
            base_url=base_url,
            api_version=settings.api_version,
            retry=RetryPolicy(attempts=settings.retry.attempts, initial_delay=settings.retry.initial_seconds,
                              max_delay=settings.retry.max_seconds),
        )

    def close(self) -> None:
        self._retrying_client.close()
        self._single_shot_client.close()

    def __enter__(self) -> Provider:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- submit ------------------------------------------------------------------------------------

    @_counted("files.upload")
    def upload_jsonl(self, path: Path, display_name: str) -> Uploaded:
        """Upload a requests JSONL file (resumable, 8 MiB chunks) under ``display_name``.

        The display name is how a copy whose answer was lost (a crash, or a retried attempt) is found
        again with ``list_files``: give each file a deterministic one.
        """
        # A 429 is not retried here: the daemon waits out the quota, once for every submission, and says so.
        uploaded, attempts = self._upload(path, display_name, JSONL_MIME_TYPE,
                                          retry_on=lambda error: is_retryable(error) and quota_delay(error) is None)
        if not uploaded.name:
            raise ProviderError(f"upload of {path}: the service returned no file name")
        return Uploaded(uploaded.name, attempts)

    @_counted("files.upload")
    def upload_file(self, path: Path, display_name: str, mime_type: str) -> tuple[RemoteFile, int]:
        """Upload a media file (streamed from disk, resumable) under ``display_name``; the File as the
        service answered and the number of transfer attempts (more than one: a copy may have been left)."""
        uploaded, attempts = self._upload(path, display_name, mime_type)
        if not uploaded.name or not uploaded.uri:
            raise ProviderError(f"upload of {path}: the service returned no file name or URI")
        return RemoteFile.from_sdk(uploaded), attempts

    def _upload(self, path: Path, display_name: str, mime_type: str, **retry: Any) -> tuple[types.File, int]:
        """The File an upload made, and how many transfers it took (``retry``: :func:`_with_retries`' options)."""
        attempts = 0

        def count(attempt: int) -> None:
            nonlocal attempts
            attempts = attempt

        def upload() -> types.File:
            config = types.UploadFileConfig(display_name=display_name, mime_type=mime_type)
            with open(path, "rb") as file:
                return self._single_shot_client.files.upload(file=_UploadParts(file), config=config)

        return _with_retries(upload, self._retry, f"upload of {path}", on_attempt=count, **retry), attempts

    @_counted("files.get")
    def get_file(self, name: str) -> RemoteFile | None:
        """A file's metadata; None when the service no longer has it (deleted, or expired after 48 h)."""
        try:
            return RemoteFile.from_sdk(self._retrying_client.files.get(name=_checked_file_name(name)))
        except errors.APIError as error:
            if is_gone(error):
                return None
            raise

    def list_files(self, page_size: int = 100) -> Iterator[RemoteFile]:
        """Every file of the project, page after page (100 is the service's largest page)."""
        REMOTE_CALLS.count("files.list")
        pager = self._retrying_client.files.list(config=types.ListFilesConfig(page_size=page_size))
        seen_tokens: set[str] = set()
        while True:
            # Page by page rather than iterating the pager: its __next__ raises IndexError on an
            # empty page that still carries a token.
            for file in pager.page:
                yield RemoteFile.from_sdk(file)
            token = pager.config.get("page_token")
            if not token:
                return
            if token in seen_tokens:  # a server bug must not become an endless loop
                raise ProviderError(f"files.list returned page token {token!r} twice")
            seen_tokens.add(token)
            REMOTE_CALLS.count("files.list")
            pager.next_page()

    @_counted("files.delete")
    def delete_file(self, name: str) -> bool:
        """Delete a file; False when it was already gone (a repeated delete, or it expired)."""
        try:
            self._retrying_client.files.delete(name=_checked_file_name(name))
        except errors.APIError as error:
            if is_gone(error):
                return False
            raise
        return True

    @_counted("batches.create")
    def create_from_file(self, model: str, file_name: str, display_name: str, kind: str = "generate",
                         webhook: dict[str, Any] | None = None) -> RemoteJob:
        """Create a batch from an uploaded JSONL file. Never retried: on an ambiguous failure reconcile
        by display name (``list_jobs``) before creating again.

        ``kind`` "embed": the file holds EmbedContentRequest lines, created with ``create_embeddings``.
        """
        if kind == "embed":
            return self._create_embeddings(model, types.EmbeddingsBatchJobSource(file_name=file_name), display_name)
        return self._create(model, file_name, display_name, webhook)

    def create_inline(self, model: str, requests: list[dict[str, Any]], display_name: str) -> RemoteJob:
        """Create a batch from SDK InlinedRequest dicts (see ``RequestEncoder.inline``); the service caps
        the total at 20 MB and the SDK costs ~0.5 ms per request, so use files for anything large."""
        return self._create(model, requests, display_name)

    @_counted("batches.create")
    def create_from_lines(self, model: str, lines: Iterable[str], display_name: str,
                          kind: str = "generate", webhook: dict[str, Any] | None = None) -> RemoteJob:
        """Create a batch with its requests inline, given as the lines of a requests file (what the spool
        holds): sent as :meth:`create_inline` sends them, without the SDK's per-request conversion.
        Never retried, like every create.

        ``kind`` "embed": EmbedContentRequest lines, sent through ``create_embeddings`` as the texts and
        their one config (:func:`inline_embeddings_source`); the SDK sends no keys with them, so their
        results come back without keys and are joined by position.
        """
        if kind == "embed":
            return self._create_embeddings(model, inline_embeddings_source(map(json.loads, lines)), display_name)
        path, body = inline_batch_request(model, lines, display_name, webhook)
        return RemoteJob.from_operation(_raw_json(self._single_shot_client, "post", path, body))

    def _create(self, model: str, source: str | list[dict[str, Any]], display_name: str,
                webhook: dict[str, Any] | None = None) -> RemoteJob:
        config = types.CreateBatchJobConfig(display_name=display_name,
                                            webhook_config=types.WebhookConfig(**webhook) if webhook else None)
        job = self._single_shot_client.batches.create(model=model, src=source, config=config)
        return RemoteJob.from_sdk(job)

    def _create_embeddings(self, model: str, source: types.EmbeddingsBatchJobSource, display_name: str) -> RemoteJob:
        job = self._single_shot_client.batches.create_embeddings(
            model=model, src=source, config=types.CreateEmbeddingsBatchJobConfig(display_name=display_name)
        )
        return RemoteJob.from_sdk(job)

    # -- reconcile and poll ------------------------------------------------------------------------

    @_counted("batches.delete")
    def delete_batch(self, name: str) -> bool:
        """Delete a batch that has ended (its results were taken); False when it was already gone."""
        try:
            self._retrying_client.batches.delete(name=_checked_batch_name(name))
        except errors.APIError as error:
            if is_gone(error):
                return False
            raise
        return True

    @_counted("batches.get")
    def get(self, name: str, *, once: bool = False) -> RemoteJob:
        """``batches.get``; ``once``: a single attempt (a poll's: see the module)."""
        if once:
            return RemoteJob.from_operation(_raw_json(self._single_shot_client, "get", _checked_batch_name(name),
                                                      http_options=_ASKED_ONCE))
        return RemoteJob.from_operation(_raw_json(self._retrying_client, "get", _checked_batch_name(name),
                                                  http_options=self._get_options))

    def list_jobs(self, page_size: int = 100) -> Iterator[RemoteJob]:
        """All jobs of the project, page after page, each page asked once (see the module).
        On the real service inline output is left out."""
        page_token = ""
        seen_tokens: set[str] = set()
        while True:
            query: dict[str, Any] = {"pageSize": page_size}
            if page_token:
                query["pageToken"] = page_token
            REMOTE_CALLS.count("batches.list")
            try:
                page = _raw_json(self._single_shot_client, "get", f"batches?{urlencode(query)}", http_options=_ASKED_ONCE)
            except Exception as error:
                REMOTE_CALLS.failed("batches.list", error)
                raise
            for operation in page.get("operations") or ():
                yield RemoteJob.from_operation(operation)
            page_token = page.get("nextPageToken") or ""
            if not page_token:
                return
            if page_token in seen_tokens:  # a server bug must not become an endless loop at startup
                raise ProviderError(f"batches.list returned page token {page_token!r} twice")
            seen_tokens.add(page_token)

    def answers(self) -> None:
        """One page of one job (``batchd doctor``'s check), tried again as the retry policy says: a
        transient answer is no verdict. Raises what the last try raised."""
        _with_retries(lambda: next(self.list_jobs(page_size=1), None), self._retry, "batches.list")

    @_counted("batches.cancel")
    def cancel(self, name: str) -> None:
        """Ask the service to cancel (asynchronous: the job shows ``cancelled`` later), once: the loop retries
        with a backoff of its own."""
        self._single_shot_client.batches.cancel(name=_checked_batch_name(name),
                                                config=types.CancelBatchJobConfig(http_options=_ASKED_ONCE))

    # -- models ------------------------------------------------------------------------------------

    @_counted("models.list")
    def list_models(self, max_pages: int = 20) -> list[str]:
        """The ids of the models the service lists (``models.list``, base models), without ``models/``.

        Sent once, without retries: the caller checks models from this list at its own pace and
        lets a job through when the service cannot say (a 429 must not hold the loop for retries).
        """
        pager = self._single_shot_client.models.list(config=types.ListModelsConfig(page_size=1000, query_base=True,
                                                                                   http_options=_ASKED_ONCE))
        names: list[str] = []
        for _ in range(max_pages):
            names += [model.name.removeprefix("models/") for model in pager.page if model.name]
            if not pager.config.get("page_token"):
                break
            pager.next_page()
        return names

    @_counted("models.get")
    def model_exists(self, model: str) -> bool:
        """Whether ``models.get`` knows ``model`` (the service lists only some of the ids it takes)."""
        try:
            self._single_shot_client.models.get(model=model, config=types.GetModelConfig(http_options=_ASKED_ONCE))
        except errors.APIError as error:
            if error.code == 404:
                return False
            raise
        return True

    @_counted("models.count_tokens")
    def count_tokens(self, model: str, text: str | list[str]) -> int:
        """Tokens of one prompt, or of several counted in one call (each a user turn)."""
        texts = [text] if isinstance(text, str) else text
        contents = [types.Content(role="user", parts=[types.Part(text=item)]) for item in texts]
        response = self._retrying_client.models.count_tokens(model=model, contents=contents)
        return response.total_tokens or 0

    # -- fetch -------------------------------------------------------------------------------------

    @_counted("files.download")
    def download(self, file_name: str, destination: Path) -> Path:
        """Download a generated file to ``destination``, atomically and without holding it in memory."""
        destination = Path(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        _with_retries(lambda: self._download_once(file_name, destination), self._retry, f"download of {file_name}")
        return destination

    def _download_once(self, file_name: str, destination: Path) -> None:
        # google-genai 3.3.0 streams into a writable object in 1 MiB chunks when given a destination.
        # Writing a temp file beside the target and renaming it means a reader (or a crash) never sees a
        # partial file; fsyncs make the rename durable before the caller records the download as done.
        # Step "results" (batchd.fs): a full disk fails the download (retried by the daemon once there is
        # room, the remote job untouched); a failed fsync ends the process.
        with fs.naming(destination):
            fd, temp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
        try:
            with fs.naming(destination), os.fdopen(fd, "wb") as temp_file:
                self._single_shot_client.files.download(file=file_name, destination=temp_file)
                temp_file.flush()
                fs.fsync(temp_file.fileno(), destination, "results")
            os.replace(temp_name, destination)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise
        fsync_dir(destination.parent, step="results")
