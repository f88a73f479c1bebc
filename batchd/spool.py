"""A job's spool: its working folder in the state dir, from built requests to joined results.

Layout of ``state_dir/jobs/<job id>/``::

    <NAME>.toml | <NAME>.json      the claimed manifest
    inputs/                        copies of the input files it names
    index.jsonl                    one line per request, in request order: [key, chunk, wants_json, input]
                                   (a fifth element: for a request never sent, its error, an object (a
                                   file it cannot send); with the request cache on, the request's hash,
                                   a string, by which its answer is stored; chunk -1: answered from the cache;
                                   read through unsent_error() and cache_digest())
    media/<sha256>                 copies of the files its requests upload (see batchd.media)
    cached.jsonl                   the answers taken from the request cache while it was built, in request
                                   order ({"n", "key", "response"}), and {"upto": n} marks (see batchd.cache_split)
    requests-0000.jsonl            the wire requests of chunk 0, as uploaded ({"key", "request"} lines)
                                   (a small job's index and requests are kept in the journal instead,
                                   ``small_builds``: see :class:`SmallBuild`)
    results-0000.jsonl             chunk 0's results as the service returned them ({"key", "response"|"error"});
                                   a pack member's share of its pack's are kept in the journal instead
                                   (``member_results``: see batchd.daemon.pack)
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
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from batchd import fs, jsonfast
from batchd.cache import CacheHit
from batchd.durable import atomic_write, fsync_dir
from batchd.journal.rows import SmallBuild
from batchd.task import TaskRequest, TaskResult

if TYPE_CHECKING:
    from batchd.cache_split import CacheSplit

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
    #: Content hash → (MIME type, size) of the files its requests reference as uploads.
    media: dict = field(default_factory=dict)
    #: A small job's one chunk, built in memory: its requests and index lines, for the journal (no file).
    small: SmallBuild | None = None


#: A job whose index and requests come to at most this many bytes is built in memory, as one inline
#: chunk, and kept in the journal (:class:`SmallBuild`); a larger one is written into its spool's files.
SMALL_BUILD_BYTES = 64 * 1024


#: Paths a :class:`JobSpool` keeps made (its files' names), at most.
PATHS_KEPT = 16


class JobSpool:
    """Paths and streaming readers/writers of one job's working folder."""

    def __init__(self, root: Path):
        self.root = root
        # A job's steps ask for the same few paths a dozen times (a pathlib join is no cheap thing).
        self._paths: dict[str, Path] = {}

    @cached_property
    def index_path(self) -> Path:
        return self.root / "index.jsonl"

    @cached_property
    def inputs(self) -> Path:
        """Copies of the input files the manifest names."""
        return self.root / "inputs"

    @cached_property
    def staging(self) -> Path:
        return self.root / "outbox"

    @cached_property
    def cached_path(self) -> Path:
        """The answers this job took from the request cache (:class:`batchd.cache_split.CacheSplit`)."""
        return self.root / "cached.jsonl"

    def requests_path(self, idx: int) -> Path:
        return self._path(f"requests-{idx:04d}.jsonl")

    def results_path(self, idx: int) -> Path:
        return self._path(f"results-{idx:04d}.jsonl")

    def manifest_path(self, source: str) -> Path:
        return self._path(source)

    def _path(self, name: str) -> Path:
        path = self._paths.get(name)
        if path is None:
            if len(self._paths) >= PATHS_KEPT:  # a job of thousands of chunks: made afresh
                self._paths.clear()
            path = self._paths[name] = self.root / name
        return path

    @cached_property
    def warnings_path(self) -> Path:
        return self.root / "warnings.json"

    def write_warnings(self, warnings: list[str], *, step: str | None = None) -> None:
        """What the task said about the job while its requests were built (none: no file)."""
        if warnings:
            atomic_write(self.warnings_path, json.dumps(warnings, ensure_ascii=False), step=step)
        else:
            self.warnings_path.unlink(missing_ok=True)

    def read_warnings(self) -> list[str]:
        try:
            warnings = json.loads(self.warnings_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        return [str(warning) for warning in warnings] if isinstance(warnings, list) else []

    def removed_error(self, error: OSError) -> dict:
        """The error of a job whose spool folder was removed while it ran, not by batchd: it cannot be finished
        (``Fetch.collect``, ``Deliver._spool_removed``)."""
        return {"code": "spool_removed",
                "message": f"its folder {self.root} was removed while it ran, not by batchd ({error.strerror or error}): "
                           f"what the job kept there went with it (the manifest it claimed, and unless the job was "
                           f"small its requests and what joins each result to its input); drop the manifest again "
                           f"to run it anew (keep state_dir away from cleaners of old files, such as /tmp's)"}

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- build ----------------------------------------------------------------------------------

    def build(self, requests: Iterable[TaskRequest], encode: Callable[[TaskRequest], str],
              limits: ChunkLimits, *, check_stop: Callable[[], None] = lambda: None,
              cache: CacheSplit | None = None) -> Iterator[BuiltChunk]:
        """Write the job's requests into chunk files split by count and bytes, plus the index.

        Yields each chunk as soon as its file is complete and durable, so it can be submitted
        while the next one is built.  ``encode`` turns a request into one JSONL line
        (``{"key", "request"}``, without the newline).  A rebuild after a crash writes the same
        chunks again (the requests of a manifest are deterministic); each chunk file is replaced
        atomically, so a reader of the earlier copy is never disturbed.

        Closed after a chunk it yielded (a cancel stops the build there), it leaves the index
        durable and holding exactly the requests of the chunks yielded so far.

        With ``cache``, ``requests`` is ``cache.tag(...)``'s stream: a :class:`CacheHit` gets an index
        entry of chunk -1 and no request line; each chunk boundary is made final in the cache's file
        before the chunk is yielded.
        """
        dumps = json.JSONEncoder(ensure_ascii=False).encode  # one encoder, not one per line
        if cache is None and SMALL_BUILD_BYTES:
            small, requests = _built_small(requests, encode, limits, dumps)
            if small is not None:
                yield small
                return
        try:
            yield from self._build(requests, encode, limits, check_stop, dumps, cache)
        except OSError:
            # A full disk (the build is retried from the start) leaves no partial chunk behind.
            for partial in self.root.glob(".requests-*.jsonl.part"):
                partial.unlink(missing_ok=True)
            raise

    def _build(self, requests, encode, limits: ChunkLimits, check_stop, dumps,
               cache: CacheSplit | None = None) -> Iterator[BuiltChunk]:
        current: BuiltChunk | None = None
        out = None
        with fs.naming(self.root), open(self.index_path, "w", encoding="utf-8", buffering=IO_BUFFER) as index:
            for n, request in enumerate(requests):
                digest = None
                if cache is not None:
                    if type(request) is CacheHit:
                        index.write(dumps([request.key, CACHED_CHUNK, request.wants_json, request.input]) + "\n")
                        if n % 10_000 == 0:
                            check_stop()
                        continue
                    request, line, digest = request.request, request.line + "\n", request.digest
                if request.error is not None:
                    # Never sent (a file it cannot send): its result is the error, in request order. It
                    # belongs to the chunk being written, or to the first one when none is yet.
                    index.write(dumps([request.key, current.idx if current else 0, False, request.input,
                                       request.error]) + "\n")
                    continue
                if cache is None:
                    line = encode(request) + "\n"
                size = utf8_size(line)
                if current is None or current.request_count >= limits.max_requests or (
                    current.request_count and current.byte_size + size > limits.max_bytes
                ):
                    if current is not None:
                        if cache is not None:
                            cache.boundary(n)  # every decision before this request is final
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
                for ref in request.files:
                    if ref.inline_data is None:
                        current.media[ref.sha256] = (ref.mime_type, ref.size)
                current.request_count += 1
                current.byte_size += size
                entry = index_entry(request, current.idx)
                if digest is not None:
                    entry.append(digest)
                index.write(dumps(entry) + "\n")
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

    def write_requests(self, idx: int, lines: Iterable[str]) -> tuple[int, int]:
        """Write a requests file whole and durably (a pack's: batchd/daemon/pack.py); its lines and bytes."""
        text = "".join(lines)
        atomic_write(self.requests_path(idx), text, step="requests")
        return text.count("\n"), utf8_size(text)

    def read_requests(self, idx: int, small: SmallBuild | None = None) -> Iterator[dict]:
        for line in self.request_lines(idx, small):
            yield json.loads(line)

    def request_lines(self, idx: int, small: SmallBuild | None = None) -> Iterator[str]:
        """The lines of chunk ``idx``'s requests, as text (an inline create sends them so): from the job's
        ``small`` build (the journal's), else from its requests file."""
        if small is not None:
            yield from json_lines(small.requests)
            return
        with open(self.requests_path(idx), encoding="utf-8", buffering=IO_BUFFER) as lines:
            yield from lines

    def first_unsent_error(self) -> dict | None:
        """The error of the first request never sent (a file it cannot send), if any."""
        try:
            for entry in self.read_index():
                error = unsent_error(entry)
                if error is not None:
                    return error
        except FileNotFoundError:
            pass
        return None

    def read_index(self, small: SmallBuild | None = None) -> Iterator[list]:
        """Index entries ``[key, chunk, wants_json, input]``, in request order (from the job's ``small``
        build, else from its index file)."""
        if small is not None:
            for line in json_lines(small.index):
                yield json.loads(line)
            return
        with open(self.index_path, encoding="utf-8", buffering=IO_BUFFER) as lines:
            for line in lines:
                yield json.loads(line)

    # -- results --------------------------------------------------------------------------------

    def write_inline_results(self, idx: int, records: Iterable[dict], small: SmallBuild | None = None) -> None:
        """Store inline results as the same JSONL a file job returns (written atomically).

        A record whose ``metadata.key`` the service dropped (key None) is matched to a request
        whose key no other record carries, in request order, and marked ``joined_by: position``:
        right when the service keeps input order (it usually does), a guess when it also shuffles
        (python-genai#1909), so the outbox says which results were matched that way (and the job is
        ``partial``). The one answer without a key for the one request left is no guess, and is not
        marked. File results always carry their key.
        """
        records = list(records)
        keyless = sum(1 for record in records if record.get("key") is None)
        if keyless:
            returned = {record.get("key") for record in records}
            unclaimed = [line["key"] for line in self.read_requests(idx, small) if line["key"] not in returned]
            # One answer without its key for one request without an answer: the match is certain, not a guess.
            certain = keyless == 1 and len(unclaimed) == 1
            records = list(_claim_by_position(records, iter(unclaimed), certain))
        self.write_results(idx, records)

    def write_results(self, idx: int, records: Iterable[dict]) -> None:
        """Store a chunk's result records (written atomically)."""
        atomic_write(self.results_path(idx), results_lines(records), step="results")

    def read_results(self, idx: int, share: str | None = None) -> Iterator[dict]:
        """A chunk's result records: those of ``share`` (a pack member's share of its pack's results, kept in
        the journal), else of its results file."""
        if share is not None:
            yield from _result_records(json_lines(share))
            return
        path = self.results_path(idx)
        if not path.exists():
            return
        with open(path, encoding="utf-8", buffering=IO_BUFFER) as lines:
            yield from _result_records(lines)

    def read_cached(self) -> Iterator[dict]:
        """The answers taken from the request cache, ``{"n", "key", "response"}``, in request order."""
        path = self.cached_path
        if not path.exists():
            return
        with open(path, encoding="utf-8", buffering=IO_BUFFER) as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return  # a torn last line: past the last final mark, never in the index
                if "key" in record:
                    yield record

    def joined(self, chunk_error: Callable[[int], dict | None], kind: str = "generate", *,
               keep: Callable[[str, dict], None] | None = None,
               share_of: Callable[[int], str | None] = lambda idx: None,
               small: SmallBuild | None = None) -> Iterator[TaskResult]:
        """Every request's result, in request order, joined by key; ``kind`` "embed" reads
        EmbedContentResponses (:func:`to_embed_result`).

        ``chunk_error(idx)`` is asked once per chunk, in order, before its results are read:
        it returns the error each request of a chunk that produced no results gets (failed,
        expired, cancelled before running, rejected at create), else None.  It may block
        until the chunk is back, so results are joined while later chunks still run.

        Requests answered from the request cache (chunk -1) are read from ``cached.jsonl`` and
        marked ``cached``. ``keep(hash, response)`` is called for every successful answer the
        service gave to a request whose index entry carries a hash (the cache is on for the job),
        except one joined by position: that is what enters the request cache.

        ``share_of(idx)``: a chunk's results kept in the journal rather than in a file (a pack member's share
        of its pack's results), asked once its ``chunk_error`` returned None; None reads its results file.
        ``small``: the job's build as the journal keeps it, when it was small (None: its index file).
        """
        cached = self.read_cached()
        for idx, entries in itertools.groupby(self.read_index(small), key=lambda entry: entry[1]):
            if idx == CACHED_CHUNK:
                for (key, _chunk, wants_json, inputs, *_), record in join_chunk(entries, cached):
                    result = to_embed_result(key, inputs, record) if kind == "embed" else \
                        to_task_result(key, inputs, wants_json, record)
                    result.cached = True
                    yield result
                continue
            error = chunk_error(idx)
            if error is not None:
                for entry in entries:
                    key, _chunk, _json, inputs = entry[:4]
                    yield TaskResult(key=key, input=inputs, status="error", text=None, data=None,
                                     error=unsent_error(entry) or error, usage=None)
                continue
            for entry, record in join_chunk(entries, self.read_results(idx, share_of(idx))):
                key, _chunk, wants_json, inputs = entry[:4]
                never_sent = unsent_error(entry)
                if never_sent is not None:
                    yield TaskResult(key=key, input=inputs, status="error", error=never_sent)
                    continue
                result = to_embed_result(key, inputs, record) if kind == "embed" else \
                    to_task_result(key, inputs, wants_json, record)
                digest = cache_digest(entry)
                if record is not None and "joined_by" in record:
                    result.joined_by = record["joined_by"]
                elif keep is not None and digest is not None and result.status == "ok":
                    keep(digest, record["response"])
                yield result


def utf8_size(text: str) -> int:
    """The bytes ``text`` takes in UTF-8 (without encoding it when it is ASCII, as most lines are)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def index_entry(request: TaskRequest, chunk_idx: int) -> list:
    """A sent request's index entry: ``[key, chunk, wants_json, input]``."""
    return [request.key, chunk_idx, request.config.get("response_mime_type") == "application/json", request.input]


def _built_small(requests: Iterable[TaskRequest], encode: Callable[[TaskRequest], str], limits: ChunkLimits,
                 dumps: Callable[[Any], str]) -> tuple[BuiltChunk | None, Iterable[TaskRequest]]:
    """The job built in memory, as one inline chunk with its :class:`SmallBuild`, when it turns out small:
    its index and request lines within :data:`SMALL_BUILD_BYTES`, every request sendable, none uploading a
    file. Else None and the requests to build into files, those read so far first (at most a small job's
    worth: they are encoded again there)."""
    requests = iter(requests)
    taken: list[TaskRequest] = []
    request_lines: list[str] = []
    index_lines: list[str] = []
    room = SMALL_BUILD_BYTES
    most_requests = min(limits.inline_max_requests, limits.max_requests)
    most_bytes = min(limits.inline_max_bytes, limits.max_bytes)
    size = 0
    for request in requests:
        taken.append(request)
        if request.error is not None or len(taken) > most_requests or any(
                ref.inline_data is None for ref in request.files):
            return None, itertools.chain(taken, requests)
        line = encode(request) + "\n"
        entry = dumps(index_entry(request, 0)) + "\n"
        line_size = utf8_size(line)
        size += line_size
        room -= line_size + utf8_size(entry)
        if room < 0 or size > most_bytes:
            return None, itertools.chain(taken, requests)
        request_lines.append(line)
        index_lines.append(entry)
    if not taken:
        return None, ()
    return BuiltChunk(idx=0, request_count=len(taken), byte_size=size, mode="inline", last=True,
                      small=SmallBuild("".join(request_lines), "".join(index_lines))), ()


#: The chunk of an index entry answered from the request cache.
CACHED_CHUNK = -1


def results_lines(records: Iterable[dict]) -> str:
    """Result records as a results file has them: one JSON object a line."""
    return "".join(jsonfast.dumps(record) + "\n" for record in records)


def json_lines(text: str) -> Iterator[str]:
    """The lines of JSON-lines ``text`` (kept in the journal rather than in a file), each with its newline, as
    reading its file gives them. Split at newlines only: ``str.splitlines`` also splits at U+2028, U+0085 and
    others, which JSON written with ``ensure_ascii=False`` (a prompt, an answer) carries as they are."""
    lines = text.split("\n")
    last = lines.pop()
    for line in lines:
        yield line + "\n"
    if last:
        yield last


def _result_records(lines: Iterable[str]) -> Iterator[dict]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield jsonfast.loads(line)
        except json.JSONDecodeError as exc:
            # A torn or garbled line must not sink the whole job: its request shows as an error.
            yield {"key": None, "error": {"code": "bad_result_line", "message": f"results line {number}: {exc}"}}


def _claim_by_position(records: list[dict], unclaimed: Iterator[Any], certain: bool) -> Iterator[dict]:
    """``records``, each without a key given the next request nobody answered (see
    :meth:`JobSpool.write_inline_results`)."""
    for record in records:
        if record.get("key") is None:
            record = {**record, "key": next(unclaimed, None)}
            if not certain:
                record["joined_by"] = "position"
        yield record


def unsent_error(entry: list) -> dict | None:
    """An index entry's error, for a request never sent (its fifth element, an object), else None."""
    return entry[4] if len(entry) > 4 and isinstance(entry[4], dict) else None


def cache_digest(entry: list) -> str | None:
    """An index entry's request hash, with the request cache on (its fifth element, a string), else None."""
    return entry[4] if len(entry) > 4 and isinstance(entry[4], str) else None


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
        if unsent_error(entry) is not None:  # a request never sent has no record
            yield entry, None
            continue
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
