"""Submit: built chunks → remote batches (``built → submitting → running``); reconciliation by display name.

Each create is an intent first: the chunk is ``submitting`` (with its ``intent_at`` and, for a file
chunk, ``upload_state = uploading``) before anything is sent. A file chunk's requests are uploaded,
the file's name recorded, and only then is the batch created from it. The transfers run in a pool of
``max_concurrent_submissions`` threads; a job whose chunks find it full waits its turn in the journal,
and jobs take turns chunk by chunk, so one job of many chunks does not hold back the small ones.

A create whose answer was lost leaves its chunk ``submitting``: :meth:`Submit.match`, given the poll's
list, finds the remote batch by display name (it is adopted), or after ``submit_grace_seconds`` creates
it again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from batchd.backoff import Backoff
from batchd.daemon.context import Context, Turns, error_dict
from batchd.daemon.crashpoints import crashpoint
from batchd.daemon.media import ABOUT as MEDIA_UPLOAD
from batchd.daemon.media import MediaUploads
from batchd.daemon.naming import upload_display_name, upload_display_names
from batchd.daemon.pack import Pack
from batchd.events import progress_counts
from batchd.journal import Chunk, Job, SmallBuild, replace_row
from batchd.logs import FailureRun
from batchd.media import resolve_request
from batchd.provider import Provider, is_auth_error, is_retryable, quota_delay, webhook_config
from batchd.remote import RemoteFile, RemoteJob
from batchd.spool import JobSpool
from batchd.states import (CHUNK_DONE_STATES, JOB_STATES_WITH_REMOTE_WORK, REMOTE_LIVE_CHUNK_STATES, ChunkState,
                           JobState, StrayOutcome, UploadState)

log = logging.getLogger("batchd")

#: While stopping with uploads in flight, systemd's stop timeout is extended by this much at a time.
DRAIN_EXTEND_SECONDS = 30.0
#: A run of uploads and creates failing with an unknown outcome (an outage) is said once, then summed up
#: once every this long while it lasts: one line per chunk was thousands under a burst.
UNSURE_FAILURES_SAID_SECONDS = 60.0


@dataclass(frozen=True)
class RequestFile:
    """A file chunk's requests on the Files API, as the upload stage found or made it."""

    name: str
    reused: bool  # an earlier upload the service still had
    sole_copy: bool  # no other copy can be out there (False: a retried transfer may have left one)


class Submit:
    def __init__(self, ctx: Context, watch: Callable[[Chunk, float], None], stray: Callable, cancel_adopted: Callable):
        self.ctx = ctx
        #: (job id, idx) → the upload or create in flight; ``about`` is the stage, "upload" or "create".
        self.submissions = ctx.workers("submit", ctx.settings.max_concurrent_submissions)
        #: Paused while the service refuses the API key (``refusal`` says how it answered).
        self.credentials = Backoff(ctx.settings.poll_interval, max(ctx.settings.poll_max_interval, 60.0))
        self.turns = Turns()
        #: max_remote_batches reached: logged once when it starts and ends, a notice in `batchd status`
        self.remote_full = False
        #: Chunks whose remote batch exists or may, counted once a tick (each count costs the loop a wait
        #: for the GIL) and kept up to date by the sends of the tick (see :meth:`remote_room`).
        self._remote_live: int | None = None
        #: The chunks whose upload or create is in flight, as their last write left them: nothing else
        #: writes a chunk while its create is in flight, so the collect reads no row for them.
        self._in_flight: dict[tuple[str, int], Chunk] = {}
        self.upload_turns = Turns()  # jobs whose next chunk waits for an upload slot
        self._watch = watch  # a display name whose create outcome is unknown is watched for strays
        self._stray = stray
        self._cancel_adopted = cancel_adopted
        #: The files chunks' requests reference, uploaded before their chunk is created (same pool).
        self.media = MediaUploads(ctx, self.submissions)
        #: Uploads and creates failing in a row with an unknown outcome (each then reconciled).
        self._unsure_failures = FailureRun(UNSURE_FAILURES_SAID_SECONDS)
        #: Small jobs' chunks, offered here and sent together in one remote batch (batchd.daemon.pack).
        self.pack = Pack(ctx, send_alone=self.send, free=self.free, submit_step=self.step)

    def step(self, job: Job) -> None:
        """Send the job's built chunks while the pool has room; a ``built`` job whose every chunk is sent
        becomes ``submitted``."""
        ctx = self.ctx
        free = self.free()
        # One more than can go: to know whether some must wait. A cancelled job sends nothing more (its
        # unsent chunks are skipped by batchd.daemon.cancel).
        chunks = [] if job.cancel_requested else ctx.journal.built_chunks(job.id, free + 1)
        if len(chunks) == 1 and self.pack.offer(job, chunks[0]):
            self.turns.forget(job.id)
            return  # it leaves in a pack (or alone) when the pool has room: Pack.seal
        share = 0
        if chunks and self.turns.first(job.id, free):
            share = 1 if len(self.turns) else free  # others in line: one chunk per turn
        upload_waits = False
        for chunk in chunks[:share]:
            if chunk.mode == "file" and not self.upload_slots():
                upload_waits = True  # each upload holds a part of its file in memory: they are bounded apart
                break
            self.send(job, chunk)
        if not chunks:
            self.turns.forget(job.id)
        if not upload_waits:
            self.upload_turns.forget(job.id)
        if upload_waits:
            self.upload_turns.wait(job)  # called when an upload ends, not on every free thread
        elif len(chunks) > share:
            self.turns.wait(job)  # more to send once the pool has room
        elif job.state == JobState.BUILT:
            totals = ctx.journal.chunk_totals(job.id)
            if totals.get(ChunkState.BUILT):
                return  # a cancelled job's unsent chunks are skipped first
            sent = totals["chunks"] > totals.get(ChunkState.SKIPPED, 0)  # none: cancelled before any was sent
            submitted = replace_row(job, state=JobState.SUBMITTED)
            ctx.journal.update_job(job.id, state=JobState.SUBMITTED, submitted_at=time.time() if sent else None,
                                   events=self._submitted_events(submitted, ctx.journal.chunks(job.id)))

    def send(self, job: Job, chunk: Chunk) -> None:
        """Commit the chunk's create intent and start its create (its upload first, for a file chunk)."""
        ctx = self.ctx
        uris, refused = self.media.ready(job, chunk)
        if refused is not None:  # a file the service refused: the chunk's requests can never be sent
            ctx.journal.update_chunk(job.id, chunk.idx, state=ChunkState.SUBMITTING, intent_at=time.time())
            ctx.journal.update_chunk(job.id, chunk.idx, state=ChunkState.FETCHED, remote_state="rejected",
                                     error=refused)
            return
        if uris is None:
            return  # its files are being uploaded: the job is visited again when an upload ends
        if uris:
            ctx.journal.set_media({sha256: {"last_used": time.time()} for sha256 in uris})
        intent = {"state": ChunkState.SUBMITTING, "intent_at": time.time(), **_upload_intent(chunk)}
        ctx.journal.update_chunk(job.id, chunk.idx, **intent)
        if self._remote_live is not None:
            self._remote_live += 1
        crashpoint("after-intent")
        if chunk.resubmits:
            crashpoint("after-resubmit-intent")
        self.start(job, chunk)
        self._in_flight[(job.id, chunk.idx)] = replace_row(chunk, **intent)

    def _submitted_events(self, job: Job, chunks: list[Chunk]) -> list[dict]:
        """The ``submitted`` event of a job all of whose chunks are sent, once one remote job of it exists.

        Until then (creates in flight or unconfirmed) there is none: it comes with the first
        adoption (:meth:`adopt`), and never for a job whose every create was refused or skipped.
        """
        if job.state != JobState.SUBMITTED or not any(c.remote_name for c in chunks):
            return []
        sent = [c for c in chunks if c.state != ChunkState.SKIPPED]
        events = [self.ctx.event("submitted", job, counts={"total": sum(c.request_count for c in sent), "done": 0,
                                                           "chunks": len(sent)})]
        # Chunks that went out and finished while later ones were built announced no progress (a job
        # announces progress once it is submitted): what they did is told now, unless the job is done.
        counts = progress_counts(sent)
        if counts["done"] and not all(c.state in CHUNK_DONE_STATES for c in sent):
            events.append(self.ctx.event("progress", job, counts=counts))
        return events

    def start(self, job: Job, chunk: Chunk) -> None:
        """Send the chunk's create; a file chunk's requests file first (:func:`upload_requests`).

        ``chunk`` is as it was before the intent just committed: its ``upload_state`` says what
        an earlier attempt may have left on the Files API.
        """
        ctx = self.ctx
        key = (job.id, chunk.idx)
        # The URIs of the files its requests reference (active: a chunk still to be sent keeps them).
        uris = {row["sha256"]: row["uri"] for row in ctx.journal.chunk_media(job.id, chunk.idx) if row["uri"]}
        if chunk.mode == "inline":
            self.submissions.start(key, create_inline, ctx.provider, ctx.model_of(job), ctx.spool(job.id), chunk,
                                   job.kind, uris, self._webhook(job, chunk), ctx.journal.small_build(job.id),
                                   about="create")
        else:
            self.submissions.start(key, upload_requests, ctx.provider, chunk, ctx.spool(job.id),
                                   ctx.settings.delete_request_files, uris, about="upload")
        log.debug("job %s: submitting chunk %d (%s, %d requests)", job.id, chunk.idx, chunk.mode,
                 chunk.request_count, extra={"job": job.id, "chunk": chunk.idx, "requests": chunk.request_count})

    def collect(self) -> None:
        """Record the uploads and creates that ended; hand the pool to the jobs waiting longest."""
        journal = self.ctx.journal
        self._remote_live = None  # counted afresh this tick
        for work in self.submissions.finished():
            if work.about == MEDIA_UPLOAD:
                self.media.collect(work)
                continue
            job_id, idx = work.key
            chunk = self._in_flight.pop(work.key, None) or journal.chunk(job_id, idx)
            try:
                result = work.future.result()
            except Exception as error:
                self._failed(chunk, error, work.about)
                continue
            if failed := self._unsure_failures.succeeded():
                log.info("the service takes uploads and creates again, after %d failed (each is reconciled: found "
                         "by its name, or sent again)", failed)
            if work.about == "upload":
                self._create_from_file(chunk, result)
                continue
            crashpoint("after-create")
            if chunk.resubmits:
                crashpoint("after-resubmit-create")
            self.ctx.key.accepted()
            self.credentials.succeeded()
            if self.ctx.quota.went_through("create"):
                log.info("the service takes creates again: the quota wait is over")
            self.adopt(chunk, result)
        self.media.due()
        self._note_remote_limit()
        self.upload_turns.call(self.upload_slots(), self.ctx.mark)
        self.turns.call(self.free(), self.ctx.mark)

    @property
    def refusal(self) -> str | None:
        """Why submissions are paused for the key (see :class:`batchd.daemon.context.KeyRefusal`), or None."""
        return self.ctx.key.reason

    def free(self) -> int:
        """Chunks that may be sent now: threads free for uploads and creates, within the room left for
        remote batches; none while the service refuses the API key, or its quota."""
        if self.credentials.waiting() or self.ctx.quota.waiting("create"):
            return 0
        free = self.submissions.free()
        return min(free, self.remote_room()) if self.ctx.settings.max_remote_batches else free

    def remote_room(self) -> int:
        """Remote batches that may still be created: ``max_remote_batches`` (set) less the chunks whose
        batch exists or may (``submitting``, ``running``) and the strays whose cancel the service has not
        taken yet (batchd.daemon.monitor: they run, and count, until it does). Google runs 100 per project
        and answers 429 to any create beyond that; counting our own keeps chunks waiting their turn here,
        oldest job first, instead of bouncing off the service.

        Counted in the journal at the first ask of a tick, then kept by :meth:`send`. A batch that ends
        during the tick frees its room at the next one: the count may only be high, never low.
        """
        limit = self.ctx.settings.max_remote_batches
        if self._remote_live is None:
            journal = self.ctx.journal
            chunks = journal.count_chunks_in(REMOTE_LIVE_CHUNK_STATES, job_states=JOB_STATES_WITH_REMOTE_WORK, limit=limit)
            self._remote_live = chunks + journal.count_remote_jobs_with_outcome(StrayOutcome.CANCELLING)
        return max(0, limit - self._remote_live)

    def _note_remote_limit(self) -> None:
        """Say once when ``max_remote_batches`` starts and stops holding chunks back (once a tick)."""
        full = bool(self.ctx.settings.max_remote_batches) and self.remote_room() == 0
        if full != self.remote_full:
            self.remote_full = full
            if full:
                log.info("%d remote batches are pending or running (max_remote_batches): further chunks wait "
                         "their turn", self.ctx.settings.max_remote_batches)
            else:
                log.info("remote batches below max_remote_batches again: chunks are sent")

    def seconds_until_free(self) -> float:
        """Until a quota wait ends and the jobs waiting for it can go (inf: none is in force)."""
        return self.ctx.quota.seconds_left("create")

    def upload_slots(self) -> int:
        """Uploads that may start now: ``max_concurrent_uploads`` less those in flight, within :meth:`free`."""
        uploading = sum(1 for work in self.submissions.running.values() if work.about == "upload")
        return max(0, min(self.free(), self.ctx.settings.max_concurrent_uploads - uploading))

    def _create_from_file(self, chunk: Chunk, requests_file: RequestFile) -> None:
        """Record the chunk's requests file (so a create made again reuses it, and it is deleted once the
        chunk is done), then send the create."""
        ctx = self.ctx
        job = ctx.journal.job(chunk.job_id)
        fields = {}
        if job.cancel_requested:
            # Cancelled while its requests were being uploaded: the create was never sent, so it never
            # will be; the upload is deleted as the chunk's of any finished chunk.
            fields["state"] = ChunkState.SKIPPED
        uploaded = {"uploaded_file": requests_file.name,
                    "upload_state": UploadState.UPLOADED if requests_file.sole_copy else UploadState.UPLOADING}
        ctx.journal.update_chunk(chunk.job_id, chunk.idx, **uploaded, **fields)
        log.info("job %s: chunk %d's requests are %s%s%s", chunk.job_id, chunk.idx, requests_file.name,
                 " (uploaded before)" if requests_file.reused else "",
                 "; the job is cancelled, so it is never created" if fields else "",
                 extra={"job": chunk.job_id, "chunk": chunk.idx, "file": requests_file.name})
        if fields:
            return
        provider = ctx.provider
        self.submissions.start((chunk.job_id, chunk.idx), provider.create_from_file, ctx.model_of(job),
                               requests_file.name, chunk.display_name, job.kind, self._webhook(job, chunk),
                               about="create")
        self._in_flight[(chunk.job_id, chunk.idx)] = replace_row(chunk, **uploaded)

    def _webhook(self, job: Job, chunk: Chunk) -> dict | None:
        """The create's per-job webhook (``webhook_public_url``), naming the job and chunk; none for embed
        batches (google-genai's create_embeddings has no webhook_config: they are polled)."""
        if job.kind == "embed":
            return None
        return webhook_config(self.ctx.settings.webhook_public_url, job.id, chunk.idx)

    def adopt(self, chunk: Chunk, remote: RemoteJob) -> Chunk:
        """Record ``remote`` as the chunk's remote job; returns the chunk as now recorded."""
        ctx = self.ctx
        ctx.journal.record_remote_job(remote.name, chunk, "adopted")
        adopted = replace_row(chunk, state=ChunkState.RUNNING, remote_name=remote.name,
                          remote_state=remote.state, stats=remote.stats)
        job = ctx.journal.job(chunk.job_id)
        events = []
        if job.pack:
            events = self._members_submitted(job, remote.name)
        elif job.state == JobState.SUBMITTED and not ctx.journal.event_count(job.id, "submitted"):
            # Every chunk was sent before this first create was confirmed: the job's remote work exists now.
            events = self._submitted_events(job, [adopted if c.idx == chunk.idx else c
                                                  for c in ctx.journal.chunks(job.id)])
        ctx.journal.update_chunk(chunk.job_id, chunk.idx, state=ChunkState.RUNNING, remote_name=remote.name,
                                 remote_state=remote.state, stats=remote.stats, events=events)
        log.info("job %s: chunk %d is remote job %s", chunk.job_id, chunk.idx, remote.name,
                 extra={"job": chunk.job_id, "chunk": chunk.idx, "remote": remote.name})
        return adopted

    def _members_submitted(self, pack: Job, remote_name: str) -> list[dict]:
        """The ``submitted`` events of a pack's members, once its remote batch exists (a member's chunk
        names it from its results on: ``Fetch``)."""
        ctx = self.ctx
        members = {chunk.job_id: chunk for chunk in ctx.journal.packed_members(pack.id)}
        events = []
        for job in ctx.journal.jobs_by_id(members):
            if not ctx.journal.event_count(job.id, "submitted"):
                events += self._submitted_events(job, [replace_row(members[job.id], remote_name=remote_name)])
        return events

    def _failed(self, chunk: Chunk, error: Exception, stage: str) -> None:
        if is_auth_error(error):
            # Refused at the door (a revoked or mistyped key): nothing was created or uploaded. The
            # chunk waits 'built' and every submission pauses; failing jobs for a key an operator
            # is about to fix would lose them.
            self.ctx.journal.update_chunk(chunk.job_id, chunk.idx, state=ChunkState.BUILT)
            wait = self.credentials.failed()
            self.ctx.key.refused(error, f"{stage} of chunk {chunk.idx}", logged=True)
            log.error("job %s: %s of chunk %d: %s; submissions paused, tried again in %.0f s (fix the key and "
                      "restart, or wait)", chunk.job_id, stage, chunk.idx, self.ctx.key.reason, wait)
            return
        asked = quota_delay(error)
        if asked is not None:
            # 429 RESOURCE_EXHAUSTED refuses at the door, before anything is created or stored: the chunk
            # waits 'built' and every upload and create waits out the quota (what the service asked for,
            # at least a backoff), said once per wait in the log and by `batchd status`.
            self.ctx.journal.update_chunk(chunk.job_id, chunk.idx, state=ChunkState.BUILT)
            reason = f"429 RESOURCE_EXHAUSTED on {stage}"
            wait = self.ctx.quota.refused("create", asked, reason)
            if wait is not None:
                log.warning("job %s: %s of chunk %d refused: quota exhausted (%s); waiting: quota, uploads and "
                            "creates retry in %.0f s", chunk.job_id, stage, chunk.idx, error_dict(error)["message"],
                            wait, extra={"job": chunk.job_id, "chunk": chunk.idx, "wait": wait})
            return
        if is_retryable(error):
            # Ambiguous: the job may exist.  It stays 'submitting' and the next reconcile
            # either finds it by display name or, after the grace period, creates it.
            self._say_unsure(chunk, error, stage)
            if stage == "create":  # a failed upload sent no create: nothing under the name to watch for
                self._watch(chunk, chunk.intent_at or time.time())
            return
        log.error("job %s: chunk %d was refused: %s", chunk.job_id, chunk.idx, error)
        self.ctx.journal.update_chunk(chunk.job_id, chunk.idx, state=ChunkState.FETCHED, remote_state="rejected",
                                      error=error_dict(error))

    def _say_unsure(self, chunk: Chunk, error: Exception, stage: str) -> None:
        self._unsure_failures.say(log, f"job {chunk.job_id}: {stage} of chunk {chunk.idx} failed ({error}); will "
                                  f"reconcile", "uploads or creates failed (each to be reconciled)",
                                  {"job": chunk.job_id, "chunk": chunk.idx})

    def unconfirmed(self) -> dict[str, Chunk]:
        """The chunks whose create is unconfirmed and not in flight, by display name. Each name is watched
        for strays from now on."""
        pending = {c.display_name: c for c in unconfirmed_chunks(self.ctx) if (c.job_id, c.idx) not in self.submissions}
        if pending:
            watched = self.ctx.journal.watched_names()
            for chunk in pending.values():
                # Its create was sent (or may have been) with no answer recorded: the name is watched from now on.
                if chunk.display_name not in watched:
                    self._watch(chunk, chunk.intent_at or time.time())
        return pending

    def match(self, pending: dict[str, Chunk], listed: Iterable[RemoteJob], listed_at: float) -> None:
        """Adopt each ``pending`` chunk's remote job found in ``listed`` (every remote job of the project,
        as the list read from ``listed_at`` on said); a chunk with none is created again once its
        create is older than ``submit_grace_seconds`` at ``listed_at`` (the list may be older than now)."""
        ctx = self.ctx
        found: dict[str, list[RemoteJob]] = {}
        for remote in listed:
            if remote.display_name in pending:
                found.setdefault(remote.display_name, []).append(remote)
        for display_name, chunk in pending.items():
            job = ctx.journal.job(chunk.job_id)
            matches = sorted(found.get(display_name, []), key=_creation_order)
            if matches:
                adopted = self.adopt(chunk, matches[0])
                for duplicate in matches[1:]:
                    self._stray(chunk.job_id, chunk.idx, display_name, duplicate)
                if job.cancel_requested:
                    self._cancel_adopted(adopted)  # kept, so whatever results it has are the job's
            elif listed_at - (chunk.intent_at or 0) < ctx.settings.submit_grace_seconds:
                continue  # the create may have reached the service and not be listed yet
            elif job.cancel_requested:
                # A cancelled job is never created again; the grace period is what says the create
                # never reached the service, as it does before a create is sent again.
                log.info("job %s: chunk %d is cancelled and its create never showed up: never submitted",
                         chunk.job_id, chunk.idx, extra={"job": chunk.job_id, "chunk": chunk.idx})
                ctx.journal.update_chunk(chunk.job_id, chunk.idx, state=ChunkState.SKIPPED)
            else:
                log.info("job %s: no remote job for chunk %d; creating it", chunk.job_id, chunk.idx)
                now = time.time()
                ctx.journal.update_chunk(chunk.job_id, chunk.idx, intent_at=now, **_upload_intent(chunk))
                self._watch(chunk, now)  # the watch runs from the last create under the name
                self.start(job, chunk)

    def busy(self) -> bool:
        return bool(len(self.submissions))

    def drain(self, service_manager) -> None:
        """Wait for the uploads and creates in flight, recording each; under systemd, ask for stop time
        while they run. Nothing is queued that could be withdrawn: each one may already have reached
        the service, and an upload that finished is recorded and its create sent, as it would have been."""
        from concurrent.futures import FIRST_COMPLETED, wait

        if self.submissions.running:
            log.info("waiting for %d submission(s) in flight before stopping", len(self.submissions))
        while self.submissions.running:
            service_manager.extend_timeout(DRAIN_EXTEND_SECONDS)
            wait(self.submissions.futures(), timeout=DRAIN_EXTEND_SECONDS / 3, return_when=FIRST_COMPLETED)
            if self.ctx.journal is None:
                break
            self.collect()

    def close(self) -> None:
        self.submissions.shutdown()
        if summary := self._unsure_failures.summary(now=True):
            log.warning("%d more uploads or creates failed in the last %.0f s, each to be reconciled after the "
                        "restart", *summary)


def unconfirmed_chunks(ctx: Context) -> list[Chunk]:
    """Chunks whose create intent is committed and whose remote batch is not recorded."""
    return ctx.journal.chunks_in((ChunkState.SUBMITTING,), job_states=JOB_STATES_WITH_REMOTE_WORK)


# -- work run in the pool: given what it needs, never the journal ---------------------------------------


def create_inline(provider: Provider, model: str, spool: JobSpool, chunk: Chunk, kind: str,
                  uris: dict[str, str] | None = None, webhook: dict | None = None,
                  small: SmallBuild | None = None) -> RemoteJob:
    """Create the chunk's remote batch with its requests inline (``small``: the job's build, as the journal
    keeps it, else its requests file)."""
    lines = spool.request_lines(chunk.idx, small)
    if uris:  # requests naming uploaded files: each placeholder replaced by its File's URI
        lines = (json.dumps({**line, "request": resolve_request(line["request"], uris)}, ensure_ascii=False,
                            separators=(",", ":")) for line in spool.read_requests(chunk.idx, small))
    return provider.create_from_lines(model, lines, chunk.display_name, kind, webhook)


def _sent_requests(spool: JobSpool, chunk: Chunk, uris: dict[str, str]) -> tuple:
    """The requests file to upload and its size: the built one, or for requests with uploaded files a
    copy naming the Files' URIs instead of their placeholders (``requests-NNNN.sent.jsonl``)."""
    if not uris:
        return spool.requests_path(chunk.idx), chunk.byte_size

    path = spool.requests_path(chunk.idx).with_suffix(".sent.jsonl")
    partial = path.with_name(f".{path.name}.part")
    with open(partial, "w", encoding="utf-8", buffering=1 << 20) as out:
        for line in spool.read_requests(chunk.idx):
            line["request"] = resolve_request(line["request"], uris)
            out.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
    os.replace(partial, path)
    return path, path.stat().st_size


def upload_requests(provider: Provider, chunk: Chunk, spool: JobSpool, delete_spares: bool,
                    uris: dict[str, str] | None = None) -> RequestFile:
    """The chunk's requests file on the Files API: the one an earlier attempt left, while the service
    still has it, else a new upload."""
    display_name = upload_display_name(chunk.display_name)
    requests_path, byte_size = _sent_requests(spool, chunk, uris or {})
    try:
        if chunk.upload_state == UploadState.UPLOADING:
            # An earlier attempt may have uploaded copies whose names were never recorded: keep one,
            # delete the others (none was ever given to a create: a name is recorded before its create).
            # A resubmitted chunk's earlier attempts uploaded the same bytes under their own names.
            searched = upload_display_names(chunk)
            copies = [f for f in provider.list_files() if f.display_name in searched]
            if chunk.uploaded_file and all(f.name != chunk.uploaded_file for f in copies):
                copies += [f for f in [provider.get_file(chunk.uploaded_file)] if f]
            kept = _reusable(copies, chunk.uploaded_file, byte_size)
            spares = [copy for copy in copies if copy is not kept]
            if delete_spares:
                spares = [copy for copy in spares if not _delete_quietly(provider, chunk, copy.name)]
            if kept is not None:
                return RequestFile(kept.name, reused=True, sole_copy=not spares)
        elif chunk.upload_state == UploadState.UPLOADED and chunk.uploaded_file:
            recorded = provider.get_file(chunk.uploaded_file)
            kept = _reusable([recorded] if recorded else [], chunk.uploaded_file, byte_size)
            if kept is not None:
                return RequestFile(kept.name, reused=True, sole_copy=True)
    except Exception as error:
        if is_retryable(error):
            raise  # the chunk stays 'submitting': created again after the grace period
        # Looking for the earlier upload is an optimisation; a service that refuses it gets a new one.
        log.warning("job %s: looking for chunk %d's earlier upload failed (%s); uploading it again",
                    chunk.job_id, chunk.idx, error)
    uploaded = provider.upload_jsonl(requests_path, display_name)
    crashpoint("after-upload")
    # A copy an earlier, interrupted upload made may show up in the list only later: a chunk that
    # was 'uploading' before is looked up by display name again once it is done.
    sole_copy = uploaded.attempts == 1 and chunk.upload_state != UploadState.UPLOADING
    return RequestFile(uploaded.name, reused=False, sole_copy=sole_copy)


def _delete_quietly(provider: Provider, chunk: Chunk, name: str) -> bool:
    """Delete a spare copy of a chunk's requests file; False (and a warning) when that failed."""
    try:
        provider.delete_file(name)
    except Exception as error:
        log.warning("job %s: deleting %s, a spare copy of chunk %d's requests, failed (%s)",
                    chunk.job_id, name, chunk.idx, error)
        return False
    return True


def _upload_intent(chunk: Chunk) -> dict:
    """The ``upload_state`` a create intent commits: for a file chunk, an upload may now be made."""
    return {"upload_state": UploadState.UPLOADING} if chunk.mode == "file" else {}


def _reusable(copies: list[RemoteFile], recorded: str | None, size: int) -> RemoteFile | None:
    """The copy of a chunk's requests file to create a batch from: the recorded one if it is among
    ``copies``, else the newest; only a complete one (active, of the chunk's size)."""
    usable = [f for f in copies if f.usable and f.size_bytes in (None, size)]
    for copy in usable:
        if copy.name == recorded:
            return copy
    return max(usable, key=lambda f: (f.create_time.timestamp() if f.create_time else 0.0, f.name), default=None)


def _creation_order(remote: RemoteJob) -> tuple[float, str]:
    """Oldest first (the one to keep when a crash left duplicates); unknown times last."""
    return (remote.create_time.timestamp() if remote.create_time else float("inf"), remote.name)
