"""Deliver: a job's results → its outbox folder (``fetched → publishing → done``).

A job's results.jsonl and organized.json are written by a writer thread that starts once the job's
first chunk is back and joins each chunk as soon as the loop says it is back (batchd.daemon.writer), so
a big job is mostly written by the time its last chunk returns. At most ``max_concurrent_writes``
jobs are written at once; the others wait their turn in the journal. The folder is written in the
job's spool (staging), its outbox name committed (``publishing``), and only then renamed into the
outbox, so it appears complete or not at all.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from batchd import durable, fs, outbox
from batchd.cache import CacheLimits
from batchd.costs import JobInfo, spend_of, summary_cost
from batchd.daemon.context import Context, FolderAccess, Turns, Work, is_own_file, iso
from batchd.daemon.crashpoints import crashpoint
from batchd.daemon.claim_inputs import read_inputs_record
from batchd.daemon.writer import ChunkGate, Written, finish_folder, write_results
from batchd.journal import Chunk, Job, replace_row
from batchd.logs import redact_data
from batchd.spool import JobSpool
from batchd.states import ACTIVE_JOB_STATES, CHUNK_DONE_STATES, ChunkState, JobState, StrayOutcome

log = logging.getLogger("batchd")


#: Spools of done jobs wait at most this long, and this many, for their removal (Deliver.tidy).
SPOOLS_KEPT_SECONDS = 10.0
SPOOLS_KEPT = 1000


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
        #: Spools of done jobs not yet handed to the cleanup thread, with when their job was done (tidy()).
        self._removable: list[tuple[float, JobSpool]] = []
        self._tidy_due = False
        # The summary is written, the manifest linked and the folder synced off the loop's thread too:
        # three fsyncs a job that held up every other job's step.
        self._stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchd-stage")
        self._staging: dict[str, tuple[Future, _Staged]] = {}  # job id → its folder being finished
        #: job id → the counts and error of its summary, from its outbox name's commit to its publish (the
        #: final event says them without reading summary.json back; after a restart it is read).
        self._announcing: dict[str, tuple[dict | None, dict | None]] = {}
        self._forget = forget  # other steps drop what they hold for a job delivered without results
        #: Called with a job's remote batch names as it is delivered, to delete them once that is committed;
        #: the daemon plugs in Uploads'.
        self.batches_done: Callable[[list[str]], None] = lambda names: None
        self._outbox_missing_reported = False
        self._outbox_access = FolderAccess("write into the outbox", "nothing is published (finished jobs wait in "
                                                                    "their spools)")

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
            gate = self.gates[job.id] = ChunkGate((c.idx for c in chunks), ctx.stopping,
                                                  ctx.journal.small_build(job.id) if chunks else None)
            self.writers.start(job.id, write_results, ctx.spool(job.id), gate, ctx.tasks,
                               ctx.plugin_clock(job.task, "organize()"), ctx.settings.plugin_timeout_seconds,
                               ctx.stopping, job.kind, CacheLimits.of(ctx.settings), job.model or ctx.settings.model)
        spool = ctx.spool(job.id)
        shares = None
        for chunk in chunks:
            if chunk.state in CHUNK_DONE_STATES and gate.waits_for(chunk.idx):  # each looked at once, not each visit
                if shares is None and chunk.packed_in is not None:
                    shares = ctx.journal.member_results(job.id)  # (a member's results are in the journal)
                share = shares.get(chunk.idx) if shares else None
                gate.open(chunk.idx, _chunk_error(chunk, spool, share is not None), share)
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
        gate = self.gates.pop(job.id)
        try:
            written: Written = work.future.result()  # a full disk's error goes to the loop, which backs off
        except FileNotFoundError as error:
            if not self._spool_gone(job, gate):
                raise
            self._spool_removed(job, error)
            return
        if gate.small is not None and self._spool_gone(job, gate):  # (its index is the journal's: it was joined)
            manifest = ctx.spool(job.id).manifest_path(job.source)
            self._spool_removed(job, FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(manifest)))
            return
        crashpoint("after-cache-store")
        summary = self._results_summary(job, written)
        staged = self._summarized(job, summary, written.usage)
        if written.counts.get("cached"):
            summary["cache"] = self._cache_summary(job, written)
        finishing = self._stager.submit(finish_folder, written.folder, *self._claimed_manifest(job), redact_data(summary),
                                        self._inputs(job))
        self._staging[job.id] = (finishing, staged)
        job_id = job.id
        finishing.add_done_callback(lambda _: (ctx.mark(job_id), ctx.wake()))

    def _spool_gone(self, job: Job, gate: ChunkGate) -> bool:
        """Whether the job's spool folder was removed while it ran (not by batchd): its index file is gone, or
        for a small job, whose index the journal keeps, its claimed manifest. (The folder itself tells nothing:
        the writer's staging folder makes it anew.)"""
        spool = self.ctx.spool(job.id)
        if gate.small is None:
            return not spool.index_path.exists()
        return not os.path.lexists(spool.manifest_path(job.source))

    def _spool_removed(self, job: Job, error: OSError) -> None:
        """A job whose spool folder was removed while it ran, not by batchd (an operator, a cleaner of old
        files): its requests, its manifest and the index that joins each result to its input went with it, so
        it cannot be finished. It is delivered ``failed``, saying so, instead of being retried forever."""
        job_error = self.ctx.spool(job.id).removed_error(error)
        log.error("job %s: %s", job.id, job_error["message"])
        self.ctx.journal.update_job(job.id, error=job_error)
        self.without_results(replace_row(job, error=job_error), "failed")

    def without_results(self, job: Job, state: str) -> None:
        """Deliver a job that never ran: ``rejected`` or ``cancelled``, or one that cannot be finished:
        ``failed`` (its folder is finished at once)."""
        self._forget(job.id)
        folder = outbox.JobFolder(self.ctx.spool(job.id).staging)
        summary = self._summary(job, state=state, counts={"total": 0, "succeeded": 0, "failed": 0})
        if state == "cancelled" and job.error is None:
            summary["error"] = {"code": "cancelled", "message": f"cancelled on request (batchd cancel {job.name}, "
                                                                f"or {job.name}.cancel) before any of it was sent"}
        staged = self._summarized(job, summary, None)
        finish_folder(folder, *self._claimed_manifest(job), redact_data(summary), self._inputs(job))
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
        return _Staged(summary["state"], cost, usage, counts=summary.get("counts"),
                       error=redact_data(summary.get("error", job.error)))

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

    def _claimed_manifest(self, job: Job) -> tuple[str, Path | None]:
        """The claimed manifest to link into the folder, if it is a file of its own (else publish moves
        the entry in whole)."""
        manifest = self.ctx.spool(job.id).manifest_path(job.source)
        return job.source, manifest if is_own_file(manifest) else None

    def _inputs(self, job: Job) -> list[tuple[str, Path]]:
        """The input files the job took, to go into its folder beside the manifest, each at its
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
        self._announcing[job.id] = (staged.counts, staged.error)

    def publish(self, job: Job) -> None:
        """A ``publishing`` job: rename its staged folder into the outbox, then it is ``done``."""
        ctx = self.ctx
        spool = ctx.spool(job.id)
        destination = Path(job.outbox_dir)
        if not self._outbox_present(destination.parent):
            return  # visited again by the sweep (every rescan_seconds) once it is back
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
        if os.path.lexists(claimed) and not os.path.lexists(destination / job.source):
            # Not a file to link (a symlink, folder, FIFO or hard link that was rejected): the entry
            # itself goes into the published folder, so removing the spool loses nothing.
            durable.durable_move(claimed, destination / job.source, step="publish")
        crashpoint("after-publish")
        ctx.journal.update_job(job.id, state=JobState.DONE, events=[self._final_event(job, destination)])
        self.remove_spool(job.id)
        # Its remote batches have nothing more to give (a shared one goes with its pack: batchd.daemon.pack).
        batches = [chunk.remote_name for chunk in ctx.journal.chunks(job.id)
                   if chunk.remote_name and not chunk.packed_in]
        if batches:
            self.batches_done(batches)  # (committed with 'done', deleted after it)
        ctx.report.delivered(job)
        ctx.log_event(job.outcome, logging.INFO if job.outcome in ("succeeded", "cancelled") else logging.WARNING,
                      "job %s (%s): %s → %s%s", job.id, job.source, job.outcome, destination,
                      f": {job.error['message']}" if isinstance(job.error, dict) and job.error.get("message") else "",
                      extra={"job": job.id, "outcome": job.outcome, "outbox": str(destination)})

    def _outbox_present(self, folder: Path) -> bool:
        """Whether the outbox is a folder to publish into. One deleted while batchd runs (by an operator, a
        cleanup job) is created again, as the inbox is: publishing into it crashed the daemon. One that
        cannot be (a file in its place, a folder batchd may not create) is waited for, said once."""
        if folder.is_dir():
            return self._outbox_access.allows(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)  # (a file in its place: FileExistsError)
            durable.fsync_dir(folder.parent, step="publish")  # before the publish into it commits
        except OSError as error:
            if fs.is_disk_full(error):
                raise
            if not self._outbox_missing_reported:
                self._outbox_missing_reported = True
                log.error("the outbox %s is gone and cannot be created again (%s); nothing is published until "
                          "it is back", folder, error.strerror or error)
            return False
        self._outbox_missing_reported = False
        log.warning("the outbox %s was gone; created it again", folder)
        return True

    def remove_spool(self, job_id: str) -> None:
        """Remove a job's spool folder, once what ended the job is committed, in the cleanup thread (when
        :meth:`tidy` says so)."""
        spool = self.ctx.spool(job_id)

        def removable() -> None:
            self._removable.append((time.monotonic(), spool))
            self._tidy_due = True  # the next tick looks whether it is time

        self.ctx.journal.after_commit(removable)

    def tidy(self) -> None:
        """Hand the spools of done jobs to the cleanup thread, together: once no job is on its way, once the
        oldest has waited :data:`SPOOLS_KEPT_SECONDS` or :data:`SPOOLS_KEPT` are waiting, or at once while
        the disk is full (they are room).

        Why not each as its job is done: on some filesystems creating a file costs more the more files
        were deleted in the seconds before (ext4 without a journal looks past each recently freed inode
        of the block group, one by one; measured: 20 µs a file, 300 µs after a burst's deletions). A
        small job creates about ten files; the spools of a burst's first jobs delivered made every
        later one's creations slower. A crash meanwhile loses nothing: the next start removes the spools
        of done jobs (batchd.daemon.intake)."""
        self._tidy_due = False
        if not self._removable:
            return
        ctx = self.ctx
        if not (len(self._removable) >= SPOOLS_KEPT or ctx.writes_paused()
                or time.monotonic() - self._removable[0][0] >= SPOOLS_KEPT_SECONDS
                or not ctx.journal.count_jobs(ACTIVE_JOB_STATES, limit=1)):
            return
        self._remove_waiting_spools()

    def _remove_waiting_spools(self) -> None:
        spools, self._removable = [spool for _, spool in self._removable], []
        if spools:
            self._cleanup.submit(_remove_spools, spools)

    def seconds_until_tidy(self) -> float:
        if self._tidy_due:
            return 0.0
        if not self._removable:
            return float("inf")
        return self._removable[0][0] + SPOOLS_KEPT_SECONDS - time.monotonic()

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
        pack = next(iter(self.ctx.journal.chunks(chunk.packed_in)), None)  # its one chunk, kept once read
        return pack is not None and pack.remote_name == chunk.remote_name

    def _final_event(self, job: Job, destination: Path) -> dict:
        announced = self._announcing.pop(job.id, None)
        if announced is None:  # named before a restart: summary.json says it
            try:
                summary = json.loads((destination / "summary.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                summary = {}  # a folder that vanished (or was edited) since: the event says what the journal knows
            announced = summary.get("counts"), summary.get("error", job.error)
        counts, error = announced
        return self.ctx.event(job.outcome, replace_row(job, state=JobState.DONE), counts=counts,
                              outbox=str(destination), error=error)

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
        cancelled = [r["remote_name"] for r in duplicates if r["outcome"] != StrayOutcome.FINISHED]
        if cancelled:
            summary["duplicate_remote_batches_cancelled"] = cancelled
        finished = [r["remote_name"] for r in duplicates if r["outcome"] == StrayOutcome.FINISHED]
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
        self._remove_waiting_spools()
        self._cleanup.shutdown(wait=True)


def _remove_spools(spools: list[JobSpool]) -> None:
    for spool in spools:
        spool.remove()


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
    """What a finished folder's ``publishing`` transition records, and what the job's final event says."""

    state: str
    cost: dict
    usage: dict | None
    counts: dict | None = None
    error: dict | None = None  # as summary.json has it (redacted)


def _chunk_error(chunk: Chunk, spool: JobSpool, shared: bool) -> dict | None:
    """The error every request of a chunk gets when the chunk itself produced no results (``shared``: it has
    a share of its pack's results)."""
    if chunk.state == ChunkState.SKIPPED:
        return {"code": "cancelled", "message": "cancelled before it was submitted"}
    if chunk.error is not None:
        return chunk.error
    if not shared and not spool.results_path(chunk.idx).exists():
        return {"code": chunk.remote_state or "no_results",
                "message": f"remote batch {chunk.remote_name} ended {chunk.remote_state} with no results"}
    return None  # requests the service left out of the results show up as "missing"
