"""The writer of a job's folder, deliver's side in its pool: results.jsonl and organized.json (and an
embed job's embeddings) written into the job's staging folder as each chunk is back, then the
manifest, the inputs and summary.json added (:func:`finish_folder`).

It runs in a writer thread given the job's spool and :class:`ChunkGate`, never the journal: what it
wrote comes back to the loop as :class:`Written` (batchd.daemon.deliver).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from batchd import fs, outbox
from batchd.cache import CacheLimits, CacheStore
from batchd.daemon.context import Stopping
from batchd.journal import SmallBuild
from batchd.npy import NpyRowWriter
from batchd.plugin_calls import InThread, PluginClock, PluginTimeout
from batchd.spool import JobSpool
from batchd.task import TaskResult

log = logging.getLogger("batchd")


class ChunkGate:
    """Which chunks of a job have their results in the spool, told by the loop to the job's writer.

    The writer joins chunks in order and waits at each one until the loop opens it (with the
    error every request of the chunk gets when the chunk produced no results, else None, and a pack
    member's share of its pack's results, which the journal keeps: the writer has no journal), and
    from the start a small job's index, which the journal keeps too.
    Index entries of a chunk that was never recorded (a build that stopped part way) have
    nothing to wait for.
    """

    def __init__(self, recorded: Iterable[int], stopping: threading.Event, small: SmallBuild | None = None):
        #: The job's build as the journal keeps it when it was small (None: its spool's index file).
        self.small = small
        self._waiting = set(recorded)
        self._opened: dict[int, dict | None] = {}
        self._shares: dict[int, str] = {}
        self._changed = threading.Condition()
        self._stopping = stopping

    def open(self, idx: int, error: dict | None, share: str | None = None) -> None:
        with self._changed:
            if idx in self._waiting:
                self._waiting.discard(idx)
                self._opened[idx] = error
                if share is not None:
                    self._shares[idx] = share
                self._changed.notify_all()

    def share_of(self, idx: int) -> str | None:
        """The chunk's share of its pack's results, if it has one (kept with the gate: a writer whose task's
        ``organize`` failed joins every chunk again)."""
        with self._changed:
            return self._shares.get(idx)

    def waits_for(self, idx: int) -> bool:
        """Whether chunk ``idx`` is recorded and not opened yet."""
        with self._changed:
            return idx in self._waiting

    def pending(self) -> bool:
        """Whether some recorded chunk is not back yet."""
        with self._changed:
            return bool(self._waiting)

    def error_of(self, idx: int) -> dict | None:
        """The chunk's error once it is back (None: join its results), waiting until then."""
        with self._changed:
            while idx in self._waiting:
                if self._stopping.is_set():
                    raise Stopping()
                self._changed.wait(0.5)
            return self._opened.get(idx)


@dataclass(frozen=True)
class Written:
    """What a job's writer hands back: its staged folder and what went into it."""

    folder: outbox.JobFolder
    counts: dict
    tokens: dict
    usage: dict
    organize_error: dict | None
    #: The failed requests by error code: ``{code: {"count": n, "message": the first one's}}``.
    errors: dict
    #: The usage of the answers taken from the request cache (priced as the batch would have been).
    cache_usage: dict | None = None


def finish_folder(folder: outbox.JobFolder, manifest_name: str, manifest: Path | None, summary: dict,
                  inputs: list[tuple[str, Path]] = ()) -> None:
    """Add the manifest and the job's input files (linked from its spool: the spool goes once the job is
    done) and summary.json to a staged folder and make its entries durable, so it may be renamed into
    the outbox once its name is committed.

    The manifest is linked, not copied: the claim moved the dropped file itself into the spool (one
    name, checked), so the folder gets that file without a new one written and synced. Creating and
    removing files is most of what a small job costs the disk."""
    if manifest is not None:
        folder.link_in(manifest_name, manifest)
    for name, path in inputs:
        folder.link_in(name, path)
    folder.write_json("summary.json", summary)  # redacted by the caller: an error text may quote a secret
    folder.sync()


def write_results(spool: JobSpool, gate: ChunkGate, tasks: dict, clock: PluginClock, timeout: float,
                  stopping: threading.Event, kind: str = "generate", cache: CacheLimits | None = None,
                  model: str = "") -> Written:
    """results.jsonl and organized.json (and an embed job's embeddings) in a fresh staging folder.

    A task plugin whose ``organize`` raises (or hangs past ``plugin_timeout_seconds``) costs the job
    its organized.json, never its results: the files are written again with every result and an
    empty organized.json, and the summary says why.

    With ``cache``, the successful answers of a job whose cache is on (its index entries carry their
    request's hash) are stored in the request cache as they are joined, and the store is brought back
    within its bounds at the end. Storing is idempotent (a hash keeps its first answer), so a writer
    run again after a crash stores nothing twice; the job's own answers come from its spool, never
    from the store.
    """
    keeper = _Keeper(cache, kind, model) if cache is not None else None
    with contextlib.closing(keeper) if keeper is not None else contextlib.nullcontext():
        written = _write_results(spool, gate, tasks, clock, timeout, stopping, kind, keeper)
        if keeper is not None:
            keeper.finish()
    return written


class _Keeper:
    """Stores a writer's answers in the request cache; opened on the first answer to keep.

    The cache is best effort: a store that fails (locked past its timeout, a full disk, a damaged
    file) costs only the answers not kept, with a warning, never the job's delivery.
    """

    def __init__(self, limits: CacheLimits, kind: str, model: str):
        self.limits, self.kind, self.model = limits, kind, model
        self.store: CacheStore | None = None
        self.failed = False

    def __call__(self, digest: str, response: dict) -> None:
        if self.failed:
            return
        try:
            if self.store is None:
                self.store = CacheStore.writer(self.limits.path)
                if self.store is None:  # damaged, said once for every job
                    self.failed = True
                    return
            self.store.put(digest, self.kind, self.model, response)
        except sqlite3.Error as error:
            self._failure(error)

    def commit(self) -> None:
        """Commit what is pending (before the writer waits for a chunk: no transaction is held meanwhile)."""
        if self.store is not None and not self.failed:
            try:
                self.store.commit()
            except sqlite3.Error as error:
                self._failure(error)

    def finish(self) -> None:
        if self.store is None or self.failed:
            return
        try:
            removed = self.store.evict(self.limits.max_entries, self.limits.max_bytes)
        except sqlite3.Error as error:
            self._failure(error)
            return
        if removed:
            log.info("request cache: %d oldest answer(s) evicted to stay within cache_max_entries/cache_max_mb",
                     removed)

    def _failure(self, error: sqlite3.Error) -> None:
        self.failed = True
        if self.store is None or not self.store.damaged(error):
            log.warning("request cache %s: storing answers failed (%s: %s); this job's answers are not kept",
                        self.limits.path, type(error).__name__, error)
        self.close()

    def close(self) -> None:
        if self.store is not None:
            try:
                self.store.close()
            except sqlite3.Error:
                pass  # rolled back with the connection: those answers are not kept
            self.store = None


def _write_results(spool: JobSpool, gate: ChunkGate, tasks: dict, clock: PluginClock, timeout: float,
                   stopping: threading.Event, kind: str, keep: _Keeper | None) -> Written:
    job_id = spool.root.name
    organize_error = None
    error_of = gate.error_of
    if keep is not None:
        def error_of(idx: int) -> dict | None:
            keep.commit()  # a chunk may take hours to come back: no store transaction is held while waiting
            return gate.error_of(idx)
    try:
        folder = outbox.JobFolder(spool.staging)
        organize = tasks[clock.task].organize
        # In a thread of its own: a plugin that hangs in organize() holds neither this writer nor the exit.
        writing = InThread(
            lambda: write_result_files(folder, spool, error_of, organize, stopping, clock, kind, keep,
                                       gate.share_of, gate.small),
            name=f"batchd-organize-{job_id}")
        counts, tokens, usage, errors, cache_usage = writing.wait(clock, timeout, stopping.is_set, Stopping)
    except Stopping:
        raise
    except PluginTimeout as error:
        log.error("job %s: %s", job_id, error, extra={"job": job_id})
        organize_error = {"message": f"{error}; results.jsonl has every result"}
        folder = outbox.JobFolder(spool.staging)  # anew: the abandoned thread's files are left unlinked
        counts, tokens, usage, errors, cache_usage = write_result_files(
            folder, spool, error_of, _organize_nothing, stopping, kind=kind, keep=keep,
            share_of=gate.share_of, small=gate.small)
    except Exception as error:
        if fs.is_disk_full(error):
            raise  # not the task's fault: the folder is written again once there is room
        if isinstance(error, FileNotFoundError) and gate.small is None and not spool.index_path.exists():
            raise  # nor is a spool removed while the job ran: the job cannot be finished (Deliver._spool_removed)
        fs.unwritable_is_fatal("outbox", error)
        log.exception("job %s: task %r failed to organize its results", job_id, clock.task)
        organize_error = {"message": f"task {clock.task!r} failed to organize the results: "
                                     f"{type(error).__name__}: {error}; results.jsonl has every result"}
        folder = outbox.JobFolder(spool.staging)
        counts, tokens, usage, errors, cache_usage = write_result_files(
            folder, spool, error_of, _organize_nothing, stopping, kind=kind, keep=keep,
            share_of=gate.share_of, small=gate.small)
    return Written(folder, counts, tokens, usage, organize_error, errors, cache_usage)


def write_result_files(folder: outbox.JobFolder, spool: JobSpool, chunk_error: Callable[[int], dict | None],
                       organize, stopping: threading.Event,
                       clock: PluginClock | None = None, kind: str = "generate",
                       keep: Callable[[str, dict], None] | None = None,
                       share_of: Callable[[int], str | None] = lambda idx: None,
                       small: SmallBuild | None = None) -> tuple[dict, dict, dict, dict, dict]:
    """Stream every joined result into results.jsonl and through ``organize`` into organized.json.

    ``clock`` (for a task plugin's ``organize``) is stamped whenever control passes to it and back.
    An embed job's vectors go to embeddings.npy as they are joined (float32, one row per successful
    request, in request order) and each row's key to embeddings_index.jsonl; its results.jsonl lines
    carry ``embedding_row`` instead of the vector, so they stay small.

    Answers from the request cache are marked ``"cached": true`` in results.jsonl, counted in
    ``counts["cached"]``, and their usage is kept apart (they were not billed this time).
    ``keep(hash, response)`` is handed the answers that enter the request cache (:meth:`JobSpool.joined`).

    Returns the counts, the token totals of summary.json, the usage totals of ``account_cost``, the
    failed requests by error code (at most :data:`ERROR_CODES_KEPT` codes, the rest as "other") and
    the usage totals of the answers from the request cache.
    """
    counts = {"total": 0, "succeeded": 0, "failed": 0}
    tokens = {"prompt": 0, "output": 0, "thoughts": 0, "total": 0}
    extra = {"cached": 0, "with_usage": 0, "joined_by_position": 0}
    cache_tokens = {"prompt": 0, "output": 0, "thoughts": 0, "total": 0}
    cache_extra = {"cached": 0, "with_usage": 0, "hits": 0}
    errors: dict[str, dict] = {}
    dumps = json.JSONEncoder(ensure_ascii=False).encode  # one encoder, not one per line

    def results_written():
        for n, result in enumerate(spool.joined(chunk_error, kind, keep=keep, share_of=share_of, small=small)):
            if n % 10_000 == 0 and stopping.is_set():
                raise Stopping()
            if embeddings is not None:
                _add_embedding(result, embeddings, embeddings_index, dumps)
            counts["total"] += 1
            counts["succeeded" if result.status == "ok" else "failed"] += 1
            if result.cached:
                cache_extra["hits"] += 1
            if result.status != "ok":
                _tally_error(errors, result.error)
            if result.usage:
                usage = result.usage
                counted, more = (cache_tokens, cache_extra) if result.cached else (tokens, extra)
                counted["prompt"] += usage.get("promptTokenCount", 0)
                counted["output"] += usage.get("candidatesTokenCount", 0)
                counted["total"] += usage.get("totalTokenCount", 0)
                if "thoughtsTokenCount" in usage:
                    counted["thoughts"] += usage["thoughtsTokenCount"]
                if "cachedContentTokenCount" in usage:
                    more["cached"] += usage["cachedContentTokenCount"]
                more["with_usage"] += 1
            line = {"key": result.key, "input": result.input, "status": result.status, "text": result.text,
                    "data": result.data, "error": result.error, "usage": result.usage}
            if result.thoughts is not None:
                line["thoughts"] = result.thoughts
            if embeddings is not None:
                line["embedding_row"] = result.embedding_row
            if result.joined_by != "key":
                line["joined_by"] = result.joined_by
                extra["joined_by_position"] += 1
            if result.cached:
                line["cached"] = True
            lines.write(dumps(line) + "\n")
            yield result

    with contextlib.ExitStack() as files:
        lines = files.enter_context(folder.open("results.jsonl"))
        organized_file = files.enter_context(folder.open("organized.json"))
        embeddings = embeddings_index = None
        if kind == "embed":
            # Closed (its header given the final shape) before the file is fsynced, hence the order.
            npy_file = files.enter_context(folder.open("embeddings.npy", "wb"))
            embeddings = NpyRowWriter(npy_file)
            files.callback(embeddings.close)
            embeddings_index = files.enter_context(folder.open("embeddings_index.jsonl"))
        organized = outbox.JsonObjectWriter(organized_file)
        entries = organize(results_written()) if clock is None else \
            clock.iterate(organize(clock.handing(results_written())))
        for key, value in entries:
            organized.add(key, value)
        organized.close()
    if extra["joined_by_position"]:
        # A summary-only count: the service's answers are in `counts`, this is about trusting them.
        counts["joined_by_position"] = extra["joined_by_position"]
    if cache_extra["hits"]:
        counts["cached"] = cache_extra["hits"]  # answered from the request cache (in succeeded), not sent

    def usage_of(tokens: dict, extra: dict) -> dict:
        return {"prompt_tokens": tokens["prompt"], "output_tokens": tokens["output"],
                "thoughts_tokens": tokens["thoughts"], "cached_tokens": extra["cached"],
                "total_tokens": tokens["total"], "requests": extra["with_usage"]}

    return counts, tokens, usage_of(tokens, extra), errors, usage_of(cache_tokens, cache_extra)


#: How many distinct error codes of failed requests the summary's error names.
ERROR_CODES_KEPT = 10


def _tally_error(errors: dict[str, dict], error: Any) -> None:
    """Count one failed request under its error code, keeping the first message of each code."""
    error = error if isinstance(error, dict) else {"message": str(error)}
    code = str(error.get("status") or error.get("code") or "error")  # google.rpc's name, else batchd's code
    if code not in errors and len(errors) >= ERROR_CODES_KEPT:
        code = "other"
    entry = errors.setdefault(code, {"count": 0, "message": str(error.get("message") or "")[:300].rstrip(".")})
    entry["count"] += 1


def _add_embedding(result: TaskResult, embeddings: NpyRowWriter, index, dumps) -> None:
    """Give a successful embedding its row in embeddings.npy (and the index); one of another length
    than the rows before it becomes an error, since the array's rows must all be alike."""
    if result.status != "ok":
        return
    try:
        result.embedding_row = embeddings.add(result.embedding)
    except ValueError as error:
        result.status, result.embedding = "error", None
        result.error = {"code": "embedding_size", "message": f"embedding not stored: {error}"}
        return
    index.write(dumps({"row": result.embedding_row, "key": result.key}) + "\n")


def _organize_nothing(results: Iterator[TaskResult]) -> Iterator[tuple[str, Any]]:
    """Consume the results (so results.jsonl is written) and organize none of them."""
    for _ in results:
        pass
    yield from ()
