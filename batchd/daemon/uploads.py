"""What the service keeps for finished work, deleted: a finished chunk's uploaded requests from the Files
API, the files sent with requests once no chunk needs them, and the remote batches of delivered jobs.

Once a chunk is ``fetched`` (or ``skipped``) nothing will create a batch from its requests file
again (see :mod:`batchd.journal`, ``upload_state``). Once a job is delivered (a pack: once every member
has its share of the results in its spool) nothing reads its remote batch again: with
``delete_finished_batches`` it is deleted, so the project's batch list (read newest first at every
poll; the embedded emulator sorts it at each page) does not grow with every batch ever run. Deletions
run one round at a time in a thread of their own; a round that failed is tried again after
``poll_max_interval``; a failed delete never fails a job (a file expires after 48 h anyway; a batch
left over stays listed, as every batch did before). The batches to delete are committed with the
transition that delivered their work (the journal's ``batches_to_delete``) and leave it once deleted,
so a restart, or a kill at any instant, deletes those the last run had not yet.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Iterable

from batchd.backoff import Backoff
from batchd.daemon.context import Context
from batchd.daemon.media import delete_media
from batchd.daemon.naming import upload_display_names
from batchd.journal import Chunk
from batchd.provider import Provider, is_retryable
from batchd.states import ACTIVE_JOB_STATES, MediaState, UploadState

log = logging.getLogger("batchd")

ROUND = "cleanup"
MEDIA_ROUND = "media-cleanup"
BATCHES_ROUND = "batches-cleanup"
#: What each kind of round deletes (for its log lines).
_ROUND_DELETES = {ROUND: "request files", MEDIA_ROUND: "uploaded files", BATCHES_ROUND: "remote batches"}
#: Remote batches deleted per round at most (a round stays short: a stop waits for it).
BATCHES_PER_ROUND = 50
#: A delivered job's remote batch waits at most this long for its deletion while other jobs are on their way:
#: nothing needs it gone soon, and each delete is a call whose thread shares the loop's CPU (a burst of
#: small jobs was 2 % slower when each pack's batch was deleted as it was done).
BATCHES_KEPT_SECONDS = 10.0
#: Remote batches waiting for their deletion at most (a service refusing deletes for days while jobs are
#: delivered): past that the oldest is left listed, as every batch was before.
BATCHES_WAITING = 10_000


class Uploads:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.rounds = ctx.workers("delete", 1, keyed_by_job=False)
        self.retry = Backoff(ctx.settings.poll_max_interval, ctx.settings.poll_max_interval)
        #: The content hashes being uploaded now (never deleted meanwhile); set by the daemon.
        self.in_flight = lambda: set()
        #: Called with the hashes a deletion round took (the jobs waiting for them are visited); set by the daemon.
        self.on_media_deleted = lambda hashes: None
        #: Remote batches of delivered jobs, to delete (``delete_finished_batches``), oldest first, with when
        #: each was handed over (monotonic): those of the journal's ``batches_to_delete`` not in a round.
        self._batches: dict[str, float] = {}
        #: Left listed past BATCHES_WAITING: to remove from the journal at the next tidy.
        self._dropped: list[str] = []

    def recover(self) -> None:
        """At start: the batches the last run had not deleted yet wait again (due at once, if that long ago)."""
        if not self.ctx.settings.delete_finished_batches:
            return  # (kept in the journal: deleted once the setting is on again)
        now, monotonic = time.time(), time.monotonic()
        for name, since in self.ctx.journal.batches_to_delete():
            self._wait_for_deletion([name], monotonic - max(0.0, now - since))

    def batches_done(self, names: list[str]) -> None:
        """The remote batches of a job being delivered (or a pack whose members have their results): delete
        them once that is committed (called from the loop, in the transition's transaction)."""
        names = [name for name in names if name]
        if self.ctx.settings.delete_finished_batches and names:
            self.ctx.journal.add_batches_to_delete(names)
            self.ctx.journal.after_commit(lambda: self._wait_for_deletion(names))

    def _wait_for_deletion(self, names: Iterable[str], since: float | None = None) -> None:
        self._batches.update(dict.fromkeys(names, time.monotonic() if since is None else since))
        while len(self._batches) > BATCHES_WAITING:
            oldest = next(iter(self._batches))
            del self._batches[oldest]
            self._dropped.append(oldest)

    def _batches_due(self) -> bool:
        """Whether to delete the waiting batches now: no job is on its way, a round's worth waits, or the
        oldest has waited :data:`BATCHES_KEPT_SECONDS`."""
        if not self._batches:
            return False
        return (len(self._batches) >= BATCHES_PER_ROUND
                or time.monotonic() - next(iter(self._batches.values())) >= BATCHES_KEPT_SECONDS
                or not self.ctx.journal.count_jobs(ACTIVE_JOB_STATES, limit=1))

    def tidy(self) -> None:
        """Start deleting the request files of finished chunks, unless a round is under way or failed lately."""
        ctx = self.ctx
        self.collect()
        if self._dropped:
            log.warning("%d remote batches wait for their deletion already: %d older ones are left listed",
                        len(self._batches), len(self._dropped))
            ctx.journal.forget_batches_to_delete(self._dropped)
            self._dropped = []
        if len(self.rounds) or not self.retry.due():
            return
        chunks = ctx.journal.uploads_to_delete()
        if not chunks:
            if self._batches_due():
                names = list(self._batches)[:BATCHES_PER_ROUND]
                for name in names:
                    del self._batches[name]
                self.rounds.start(BATCHES_ROUND, delete_batches, ctx.provider, names, ctx.stopping, about=names)
                return
            self._tidy_media()
            return
        if not ctx.settings.delete_request_files:
            ctx.journal.set_upload_states({(c.job_id, c.idx): UploadState.KEPT for c in chunks})
            return
        self.rounds.start(ROUND, delete_request_files, ctx.provider, chunks, ctx.stopping)

    def _tidy_media(self) -> None:
        """Start deleting the uploaded files (of requests' media) no chunk needs any more."""
        ctx = self.ctx
        in_flight = self.in_flight()
        rows = [row for row in ctx.journal.media_to_delete(time.time() - ctx.settings.media_keep_seconds)
                if row["sha256"] not in in_flight]
        if not rows:
            return
        # Intent first: a chunk needing one of them meanwhile waits for the round, then uploads it again.
        ctx.journal.set_media({row["sha256"]: {"state": MediaState.DELETING} for row in rows})
        self.rounds.start(MEDIA_ROUND, delete_media, ctx.provider, rows, ctx.stopping, about=[r["sha256"] for r in rows])

    def collect(self) -> None:
        for work in self.rounds.finished():
            media = work.key == MEDIA_ROUND
            try:
                outcome, again = work.future.result()
            except Exception:
                log.exception("deleting %s failed; retrying later", _ROUND_DELETES[work.key])
                outcome, again = ({}, True) if work.key != BATCHES_ROUND else (work.about, True)
            if work.key == BATCHES_ROUND:
                retried = set(outcome)
                self.ctx.journal.forget_batches_to_delete([name for name in work.about if name not in retried])
                self._wait_for_deletion(outcome)  # (not deleted: tried again)
            elif media:
                self.ctx.journal.set_media(outcome)
                self.on_media_deleted(work.about)
            else:
                self.ctx.journal.set_upload_states(outcome)
            (self.retry.failed if again else self.retry.succeeded)()

    def busy(self) -> bool:
        """A round is under way, or remote batches wait for theirs (run --once deletes them before it exits;
        those whose delete failed are left, rather than hold the exit for the retry's wait)."""
        return bool(len(self.rounds)) or self._batches_due() and self.retry.due()

    def close(self) -> None:
        self.rounds.shutdown()
        if self.ctx.journal is not None and self.ctx.storage_failure is None:
            self.collect()  # deletions not recorded would only be repeated (and found gone)


def delete_request_files(provider: Provider, chunks: list[Chunk],
                         stopping: threading.Event) -> tuple[dict[tuple[str, int], str], bool]:
    """Delete the chunks' request files (runs in the pool): the recorded one, and for an ``uploading``
    chunk every copy the files list shows under its upload display names.

    Returns each chunk's new ``upload_state`` (chunks left out are tried again) and whether to
    try again later.
    """
    names = {(c.job_id, c.idx): [c.uploaded_file] if c.uploaded_file else [] for c in chunks}
    searched = {name: (c.job_id, c.idx) for c in chunks if c.upload_state == UploadState.UPLOADING
                for name in upload_display_names(c)}
    again = False
    if searched:
        try:
            for remote_file in provider.list_files():
                key = searched.get(remote_file.display_name)
                if key is not None and remote_file.name not in names[key]:
                    names[key].append(remote_file.name)
        except Exception as error:
            log.warning("listing files to find the request files of %d finished chunk(s) failed (%s); "
                        "retrying later", len(searched), error)
            again = True
            for key in set(searched.values()):
                del names[key]
    outcome: dict[tuple[str, int], str] = {}
    for (job_id, idx), file_names in names.items():
        if again or stopping.is_set():
            # The service is failing (each delete already had the read retries), or the daemon is
            # stopping: the rest waits for the next round, so a round stays short.
            break
        state = UploadState.DELETED
        for name in file_names:
            try:
                if provider.delete_file(name):
                    log.info("job %s: deleted %s, the requests of chunk %d", job_id, name, idx,
                             extra={"job": job_id, "chunk": idx, "file": name})
            except Exception as error:
                if is_retryable(error):
                    log.warning("job %s: deleting %s failed (%s); retrying later", job_id, name, error)
                    again = True
                    break
                log.error("job %s: the service refused to delete %s (%s); it stays until it expires",
                          job_id, name, error, extra={"job": job_id, "chunk": idx, "file": name})
                state = UploadState.KEPT
        else:
            outcome[(job_id, idx)] = state
    return outcome, again


def delete_batches(provider: Provider, names: list[str], stopping: threading.Event) -> tuple[list[str], bool]:
    """Delete the remote batches of delivered jobs (runs in the pool). Returns the names to try again (a
    failure the service may get over, and those a stop or such a failure left) and whether to wait first."""
    for n, name in enumerate(names):
        if stopping.is_set():
            return names[n:], False
        try:
            if provider.delete_batch(name):
                log.info("deleted %s, its results delivered", name, extra={"remote": name})
        except Exception as error:
            if is_retryable(error):
                log.warning("deleting %s failed (%s); retrying later", name, error)
                return names[n:], True
            log.error("the service refused to delete %s (%s); it stays listed", name, error, extra={"remote": name})
    return [], False
