"""Deliver: a job's results → its outbox folder (``fetched → publishing → done``).

A job's results.jsonl and organized.json are written by a writer thread that starts once the job's
first chunk is back and joins each chunk as soon as the loop says it is back (:class:`ChunkGate`), so
a big job is mostly written by the time its last chunk returns. At most ``max_concurrent_writes``
jobs are written at once; the others wait their turn in the journal. The folder is written in the
job's spool (staging), its outbox name committed (``publishing``), and only then renamed into the
outbox, so it appears complete or not at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from batchd import durable, fs, outbox
from batchd.cache import CacheLimits, CacheStore
from batchd.costs import JobInfo, spend_of, summary_cost
from batchd.daemon.context import Context, Stopping, Turns, Work, is_own_file, iso, replace
from batchd.daemon.crashpoints import crashpoint
from batchd.daemon.intake import read_inputs_record
from batchd.journal import Chunk, Job
from batchd.logs import redact_data
from batchd.npy import NpyRowWriter
from batchd.plugin_calls import InThread, PluginClock, PluginTimeout
from batchd.spool import JobSpool
from batchd.states import CHUNK_DONE_STATES, ChunkState, JobState
from batchd.task import TaskResult

log = logging.getLogger("batchd")


class ChunkGate:
    """Which chunks of a job have their results in the spool, told by the loop to the job's writer.

    The writer joins chunks in order and waits at each one until the loop opens it (with the
    error every request of the chunk gets when the chunk produced no results, else None).
    Index entries of a chunk that was never recorded (a build that stopped part way) have
    nothing to wait for.
    """

    def __init__(self, recorded: Iterable[int], stopping: threading.Event):
        self._waiting = set(recorded)
        self._opened: dict[int, dict | None] = {}
        self._changed = threading.Condition()
        self._stopping = stopping

    def open(self, idx: int, error: dict | None) -> None:
        with self._changed:
            if idx in self._waiting:
                self._waiting.discard(idx)
                self._opened[idx] = error
                self._changed.notify_all()

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


class Deliver:
    def __init__(self, ctx: Context, *, forget: Callable[[str], None]):
        self.ctx = ctx
        # A writer waits at each chunk still running, so a few long jobs must not hold every writer
        # while another job's results are all back: enough threads, each started only when needed.
        self.writers = ctx.workers("write", ctx.settings.max_concurrent_writes)
        self.gates: dict[str, ChunkGate] = {}  # job id → what its writer is told
        self._written: dict[str, Work] = {}  # job id → its writer, ended, not yet published
        self.turns = Turns()
        # A done job's spool is removed off the loop's thread (a kill first leaves it for the next
        # start to remove): deleting its files took a tenth of the loop's time per small job.
        self._cleanup = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchd-cleanup")
        # The summary and manifest copy are written, and the folder synced, off the loop's thread too:
        # three fsyncs a job that held up every other job's step.
        self._stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchd-stage")
        self._staging: dict[str, tuple[Future, _Staged]] = {}  # job id → its folder being finished
        self._forget = forget  # other steps drop what they hold for a job delivered without results

    def collect(self) -> None:
        for work in self.writers.finished():
            self._written[work.key] = work
        self.turns.call(self.writers.free(), self.ctx.mark)

    def join(self, job: Job, chunks: list[Chunk]) -> bool:
        """Start the job's writer (when a thread is free) and open the chunks that are back; False while
        it waits its turn."""
        ctx = self.ctx
        gate = self.gates.get(job.id)
        if gate is None:
            if not self.turns.first(job.id, self.writers.free()):
                self.turns.wait(job)
                return False
            gate = self.gates[job.id] = ChunkGate((c.idx for c in chunks), ctx.stopping)
            self.writers.start(job.id, write_results, ctx.spool(job.id), gate, ctx.tasks,
                               ctx.plugin_clock(job.task, "organize()"), ctx.settings.plugin_timeout_seconds,
                               ctx.stopping, job.kind, CacheLimits.of(ctx.settings), job.model or ctx.settings.model)
        spool = ctx.spool(job.id)
        for chunk in chunks:
            if chunk.state in CHUNK_DONE_STATES and gate.waits_for(chunk.idx):  # each looked at once, not each visit
                gate.open(chunk.idx, _chunk_error(chunk, spool))
        return True

    def step(self, job: Job) -> None:
        """A ``fetched`` job: once its writer is done, summarize; once its folder is finished, name it."""
        ctx = self.ctx
        if job.id in self._staging:
            future, staged = self._staging[job.id]
            if not future.done():
                return  # the stager marks the job when it is
            del self._staging[job.id]
            future.result()  # a full disk's error goes to the loop, which backs off
            self._name_folder(job, staged)
            return
        if job.id not in self._written:
            self.join(job, ctx.journal.chunks(job.id))
            return
        work = self._written.pop(job.id)
        del self.gates[job.id]
        written: Written = work.future.result()  # a full disk's error goes to the loop, which backs off
        crashpoint("after-cache-store")
        summary = self._results_summary(job, written)
        staged = self._summarized(job, summary, written.usage)
        if written.counts.get("cached"):
            summary["cache"] = self._cache_summary(job, written)
        finishing = self._stager.submit(finish_folder, written.folder, *self._manifest_copy(job), redact_data(summary),
                                        self._inputs(job))
        self._staging[job.id] = (finishing, staged)
        job_id = job.id
        finishing.add_done_callback(lambda _: (ctx.mark(job_id), ctx.wake()))

    def without_results(self, job: Job, state: str) -> None:
        """Deliver a job that never ran: ``rejected`` or ``cancelled`` (its folder is finished at once)."""
        self._forget(job.id)
        folder = outbox.JobFolder(self.ctx.spool(job.id).staging)
        summary = self._summary(job, state=state, counts={"total": 0, "succeeded": 0, "failed": 0})
        if state == "cancelled" and job.error is None:
            summary["error"] = {"code": "cancelled", "message": f"cancelled on request (batchd cancel {job.name}, "
                                                                f"or {job.name}.cancel) before any of it was sent"}
        staged = self._summarized(job, summary, None)
        finish_folder(folder, *self._manifest_copy(job), redact_data(summary), self._inputs(job))
        self._name_folder(job, staged)

    def _summarized(self, job: Job, summary: dict, usage: dict | None) -> _Staged:
        """Complete ``summary`` with the job's error and costs (the actual one accounted now)."""
        ctx = self.ctx
        if job.error is not None:
            summary["error"] = job.error
        cost = dict(job.cost or {})
        if usage is not None and ctx.costs.active:
            cost["actual"] = ctx.costs.account(JobInfo.of(job, ctx.settings.model), usage, ctx.settings)
        if cost:
            summary["cost"] = summary_cost(cost)
        return _Staged(summary["state"], cost, usage)

    def _cache_summary(self, job: Job, written: Written) -> dict:
        """summary.json's ``cache``: the requests answered from the request cache, their tokens and what
        they would have cost in this batch (``saved``), which ``cost.actual`` leaves out."""
        ctx = self.ctx
        usage = written.cache_usage or {}
        block = {"hits": written.counts["cached"], "tokens": {
            "prompt": usage.get("prompt_tokens", 0), "output": usage.get("output_tokens", 0),
            "thoughts": usage.get("thoughts_tokens", 0), "total": usage.get("total_tokens", 0)}}
        if ctx.costs.active:
            priced = ctx.costs.account(JobInfo.of(job, ctx.settings.model), usage, ctx.settings) or {}
            block["saved"] = priced.get("cost")
            block["saved_standard"] = priced.get("standard_cost")
            block["currency"] = priced.get("currency")
        return block

    def _manifest_copy(self, job: Job) -> tuple[str, Path | None]:
        """The claimed manifest to copy into the folder, if it is a file of its own (else publish moves
        the entry in whole)."""
        manifest = self.ctx.spool(job.id).manifest_path(job.source)
        return job.source, manifest if is_own_file(manifest) else None

    def _inputs(self, job: Job) -> list[tuple[str, Path]]:
        """The input files the job took, to go into its folder beside the manifest's copy, each at its
        path in the inbox (``data/reviews.csv``), so that the folder holds what the job read."""
        inputs = self.ctx.spool(job.id).inputs
        return [(entry["path"], inputs / entry["name"]) for entry in read_inputs_record(inputs) if entry.get("placed")]

    def _name_folder(self, job: Job, staged: _Staged) -> None:
        """Commit the finished folder's outbox name (``publishing``); the next visit publishes it."""
        ctx = self.ctx
        if staged.usage is not None and job.task:
            # What later estimates of this task and model price their output by (commits with 'publishing').
            ctx.journal.observe_output(job.task, job.model or ctx.settings.model, staged.usage["requests"],
                                       staged.usage["output_tokens"] + staged.usage["thoughts_tokens"])
        destination = outbox.choose_folder(ctx.settings.outbox, job.name)
        # The folder's name is the intent; the job is published on its next visit, once that is committed.
        ctx.journal.update_job(job.id, state=JobState.PUBLISHING, outbox_dir=str(destination),
                               outcome=staged.state, cost=staged.cost or None, spend=spend_of(staged.cost))

    def publish(self, job: Job) -> None:
        """A ``publishing`` job: rename its staged folder into the outbox, then it is ``done``."""
        ctx = self.ctx
        spool = ctx.spool(job.id)
        destination = Path(job.outbox_dir)
        if spool.staging.exists():
            if destination.exists():
                # Taken by someone else since we chose it: pick again, intent first.
                destination = outbox.choose_folder(ctx.settings.outbox, job.name)
                ctx.journal.update_job(job.id, outbox_dir=str(destination))
                ctx.journal.flush()
            # The outbox's fsync waits for the tick's commit ('done'): one for every job published this tick.
            # Its entries were synced when it was finished (finish_folder), before 'publishing' committed.
            outbox.JobFolder(spool.staging, create=False).publish(destination, sync=ctx.journal.sync_before_commit,
                                                                  synced=True)
        elif not destination.exists():
            # Neither staged nor published (a staging folder lost): deliver it again from the spool
            # rather than record as delivered a folder nobody can read.
            log.warning("job %s: its outbox folder is neither staged nor at %s; writing it again", job.id, destination)
            ctx.journal.update_job(job.id, state=JobState.FETCHED if ctx.journal.chunk_totals(job.id)["chunks"]
                                   else JobState.RECEIVED)
            return
        claimed = spool.manifest_path(job.source)
        if os.path.lexists(claimed) and not is_own_file(claimed):
            # Not a file to copy (a symlink, folder, FIFO or hard link that was rejected): the entry
            # itself goes into the published folder, so removing the spool loses nothing.
            durable.durable_move(claimed, destination / job.source, step="publish")
        crashpoint("after-publish")
        ctx.journal.update_job(job.id, state=JobState.DONE, events=[self._final_event(job, destination)])
        self.remove_spool(job.id)
        ctx.report.delivered(job)
        ctx.log_event(job.outcome, logging.INFO if job.outcome in ("succeeded", "cancelled") else logging.WARNING,
                      "job %s (%s): %s → %s%s", job.id, job.source, job.outcome, destination,
                      f": {job.error['message']}" if isinstance(job.error, dict) and job.error.get("message") else "",
                      extra={"job": job.id, "outcome": job.outcome, "outbox": str(destination)})

    def remove_spool(self, job_id: str) -> None:
        """Remove a job's spool folder, once what ended the job is committed, in the cleanup thread."""
        spool = self.ctx.spool(job_id)
        self.ctx.journal.after_commit(lambda: self._cleanup.submit(spool.remove))

    def abandon(self, job: Job) -> None:
        """A full disk cut the job's writing short: its staging folder is written anew once there is room
        (unless it was complete: ``job``, as committed, is being published)."""
        if job.id in self._written:
            del self._written[job.id]
            self.gates.pop(job.id, None)
        self._staging.pop(job.id, None)
        if job.state in (JobState.RECEIVED, JobState.FETCHED) and job.id not in self.gates:
            shutil.rmtree(self.ctx.spool(job.id).staging, ignore_errors=True)  # the room it took is free again

    def _rode_in_pack(self, chunk: Chunk) -> bool:
        """Whether the chunk's requests went in a pack's remote batch, with other jobs' (batchd.daemon.pack),
        rather than alone (never packed, or sent alone once its pack was refused)."""
        if chunk.packed_in is None or chunk.remote_name is None:
            return False
        pack = self.ctx.journal.chunk(chunk.packed_in, 0)
        return pack is not None and pack.remote_name == chunk.remote_name

    def _final_event(self, job: Job, destination: Path) -> dict:
        try:
            summary = json.loads((destination / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            summary = {}  # a folder that vanished (or was edited) since: the event says what the journal knows
        return self.ctx.event(job.outcome, replace(job, state=JobState.DONE), counts=summary.get("counts"),
                              outbox=str(destination), error=summary.get("error", job.error))

    def _results_summary(self, job: Job, written: Written) -> dict:
        ctx = self.ctx
        counts = written.counts
        chunks = ctx.journal.chunks(job.id)
        state = outcome_of(job, counts, written.organize_error)
        summary = self._summary(job, state=state, counts=counts)
        summary["tokens"] = written.tokens
        summary["remote_batches"] = [
            {"chunk": c.idx, "name": c.remote_name, "display_name": c.display_name, "mode": c.mode,
             "requests": c.request_count, "state": c.remote_state or c.state,
             **({"resubmits": c.resubmits} if c.resubmits else {}),
             **({"shared": True} if self._rode_in_pack(c) else {})}
            for c in chunks
        ]
        remote_jobs = ctx.journal.remote_jobs(job.id)
        duplicates = [r for r in remote_jobs if r["role"] == "duplicate"]
        cancelled = [r["remote_name"] for r in duplicates if r["outcome"] != "finished"]
        if cancelled:
            summary["duplicate_remote_batches_cancelled"] = cancelled
        finished = [r["remote_name"] for r in duplicates if r["outcome"] == "finished"]
        if finished:
            # Found only after they had ended: billed, their results unused.
            summary["duplicate_remote_batches_finished"] = finished
        expired = [r["remote_name"] for r in remote_jobs if r["role"] == "expired"]
        if expired:
            summary["expired_remote_batches"] = expired  # resubmitted: their chunks ran again
        error = outcome_error(job, state, counts, written, ctx.settings.limits.error_chars)
        if error is not None:
            summary["error"] = error
        if counts.get("joined_by_position"):
            log.warning("job %s (%s): %d answers came back without their key and were matched to their requests "
                        "by position, which the service does not guarantee: delivered as %s; check them (marked "
                        "\"joined_by\": \"position\" in results.jsonl) or send the job again with "
                        "inline_max_requests = 0", job.id, job.source, counts["joined_by_position"], state,
                        extra={"job": job.id, "outcome": state})
        warnings = ctx.spool(job.id).read_warnings()  # the task's own (batchd.task.warn), said at build time
        if job.build_stopped:
            built = sum(c.request_count for c in chunks)
            warnings.append(
                f"cancelled while it was being built: building stopped after chunk {chunks[-1].idx}; the "
                f"manifest's requests after its first {built} were never built nor sent and are not in results.jsonl")
        if counts.get("joined_by_position"):
            warnings.append(position_message(job, counts["joined_by_position"]))
        for c in chunks:
            if (c.error or {}).get("code") == "expired":
                tries = c.resubmits + 1
                warnings.append(
                    f"chunk {c.idx} ({c.request_count} requests) expired {tries} time{'s' if tries != 1 else ''}: "
                    f"the service did not finish it within 48 h, and resubmit_expired = "
                    f"{ctx.settings.resubmit_expired} allows no more resubmissions; its requests are errors "
                    f"with code \"expired\" in results.jsonl")
        if warnings:
            summary["warnings"] = warnings
        return summary

    def _summary(self, job: Job, *, state: str, counts: dict) -> dict:
        """The fields every summary.json has (``without_results`` and ``_results_summary`` add theirs)."""
        now = time.time()
        settings = self.ctx.settings
        return {
            "job": job.id,
            "name": job.name,
            "manifest": job.source,
            "task": job.task,
            "model": job.model,
            "provider": settings.provider,
            "emulated": settings.provider == "emulator",
            "state": state,
            "counts": counts,
            **({"retry_of": {**job.retry_of, "requests": counts["total"]}} if job.retry_of else {}),
            "timings": {
                "received": iso(job.created_at),
                "submitted": iso(job.submitted_at),
                "finished": iso(job.finished_at),
                "delivered": iso(now),
                "seconds": round(now - job.created_at, 3),
            },
        }

    def close(self) -> None:
        # Writers waiting for chunks give up (the stop is set); a restart writes the job's staging folder anew.
        self.writers.shutdown(cancel=True)
        self._stager.shutdown(wait=True)  # a folder being finished is finished (a restart writes it anew)
        self._cleanup.shutdown(wait=True)


#: A job's outcome when its task plugin's ``organize()`` failed (raised or hung): results.jsonl has every
#: result, organized.json none; ``run --once`` exits :data:`batchd.daemon.context.PLUGIN_FAILED_EXIT_CODE`.
PLUGIN_FAILED = "plugin_failed"


def outcome_of(job: Job, counts: dict, organize_error: dict | None) -> str:
    """The outcome of a job that ran: ``succeeded`` only when every request has an answer surely its own
    and the task organized them; answers matched by position make it ``partial``, as failed requests do."""
    if job.cancel_requested:
        return "cancelled"
    if counts["failed"] and not counts["succeeded"]:
        return "failed"
    if organize_error is not None:
        return PLUGIN_FAILED
    if counts["failed"] or counts.get("joined_by_position"):
        return "partial"
    return "succeeded"


def position_message(job: Job, joined: int) -> str:
    """Why answers matched by position need a second look, and how to avoid them."""
    if job.kind == "embed":
        without_key = f"inline embeddings carry no key (google-genai sends none with them), so {joined} were"
    else:
        without_key = f"{joined} inline answers came back without their key and were"
    return (f"{without_key} matched to their requests by position, which the service does not guarantee (the "
            "answers may belong to other inputs); they are marked \"joined_by\": \"position\" in results.jsonl "
            "(file batches always carry keys: send the job again with inline_max_requests = 0)")


def outcome_error(job: Job, state: str, counts: dict, written: Written, max_chars: int = 2000) -> dict | None:
    """summary.json's ``error`` for a job that ran and did not succeed: a ``code`` (the state's own reason)
    and each reason in one message, cut at ``max_chars``."""
    reasons: list[tuple[str, str]] = []
    if written.organize_error is not None:
        reasons.append((PLUGIN_FAILED, written.organize_error["message"]))
    if state == "cancelled":
        reasons.append(("cancelled", f"cancelled on request (batchd cancel {job.name}, or {job.name}.cancel): "
                                     f"{counts['succeeded']} of {counts['total']} requests have an answer; the "
                                     "others are errors in results.jsonl"))
    elif counts["failed"]:
        codes = sorted(written.errors.items(), key=lambda item: -item[1]["count"])
        detail = "; ".join(f"{entry['count']} × {code}" + (f": {entry['message']}" if entry["message"] else "")
                           for code, entry in codes)
        expired = " (expired: the service did not finish them within 48 h)" if "expired" in written.errors else ""
        what = f"all {counts['total']}" if not counts["succeeded"] else f"{counts['failed']} of the {counts['total']}"
        reasons.append(("requests_failed", f"{what} requests failed{expired}: {detail}; results.jsonl "
                                           f"has each error (batchd retry {job.name} sends them again)"))
    if counts.get("joined_by_position") and state != "cancelled":
        reasons.append(("joined_by_position", position_message(job, counts["joined_by_position"])))
    if not reasons or state == "succeeded":
        return None
    codes = [code for code, _ in reasons]
    primary = {PLUGIN_FAILED: PLUGIN_FAILED, "cancelled": "cancelled", "failed": "requests_failed"}.get(state)
    message = "; ".join(message for _, message in reasons)
    if len(message) > max_chars:
        message = message[: max_chars - 1] + "…"
    return {"code": primary if primary in codes else codes[0], "message": message}


@dataclass(frozen=True)
class _Staged:
    """What a finished folder's ``publishing`` transition records."""

    state: str
    cost: dict
    usage: dict | None


# -- the writer: runs in the pool, given its spool and gate, never the journal ------------------------


def finish_folder(folder: outbox.JobFolder, manifest_name: str, manifest: Path | None, summary: dict,
                  inputs: list[tuple[str, Path]] = ()) -> None:
    """Add the manifest's copy, the job's input files (linked from its spool: the spool goes once the
    job is done) and summary.json to a staged folder and make its entries durable, so it may be
    renamed into the outbox once its name is committed."""
    if manifest is not None:
        folder.copy_in(manifest_name, manifest)
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
                self.store = CacheStore(self.limits.path)
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
            lambda: write_result_files(folder, spool, error_of, organize, stopping, clock, kind, keep),
            name=f"batchd-organize-{job_id}")
        counts, tokens, usage, errors, cache_usage = writing.wait(clock, timeout, stopping.is_set, Stopping)
    except Stopping:
        raise
    except PluginTimeout as error:
        log.error("job %s: %s", job_id, error, extra={"job": job_id})
        organize_error = {"message": f"{error}; results.jsonl has every result"}
        folder = outbox.JobFolder(spool.staging)  # anew: the abandoned thread's files are left unlinked
        counts, tokens, usage, errors, cache_usage = write_result_files(
            folder, spool, error_of, _organize_nothing, stopping, kind=kind, keep=keep)
    except Exception as error:
        if fs.is_disk_full(error):
            raise  # not the task's fault: the folder is written again once there is room
        fs.unwritable_is_fatal("outbox", error)
        log.exception("job %s: task %r failed to organize its results", job_id, clock.task)
        organize_error = {"message": f"task {clock.task!r} failed to organize the results: "
                                     f"{type(error).__name__}: {error}; results.jsonl has every result"}
        folder = outbox.JobFolder(spool.staging)
        counts, tokens, usage, errors, cache_usage = write_result_files(
            folder, spool, error_of, _organize_nothing, stopping, kind=kind, keep=keep)
    return Written(folder, counts, tokens, usage, organize_error, errors, cache_usage)


def write_result_files(folder: outbox.JobFolder, spool: JobSpool, chunk_error: Callable[[int], dict | None],
                       organize, stopping: threading.Event,
                       clock: PluginClock | None = None, kind: str = "generate",
                       keep: Callable[[str, dict], None] | None = None) -> tuple[dict, dict, dict, dict, dict]:
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
        for n, result in enumerate(spool.joined(chunk_error, kind, keep=keep)):
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


def _chunk_error(chunk: Chunk, spool: JobSpool) -> dict | None:
    """The error every request of a chunk gets when the chunk itself produced no results."""
    if chunk.state == ChunkState.SKIPPED:
        return {"code": "cancelled", "message": "cancelled before it was submitted"}
    if chunk.error is not None:
        return chunk.error
    if not spool.results_path(chunk.idx).exists():
        return {"code": chunk.remote_state or "no_results",
                "message": f"remote batch {chunk.remote_name} ended {chunk.remote_state} with no results"}
    return None  # requests the service left out of the results show up as "missing"
