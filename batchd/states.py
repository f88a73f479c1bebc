"""The states of a job, of a chunk, of a chunk's requests file, of a file sent with requests and of a stray;
the moves allowed between job and chunk states.

This module is the one home of that vocabulary: the journal refuses a transition missing from
:data:`JOB_MOVES` or :data:`CHUNK_MOVES`, the daemon's loop reads as a table from job state to step,
and the diagrams in :mod:`batchd.journal` are checked against these tables by a test.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    CLAIMING = "claiming"      # its row is committed, the manifest is being moved into the spool
    RECEIVED = "received"      # claimed; waits for its estimate, budget decision and a build slot
    HELD = "held"              # over budget: waits for `batchd approve` or room in the budget
    BUILDING = "building"      # chunks are being built (and already submitted as they come)
    BUILT = "built"            # every chunk is known
    SUBMITTED = "submitted"    # every chunk was sent; remote batches run
    FETCHED = "fetched"        # every chunk's results (or its reason for having none) are in the spool
    PUBLISHING = "publishing"  # its outbox folder is chosen and committed, being renamed into place
    DONE = "done"              # delivered, with an outcome


class ChunkState(StrEnum):
    BUILT = "built"            # its requests file is complete in the spool
    PACKED = "packed"          # its requests travel in a pack's remote batch (``packed_in``; batchd/daemon/pack.py)
    SUBMITTING = "submitting"  # create intent committed; the remote batch may or may not exist
    RUNNING = "running"        # its remote batch exists (remote_name recorded)
    FETCHED = "fetched"        # its results are in the spool, or it ended without any (see error)
    SKIPPED = "skipped"        # cancelled: never sent, or its unconfirmed create never showed up


class UploadState(StrEnum):
    """A file chunk's requests file on the Files API (``chunks.upload_state``)."""

    UPLOADING = "uploading"    # copies may exist whose names nobody recorded
    UPLOADED = "uploaded"      # ``uploaded_file`` is the only copy
    DELETED = "deleted"
    KEPT = "kept"              # deletion is off, or the service refused it


class StrayOutcome(StrEnum):
    """What became of a stray: a remote batch under one of our display names that is not its chunk's
    own (``remote_jobs.outcome`` of a ``duplicate``; see batchd/daemon/monitor.py)."""

    CANCELLING = "cancelling"  # recorded; its cancel not yet taken by the service (it runs, and counts)
    CANCELLED = "cancelled"
    FINISHED = "finished"      # it had ended on its own when found: billed, its results unused


class MediaState(StrEnum):
    """A file sent with requests, on the Files API (``media.state``, one row per content hash; see
    batchd/daemon/media.py)."""

    NEW = "new"              # recorded with a chunk that needs it; never uploaded
    UPLOADING = "uploading"  # intent: copies may exist under its display name whose names nobody recorded
    ACTIVE = "active"        # ``remote_name``/``uri`` recorded
    DELETING = "deleting"    # intent: a deletion round may be removing it
    DELETED = "deleted"
    FAILED = "failed"        # the service refused the upload; the chunks needing it fail


#: Every allowed job transition.
JOB_MOVES: frozenset[tuple[JobState, JobState]] = frozenset({
    (JobState.CLAIMING, JobState.RECEIVED),
    (JobState.CLAIMING, JobState.DONE),          # the manifest vanished before its claim finished
    (JobState.RECEIVED, JobState.HELD),
    (JobState.RECEIVED, JobState.BUILDING),
    (JobState.RECEIVED, JobState.PUBLISHING),    # rejected or cancelled: delivered without results
    (JobState.HELD, JobState.RECEIVED),          # approved, within budget again, or cancelled
    (JobState.BUILDING, JobState.BUILT),
    (JobState.BUILDING, JobState.RECEIVED),      # the build failed before any chunk: rejected next
    (JobState.BUILDING, JobState.PUBLISHING),    # cancelled before any chunk was built
    (JobState.BUILT, JobState.SUBMITTED),
    (JobState.SUBMITTED, JobState.FETCHED),
    (JobState.SUBMITTED, JobState.DONE),         # a pack, once its members have its results (never delivered)
    (JobState.FETCHED, JobState.PUBLISHING),
    (JobState.PUBLISHING, JobState.DONE),
    (JobState.PUBLISHING, JobState.FETCHED),     # its staged folder was lost: written again
    (JobState.PUBLISHING, JobState.RECEIVED),    # the same, for a job delivered without results
})

#: Every allowed chunk transition (a chunk is born ``built``).
CHUNK_MOVES: frozenset[tuple[ChunkState, ChunkState]] = frozenset({
    (ChunkState.BUILT, ChunkState.SUBMITTING),
    (ChunkState.BUILT, ChunkState.SKIPPED),        # cancelled before it was sent
    (ChunkState.BUILT, ChunkState.PACKED),         # sealed into a pack with other small jobs' chunks
    (ChunkState.PACKED, ChunkState.FETCHED),       # its share of the pack's results is in its own spool, or the
                                                   # pack ended without results, as it did
    (ChunkState.PACKED, ChunkState.SKIPPED),       # cancelled: its share of the pack's results is dropped
    (ChunkState.PACKED, ChunkState.BUILT),         # the service refused the pack's create: it is sent alone
    (ChunkState.SUBMITTING, ChunkState.RUNNING),   # the create's answer, or found by its display name
    (ChunkState.SUBMITTING, ChunkState.FETCHED),   # the create was refused (remote_state "rejected")
    (ChunkState.SUBMITTING, ChunkState.SKIPPED),   # cancelled; its create never showed up
    (ChunkState.SUBMITTING, ChunkState.BUILT),     # the service refused the API key or its quota (429): nothing was created
    (ChunkState.RUNNING, ChunkState.FETCHED),      # results stored, or the remote batch ended without
    (ChunkState.RUNNING, ChunkState.BUILT),        # expired: submitted again under its next display name
})

#: States of a job that still needs the daemon.
ACTIVE_JOB_STATES = tuple(state for state in JobState if state not in (JobState.HELD, JobState.DONE))
#: Job states whose chunks may have remote batches in flight.
JOB_STATES_WITH_REMOTE_WORK = (JobState.BUILDING, JobState.BUILT, JobState.SUBMITTED)
#: Chunk states in which a remote batch exists, or may, and is not known to have finished.
REMOTE_LIVE_CHUNK_STATES = (ChunkState.SUBMITTING, ChunkState.RUNNING)
#: Chunk states that are final for this attempt: its results (or their absence) are settled.
CHUNK_DONE_STATES = (ChunkState.FETCHED, ChunkState.SKIPPED)


def _sources(moves: frozenset[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    """For each state, the states a row may be in to take it (itself included: a field update)."""
    sources: dict[str, set[str]] = {}
    for before, after in moves:
        sources.setdefault(after, {after}).add(before)
    return {state: tuple(sorted(found)) for state, found in sources.items()}


#: State → the job states allowed to move to it (the journal's UPDATE checks the move in its WHERE).
JOB_SOURCES = _sources(JOB_MOVES)
#: State → the chunk states allowed to move to it.
CHUNK_SOURCES = _sources(CHUNK_MOVES)


class IllegalMove(RuntimeError):
    """A step tried a transition missing from the tables above: a bug, never bad input."""


def check_job_move(before: str, after: str) -> None:
    if before != after and (before, after) not in JOB_MOVES:
        raise IllegalMove(f"job state {str(before)!r} → {str(after)!r} is not a transition batchd allows")


def check_chunk_move(before: str, after: str) -> None:
    if before != after and (before, after) not in CHUNK_MOVES:
        raise IllegalMove(f"chunk state {str(before)!r} → {str(after)!r} is not a transition batchd allows")
