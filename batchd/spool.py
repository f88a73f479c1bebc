"""A job's spool: its working folder in the state dir, from built requests to joined results.

Layout of ``state_dir/jobs/<job id>/``::

    <NAME>.toml | <NAME>.json      the claimed manifest
    inputs/                        copies of the input files it names
    index.jsonl                    one line per request, in request order: [key, chunk, wants_json, input]
    requests-0000.jsonl            the wire requests of chunk 0, as uploaded ({"key", "request"} lines)
    results-0000.jsonl             chunk 0's results as the service returned them ({"key", "response"|"error"})
    outbox/                        the job's outbox folder while it is being written

Everything here is streamed line by line, so memory stays flat however many
requests a job has; the only thing that grows is bounded by one chunk (see
:func:`join_chunk`).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from batchd import fs
from batchd.durable import atomic_write, fsync_dir
from batchd.task import TaskRequest, TaskResult

#: Buffer size of the spool's files: a few large reads and writes instead of thousands of 8 KiB
#: ones, each of which lets another busy thread take the GIL for up to a switch interval.
IO_BUFFER = 1 << 20


@dataclass(frozen=True)
class ChunkLimits:
    max_requests: int
    max_bytes: int
    inline_max_requests: int
    inline_max_bytes: int


@dataclass
class BuiltChunk:
    idx: int
    request_count: int = 0
    byte_size: int = 0
    mode: str = "file"
    #: Whether it is the job's last chunk (no request follows it).
    last: bool = False


class JobSpool:
    """Paths and streaming readers/writers of one job's working folder."""

    def __init__(self, root: Path):
        self.root = root

    @property
    def index_path(self) -> Path:
        return self.root / "index.jsonl"

    @property
    def inputs(self) -> Path:
        """Copies of the input files the manifest names."""
        return self.root / "inputs"

    @property
    def staging(self) -> Path:
        return self.root / "outbox"

    def requests_path(self, idx: int) -> Path:
        return self.root / f"requests-{idx:04d}.jsonl"

    def results_path(self, idx: int) -> Path:
        return self.root / f"results-{idx:04d}.jsonl"

    def manifest_path(self, source: str) -> Path:
        return self.root / source

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- build ----------------------------------------------------------------------------------

    def build(self, requests: Iterable[TaskRequest], encode: Callable[[TaskRequest], str],
              limits: ChunkLimits, *, check_stop: Callable[[], None] = lambda: None) -> Iterator[BuiltChunk]:
        """Write the job's requests into chunk files split by count and bytes, plus the index.

        Yields each chunk as soon as its file is complete and durable, so it can be submitted
        while the next one is built.  ``encode`` turns a request into one JSONL line
        (``{"key", "request"}``, without the newline).  A rebuild after a crash writes the same
        chunks again (the requests of a manifest are deterministic); each chunk file is replaced
        atomically, so a reader of the earlier copy is never disturbed.

        Closed after a chunk it yielded (a cancel stops the build there), it leaves the index
        durable and holding exactly the requests of the chunks yielded so far.
        """
        dumps = json.JSONEncoder(ensure_ascii=False).encode  # one encoder, not one per line
        try:
            yield from self._build(requests, encode, limits, check_stop, dumps)
        except OSError:
            # A full disk (the build is retried from the start) leaves no partial chunk behind.
            for partial in self.root.glob(".requests-*.jsonl.part"):
                partial.unlink(missing_ok=True)
            raise

    def _build(self, requests, encode, limits: ChunkLimits, check_stop, dumps) -> Iterator[BuiltChunk]:
        current: BuiltChunk | None = None
        out = None
        with fs.naming(self.root), open(self.index_path, "w", encoding="utf-8", buffering=IO_BUFFER) as index:
            for n, request in enumerate(requests):
                line = encode(request) + "\n"
                size = len(line.encode("utf-8")) if not line.isascii() else len(line)
                if current is None or current.request_count >= limits.max_requests or (
                    current.request_count and current.byte_size + size > limits.max_bytes
                ):
                    if current is not None:
                        try:
                            yield self._finish_chunk(current, out, limits)
                        except GeneratorExit:
                            # The next request is not in the index yet: it ends with this chunk.
                            index.flush()
                            fs.fsync(index.fileno(), self.index_path, "requests")
                            raise
                    current = BuiltChunk(idx=current.idx + 1 if current else 0)
                    out = open(self._partial(current.idx), "w", encoding="utf-8", buffering=IO_BUFFER)
                out.write(line)
                current.request_count += 1
                current.byte_size += size
                wants_json = request.config.get("response_mime_type") == "application/json"
                index.write(dumps([request.key, current.idx, wants_json, request.input]) + "\n")
                if n % 10_000 == 0:
                    check_stop()
            index.flush()
            fs.fsync(index.fileno(), self.index_path, "requests")
        if current is not None:
            current.last = True
            yield self._finish_chunk(current, out, limits)

    def _partial(self, idx: int) -> Path:
        path = self.requests_path(idx)
        return path.with_name(f".{path.name}.part")

    def _finish_chunk(self, chunk: BuiltChunk, out, limits: ChunkLimits) -> BuiltChunk:
        with fs.naming(self._partial(chunk.idx)), out:
            out.flush()
            fs.fsync(out.fileno(), self._partial(chunk.idx), "requests")
        os.replace(self._partial(chunk.idx), self.requests_path(chunk.idx))
        fsync_dir(self.root, step="requests")
        if chunk.request_count <= limits.inline_max_requests and chunk.byte_size <= limits.inline_max_bytes:
            chunk.mode = "inline"
        return chunk

    def read_requests(self, idx: int) -> Iterator[dict]:
        with open(self.requests_path(idx), encoding="utf-8", buffering=IO_BUFFER) as lines:
            for line in lines:
                yield json.loads(line)

    def read_index(self) -> Iterator[list]:
        """Index entries ``[key, chunk, wants_json, input]``, in request order."""
        with open(self.index_path, encoding="utf-8", buffering=IO_BUFFER) as lines:
            for line in lines:
                yield json.loads(line)

    # -- results --------------------------------------------------------------------------------

    def write_inline_results(self, idx: int, records: Iterable[dict]) -> None:
        """Store inline results as the same JSONL a file job returns (written atomically).

        A record whose ``metadata.key`` the service dropped (key None) is matched to a request
        whose key no other record carries, in request order, and marked ``joined_by: position``:
        right when the service keeps input order (it usually does), a guess when it also shuffles
        (python-genai#1909), so the outbox says which results were matched that way (and the job is
        ``partial``). The one answer without a key for the one request left is no guess, and is not
        marked. File results always carry their key.
        """
        keys = [line["key"] for line in self.read_requests(idx)]  # an inline chunk is small
        records = list(records)
        returned = {record.get("key") for record in records}
        unclaimed = [key for key in keys if key not in returned]
        keyless = sum(1 for record in records if record.get("key") is None)
        # One answer without its key for one request without an answer: the match is certain, not a guess.
        certain = keyless == 1 and len(unclaimed) == 1
        unclaimed = iter(unclaimed)
        lines = []
        for record in records:
            if record.get("key") is None:
                record = {**record, "key": next(unclaimed, None)}
                if not certain:
                    record["joined_by"] = "position"
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        atomic_write(self.results_path(idx), "".join(lines), step="results")

    def read_results(self, idx: int) -> Iterator[dict]:
        path = self.results_path(idx)
        if not path.exists():
            return
        with open(path, encoding="utf-8", buffering=IO_BUFFER) as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    # A torn or garbled line must not sink the whole job: its request shows as an error.
                    yield {"key": None, "error": {"code": "bad_result_line",
                                                  "message": f"results line {number}: {exc}"}}

    def joined(self, chunk_error: Callable[[int], dict | None], kind: str = "generate") -> Iterator[TaskResult]:
        """Every request's result, in request order, joined by key; ``kind`` "embed" reads
        EmbedContentResponses (:func:`to_embed_result`).

        ``chunk_error(idx)`` is asked once per chunk, in order, before its results are read:
        it returns the error each request of a chunk that produced no results gets (failed,
        expired, cancelled before running, rejected at create), else None.  It may block
        until the chunk is back, so results are joined while later chunks still run.
        """
        for idx, entries in itertools.groupby(self.read_index(), key=lambda entry: entry[1]):
            error = chunk_error(idx)
            if error is not None:
                for key, _chunk, _json, inputs in entries:
                    yield TaskResult(key=key, input=inputs, status="error", text=None, data=None,
                                     error=error, usage=None)
                continue
            for (key, _chunk, wants_json, inputs), record in join_chunk(entries, self.read_results(idx)):
                result = to_embed_result(key, inputs, record) if kind == "embed" else \
                    to_task_result(key, inputs, wants_json, record)
                if record is not None and "joined_by" in record:
                    result.joined_by = record["joined_by"]
                yield result


def join_chunk(entries: Iterable[list], records: Iterable[dict]) -> Iterator[tuple[list, dict | None]]:
    """Pair each index entry with its result record by key, in index order.

    Results usually come back in input order, so this walks both streams together and only
    parks records that arrive early; memory is bounded by how far out of order a chunk is,
    never by the job's size.
    """
    parked: dict[Any, dict] = {}
    records = iter(records)
    exhausted = False
    for entry in entries:
        key = entry[0]
        record = parked.pop(key, None)
        while record is None and not exhausted:
            candidate = next(records, None)
            if candidate is None:
                exhausted = True
            elif candidate.get("key") == key:
                record = candidate
            else:
                parked[candidate.get("key")] = candidate
        yield entry, record


def _failed_result(key: str, inputs: dict, record: dict | None) -> TaskResult | None:
    """The error result of a missing or failed record, else None."""
    if record is None:
        return TaskResult(key=key, input=inputs, status="error", text=None, data=None,
                          error={"code": "missing", "message": "the service returned no result for this request"},
                          usage=None)
    if "error" in record and record["error"]:
        error = record["error"]
        return TaskResult(key=key, input=inputs, status="error", text=None, data=None,
                          error={"code": error.get("code"), "message": error.get("message")}, usage=None)
    return None


def to_embed_result(key: str, inputs: dict, record: dict | None) -> TaskResult:
    """Turn one EmbedContentResponse line (``{"embedding": {"values": […]}, "tokenCount": "N"}``) into a result.

    Its ``usage`` is written as a generation's (``promptTokenCount``, ``totalTokenCount`` from
    ``tokenCount``), so token totals and the actual cost count embeddings as input tokens.
    """
    failed = _failed_result(key, inputs, record)
    if failed is not None:
        return failed
    response = record.get("response") or {}
    values = (response.get("embedding") or {}).get("values") if isinstance(response, dict) else None
    if not isinstance(values, list) or not values or not all(type(v) in (float, int) for v in values):
        return TaskResult(key=key, input=inputs, status="error",
                          error={"code": "no_embedding", "message": "the response holds no embedding values"})
    usage = None
    try:
        tokens = int(response["tokenCount"])  # int64, a string on the wire
    except (KeyError, TypeError, ValueError):
        pass
    else:
        usage = {"promptTokenCount": tokens, "totalTokenCount": tokens}
    return TaskResult(key=key, input=inputs, status="ok", embedding=values, usage=usage)


def to_task_result(key: str, inputs: dict, wants_json: bool, record: dict | None) -> TaskResult:
    """Turn one service result line into what the outbox and the task plugin see."""
    failed = _failed_result(key, inputs, record)
    if failed is not None:
        return failed
    response = record.get("response") or {}
    usage = response.get("usageMetadata")
    candidates = response.get("candidates") or []
    if not candidates:
        reason = (response.get("promptFeedback") or {}).get("blockReason", "no candidates")
        return TaskResult(key=key, input=inputs, status="error", text=None, data=None,
                          error={"code": "blocked", "message": f"no answer: {reason}"}, usage=usage)
    candidate = candidates[0]
    parts = (candidate.get("content") or {}).get("parts") or []
    text = "".join(part.get("text", "") for part in parts if not part.get("thought"))
    # Thought summaries (include_thoughts) are kept apart: the answer's text must parse as it is.
    thoughts = "".join(part.get("text", "") for part in parts if part.get("thought")) or None
    if not wants_json:
        return TaskResult(key=key, input=inputs, status="ok", text=text, data=None, error=None, usage=usage,
                          thoughts=thoughts)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        finish = candidate.get("finishReason", "")
        return TaskResult(key=key, input=inputs, status="error", text=text, data=None,
                          error={"code": "invalid_json",
                                 "message": f"structured output is not valid JSON ({exc.msg}; finishReason {finish})"},
                          usage=usage, thoughts=thoughts)
    return TaskResult(key=key, input=inputs, status="ok", text=text, data=data, error=None, usage=usage,
                      thoughts=thoughts)
