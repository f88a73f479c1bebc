"""What the journal's one writer keeps in memory of the rows it read, and the rule that keeps it true.

Every query the daemon's loop makes releases the GIL, and getting it back waits for whichever worker
holds it: under load a query costs the loop about a millisecond, whatever it reads. Because one
connection alone writes the journal (the state dir's lock), that connection may answer the loop's
many reads of the same rows from memory:

* a job as last read, and as each UPDATE of its row through this connection then left it (the
  values written, as a read would return them: :func:`batchd.journal.rows.job_values`);
* a job's chunks as last read (all of them, for jobs of at most :data:`KEPT_CHUNKS_PER_JOB`), and as each
  UPDATE of one of them through this connection then left it; dropped when a chunk is added or several
  jobs' chunks are written at once;
* everything, after any rollback (it may undo what was read inside it).

So a write rolled back costs a read, never a stale row. Both kinds are bounded (:data:`KEPT_JOBS`,
:data:`KEPT_CHUNKS`): past the bound, the writer starts over. A reader (the HTTP server, the CLI)
keeps nothing, as another process writes.
"""

from __future__ import annotations

from typing import Callable

from batchd.journal.rows import Chunk, Job

#: Job rows the writer keeps in memory at most; past that, it starts over.
KEPT_JOBS = 4096
#: A job's chunks are kept only when it has at most this many: a job of thousands of chunks is read as
#: before, its visits reading only the few they need.
KEPT_CHUNKS_PER_JOB = 256
#: Chunk rows kept in memory at most, of all jobs (a few MB); past that, it starts over.
KEPT_CHUNKS = 20_000


class KeptRows:
    """The rows one writer read, by job id. ``rollbacks`` counts its connection's rollbacks (each drops
    everything); ``keep`` False (a reader) keeps nothing."""

    def __init__(self, rollbacks: Callable[[], int], *, keep: bool = True):
        self._rollbacks = rollbacks
        self._seen_rollbacks = rollbacks()
        self._keep = keep
        self._jobs: dict[str, Job] = {}
        self._chunks: dict[str, list[Chunk]] = {}
        #: The chunks kept, of all jobs.
        self.chunk_count = 0
        #: Jobs seen with more than KEPT_CHUNKS_PER_JOB chunks: never read whole to be kept (a job's chunks
        #: are only ever added to while it runs).
        self._large: set[str] = set()

    @property
    def keeps(self) -> bool:
        return self._keep

    def job(self, job_id: str) -> Job | None:
        self._forget_after_rollback()
        return self._jobs.get(job_id)

    def keep_job(self, job: Job) -> Job:
        """``job``, as read, kept for the next read of it (up to :data:`KEPT_JOBS`: an active daemon's)."""
        if self._keep:
            if len(self._jobs) >= KEPT_JOBS:
                self._jobs.clear()
            self._jobs[job.id] = job
        return job

    def forget_job(self, job_id: str) -> None:
        """Called before every write of the job's row."""
        self._jobs.pop(job_id, None)

    def chunks(self, job_id: str) -> list[Chunk] | None:
        """The job's chunks as kept (callers copy before handing them out), or None."""
        self._forget_after_rollback()
        return self._chunks.get(job_id)

    def keep_chunks(self, job_id: str, chunks: list[Chunk]) -> None:
        """Every chunk of the job, as read."""
        if not self._keep:
            return
        if len(chunks) > KEPT_CHUNKS_PER_JOB:
            self.note_large(job_id)
            return
        self.forget_chunks(job_id)
        if self.chunk_count + len(chunks) > KEPT_CHUNKS:
            self._chunks.clear()
            self.chunk_count = 0
        self._chunks[job_id] = chunks
        self.chunk_count += len(chunks)

    def forget_chunks(self, *job_ids: str) -> None:
        """Called before every write of these jobs' chunks."""
        for job_id in job_ids:
            self.chunk_count -= len(self._chunks.pop(job_id, ()))

    def is_large(self, job_id: str) -> bool:
        """Whether the job has too many chunks to be kept (as far as this writer has seen)."""
        self._forget_after_rollback()
        return job_id in self._large

    def note_large(self, job_id: str) -> None:
        if len(self._large) >= KEPT_JOBS:
            self._large.clear()
        self._large.add(job_id)

    def _forget_after_rollback(self) -> None:
        rollbacks = self._rollbacks()
        if rollbacks != self._seen_rollbacks:
            self._seen_rollbacks = rollbacks
            self._jobs.clear()
            self._chunks.clear()
            self.chunk_count = 0
            self._large.clear()
