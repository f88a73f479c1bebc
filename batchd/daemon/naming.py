"""The names batchd gives remote things: its idempotency keys.

A create or an upload whose answer was lost (a crash, a timeout) is found again in the service's
lists by the name batchd chose before sending it; so every name is derived from what the journal
already holds.
"""

from __future__ import annotations

from batchd.journal import Chunk, Job


def chunk_display_name(job: Job, idx: int, resubmits: int = 0) -> str:
    """The remote batch's display name: unique per chunk and attempt (an expired chunk's next
    attempt gets ``-r<n>``)."""
    return display_name(job.name, job.id, idx, resubmits)


def display_name(job_name: str, job_id: str, idx: int, resubmits: int = 0) -> str:
    """:func:`chunk_display_name` of a job known by its name and id (a pack, named before its row exists)."""
    return f"batchd-{job_name[:60]}-{job_id}-c{idx}" + (f"-r{resubmits}" if resubmits else "")


def upload_display_name(chunk_display_name: str) -> str:
    """The display name of a chunk's requests file on the Files API."""
    return f"{chunk_display_name}-requests"


def upload_display_names(chunk: Chunk) -> set[str]:
    """The upload display names of every attempt at a chunk: each attempt may have uploaded its
    requests under its own."""
    base = chunk.display_name.removesuffix(f"-r{chunk.resubmits}") if chunk.resubmits else chunk.display_name
    return {upload_display_name(base + (f"-r{n}" if n else "")) for n in range(chunk.resubmits + 1)}
