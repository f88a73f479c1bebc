"""Batch jobs: their lifecycle on the clock, their processing, and their Operation JSON.

A job record (``store.jobs[id]``) holds what was decided at create time and what happened since::

    id, kind ("generate" | "embed"), model ("models/..."), displayName?, createTime, jobSeconds,
    inputFile (file id, or None for inline), requestCount, faults (job fault specs),
    cancelTime?, completeTime?, succeeded, failed, error?

Processing starts at once, in a worker thread, and is recorded by ``completeTime``. What a client
*sees* is a function of the wall clock relative to ``createTime`` (see :func:`view_job`): PENDING for
the first quarter of ``jobSeconds``, then RUNNING with counts going up, then SUCCEEDED at
``max(createTime + jobSeconds, completeTime)``: never before the results exist. Because the view
is computed from stored times, a restarted emulator continues where the old one was.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable

from batchd.emulator import shapes
from batchd.emulator.answers import Answerer
from batchd.emulator.errors import ApiError, invalid, quota_exhausted
from batchd.emulator.faults import FAILED_REQUEST, JobFaults
from batchd.emulator.store import Doc, Store
from batchd.emulator.wire import has_snake_case_keys, int64_counts, rfc3339, to_camel_case
from batchd.jsonfast import dumps as encode
from batchd.jsonfast import loads as decode

log = logging.getLogger("batchd.emulator")

#: Share of ``jobSeconds`` a job spends PENDING before it shows RUNNING.
PENDING_SHARE = 0.25
#: File outputs of a ``shuffle`` job are shuffled within windows of this many lines (bounded memory).
SHUFFLE_WINDOW = 1024
#: How often (in requests) a worker publishes progress and checks for cancellation.
PROGRESS_EVERY = 256

_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main."
BATCH_TYPES = {"generate": _TYPE + "GenerateContentBatch", "embed": _TYPE + "EmbedContentBatch"}
OUTPUT_TYPES = {"generate": _TYPE + "GenerateContentBatchOutput", "embed": _TYPE + "EmbedContentBatchOutput"}

TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"})


def output_file_id(job_id: str) -> str:
    return f"batch-{job_id}"


@lru_cache(maxsize=1024)
def job_faults(specs: tuple[str, ...]) -> JobFaults:
    return JobFaults(specs)


# ------------------------------------------------------------------------------------------------
# The lifecycle, as seen at a moment


@dataclass(frozen=True)
class JobView:
    state: str  # without the BATCH_STATE_ prefix
    update_time: float
    end_time: float | None
    succeeded: int
    failed: int

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


def view_job(job: Doc, now: float, progress: tuple[int, int], expire_seconds: float) -> JobView:
    """The state a client sees at ``now``; ``progress`` is (done, failed) of a job still processing."""
    created = job["createTime"]
    running_from = created + job["jobSeconds"] * PENDING_SHARE
    due = created + job["jobSeconds"]
    expires = created + expire_seconds
    faults = job_faults(tuple(job["faults"]))

    if faults.stuck_pending:
        finish, final_state = None, None
    elif faults.job_failed or faults.job_expired:
        finish, final_state = due, "FAILED" if faults.job_failed else "EXPIRED"
    elif job.get("completeTime") is not None:
        finish, final_state = max(due, job["completeTime"]), "FAILED" if job.get("error") else "SUCCEEDED"
    else:
        finish, final_state = None, None

    # Cancel is asynchronous, as Google's: the job goes on until its cancelTime, and one that ends
    # before then ends as it would have (a client must expect SUCCEEDED after asking to cancel).
    cancelled = job.get("cancelTime")
    if cancelled is not None and now >= cancelled and (finish is None or finish > cancelled):
        return JobView("CANCELLED", cancelled, cancelled, job.get("succeeded", 0), job.get("failed", 0))
    if now >= expires and (finish is None or finish > expires):
        return JobView("EXPIRED", expires, expires, 0, 0)
    if finish is not None and now >= finish:
        if final_state == "SUCCEEDED":
            return JobView(final_state, finish, finish, job["succeeded"], job["failed"])
        return JobView(final_state, finish, finish, 0, 0)
    if now < running_from or faults.stuck_pending:
        return JobView("PENDING", created, None, 0, 0)

    # RUNNING: show at most what the clock allows and at most what the worker really did.
    total = job["requestCount"]
    done, failed = (total, job["failed"]) if job.get("completeTime") is not None else progress
    if due > running_from:
        shown = min(done, math.floor(total * (now - running_from) / (due - running_from)))
    else:
        shown = done
    shown_failed = failed * shown // done if done else 0
    return JobView("RUNNING", running_from, None, shown - shown_failed, shown_failed)


def render_operation(job: Doc, view: JobView, inline_responses: list | str | None) -> dict:
    """The google.longrunning Operation google-genai reads (it only looks at ``name`` and ``metadata``).
    ``inline_responses``: a finished inline job's, or a stand-in its caller replaces (app._SPLICED)."""
    name = f"batches/{job['id']}"
    total = job["requestCount"]
    pending = total - view.succeeded - view.failed if view.state in ("PENDING", "RUNNING", "CANCELLED") else 0
    metadata: dict = {"@type": BATCH_TYPES[job["kind"]], "model": job["model"]}
    if job.get("displayName") is not None:
        metadata["displayName"] = job["displayName"]
    if job.get("inputFile"):
        metadata["inputConfig"] = {"fileName": f"files/{job['inputFile']}"}
    output = None
    if view.state == "SUCCEEDED":
        if job.get("inputFile"):
            output = {"responsesFile": f"files/{output_file_id(job['id'])}"}
        elif inline_responses is not None:
            output = {"inlinedResponses": {"inlinedResponses": inline_responses}}
    if output is not None:
        metadata["output"] = output
    metadata["createTime"] = rfc3339(job["createTime"], nanoseconds=True)
    metadata["updateTime"] = rfc3339(view.update_time, nanoseconds=True)
    if view.end_time is not None:
        metadata["endTime"] = rfc3339(view.end_time, nanoseconds=True)
    metadata["batchStats"] = int64_counts(
        requestCount=total,
        successfulRequestCount=view.succeeded,
        failedRequestCount=view.failed,
        pendingRequestCount=pending,
    )
    metadata["state"] = f"BATCH_STATE_{view.state}"
    metadata["name"] = name

    operation: dict = {"name": name, "metadata": metadata}
    if view.terminal:
        operation["done"] = True
    if output is not None:
        operation["response"] = {"@type": OUTPUT_TYPES[job["kind"]], **output}
    elif view.state == "FAILED":
        operation["error"] = {"code": 13, "message": job.get("error") or "Emulated job failure (fault job-failed)."}
    elif view.state == "CANCELLED":
        operation["error"] = {"code": 1, "message": "The batch was cancelled."}
    elif view.state == "EXPIRED":
        operation["error"] = {"code": 4, "message": "The batch expired before it could complete."}
    return operation


def needs_processing(job: Doc) -> bool:
    return (job.get("completeTime") is None and job.get("cancelTime") is None
            and job_faults(tuple(job["faults"])).produces_results)


class ActiveJobs:
    """The batch jobs not yet ended, bounded as Google bounds them: the Gemini API runs at most
    100 "concurrent batch requests" per project (its rate-limits page), and a create beyond that is
    refused with 429 RESOURCE_EXHAUSTED before anything is stored.

    Ended jobs leave the set lazily, when it is full: a create costs O(1) until the limit is near,
    then at most one look at each job counted.
    """

    def __init__(self, limit: int, ended: Callable[[str], bool]) -> None:
        self.limit = limit  # 0: no limit
        self._ended = ended  # job id → it is in a final state, or gone
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Jobs counted: those not yet seen to end (none without a limit: nothing is kept then)."""
        return len(self._ids)

    def add_existing(self, job_ids: Iterable[str]) -> None:
        """Count the jobs a previous process accepted that have not ended (at start)."""
        if not self.limit:
            return
        with self._lock:
            self._ids.update(job_id for job_id in job_ids if not self._ended(job_id))

    def reserve(self, job_id: str) -> None:
        """Count ``job_id`` in, or raise the 429 Google answers when the limit is reached."""
        if not self.limit:
            return  # nothing to bound: keeping every id would grow with every job ever created
        with self._lock:
            if len(self._ids) >= self.limit:
                self._ids = {counted for counted in self._ids if not self._ended(counted)}
            if len(self._ids) >= self.limit:
                raise quota_exhausted("batch_concurrent_requests", "BatchConcurrentRequestsPerProject",
                                      str(self.limit))
            self._ids.add(job_id)

    def release(self, job_id: str) -> None:
        """A reserved job that was never stored (its create failed after :meth:`reserve`)."""
        with self._lock:
            self._ids.discard(job_id)


# ------------------------------------------------------------------------------------------------
# Processing


class _Abandoned(Exception):
    """The job was cancelled or deleted, or the emulator is stopping: drop the work."""


class BatchRunner:
    """Answers the requests of batch jobs in worker threads, never on the event loop."""

    def __init__(self, store: Store, answerer: Answerer, workers: int = 2) -> None:
        self.store = store
        self.answerer = answerer
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="emulator-batch")
        self._progress: dict[str, tuple[int, int]] = {}
        self._abandoned: set[str] = set()
        self._stopping = threading.Event()

    def resume(self) -> None:
        """Start the jobs a previous process accepted but did not finish (results are deterministic)."""
        for job in sorted(self.store.jobs.values(), key=lambda j: j["createTime"]):
            if needs_processing(job):
                self.submit(job)

    def submit(self, job: Doc) -> None:
        self._progress[job["id"]] = (0, 0)
        self._pool.submit(self._run, job)

    def progress(self, job_id: str) -> tuple[int, int]:
        return self._progress.get(job_id, (0, 0))

    def abandon(self, job_id: str) -> None:
        self._abandoned.add(job_id)

    def stop(self) -> None:
        self._stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- one job ----------------------------------------------------------------------------------

    def _run(self, job: Doc) -> None:
        job_id = job["id"]
        try:
            if job.get("inputFile"):
                succeeded, failed = self._run_file(job)
            else:
                succeeded, failed = self._run_inline(job)
            self.store.update_job(job_id, completeTime=time.time(), succeeded=succeeded, failed=failed)
        except _Abandoned:
            pass
        except Exception as error:  # a bug or a vanished input: the job fails, the emulator goes on
            log.exception("batch %s failed", job_id)
            self.store.update_job(job_id, completeTime=time.time(), succeeded=0, failed=0,
                                  error=f"Batch processing failed: {error}")
        finally:
            self._progress.pop(job_id, None)

    def _check(self, job_id: str, done: int, failed: int) -> None:
        self._progress[job_id] = (done, failed)
        if job_id in self._abandoned or self._stopping.is_set():
            raise _Abandoned
        cancelled = (self.store.jobs.get(job_id) or {}).get("cancelTime")
        if cancelled is not None and time.time() >= cancelled:
            raise _Abandoned  # its cancel took effect

    def _run_inline(self, job: Doc) -> tuple[int, int]:
        job_id, kind, model = job["id"], job["kind"], job["model"]
        faults = job_faults(tuple(job["faults"]))
        items = self.store.inline_input(job_id)
        responses = []
        failed = 0
        for index, item in enumerate(items):
            if index % PROGRESS_EVERY == 0:
                self._check(job_id, index, failed)
            entry: dict = {}
            try:
                if faults.request_fails(index):
                    raise FAILED_REQUEST
                entry["response"] = self.answerer.answer(kind, item.get("request"), model)
            except ApiError as error:
                entry["error"] = error.status_object()
                failed += 1
            metadata = item.get("metadata")
            if metadata is not None and not faults.drops_metadata(index):
                entry["metadata"] = metadata
            responses.append(entry)
        self._check(job_id, len(items), failed)
        self.store.save_inline_output(job_id, [responses[i] for i in faults.order(len(responses))])
        return len(items) - failed, failed

    def _run_file(self, job: Doc) -> tuple[int, int]:
        """Stream the input file line by line into the output file; memory stays flat in its size."""
        job_id = job["id"]
        file_id = output_file_id(job_id)
        source = self.store.blob(job["inputFile"])
        target = self.store.blob(file_id)
        partial = target.with_name(target.name + ".part")
        answer_line = _LineAnswerer(self.answerer, job["kind"], job["model"], job_faults(tuple(job["faults"])))
        shuffle = answer_line.faults.shuffle
        done = failed = 0
        window: list[bytes] = []
        # 1 MiB buffers both ways: each 8 KiB read would let the HTTP thread or another job take
        # the GIL for up to a switch interval.
        with open(source, "rb", buffering=1 << 20) as lines, open(partial, "wb", buffering=1 << 20) as out:
            for line_number, raw in enumerate(lines, 1):
                if not raw.strip():
                    continue
                if done % PROGRESS_EVERY == 0:
                    self._check(job_id, done, failed)
                encoded, ok = answer_line(raw, done, line_number)
                done += 1
                failed += not ok
                if shuffle:
                    window.append(encoded)
                    if len(window) == SHUFFLE_WINDOW:
                        out.writelines(window[i] for i in answer_line.faults.order(len(window)))
                        window.clear()
                else:
                    out.write(encoded)
            out.writelines(window[i] for i in answer_line.faults.order(len(window)))
            self._check(job_id, done, failed)
        os.replace(partial, target)
        self.store.save_file(generated_file_doc(file_id, target.stat().st_size, job))
        return done - failed, failed


#: The names a JSONL input line may have besides its request's (shapes.batch_request_line).
_LINE_KEYS = frozenset({"key", "request", "metadata"})



class _LineAnswerer:
    """Turns one input JSONL line into one output line ``{"key", "response" | "error"}``."""

    def __init__(self, answerer: Answerer, kind: str, model: str, faults: JobFaults) -> None:
        self.answer = answerer.embed if kind == "embed" else answerer.generate
        self.model = model
        self.faults = faults

    def __call__(self, raw: bytes, index: int, line_number: int) -> tuple[bytes, bool]:
        # A line is {"key": ..., "request": {...}} or a bare request; a bare line is keyed by its line number.
        key = str(line_number)
        try:
            try:
                item = decode(raw)
            except ValueError as error:
                raise invalid(f"Invalid JSON on line {line_number}: {error}") from None
            if not isinstance(item, dict):
                raise invalid(f"Line {line_number} is not a JSON object.")
            if has_snake_case_keys(raw):  # the fast path skips the walk for lines already in camelCase
                item = to_camel_case(item)
            if "request" in item:
                key = item.get("key", key)
                if not (item.keys() <= _LINE_KEYS and isinstance(key, str)):  # else nothing to check
                    shapes.check(item, shapes.batch_request_line())
                request, path = item["request"], "request"
            else:
                request, path = item, ""
            if self.faults.request_fails(index):
                raise FAILED_REQUEST
            line = {"key": key, "response": self.answer(request, self.model, path)}
            ok = True
        except ApiError as error:
            line = {"key": key, "error": error.status_object()}
            ok = False
        return (encode(line) + "\n").encode(), ok


def generated_file_doc(file_id: str, size: int, job: Doc) -> Doc:
    now = time.time()
    return {
        "id": file_id, "displayName": None, "mimeType": "application/jsonl", "sizeBytes": size,
        "createTime": now, "sha256": None, "source": "GENERATED", "job": job["id"],
    }


def write_inline_input(store: Store, job_id: str, items: list) -> None:
    """An inline job's requests are stored before the job record, so a stored job always has them."""
    store.save_inline_input(job_id, items)
