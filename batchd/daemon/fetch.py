"""Fetch: a finished remote batch's results → the job's spool (``running → fetched``).

Downloads run in a pool of ``max_concurrent_submissions`` threads (transfers like uploads); the
chunk stays ``running`` in the journal until its results are stored, so a download cut short by a
crash or a stop is simply made again.
"""

from __future__ import annotations

import logging
from typing import Callable

from batchd import fs
from batchd.daemon.context import Context, error_dict
from batchd.daemon.crashpoints import crashpoint
from batchd.daemon.pack import split_results
from batchd.journal import Chunk, SmallBuild
from batchd.logs import FailureRun
from batchd.provider import Provider, is_auth_error, is_retryable
from batchd.remote import RemoteJob, inline_results
from batchd.spool import JobSpool
from batchd.states import ChunkState

log = logging.getLogger("batchd")

#: A run of failed fetches (each tried again at the next poll) is said once, then summed up once every
#: this long while it lasts: a line per chunk per poll was hundreds a minute through an outage of downloads.
FETCH_FAILURES_SAID_SECONDS = 60.0


class Fetch:
    def __init__(self, ctx: Context, *, progress_events: Callable, disk_full: Callable):
        self.ctx = ctx
        self.fetches = ctx.workers("fetch", ctx.settings.max_concurrent_submissions)
        self._progress_events = progress_events
        self._disk_full = disk_full
        #: Finished chunks waiting for a free download thread, in the order they were seen.
        self._queued: dict[tuple[str, int], Chunk] = {}
        #: Fetches failing in a row, each tried again later.
        self._failures = FailureRun(FETCH_FAILURES_SAID_SECONDS)

    def start(self, chunk: Chunk, remote: RemoteJob | None = None) -> None:
        """Store a finished chunk's results in the spool, unless that is already under way or queued.

        ``remote``: the finished batch as a ``get`` just answered it (inline output included), so it is not
        asked for again; None when it was seen in a list (which leaves inline output out)."""
        key = (chunk.job_id, chunk.idx)
        if key in self.fetches or self.ctx.writes_paused():
            return  # under way, or no room to store the results: the next poll after the pause fetches them
        if not self.fetches.free():
            self._queued[key] = chunk
            return  # (its remote is asked for again when its turn comes: it may be big)
        self._queued.pop(key, None)
        journal = self.ctx.journal
        # A pack's results are split into its members' shares in the same work (batchd.daemon.pack).
        members = journal.packed_members(chunk.job_id) if journal.job(chunk.job_id).pack else None
        # A small job's requests are in the journal: they match answers returned inline without their key.
        small = journal.small_build(chunk.job_id) if members is None and chunk.mode == "inline" else None
        self.fetches.start(key, store_results, self.ctx.provider, chunk, self.ctx.spool(chunk.job_id), remote,
                           members, small, about=chunk)

    def busy(self) -> bool:
        return bool(len(self.fetches) or self._queued)

    def collect(self) -> None:
        """Record the chunks whose results are now in the spool; start the queued downloads."""
        journal = self.ctx.journal
        for work in self.fetches.finished():
            chunk = work.about
            try:
                remote, error, shares = work.future.result()
            except Exception as failure:
                # Transient (the network, a full disk here, a key refused: the operator's to fix, not the
                # job's): still 'running' in the journal, so the next poll fetches it again. Anything else
                # fails this chunk's requests, not the daemon.
                if fs.is_disk_full(failure):
                    self._disk_full(failure, "results", journal.job(chunk.job_id))
                    continue
                fs.unwritable_is_fatal("results", failure)
                if is_auth_error(failure):
                    self.ctx.key.refused(failure, f"fetching the results of job {chunk.job_id}'s chunk {chunk.idx}")
                    continue
                spool = self.ctx.spool(chunk.job_id)
                if isinstance(failure, FileNotFoundError) and not spool.root.is_dir():
                    # The job's spool folder was removed while it ran (not by batchd): the results have nowhere
                    # to go, now or later. The chunk ends without them; the job is delivered failed, saying why.
                    error = spool.removed_error(failure)
                    log.error("job %s: %s", chunk.job_id, error["message"])
                    journal.update_chunk(chunk.job_id, chunk.idx, state=ChunkState.FETCHED, error=error,
                                         events=self._progress_events(chunk, chunk.stats, finished=True))
                    continue
                if is_retryable(failure) or isinstance(failure, OSError):
                    self._say_failed(chunk, failure)
                    continue
                log.error("job %s: results of chunk %d cannot be fetched: %s", chunk.job_id, chunk.idx, failure)
                missing = getattr(failure, "code", None) == 404
                journal.update_chunk(chunk.job_id, chunk.idx, state=ChunkState.FETCHED,
                                     remote_state="missing" if missing else chunk.remote_state,
                                     error={"code": "remote_missing" if missing else "results_unavailable",
                                            "message": f"the results of {chunk.remote_name} could not be "
                                                       f"fetched: {error_dict(failure)['message']}"},
                                     events=self._progress_events(chunk, chunk.stats, finished=True))
                continue
            if failed := self._failures.succeeded():
                log.info("results are fetched again, after %d failed fetches", failed)
            journal.update_chunk(chunk.job_id, chunk.idx, state=ChunkState.FETCHED, remote_state=remote.state,
                                 stats=remote.stats, error=error,
                                 events=self._progress_events(chunk, remote.stats, finished=True))
            for (job_id, idx), (stats, share) in (shares or {}).items():
                member = journal.chunk(job_id, idx)
                if member.state == ChunkState.PACKED:  # (not cancelled since)
                    journal.update_chunk(job_id, idx, state=ChunkState.FETCHED, remote_name=remote.name,
                                         remote_state=remote.state, stats=stats, member_results=share,
                                         events=self._progress_events(member, stats, finished=True))
            log.info("job %s: chunk %d %s", chunk.job_id, chunk.idx, remote.state,
                     extra={"job": chunk.job_id, "chunk": chunk.idx, "remote_state": remote.state})
        for chunk in list(self._queued.values())[:self.fetches.free()]:
            self.start(chunk)

    def _say_failed(self, chunk: Chunk, failure: Exception) -> None:
        self._failures.say(log, f"job {chunk.job_id}: fetching chunk {chunk.idx} failed ({failure}); retrying later",
                           "fetches failed", {"job": chunk.job_id, "chunk": chunk.idx})

    def close(self) -> None:
        # A download cut short leaves its chunk 'running': the next start fetches it again.
        self._queued.clear()
        self.fetches.shutdown(cancel=True)
        if summary := self._failures.summary(now=True):
            log.warning("%d more fetches failed in the last %.0f s, each fetched again after the restart", *summary)


def store_results(provider: Provider, chunk: Chunk, spool: JobSpool, remote: RemoteJob | None = None,
                  members: list[Chunk] | None = None,
                  small: SmallBuild | None = None) -> tuple[RemoteJob, dict | None, dict | None]:
    """One get (list leaves inline output out) unless ``remote`` is one, then the results themselves (runs in
    the pool): the remote batch, the chunk's error (results it cannot have), and for a pack's chunk each of
    its ``members``' counts and share of the results, for the loop to commit (None: no results to share).
    ``small``: the job's build as the journal keeps it (its keys match answers the service left without one)."""
    if remote is None:
        remote = provider.get(chunk.remote_name)
    error = None
    if remote.responses_file:
        try:
            provider.download(remote.responses_file, spool.results_path(chunk.idx))
        except Exception as failure:
            if is_retryable(failure) or is_auth_error(failure):
                raise  # the next poll tries again (a refused key is the operator's to fix, not the job's)
            # A results file the service refuses for good must not stop every other job:
            # the chunk's requests are delivered as errors that say why.
            log.error("job %s: results of chunk %d cannot be downloaded: %s", chunk.job_id, chunk.idx, failure)
            error = {"code": "results_unavailable",
                     "message": f"{remote.responses_file} could not be downloaded: "
                                f"{error_dict(failure)['message']}"}
    elif remote.inlined is not None:
        spool.write_inline_results(chunk.idx, inline_results(remote.inlined), small)
    crashpoint("after-download")
    if members is None:
        return remote, error, None
    shares = split_results(spool, members) if error is None else None
    crashpoint("after-pack-split")
    return remote, error, shares
