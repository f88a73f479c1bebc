"""What the service's answers mean to batchd: remote batch jobs and files as it reports them, their
states, and the result records of a finished job (a downloaded results file, or inline answers).

Parsed here from what google-genai returns (:mod:`batchd.provider` makes the calls), so that every step
reads one shape whatever the wire sent: a state batchd does not know is ``unknown``, a malformed counter
is 0, and a result line that cannot be read is an error record of its own instead of a stopped job.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from google.genai import types

#: Progress counters of ``metadata.batchStats``; int64 strings on the wire, zero-valued ones omitted.
STAT_FIELDS = ("requestCount", "successfulRequestCount", "failedRequestCount", "pendingRequestCount")

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "expired"})

# Wire states are BATCH_STATE_X; the SDK reports JOB_STATE_X. The Vertex-only states are mapped too so a
# future Gemini API that sends them is understood: CANCELLING may still end in SUCCEEDED or FAILED, and
# PARTIALLY_SUCCEEDED has results (missing ones show up as keys without a result).
_SHORT_STATES = {
    "QUEUED": "pending",
    "PENDING": "pending",
    "PAUSED": "pending",
    "RUNNING": "running",
    "UPDATING": "running",
    "CANCELLING": "running",
    "SUCCEEDED": "succeeded",
    "PARTIALLY_SUCCEEDED": "succeeded",
    "FAILED": "failed",
    "CANCELLED": "cancelled",
    "EXPIRED": "expired",
}

# google.rpc code for "unrecoverable data loss or corruption": a result line that cannot be read.
_DATA_LOSS = 15


# --------------------------------------------------------------------------------------------------
# Jobs and files


def short_state(raw_state: str | None) -> str:
    """``BATCH_STATE_RUNNING`` / ``JOB_STATE_RUNNING`` -> ``running``; anything unknown -> ``unknown``."""
    if not raw_state:
        return "unknown"
    return _SHORT_STATES.get(raw_state.removeprefix("BATCH_STATE_").removeprefix("JOB_STATE_"), "unknown")


def _count(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0  # a malformed counter must not stop polling; counts are for progress display only


def _timestamp(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(value)  # 3.11 accepts "Z" and nanosecond fractions (truncated)
    except (TypeError, ValueError):
        return None


@dataclass(slots=True)
class RemoteJob:
    """A batch job as the service reports it."""

    name: str  # "batches/…"
    display_name: str | None
    state: str  # pending | running | succeeded | failed | cancelled | expired | unknown
    raw_state: str | None  # as received, e.g. "BATCH_STATE_RUNNING"
    stats: dict[str, int]  # every STAT_FIELDS key, 0 when the service omitted it
    responses_file: str | None = None  # "files/batch-…" for file output
    inlined: list[dict[str, Any]] | None = None  # raw InlinedResponse dicts for inline output
    create_time: datetime | None = None
    model: str | None = None
    error: dict[str, Any] | None = None  # operation-level error of a failed job, if the service sent one

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_operation(cls, operation: Mapping[str, Any]) -> RemoteJob:
        """Parse the REST ``Operation`` that get and list return (the batch fields live in ``metadata``)."""
        metadata = operation.get("metadata") or {}
        output = metadata.get("output") or {}
        raw_stats = metadata.get("batchStats") or {}
        raw_state = metadata.get("state")
        return cls(
            name=operation.get("name") or metadata.get("name", ""),
            display_name=metadata.get("displayName"),
            state=short_state(raw_state),
            raw_state=raw_state,
            stats={field: _count(raw_stats.get(field, 0)) for field in STAT_FIELDS},
            responses_file=output.get("responsesFile"),
            # Embedding batches may answer under inlinedEmbedContentResponses (google-genai reads both).
            inlined=(output.get("inlinedResponses") or output.get("inlinedEmbedContentResponses")
                     or {}).get("inlinedResponses"),
            create_time=_timestamp(metadata.get("createTime")),
            model=metadata.get("model"),
            error=operation.get("error"),
        )

    @classmethod
    def from_sdk(cls, job: types.BatchJob) -> RemoteJob:
        """Convert the SDK's answer to create; it has no stats (a new job has nothing done yet)."""
        raw_state = job.state.value if job.state is not None else None
        return cls(
            name=job.name or "",
            display_name=job.display_name,
            state=short_state(raw_state),
            raw_state=raw_state,
            stats=dict.fromkeys(STAT_FIELDS, 0),
            responses_file=job.dest.file_name if job.dest else None,
            create_time=job.create_time,
            model=job.model,
        )


@dataclass(slots=True)
class RemoteFile:
    """A file of the Files API as the service reports it."""

    name: str  # "files/…"
    display_name: str | None
    size_bytes: int | None
    state: str | None  # ACTIVE | PROCESSING | FAILED, as sent
    source: str | None  # UPLOADED | GENERATED
    create_time: datetime | None = None
    uri: str | None = None  # what a request's fileData.fileUri names
    expiration_time: datetime | None = None

    @property
    def usable(self) -> bool:
        """Whether a batch can be created from it (a JSONL upload is ACTIVE once finalized)."""
        return self.state in (None, "ACTIVE")

    @classmethod
    def from_sdk(cls, file: types.File) -> RemoteFile:
        def enum_value(value: Any) -> str | None:
            return getattr(value, "value", value) if value is not None else None

        return cls(name=file.name or "", display_name=file.display_name, size_bytes=file.size_bytes,
                   state=enum_value(file.state), source=enum_value(file.source), create_time=file.create_time,
                   uri=file.uri, expiration_time=file.expiration_time)


@dataclass(frozen=True, slots=True)
class Uploaded:
    """An upload's answer: the file, and how many transfer attempts it took.

    More than one attempt means an earlier one may have reached the service after all (its answer
    was lost), leaving a copy under the same display name that nobody knows the name of.
    """

    name: str  # "files/…"
    attempts: int


# --------------------------------------------------------------------------------------------------
# Results


def _error_record(key: Any, message: str) -> dict[str, Any]:
    return {"key": key, "error": {"code": _DATA_LOSS, "status": "DATA_LOSS", "message": message}}


def _result_record(key: Any, result: Mapping[str, Any], where: str) -> dict[str, Any]:
    if "response" in result:
        return {"key": key, "response": result["response"]}
    if "error" in result:
        return {"key": key, "error": result["error"]}
    return _error_record(key, f"{where}: neither 'response' nor 'error'")


def read_results_file(path: Path) -> Iterator[dict[str, Any]]:
    """Stream the ``{"key", "response"|"error"}`` records of a downloaded results JSONL file.

    A line that is not a JSON object becomes an error record (key None) instead of stopping the job.
    """
    with open(path, "rb") as lines:  # bytes: invalid UTF-8 is then one bad line, not a crash
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                result = json.loads(line)
            except ValueError as exc:
                yield _error_record(None, f"{path.name} line {number}: not JSON ({exc})")
                continue
            if not isinstance(result, dict):
                yield _error_record(None, f"{path.name} line {number}: not a JSON object")
                continue
            yield _result_record(result.get("key"), result, f"{path.name} line {number}")


def inline_results(items: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    """Records of inline output; the key comes from ``metadata["key"]``, None when the service dropped it."""
    for number, item in enumerate(items, 1):
        key = (item.get("metadata") or {}).get("key")
        yield _result_record(key, item, f"inline result {number}")
