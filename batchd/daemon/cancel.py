"""Cancel: what a cancel request (``batchd cancel``, a ``NAME.cancel`` file) does, state by state.

The request is committed on the job (``cancel_requested``) by intake; the loop then applies it on each
visit before the job's own step. Nothing already paid for is thrown away: chunks already sent are
cancelled remotely and whatever results they have are the job's. Two points act on it apart from
this table, because they are where an effect would otherwise follow: an upload that finishes for a
cancelled job is never created (:mod:`batchd.daemon.submit`), an unconfirmed create of a cancelled
job is never made again (``Submit.match``), and an expired chunk of one is not resubmitted
(:mod:`batchd.daemon.monitor`).
"""

from __future__ import annotations

from batchd.daemon.build import Build, Stopped
from batchd.daemon.context import Context
from batchd.daemon.deliver import Deliver
from batchd.daemon.monitor import Monitor
from batchd.journal import Job
from batchd.states import ChunkState, JobState


class Cancel:
    def __init__(self, ctx: Context, *, build: Build, deliver: Deliver, monitor: Monitor):
        self.ctx, self.build, self.deliver, self.monitor = ctx, build, deliver, monitor

    def apply(self, job: Job) -> bool:
        """Apply the job's cancel request; True when nothing else is to be done for the job on this visit."""
        if job.state == JobState.RECEIVED:
            if job.error is not None:
                return False  # rejected already: delivered as such by its step
            self.deliver.without_results(job, "cancelled")
            return True
        if job.state == JobState.BUILDING:
            stopped = self.build.stop(job)
            if stopped is Stopped.NOTHING_BUILT:
                self.deliver.without_results(job, "cancelled")
            return stopped is not Stopped.NOT_YET  # else the build goes on to its next chunk boundary
        if job.state in (JobState.BUILT, JobState.SUBMITTED):
            self.skip_unsent(job)
            if job.state == JobState.SUBMITTED:
                for chunk in self.ctx.journal.chunks(job.id):
                    if chunk.state == ChunkState.RUNNING and not chunk.cancel_sent:
                        self.monitor.send_cancel(chunk)
                    elif chunk.state == ChunkState.PACKED:
                        # Its requests share a batch with other jobs': that batch goes on, this job's share
                        # of it is dropped (batchd.daemon.pack cancels a batch no job is waiting for).
                        self.ctx.journal.update_chunk(job.id, chunk.idx, state=ChunkState.SKIPPED)
                        self.ctx.mark(chunk.packed_in)
        return False

    def skip_unsent(self, job: Job) -> None:
        """Chunks not yet sent are never sent (an expired one waiting to be sent again included)."""
        for chunk in self.ctx.journal.built_chunks(job.id, 1_000_000):
            self.ctx.journal.update_chunk(job.id, chunk.idx, state=ChunkState.SKIPPED)
