"""Pack: small jobs share one remote batch (member chunks ``built → packed → fetched``).

Each remote batch costs a create, polls and a fetch, waits its own turn in the service's queue, and
Google runs at most 100 of a project's at once (``max_remote_batches``). A burst of thousands of
two-request manifests sent one batch each would wait for dozens of rounds of 100. So the one chunk
of a small job (fewer than ``pack_jobs_below`` requests, inline, a ``generate`` task, no file
uploaded for it) is not sent alone: a visit *offers* it (``Submit.step``), and offers are sealed
into a *pack*, a job of batchd's own whose one chunk carries up to ``inline_max_requests``
requests of as many jobs, under keys ``<job id>/<idx>/<key>``. The pack's chunk is submitted,
reconciled, polled, resubmitted when it expires and fetched by the same steps as any chunk; the
pack itself is never delivered, announced or shown (``jobs.pack``; ``Context.event`` gives it none).

When: offers are sealed whenever the submission pool has room, at the end of every tick, and one
pack right after the tick's collect, when the pool frees up (a pack takes its turn like one job's
chunk, so neither big jobs nor packs starve). An offer alone is sent alone: one manifest dropped into a quiet daemon waits for nobody.
Under load the pool is busy, offers pile up meanwhile and leave together.

Crash safety (docs/design.md, "Packs"): the pack's requests file is written and synced before the
transaction that records the pack and moves its members ``built → packed`` (their jobs ``built →
submitted``); a crash before that commit leaves an unknown spool folder (removed at start) and the
members ``built``, sealed again. The fetch of the pack's chunk splits the results into each member's
share, which the loop commits to the journal with the member's move ``packed → fetched``
(batchd.daemon.fetch), so a crash before that fetches and splits again. A pack that ended without
results ends its members as it ended (failed, expired past ``resubmit_expired``, vanished: what a
chunk of their own would have got, never sent again, so never billed twice), except one whose
create the service refused: nothing ran, and one member's request may be what it refused, so its
members are sent alone (``packed → built``; a chunk is packed once). A member cancelled meanwhile is
``packed → skipped``, its share dropped; a pack whose members are all gone is cancelled.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, Iterable

from batchd import fs
from batchd.daemon.context import Context
from batchd.daemon.crashpoints import crashpoint
from batchd.daemon.naming import display_name
from batchd.journal import Chunk, Job, SmallBuild, new_job_id
from batchd.spool import JobSpool, results_lines
from batchd.states import CHUNK_DONE_STATES, REMOTE_LIVE_CHUNK_STATES, ChunkState, JobState

log = logging.getLogger("batchd")

#: A pack's job name, in its display names (``batchd-pack-<id>-c0``).
PACK_NAME = "pack"
#: Separates a member's job id, chunk index and own key in a pack's request keys (a job id has none).
KEY_SEPARATOR = "/"
#: An offer waits at most this long for company while other jobs are on their way (claimed, estimated,
#: built): nothing, next to the minutes to hours a remote batch takes, and what turns a burst into a
#: few batches. A manifest alone in the daemon does not wait at all.
PACK_WAIT_SECONDS = 0.25
#: The job states of jobs on their way to be offered.
ON_THEIR_WAY = (JobState.CLAIMING, JobState.RECEIVED, JobState.BUILDING)
#: Bytes a pack's key adds to each request line, at most: a job id, a chunk index, two separators.
KEY_OVERHEAD = 40


def pack_key(job_id: str, idx: int, key: str) -> str:
    return f"{job_id}{KEY_SEPARATOR}{idx}{KEY_SEPARATOR}{key}"


def member_of(key: object) -> tuple[str, int, str] | None:
    """``(job id, chunk idx, own key)`` of a pack's request key; None for one batchd never wrote."""
    if not isinstance(key, str):
        return None
    parts = key.split(KEY_SEPARATOR, 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


class Pack:
    """The offers of small jobs' chunks, and the step of every pack (a job whose ``pack`` is set)."""

    def __init__(self, ctx: Context, *, send_alone: Callable[[Job, Chunk], None], free: Callable[[], int],
                 submit_step: Callable[[Job], None]):
        self.ctx = ctx
        self._send_alone = send_alone
        self._free = free
        self._submit_step = submit_step  # sends a pack's chunk as any job's
        #: (job id, idx) → the offered chunk's requests and when it was first offered (monotonic), oldest
        #: first: as little as a job waiting in a pool's line keeps. The chunk stays ``built`` in the
        #: journal (read again when sealed), so a crash forgets nothing: the job is visited and offers it again.
        self.offered: dict[tuple[str, int], tuple[int, float]] = {}
        self._offered_requests = 0  # their requests, as offered
        #: Removes an ended pack's spool once that is committed; the daemon plugs in Deliver.remove_spool,
        #: which removes it in the cleanup thread rather than the loop's.
        self.remove_spool: Callable[[str], None] = lambda job_id: ctx.journal.after_commit(ctx.spool(job_id).remove)
        #: Called with an ending pack's remote batch, to delete it once that is committed; the daemon plugs in
        #: Uploads.batches_done.
        self.batches_done: Callable[[list[str]], None] = lambda names: None

    @property
    def enabled(self) -> bool:
        settings = self.ctx.settings
        return settings.pack_jobs_below > 1 and settings.inline_max_bytes > 0 and settings.inline_max_requests > 1

    def offer(self, job: Job, chunk: Chunk) -> bool:
        """Take ``chunk`` (the next built chunk of ``job``) for a pack; False if it is to be sent alone."""
        if not (self.enabled and not job.pack and job.state == JobState.BUILT and job.kind == "generate"
                and chunk.mode == "inline" and chunk.request_count < self.ctx.settings.pack_jobs_below
                and chunk.packed_in is None and not chunk.resubmits):
            return False
        journal = self.ctx.journal
        if journal.chunk_totals(job.id)["chunks"] != 1 or journal.chunk_media(job.id, chunk.idx):
            return False  # one chunk of a bigger job, or requests whose files are uploaded first
        if (job.id, chunk.idx) not in self.offered:
            self.offered[(job.id, chunk.idx)] = (chunk.request_count, time.monotonic())
            self._offered_requests += chunk.request_count
        return True

    def _take(self, key: tuple[str, int]) -> None:
        requests, _ = self.offered.pop(key)
        self._offered_requests -= requests

    def forget(self, job_id: str) -> None:
        for key in [key for key in self.offered if key[0] == job_id]:
            self._take(key)

    def seal(self, *, most: int | None = None) -> None:
        """Seal the offers into packs while the pool has room (at most ``most`` packs). A pack leaves
        once it is full, once no other job is on its way to join it (being claimed, estimated or
        built), or once its oldest offer has waited :data:`PACK_WAIT_SECONDS`; an offer with no company
        is sent alone."""
        if not self.offered:
            return
        slots = self._free() if most is None else min(most, self._free())
        if slots <= 0:
            return
        journal = self.ctx.journal
        settings = self.ctx.settings
        if self.seconds_until_due() > 0 and self._offered_requests + settings.pack_jobs_below \
                <= settings.inline_max_requests and journal.count_jobs(ON_THEIR_WAY, limit=1):
            return  # no pack can be full yet, and more may join: not worth reading the offers again
        jobs = {job.id: job for job in journal.jobs_by_id({job_id for job_id, _ in self.offered})}
        ready: list[tuple[Job, Chunk, float]] = []
        for key, (_, offered_at) in list(self.offered.items()):
            job = jobs.get(key[0])
            current = journal.chunk(*key) if job is not None else None
            if job is None or job.cancel_requested or job.state != JobState.BUILT or current is None \
                    or current.state != ChunkState.BUILT:
                self._take(key)  # cancelled, or gone on another way since it was offered
                continue
            ready.append((job, current, offered_at))
        coming = None
        while ready and slots > 0:
            waited = time.monotonic() - ready[0][2]
            members, full = self._fill(ready)
            if not full and waited < PACK_WAIT_SECONDS:
                if coming is None:
                    coming = journal.count_jobs(ON_THEIR_WAY, limit=1)
                if coming:
                    break  # the pack may grow: the offers wait (Pack.seconds_until_due)
            for job, chunk in members:
                self._take((job.id, chunk.idx))
            if len(members) == 1:
                self._send_alone(*members[0])
            else:
                self._seal_or_send_alone(members)
            slots -= 1

    def seconds_until_due(self) -> float:
        """Until the oldest offer has waited long enough to leave without a full pack (inf: none waits)."""
        oldest = next(iter(self.offered.values()), None)
        return float("inf") if oldest is None else max(0.0, oldest[1] + PACK_WAIT_SECONDS - time.monotonic())

    def _fill(self, ready: list[tuple[Job, Chunk, float]]) -> tuple[list[tuple[Job, Chunk]], bool]:
        """Take from ``ready`` the oldest offer and the offers after it that fit in one pack with it
        (same model, within the inline limits); and whether that pack is full (an offer of its model was
        left out, or no member of the largest size packed would fit)."""
        settings = self.ctx.settings
        model = self.ctx.model_of(ready[0][0])
        members, requests, size, left, full = [], 0, 0, [], False
        for job, chunk, offered_at in ready:
            grown = size + chunk.byte_size + KEY_OVERHEAD * chunk.request_count
            if self.ctx.model_of(job) != model:
                left.append((job, chunk, offered_at))
            elif requests + chunk.request_count <= settings.inline_max_requests \
                    and (not members or grown <= settings.inline_max_bytes):
                members.append((job, chunk))
                requests += chunk.request_count
                size = grown
            else:
                left.append((job, chunk, offered_at))
                full = True
        ready[:] = left
        return members, full or requests + settings.pack_jobs_below > settings.inline_max_requests

    def _seal_or_send_alone(self, members: list[tuple[Job, Chunk]]) -> None:
        try:
            self._seal(members)
        except OSError as error:
            if fs.is_disk_full(error):
                raise  # the loop pauses the writing steps; the offers are made again once there is room
            fs.unwritable_is_fatal("requests", error)
            # A member's requests file cannot be read (its spool was tampered with): nothing is recorded,
            # and each goes alone, where an unreadable file fails its own job only.
            log.error("a pack of %d jobs could not be written (%s); sending them alone", len(members), error)
            for job, chunk in members:
                self._send_alone(job, chunk)

    def _seal(self, members: list[tuple[Job, Chunk]]) -> None:
        """Write the pack's requests file, then commit the pack and its members' moves together."""
        ctx = self.ctx
        pack_id = new_job_id()
        spool = ctx.spool(pack_id)
        spool.root.mkdir(parents=True)
        requests, size = spool.write_requests(0, _pack_lines(
            (chunk, ctx.spool(job.id), ctx.journal.small_build(job.id)) for job, chunk in members))
        crashpoint("after-pack-requests")
        ctx.journal.add_pack(pack_id, name=PACK_NAME, model=ctx.model_of(members[0][0]),
                             chunk={"display_name": display_name(PACK_NAME, pack_id, 0), "request_count": requests,
                                    "byte_size": size},
                             members=[chunk for _, chunk in members])
        log.info("pack %s: %d small jobs share one remote batch (%d requests)", pack_id, len(members), requests,
                 extra={"job": pack_id, "requests": requests, "members": len(members)})

    def step(self, pack: Job) -> None:
        """A pack's own step: its chunk is sent (again, once expired) like any; once it is done, the members
        the fetch gave no results end as the pack did (or go alone, if its create was refused), and the
        pack is done."""
        ctx = self.ctx
        journal = ctx.journal
        chunk = journal.chunk(pack.id, 0)
        if chunk is None:
            return
        if chunk.state == ChunkState.BUILT:
            self._submit_step(pack)
            return
        members = journal.packed_members(pack.id)
        if chunk.state in REMOTE_LIVE_CHUNK_STATES:
            if not members and not pack.cancel_requested:
                log.info("pack %s: every job in it was cancelled; cancelling its remote batch", pack.id,
                         extra={"job": pack.id})
                journal.update_job(pack.id, cancel_requested=1)
            return
        if chunk.state not in CHUNK_DONE_STATES:
            return
        # Members the fetch did not give results to (batchd.daemon.fetch moved the others). The service
        # refused the create: nothing ran or was billed, and one member's request may be what it refused,
        # so each is sent alone. Else they end as the pack did, as a chunk of their own would have.
        for member in members:
            if chunk.remote_state == "rejected":
                log.warning("job %s: the service refused the batch it shared with %d other jobs (%s); sending it "
                            "alone", member.job_id, len(members) - 1, (chunk.error or {}).get("message"),
                            extra={"job": member.job_id})
                journal.update_chunk(member.job_id, member.idx, state=ChunkState.BUILT)
            else:
                journal.update_chunk(member.job_id, member.idx, state=ChunkState.FETCHED, remote_name=chunk.remote_name,
                                     remote_state=chunk.remote_state, error=chunk.error)
        journal.update_job(pack.id, state=JobState.DONE, outcome=chunk.remote_state or chunk.state,
                           finished_at=time.time())
        self.remove_spool(pack.id)  # its members' shares are in the journal
        if chunk.remote_name:  # ... so nothing reads its remote batch again
            self.batches_done([chunk.remote_name])  # (committed with 'done', deleted after it)


def _pack_lines(members: Iterable[tuple[Chunk, JobSpool, SmallBuild | None]]) -> Iterable[str]:
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    for chunk, spool, small in members:
        for line in spool.read_requests(chunk.idx, small):
            line["key"] = pack_key(chunk.job_id, chunk.idx, line["key"])
            yield encode(line) + "\n"


def split_results(pack: JobSpool, members: list[Chunk]) -> dict[tuple[str, int], tuple[dict, str]] | None:
    """Each member's share of the pack's stored results, under its own keys, as JSON lines, with its counts as
    ``batchStats`` (runs in the fetch pool; the loop commits each share with its member's move to ``fetched``).
    None when the pack has no results (its step then ends its members as it ended: :meth:`Pack.step`)."""
    if not pack.results_path(0).exists():
        return None
    shares: dict[tuple[str, int], list[dict]] = {(chunk.job_id, chunk.idx): [] for chunk in members}
    dropped = 0
    for record in pack.read_results(0):
        found = member_of(record.get("key"))
        share = shares.get(found[:2]) if found else None
        if share is None:
            dropped += 1  # a member cancelled since, or a key batchd never sent
            continue
        if record.get("joined_by") == "position":
            # The service returned this answer without its key; matched by position within one job that
            # is a guess the job's results mark, but in a shared batch the answer may be another job's.
            # No job is given an answer that may not be its own.
            record = {"error": {"code": "key_dropped", "message": "the service returned this request's answer "
                                "without its key, in a batch shared with other jobs: it is not matched by "
                                "position (it could be another job's); send it again with `batchd retry`"}}
        share.append({**record, "key": found[2]})
    if dropped:
        log.info("%s: %d results belong to no member waiting for them", pack.root.name, dropped)
    split = {}
    for chunk in members:
        records = shares[(chunk.job_id, chunk.idx)]
        failed = sum(1 for record in records if "error" in record)
        counts = {"requestCount": chunk.request_count, "successfulRequestCount": len(records) - failed,
                  "failedRequestCount": failed, "pendingRequestCount": 0}
        split[(chunk.job_id, chunk.idx)] = counts, results_lines(records)
    return split
