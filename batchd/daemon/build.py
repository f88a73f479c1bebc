"""Build: an admitted job's requests → chunk files in its spool, ``building`` → ``built``.

A task plugin's ``requests()`` runs in a thread of its own per job being built (a plugin that hangs
then holds up only its own job, see :mod:`batchd.plugin_calls`), at most ``max_concurrent_builds``
jobs at once; the others wait their turn in the journal, oldest first.

Nothing of a job is sent before every one of its input rows was read and checked: a bad row at the
end of a big input rejects the job whole instead of after some of it was billed. A job priced before
admission (a budget could hold it, or it reads input files: see :mod:`batchd.daemon.admit`) had its
rows read by that pass, so the loop records one chunk per visit and chunks already built are
submitted while the next is written. Any other job (its items inline, so small) is read whole by this
pass: its chunks are *held* (recorded together once the last is built) and it is priced on the way
(:class:`EstimateAlongside`), so it is also priced before it is sent.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from enum import Enum
from typing import Iterator

from batchd import fs
from batchd.costs import EstimateAlongside, JobInfo, spend_of
from batchd.costs import describe as describe_cost
from batchd.daemon.admit import TokenCounter, load_claimed
from batchd.daemon.context import Context, Stopping, Turns, manifest_error
from batchd.daemon.crashpoints import crashpoint
from batchd.daemon.naming import chunk_display_name
from batchd.journal import Job, replace_row
from batchd.manifest import ManifestError
from batchd.media import MediaResolver
from batchd.plugin_calls import OnDemand, PluginClock, PluginTimeout
from batchd.encoding import EmbedRequestEncoder, RequestEncoder
from batchd.cache import cache_path
from batchd.cache_split import CacheSplit
from batchd.spool import BuiltChunk, ChunkLimits
from batchd.states import JobState

log = logging.getLogger("batchd")


#: Chunks a job's build may have ready before the loop takes them, and the most a visit records and sends.
#: Why more than one: a busy loop then records (and sends) several in a visit instead of one a tick,
#: while a cancel still finds the build a few chunk files ahead at most (batchd.plugin_calls.OnDemand).
CHUNKS_AHEAD = 4


class Stopped(Enum):
    """How a cancelled job's build ended (see :meth:`Build.stop`)."""

    NOT_YET = "not yet"            # a chunk is being built: it is recorded first
    AFTER_CHUNKS = "after chunks"  # the chunks recorded so far are the job
    NOTHING_BUILT = "nothing built"


@dataclass
class Builder:
    """A job being built: its chunks from a thread of their own, the estimate its pass feeds, and which
    of its requests the request cache answers."""

    chunks: OnDemand = dataclasses.field(init=False)  # set once the builder exists: its thread fills the rest
    estimate: EstimateAlongside | None = None
    cache: CacheSplit | None = None
    #: Built chunks not yet recorded, for a build that holds them until its pass has read every row
    #: (None: each is recorded as it comes, and may be sent at once).
    held: list | None = None
    #: What the task said through batchd.task.warn() (complete once every request is read).
    warnings: list[str] = dataclasses.field(default_factory=list)

    def close(self, *, wait: bool = False) -> None:
        self.chunks.close(wait=wait)
        if self.estimate is not None:
            self.estimate.close()


class Build:
    def __init__(self, ctx: Context, tokens: TokenCounter):
        self.ctx = ctx
        self.builders: dict[str, Builder] = {}
        self.slots = ctx.settings.max_concurrent_builds
        self.turns = Turns()
        self._tokens = tokens  # shared with the estimates made before admission

    def step(self, job: Job) -> str:
        """Record the job's next chunk, if it is built (the next ones are built meanwhile, a few ahead).

        Returns the job's state after the step (the loop reads the job again only when it moved on)."""
        ctx = self.ctx
        builder = self.builders.get(job.id)
        if builder is None:
            if not self.turns.first(job.id, self.slots - len(self.builders)):
                self.turns.wait(job)
                return job.state
            try:
                builder = self._start(job)
            except Stopping:
                raise
            except Exception as error:  # noqa: BLE001 - classified as a failure of the build below
                return self._build_failed(job, error)
            if job.state != JobState.BUILDING:
                # The build starts now, not once 'building' commits: it writes only into the job's own
                # spool, and its first chunk row commits with 'building' or after it. A crash before
                # that commit leaves the job 'received', built again from the start.
                job = replace_row(job, state=JobState.BUILDING)
        self._ask(job, builder)
        kind, chunk = builder.chunks.take()
        if kind == "waiting":
            timeout = ctx.settings.plugin_timeout_seconds
            if builder.chunks.clock.overdue(timeout):
                return self._build_failed(job, builder.chunks.clock.timeout(timeout))
            if job.cancel_requested and builder.chunks.resting():
                ctx.mark(job.id)  # nothing more is coming: the cancel stops it on the next visit
            return job.state  # the next chunk is still being built; the feed marks the job when it is
        if kind == "error":
            return self._build_failed(job, chunk)
        if chunk is not None:
            if builder.held is not None:
                builder.held.append(chunk)  # recorded once every row is read
            else:
                self._record(job, chunk)
            if chunk.idx:
                crashpoint("while-building")
            self._ask(job, builder)  # built ahead while this one is sent
            return job.state
        if job.cancel_requested and builder.held is not None:
            # Cancelled while its chunks were held (none recorded, none sent), and built to the end
            # meanwhile: none is recorded now. The cancel's next visit delivers it with nothing built.
            self._release(job.id)
            ctx.mark(job.id)
            return job.state
        fields = {}
        if builder.estimate is not None:
            if not builder.estimate.done():
                return job.state  # every request is read; the estimate finishes in its thread (a countTokens call)
            if not builder.estimate.abandoned:
                fields["cost"] = {"estimate": builder.estimate.result}
                fields["spend"] = spend_of(fields["cost"])
                log.info("job %s: estimated %s", job.id, describe_cost(builder.estimate.result), extra={"job": job.id})
        hits = builder.cache.hits if builder.cache is not None else 0
        for chunk in builder.held or ():
            self._record(job, chunk)
        self._release(job.id)
        counts = ctx.journal.chunk_totals(job.id)
        if not counts["chunks"] and not hits:
            unsent = ctx.spool(job.id).first_unsent_error()
            if unsent is not None:  # every request had a file it cannot send
                return self._failed(job, {"message": f"no request can be sent: {unsent['message']}",
                                          "code": unsent["code"]})
            return self._failed(job, {"message": f"task {job.task!r} produced no requests from the manifest"})
        # Kept in the spool (written before 'built' commits; a build started again writes it anew) for
        # summary.json's warnings, and said now.
        ctx.spool(job.id).write_warnings(builder.warnings, step="requests")
        for warning in builder.warnings:
            log.warning("job %s (%s): %s", job.id, job.source, warning, extra={"job": job.id})
        # A job the cache answers whole has no chunk: it goes on to be delivered, sending nothing.
        ctx.journal.update_job(job.id, state=JobState.BUILT, **fields)
        log.info("job %s: %d requests in %d chunk(s)%s", job.id, counts["requests"], counts["chunks"],
                 f", {hits} answered from the request cache" if hits else "")
        return JobState.BUILT

    def _ask(self, job: Job, builder: Builder) -> None:
        """Keep the build ``CHUNKS_AHEAD`` chunks ahead; once the job is cancelled, ask for nothing more
        (its build comes to rest after the chunk being built: :meth:`stop`) but the chunks a restarted
        build must make again."""
        if not job.cancel_requested:
            builder.chunks.ask()
        elif self._rebuilding(job, builder):
            builder.chunks.ask(most=1)
        else:
            builder.chunks.withdraw()

    def has_chunk(self, job_id: str) -> bool:
        """Whether the job's next chunk is built, waiting to be taken by :meth:`step`."""
        builder = self.builders.get(job_id)
        return builder is not None and builder.chunks.ready()

    def _rebuilding(self, job: Job, builder: Builder) -> bool:
        """Whether the build, started again after a restart, has not yet made every chunk recorded before."""
        recorded = self.ctx.journal.chunks(job.id)
        last = builder.chunks.last
        return bool(recorded) and (last is None or last.idx < recorded[-1].idx)

    def sends_while_building(self, job_id: str) -> bool:
        """Whether the job's chunks may go out while later ones are built: its rows were all read (and
        it was priced) before admission. Else its chunks are held until the build ends."""
        builder = self.builders.get(job_id)
        return builder is None or builder.held is None

    def _start(self, job: Job) -> Builder:
        """The chunks of a job, built in a thread of their own; after a crash the same chunks are built
        again, with the same limits. Only the loop's thread records them in the journal. The task,
        model and kind are the claim's (it recorded what it checked); the manifest is read again in the
        build's thread (:meth:`_chunks`): parsing it is no work for the loop."""
        ctx = self.ctx
        model = job.model or ctx.settings.model
        limits = job.chunk_limits or dataclasses.asdict(self._limits(job.kind))
        if job.state != JobState.BUILDING:
            ctx.journal.update_job(job.id, state=JobState.BUILDING, chunk_limits=limits)
        job_id = job.id

        def look_again() -> None:  # a chunk is built, or the estimate is done: the loop takes it at once
            ctx.mark(job_id)
            ctx.wake()

        estimate = None
        # A job estimated before admission had its rows read by that pass; chunks recorded already went
        # out as they came (a build a restart cut short). Else this pass is the first to read the rows:
        # it holds the chunks until the last row is read (a bad row rejects the job with nothing sent).
        first_read = job.cost is None and not ctx.journal.chunk_totals(job.id)["chunks"]
        if job.cost is None and ctx.costs.estimates:
            # Priced from the same pass, so it is priced before any of it is sent.
            info = JobInfo.of(replace_row(job, model=model))
            counter, settings, costs = self._tokens.for_model(model), ctx.settings, ctx.costs
            observed = ctx.journal.observed_output(job.task, model)
            estimate = EstimateAlongside(lambda stream: costs.estimate(info, stream, counter, settings, observed),
                                         job.id, on_done=look_again)
        clock = ctx.plugin_clock(job.task, "requests()")
        builder = Builder(estimate, held=[] if first_read else None)
        builder.chunks = OnDemand(self._chunks(job, model, ChunkLimits(**limits), clock, builder), clock,
                                  name=f"batchd-build-{job.id}", on_ready=look_again, ahead=CHUNKS_AHEAD)
        self.builders[job.id] = builder
        return builder

    def _chunks(self, job: Job, model: str, limits: ChunkLimits, clock: PluginClock,
                builder: Builder) -> Iterator[BuiltChunk]:
        """The job's chunks, made in the build's thread: the claimed manifest read, its task's requests
        through the request cache and the estimate, written into chunk files of the job's spool."""
        ctx = self.ctx
        manifest = load_claimed(ctx, job)
        builder.warnings = manifest.warnings  # read by the loop once the build has ended
        # Settings are merged per request by the manifest, so the encoder has no defaults.
        encoder = EmbedRequestEncoder() if job.kind == "embed" else RequestEncoder(model)
        # Files are read, checked and kept (by hash, in the spool) in the build's thread: see batchd.media.
        spool = ctx.spool(job.id)
        media = MediaResolver(ctx.settings.inbox, spool.root / "media",
                              inline_max_bytes=ctx.settings.media_inline_max_bytes)
        requests = clock.iterate(manifest.requests(media))
        use_cache = manifest.common.cache if manifest.common.cache is not None else ctx.settings.cache
        if use_cache or spool.cached_path.exists():
            # Decisions a first pass made are kept even if the setting changed since (CacheSplit).
            builder.cache = CacheSplit(spool, cache_path(ctx.settings.state_dir) if use_cache else None, job.kind,
                                       model, encoder.encode)
            requests = builder.cache.tag(requests)
        if builder.estimate is not None:
            requests = builder.estimate.feed(requests)
        try:
            yield from spool.build(requests, encoder.encode, limits, check_stop=ctx.raise_if_stopping,
                                   cache=builder.cache)
        finally:
            # Closed here, in the thread that made it: its cleanup (an SQLite connection's, say) must run
            # in that thread, and an error's traceback would otherwise keep it suspended.
            requests.close()

    def stop(self, job: Job) -> Stopped:
        """End the build of a job whose cancel was requested, at the chunk boundary it is at.

        The chunks recorded so far are the job (those not yet sent end skipped, never submitted);
        the requests after them are never built nor sent, and the summary says so. A build a restart
        cut off rebuilds its recorded chunks first (NOT_YET until then): the index that joins
        their results back is written by the build, and a kill may have left it short.
        """
        ctx = self.ctx
        chunks = ctx.journal.chunks(job.id)
        builder = self.builders.get(job.id)
        last = builder.chunks.last if builder is not None else None
        if chunks and (last is None or last.idx < chunks[-1].idx):
            return Stopped.NOT_YET
        if builder is not None and not builder.chunks.resting():
            return Stopped.NOT_YET  # a chunk is being built: it is recorded first, and the build stops after it
        self._release(job.id, wait=True)  # at a chunk boundary: the index holds exactly the recorded chunks
        if not chunks:
            log.info("job %s (%s): cancelled before any request was built", job.id, job.source)
            return Stopped.NOTHING_BUILT
        cut_short = not last.last
        ctx.journal.update_job(job.id, state=JobState.BUILT, build_stopped=cut_short)
        log.info("job %s (%s): cancelled while being built; %s", job.id, job.source,
                 f"building stopped after chunk {last.idx}" if cut_short else "every request was built",
                 extra={"job": job.id})
        return Stopped.AFTER_CHUNKS

    def abandon(self, job_id: str) -> None:
        """A full disk cut the build short: it starts afresh once there is room."""
        self._release(job_id, wait=True)  # its thread has ended with the error, or rests between chunks

    def forget(self, job_id: str) -> None:
        """The job is delivered without being built (cancelled, rejected)."""
        self.turns.forget(job_id)
        self._release(job_id)
        self.ctx.claimed_manifests.forget(job_id)

    def _release(self, job_id: str, *, wait: bool = False) -> None:
        builder = self.builders.pop(job_id, None)
        if builder is not None:
            builder.close(wait=wait)
            self.turns.call(self.slots - len(self.builders), self.ctx.mark)

    def _record(self, job: Job, chunk) -> None:
        ctx = self.ctx
        recorded = {"idx": chunk.idx, "display_name": chunk_display_name(job, chunk.idx), "mode": chunk.mode,
                    "request_count": chunk.request_count, "byte_size": chunk.byte_size, "media": chunk.media}
        if ctx.journal.add_chunk(job.id, recorded, chunk.small):
            return
        # Recorded before a crash, and perhaps submitted already: the rebuild must agree with it.
        before = next(c for c in ctx.journal.chunks(job.id) if c.idx == chunk.idx)
        if (before.request_count, before.byte_size) != (chunk.request_count, chunk.byte_size):
            raise RuntimeError(f"chunk {chunk.idx} came out different when rebuilt after a restart: "
                               f"task {job.task!r} must build the same requests from the same manifest")

    def _build_failed(self, job: Job, error: BaseException) -> str:
        """Reject (or cut short) the job whose build raised ``error``; never the daemon."""
        if isinstance(error, Stopping) or not isinstance(error, Exception):
            raise error
        if isinstance(error, ManifestError):
            return self._failed(job, manifest_error(error, self.ctx.settings.limits.error_chars))
        if isinstance(error, PluginTimeout):  # a hung plugin: its thread is left behind, the job fails
            log.error("job %s: %s", job.id, error, extra={"job": job.id})
            return self._failed(job, {"message": str(error)})
        if fs.is_disk_full(error):
            raise error  # no room for the chunk files: the loop backs off and the build starts again
        fs.unwritable_is_fatal("requests", error)
        log.error("job %s: building requests failed", job.id, exc_info=error)
        return self._failed(job, {"message": f"task {job.task!r} failed to build requests: "
                                             f"{type(error).__name__}: {error}"})

    def _failed(self, job: Job, error: dict) -> str:
        ctx = self.ctx
        self._release(job.id)
        if not ctx.journal.chunk_totals(job.id)["chunks"]:
            ctx.journal.update_job(job.id, state=JobState.RECEIVED, error=error)  # rejected: nothing was sent
            return JobState.RECEIVED
        # Chunks already out may be running: their results are kept, the requests that were never
        # sent show up as errors, and the summary says why the job stopped short.
        log.error("job %s: building stopped part way: %s", job.id, error["message"])
        ctx.journal.update_job(job.id, state=JobState.BUILT, error=error)
        return JobState.BUILT

    def _limits(self, kind: str = "generate") -> ChunkLimits:
        s = self.ctx.settings
        inline_max = s.inline_max_requests
        if kind == "embed":
            # google-genai sends inline embeddings without keys, so their answers could only be matched by
            # position: an embed chunk goes inline only when it holds one request (a match that is certain).
            inline_max = min(inline_max, 1)
        return ChunkLimits(s.chunk_max_requests, s.chunk_max_bytes, inline_max, s.inline_max_bytes)

    def close(self) -> None:
        for builder in self.builders.values():
            builder.close()
        self.builders.clear()
