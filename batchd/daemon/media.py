"""Media uploads: the files a chunk's requests reference, on the Files API before the chunk is created.

A chunk whose requests hold ``fileData`` parts (see :mod:`batchd.media`) is created only once every
file it names is ``active`` in the journal's ``media`` table with at least ``REUSE_MIN_SECONDS`` to
live. A file that is not is uploaded first, intent before effect: ``state = 'uploading'`` is committed,
then the upload runs in the submit pool, which first looks the file up by its display name
(``batchd-media-<sha256>``): a copy an earlier job left, or an upload a crash cut off before its name
was recorded, is reused instead of uploaded again. One upload per content hash at a time, whatever
the number of chunks and jobs needing it.

Deletion: :mod:`batchd.daemon.uploads` deletes a file no chunk still to be sent or running needs,
``media_keep_seconds`` after it was last used (``'deleting'`` committed first).
"""

from __future__ import annotations

import logging
import time

from batchd.daemon.context import Context, error_dict
from batchd.daemon.crashpoints import crashpoint
from batchd.journal import Chunk, Job
from batchd.media import REUSE_MIN_SECONDS, display_name
from batchd.provider import Provider, is_retryable
from batchd.remote import RemoteFile
from batchd.states import MediaState

log = logging.getLogger("batchd")

#: ``Work.about`` of a media upload in the submit pool.
ABOUT = "media"


class MediaUploads:
    def __init__(self, ctx: Context, pool):
        self.ctx = ctx
        self.pool = pool  # the submit pool: uploads and creates share its threads
        #: Content hashes being uploaded now (their pool key is (job id, "media:<sha256>")).
        self.in_flight: set[str] = set()
        #: Content hash → when a failed upload may be tried again.
        self._retry_at: dict[str, float] = {}
        #: Content hash → the jobs waiting for it (marked when its upload, or its deletion, ends).
        self._waiting: dict[str, set[str]] = {}
        #: Jobs with an upload to start that found the pool full.
        self._for_thread: set[str] = set()

    def ready(self, job: Job, chunk: Chunk) -> tuple[dict[str, str] | None, dict | None]:
        """Whether the chunk's files are on the Files API: ``(uris, None)`` when they are (content hash →
        URI, empty for a chunk without files), ``(None, error)`` when one can never be (the service
        refused it), else ``(None, None)``, after starting the uploads that are due and have room."""
        rows = self.ctx.journal.chunk_media(job.id, chunk.idx)
        if not rows:
            return {}, None
        now = time.time()
        uris: dict[str, str] = {}
        starts = []
        for row in rows:
            sha256 = row["sha256"]
            if row["state"] == MediaState.ACTIVE and (row["expires_at"] or float("inf")) > now + REUSE_MIN_SECONDS:
                uris[sha256] = row["uri"]
                continue
            if row["state"] == MediaState.FAILED:
                error = row["error"]
                return None, {"code": "file_refused", "message": f"a file of these requests could not be uploaded: "
                                                                 f"{error}"}
            if sha256 in self.in_flight or row["state"] == MediaState.DELETING or self._retry_at.get(sha256, 0) > now:
                self._waiting.setdefault(sha256, set()).add(job.id)
                continue
            starts.append(row)
        if len(uris) == len(rows):
            return uris, None
        spool = self.ctx.spool(job.id)
        free = self.pool.free()
        if len(starts) > free:  # no thread free: the job is visited again when one is
            self._for_thread.add(job.id)
        for row in starts[:free]:
            sha256 = row["sha256"]
            self.ctx.journal.set_media({sha256: {"state": MediaState.UPLOADING, "intent_at": now, "error": None}})
            crashpoint("after-media-intent")
            self.in_flight.add(sha256)
            self.pool.start((job.id, f"media:{sha256}"), upload_media, self.ctx.provider, spool.root / "media" / sha256,
                            sha256, row["mime_type"], row["size"], row["state"] != MediaState.NEW, about=ABOUT)
            log.info("job %s: uploading a file of chunk %d (%s, %d bytes, sha256 %s)", job.id, chunk.idx,
                     row["mime_type"], row["size"], sha256[:12], extra={"job": job.id, "chunk": chunk.idx})
        return None, None

    def wake(self, hashes) -> None:
        """Mark the jobs waiting for these files (their upload or deletion ended, or a thread is free)."""
        for sha256 in hashes:
            for job_id in self._waiting.pop(sha256, ()):
                self.ctx.mark(job_id)

    def due(self) -> None:
        """Mark the jobs waiting for a failed upload whose retry is due, and, when the pool has room, those
        waiting for a thread (each tick, with the submit pool's outcomes)."""
        now = time.time()
        due = [sha256 for sha256, at in self._retry_at.items() if at <= now]
        for sha256 in due:
            del self._retry_at[sha256]
        self.wake(due)
        if self.pool.free() and self._for_thread:
            for job_id in self._for_thread:
                self.ctx.mark(job_id)
            self._for_thread.clear()

    def collect(self, work) -> None:
        """Record a media upload that ended (the loop's thread)."""
        sha256 = work.key[1].removeprefix("media:")
        self.in_flight.discard(sha256)
        self.wake([sha256])
        try:
            remote, reused = work.future.result()
        except Exception as error:
            if is_retryable(error):
                wait = self.ctx.settings.poll_interval
                self._retry_at[sha256] = time.time() + wait
                log.warning("uploading file %s failed (%s); trying again in %.0f s", sha256[:12], error, wait)
                return
            log.error("the service refused file %s: %s", sha256[:12], error)
            self.ctx.journal.set_media({sha256: {"state": MediaState.FAILED, "error": error_dict(error)["message"]}})
            return
        self._retry_at.pop(sha256, None)
        expires = remote.expiration_time.timestamp() if remote.expiration_time else None
        self.ctx.journal.set_media({sha256: {"state": MediaState.ACTIVE, "remote_name": remote.name, "uri": remote.uri,
                                             "expires_at": expires}})
        log.info("file %s is %s%s", sha256[:12], remote.name, " (uploaded before)" if reused else "",
                 extra={"file": remote.name})


def upload_media(provider: Provider, path, sha256: str, mime_type: str, size: int,
                 look_up: bool = True) -> tuple[RemoteFile, bool]:
    """The File holding content ``sha256`` (runs in the pool): one the service still keeps under its
    display name with time to live, else a new upload. Spare copies (a retried transfer, an upload
    whose answer a crash lost while another was found) are deleted. ``look_up`` False: the journal
    never intended an upload of it (``new``), so there is nothing to look for (a listing per file
    would make a job of n new files list the project's files n times)."""
    name = display_name(sha256)
    soon = time.time() + REUSE_MIN_SECONDS
    copies = [f for f in provider.list_files() if f.display_name == name] if look_up else []
    usable = [f for f in copies if f.usable and f.uri and f.size_bytes in (None, size)
              and (f.expiration_time is None or f.expiration_time.timestamp() > soon)]
    if usable:
        kept = max(usable, key=lambda f: (f.expiration_time.timestamp() if f.expiration_time else float("inf"), f.name))
        _delete_spares(provider, [f for f in usable if f is not kept])
        return kept, True
    remote, attempts = provider.upload_file(path, name, mime_type)
    crashpoint("after-media-upload")
    if attempts > 1:
        _delete_spares(provider, [f for f in provider.list_files() if f.display_name == name and f.name != remote.name
                                  and (f.expiration_time is None or f.expiration_time.timestamp() > soon)])
    return remote, False


def _delete_spares(provider: Provider, spares: list[RemoteFile]) -> None:
    for spare in spares:
        try:
            provider.delete_file(spare.name)
        except Exception as error:
            log.warning("deleting %s, a spare copy of an uploaded file, failed (%s)", spare.name, error)


def delete_media(provider: Provider, rows: list[dict], stopping) -> tuple[dict[str, dict], bool]:
    """Delete uploaded files (runs in the delete pool): the recorded File, and every copy the files list
    shows under the display name. Returns each hash's new fields and whether to try again later."""
    wanted = {display_name(row["sha256"]): row for row in rows}
    names: dict[str, set[str]] = {row["sha256"]: {row["remote_name"]} if row["remote_name"] else set() for row in rows}
    try:
        for remote in provider.list_files():
            row = wanted.get(remote.display_name)
            if row is not None:
                names[row["sha256"]].add(remote.name)
    except Exception as error:
        log.warning("listing files to delete %d uploaded file(s) failed (%s); retrying later", len(rows), error)
        return {}, True
    outcome: dict[str, dict] = {}
    again = False
    for sha256, file_names in names.items():
        if again or stopping.is_set():
            break
        for name in sorted(file_names):
            try:
                if provider.delete_file(name):
                    log.info("deleted %s, a file no job needs any more", name, extra={"file": name})
            except Exception as error:
                if not is_retryable(error):  # refused: it stays until it expires (48 h at most)
                    log.error("the service refused to delete %s (%s); it stays until it expires", name, error)
                    continue
                log.warning("deleting %s failed (%s); retrying later", name, error)
                again = True
                break
        else:
            outcome[sha256] = {"state": MediaState.DELETED, "remote_name": None, "uri": None, "expires_at": None}
    return outcome, again
