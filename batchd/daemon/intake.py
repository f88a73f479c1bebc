"""Intake: inbox → ``claiming`` → ``received``; ``NAME.cancel`` and ``NAME.approve`` control files.

A manifest becomes a job in two commits around one rename: the job's row (with its verdict: a
duplicate, an irregular entry, a file that does not parse is rejected *in* its claim) is committed
first, then the file is renamed into the job's spool, then the job is ``received``. A crash between
them is finished by :meth:`Intake.finish_claim` at the next start.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from batchd import fs
from batchd.daemon.context import Context, FolderAccess, is_regular_file, manifest_error
from batchd.daemon.claim_inputs import (INPUT_GONE, INPUTS_RECORD, OUTBOX_FILES, TOO_MANY, pending_manifests,
                                        read_inputs_record, same_file, take_input)
from batchd.daemon.control_files import CONTROL_SUFFIXES, ControlFiles
from batchd.daemon.crashpoints import crashpoint
from batchd.durable import atomic_write, fsync_dir, link_first, unlink_old
from batchd.inbox import (Candidate, Entry, Inbox, Irregular, UnsafeEntry, claim, is_temp_name,
                          read_entry, sha256_file)
from batchd.journal import Job, new_job_id, replace_row
from batchd.manifest import MANIFEST_SUFFIXES, Manifest, ManifestError, is_valid_text, load_manifest
from batchd.states import JobState

log = logging.getLogger("batchd")

#: Manifests claimed (or control files taken) in one tick at most: a burst of thousands is claimed over
#: many ticks, so the jobs already claimed move on meanwhile (each claim parses a manifest and commits twice).
CLAIMS_PER_TICK = 50
#: While manifests of the last listing wait their turn (a burst: CLAIMS_PER_TICK a tick), the next
#: ticks take them from that listing, and the inbox is listed again at most this often: a cancel or
#: approval dropped meanwhile waits that long at most. Listing a folder of thousands on every tick made
#: the claims of a burst cost the square of its size.
RELIST_SECONDS = 1.0
#: Files batchd's user may not move out of the inbox remembered at most (Intake._not_movable): whatever a
#: flood of them, memory stays bounded.
UNMOVABLE_KEPT = 10_000


@dataclass(frozen=True)
class Claim:
    """A claim whose intent (the job's row, ``claiming``) is recorded: ``path`` is still to be moved."""

    job_id: str
    path: Path
    source: str
    #: (st_dev, st_ino) of the file whose bytes were checked; None for an entry rejected unread.
    checked: tuple[int, int] | None = None


class Intake:
    def __init__(self, ctx: Context, inbox: Inbox, *, on_flag: Callable[[], None]):
        self.ctx = ctx
        self.inbox = inbox
        #: NAME.cancel and NAME.approve, taken as they are found.
        self.control_files = ControlFiles(ctx, on_flag=on_flag, left=self._remember_unmovable)
        #: Why new manifests are not claimed (free space under min_free_mb), or None.
        self.claiming_paused: str | None = None
        #: Whether the last tick left settled manifests for the next one (CLAIMS_PER_TICK).
        self.backlog = False
        #: The text of the manifests waiting in the inbox, read at most once a tick (see _named_elsewhere).
        self._pending: dict | None = None
        #: Claims were intended and not all moved yet (a full disk or a stop cut them short).
        self._claims_unfinished = False
        #: The last scan left manifests in the inbox that no event will bring back (the claims of one
        #: tick are bounded, the disk is low, or a file does not parse yet): the next tick scans again.
        self._left_in_inbox = False
        #: The settled manifests of the last listing not yet taken (oldest first), and when (monotonic)
        #: the inbox is listed again all the same (RELIST_SECONDS).
        self._listed: list[Candidate] = []
        self._relist_at = float("-inf")
        self._inbox_access = FolderAccess("move files out of the inbox", "nothing is claimed")
        #: Files batchd's user may not move out of the inbox (another user's, in a folder with the sticky bit,
        #: as a shared drop folder has), by (name, size, mtime), oldest first: each was rejected once and is
        #: left alone (up to UNMOVABLE_KEPT: past that the oldest is forgotten, and found again in the journal,
        #: as after a restart: :meth:`_rejected_as_unmovable_before`).
        self._unmovable: dict[tuple[str, int, int], None] = {}

    # -- at start -------------------------------------------------------------------------------

    def recover(self) -> None:
        """Finish the claims a crash cut short, and remove spools no job needs."""
        left = [job.id for job in self.ctx.journal.jobs(states=(JobState.CLAIMING,)) if not self.finish_claim(job)]
        self._claims_unfinished = bool(left)
        for folder in (self.ctx.settings.state_dir / "jobs").iterdir():
            # A spool of a job already done (killed before its spool was removed), or of no job at all
            # (killed in accept() before the job's row: it holds only copies of the inputs).
            job = self.ctx.journal.job(folder.name)
            if job is None or job.state == JobState.DONE:
                log.info("removing the leftover spool %s", folder)
                shutil.rmtree(folder, ignore_errors=True)

    # -- each tick --------------------------------------------------------------------------------

    def take(self) -> None:
        """Claim what settled in the inbox, oldest first."""
        ctx = self.ctx
        if not self._inbox_access.allows(ctx.settings.inbox):
            return
        if self._claims_unfinished:
            # A claim a full disk cut short (its row committed, the move refused) is finished first, so
            # the file still in the inbox is not taken for a second copy of itself.
            finished = [self.finish_claim(job) for job in ctx.journal.jobs(states=(JobState.CLAIMING,))]
            self._claims_unfinished = not all(finished)
            if self._claims_unfinished:
                return  # the inbox refused a move this instant: the new claims wait for the ones intended
        try:
            self.inbox.reap_stale_temp_files()
            if not (self.inbox.scan_due() or self._left_in_inbox or self.claiming_paused or self._listed):
                return  # nothing new can be there (while claiming is paused, the free space is looked at)
            paused = self._below_free_space_floor()
            now = time.monotonic()
            if self._listed and now < self._relist_at:
                candidates, self._listed = self._listed, []
            else:
                candidates, self._relist_at = self.inbox.scan(), now + RELIST_SECONDS
        except FileNotFoundError:
            return  # the inbox went away this instant: the next tick creates it again
        self.backlog = False
        self._pending = None  # the waiting manifests' text, read again this tick if an input needs it
        intents: list[Claim] = []
        # The claims' intents commit together, then the files move. A stop or a full disk part way
        # leaves the claims intended so far 'claiming': the next tick, or the next start, finishes them.
        self._left_in_inbox = self._intend_claims(candidates, paused, intents)
        if intents:
            ctx.journal.flush()
            self._claims_unfinished = True
            linked = self._link_claimed(intents)
            finished = [self._claim(intent, linked=intent.job_id in linked) for intent in intents]
            self._claims_unfinished = not all(finished)

    def _intend_claims(self, candidates, paused: bool, intents: list[Claim]) -> bool:
        """Intend the claims of the settled ``candidates``; whether some were left for a later tick."""
        ctx = self.ctx
        left = False
        for irregular in self.inbox.take_irregular() if not paused else ():
            self._reject_irregular(irregular, intents)
        claimed = 0
        for n, candidate in enumerate(candidates):
            ctx.check_stop()
            if claimed >= CLAIMS_PER_TICK:
                self.backlog = True  # the rest next tick, after the jobs already claimed have moved
                self._listed = candidates[n:]
                return True
            path = candidate.path
            if (path.name, candidate.size, candidate.mtime_ns) in self._unmovable:
                continue  # rejected once: batchd's user may not move it (see _claim)
            if paused and path.suffix.lower() not in CONTROL_SUFFIXES:
                left = True
                continue  # a cancel or approval takes no room; a new job does
            if not is_valid_text(path.name):
                # Journal, outbox folder and remote display name all need a text name: the job is
                # rejected under a readable rendering of it, the file kept in its folder.
                source = readable_name(path.name)
                self._accept(path, None, intents, source=source, error={
                    "code": "file_name_not_utf8", "file": source,
                    "message": f"the file name '{source}' is not valid UTF-8: rename it and drop it again"})
                claimed += 1
                continue
            if path.suffix.lower() in CONTROL_SUFFIXES:
                self.control_files.take(path)
                claimed += 1  # (a flood of them is taken over many ticks too)
                continue
            try:
                # Open, then check: what is validated is the bytes read through a descriptor that
                # was checked (regular, one link, no symlink followed), never the name again.
                entry = read_entry(path, ctx.settings.limits.manifest_bytes)
            except FileNotFoundError:
                continue  # gone since the scan
            except UnsafeEntry as unsafe:  # swapped for something else since the scan
                self._reject_irregular(Irregular(path, unsafe.kind), intents, reason=str(unsafe))
                claimed += 1
                continue
            except OSError as unreadable:
                if self._unread_rejected_as_unmovable_before(path):
                    continue
                # Unreadable (permissions): rejected and moved aside, or it would fail every tick and restart.
                self._accept(path, None, intents, error={
                    "code": "unreadable", "file": path.name,
                    "message": f"{path.name} cannot be read: {unreadable.strerror or unreadable}"})
                claimed += 1
                continue
            if (entry.size, entry.mtime_ns) != (candidate.size, candidate.mtime_ns):
                left = True  # written to since the listing that found it settled: it settles again
                continue
            if self._rejected_as_unmovable_before(path, entry):
                continue
            try:
                # The document is checked here, its input rows by the first pass that reads them, in a
                # worker (a million rows would hold up the loop for seconds): nothing of a job is sent
                # before that pass has read its last row (batchd.daemon.build).
                manifest = load_manifest(path, root=ctx.settings.inbox, tasks=ctx.tasks, content=entry.content,
                                         limits=ctx.settings.limits, check_inputs=False)
            except Exception as error:  # noqa: BLE001 - whatever was dropped, the daemon goes on
                if fs.is_disk_full(error):
                    raise  # no room to check it: it is taken once there is (the loop backs off)
                # A file that does not parse may still be being written: reject it only once
                # it has stayed unchanged long enough. Under ``run --once`` a candidate is complete
                # (it has settled, or was renamed in, and --once takes what the inbox holds): at once.
                if not ctx.once and candidate.unchanged_for < ctx.settings.incomplete_grace_seconds:
                    left = True
                    continue
                if not isinstance(error, ManifestError):
                    # A reader's bug or an input nobody foresaw: the file is rejected with the error
                    # named, instead of failing every tick (and every restart) on the same file.
                    log.error("%s: reading the manifest failed unexpectedly", readable_name(path.name),
                              exc_info=error)
                    error = ManifestError(path, f"batchd could not read this manifest "
                                                f"({type(error).__name__}: {error})")
                self._accept(path, None, intents, entry=entry,
                             error=manifest_error(error, ctx.settings.limits.error_chars))
                claimed += 1
                continue
            self._accept(path, manifest, intents, entry=entry)
            claimed += 1
        return left

    def _reject_irregular(self, irregular: Irregular, intents: list[Claim], *, reason: str | None = None) -> None:
        """A symlink, folder, FIFO or hard-linked file with a manifest's name: rejected, and the entry
        itself (never what a symlink points to) moved into the rejected job's outbox folder, as a
        manifest would be."""
        if irregular.path.suffix.lower() not in MANIFEST_SUFFIXES:
            return  # a NAME.cancel that is no file: the warning the inbox logged is all it gets
        name = readable_name(irregular.path.name)
        what = reason or f"a {irregular.kind}, not a regular file"
        self._accept(irregular.path, None, intents, source=name, error={
            "code": "not_a_regular_file", "file": name, "kind": irregular.kind,
            "message": f"{name} is {what}; batchd reads only regular files with one link "
                       f"(`batchd submit FILE` copies one in). It is kept in this folder as it was"})

    def _accept(self, path: Path, manifest: Manifest | None, intents: list[Claim], *, entry: Entry | None = None,
                error: dict | None = None, source: str | None = None) -> None:
        """Record the intent to claim ``path`` as a new job (added to ``intents``; :meth:`_claim` moves the
        file once it is committed). ``entry``: the file as read and checked (None for an entry that is
        rejected unread). ``source``: the file name the job is known by (default ``path.name``)."""
        ctx = self.ctx
        source = source or path.name
        # One hash of the manifest's bytes: alone, what later reads must match; with its input files
        # added below, the job's content (duplicate detection).
        digest = hashlib.sha256(entry.content) if entry is not None else None
        manifest_sha256 = digest.hexdigest() if digest is not None else None
        job_id = self._unused_job_id()
        spool = ctx.spool(job_id)
        try:
            with fs.naming(spool.root):
                spool.root.mkdir(parents=True)
                taken = []
                for input_path in manifest.input_files() if manifest else []:
                    # Inputs are linked (or copied) into the spool before the claim, so the claimed
                    # job is self-contained; a crash here leaves only a spare copy. One that goes with
                    # the job (linked here, its inbox name removed once the claim is committed) is
                    # one no other manifest waiting in the inbox names; one that stays is copied.
                    copy = spool.inputs / input_path.name
                    fs.fault_point("claim", copy)
                    relative = input_path.relative_to(ctx.settings.inbox.resolve()).as_posix()
                    placed = relative not in OUTBOX_FILES and relative != source
                    moved = placed and not self._named_elsewhere(input_path.name, path, intents)
                    take_input(input_path, copy, ctx.settings.inbox, link=moved)
                    taken.append({"path": relative, "name": input_path.name, "moved": moved, "placed": placed})
                    digest.update(b"\0" + input_path.name.encode() + b"\0" + sha256_file(copy).encode())
                if manifest is not None and manifest.input_folder is not None:
                    # A folder input's files are read when the job is built: its listing tells jobs apart.
                    digest.update(b"\0folder\0" + manifest.folder_fingerprint().encode())
                if taken:
                    # Durable before the claim's intent: recovery finishes the claim from it.
                    atomic_write(spool.inputs / INPUTS_RECORD, json.dumps(taken, ensure_ascii=False), step="claim")
        except UnsafeEntry as unsafe:
            # Changed into a symlink, a hard link or something else since it was validated: never read.
            error = {"code": "unsafe_input", "file": source, "kind": unsafe.kind,
                     "message": f"{source}: its input file {readable_name(unsafe.path.name)} is {unsafe}; "
                                f"batchd reads only regular files with one link"}
            shutil.rmtree(spool.inputs, ignore_errors=True)
        except OSError as failure:
            if fs.is_disk_full(failure):
                shutil.rmtree(spool.root, ignore_errors=True)  # no row yet: the manifest is taken again later
            fs.unwritable_is_fatal("claim", failure, failure.filename or spool.root)
            if manifest is None or not (failure.errno in INPUT_GONE or failure.errno in (errno.EACCES, errno.EPERM)
                                        and os.access(spool.inputs, os.W_OK)):
                raise  # the state dir's fault (permissions of its own folder, say): not the job's
            # Removed, or made a folder or unreadable, since the manifest was checked: the job is rejected
            # saying so (as it would have been a moment earlier), never the daemon stopped.
            name = readable_name(Path(failure.filename).name) if isinstance(failure.filename, str) else "?"
            error = {"code": "input_unreadable", "file": source,
                     "message": f"{source}: its input file {name} could not be taken: "
                                f"{failure.strerror or failure}; drop the manifest again with its input"}
            shutil.rmtree(spool.inputs, ignore_errors=True)
        sha256 = digest.hexdigest() if digest is not None else None
        earlier = ctx.journal.job_with_content(sha256) if sha256 is not None else None
        if error is None and earlier is not None and not (manifest is not None and manifest.common.force):
            error = {"code": "duplicate",
                     "message": f"{source} has the same content as job {earlier.id} "
                                f"({earlier.source}); it was not run again (to run it again: `batchd submit "
                                f"--force FILE`, or force = true in the manifest)",
                     "duplicate_of": earlier.id}
        # The verdict is part of the claim's intent: recovery finishes a claim cut short by a crash
        # and must not run a duplicate, a symlink or a FIFO it never re-examines.
        task_and_model = {"task": manifest.task, "model": manifest.model or ctx.settings.model,
                          "kind": manifest.kind} if manifest else {}
        ctx.journal.add_job(job_id, name=Path(source).stem, source=source, sha256=sha256, error=error,
                            manifest_sha256=manifest_sha256, retry_of=self._retry_of(manifest),
                            **task_and_model)
        if error is None and manifest is not None:
            ctx.claimed_manifests.keep(job_id, manifest_sha256, manifest, len(entry.content))
        intents.append(Claim(job_id, path, source, (entry.device, entry.inode) if entry is not None else None))

    def _named_elsewhere(self, name: str, manifest: Path, intents: list[Claim]) -> bool:
        """Whether a manifest waiting in the inbox, other than ``manifest`` and those claimed this tick,
        may name input file ``name`` (its text holds the name; one too big or too many to read counts
        as naming it: an input is kept rather than taken from a job that needs it)."""
        if self._pending is None:
            self._pending = pending_manifests(self.ctx.settings.inbox)
        if self._pending is TOO_MANY:
            return True
        besides = {manifest.name, *(intent.path.name for intent in intents)}
        needle = name.encode()
        return any(text is None or needle in text for entry, text in self._pending.items() if entry not in besides)

    def _release_inputs(self, job_id: str) -> None:
        """The claim is committed: the input files that go with the job leave the inbox (the spool holds
        them; delivery puts them into the job's outbox folder). An inbox name that is no longer the
        file taken (replaced since) is left alone."""
        ctx = self.ctx
        spool = ctx.spool(job_id)
        for entry in read_inputs_record(spool.inputs):
            if not entry.get("moved"):
                continue
            left = ctx.settings.inbox / entry["path"]
            try:
                if same_file(left, spool.inputs / entry["name"]):
                    os.unlink(left)
                    ctx.journal.sync_before_commit(left.parent, step="claim")
            except FileNotFoundError:
                pass  # gone already: removed before a crash, or by its owner

    def _unused_job_id(self) -> str:
        """A job id no job has, nor a spool folder a crash left behind: ids are the second plus 24 random
        bits, and a burst claims thousands a second."""
        while True:
            job_id = new_job_id()
            if self.ctx.journal.job(job_id) is None and not os.path.lexists(self.ctx.spool(job_id).root):
                return job_id

    def _retry_of(self, manifest: Manifest | None) -> dict | None:
        """What a retry manifest retries: the job's id, and its name when the journal knows the job."""
        retry_of = manifest.common.retry_of if manifest is not None else None
        if retry_of is None:
            return None
        parent = self.ctx.journal.job(retry_of.job)
        return {"job": retry_of.job, "name": parent.name if parent is not None else None}

    def _link_claimed(self, intents: list[Claim]) -> set[str]:
        """Link each manifest whose claim is committed into its job's spool, then make the new names durable
        together (one syncfs with ``group_sync``, else each spool folder's fsync), before any old name goes
        (:meth:`_claim`): a burst's claims cost one sync, not one each. The job ids of those linked."""
        ctx = self.ctx
        linked = {intent.job_id for intent in intents
                  if link_first(intent.path, ctx.spool(intent.job_id).manifest_path(intent.source), step="claim")}
        if linked and ctx.sync_group is not None:
            ctx.sync_group.sync("claim", anyway=True)
        elif linked:
            for job_id in linked:
                fsync_dir(ctx.spool(job_id).root, step="claim", deferrable=False)
        return linked

    def _claim(self, intent: Claim, *, linked: bool = False) -> bool:
        """Move a manifest whose claim is committed into its job's spool (``linked``: its new name is there
        and durable already); the job is then ``received``. False when the claim is left ``claiming``: the
        inbox refused the move this instant (:meth:`_refused_for_now`)."""
        ctx = self.ctx
        job_id, source = intent.job_id, intent.source
        claimed = ctx.spool(job_id).manifest_path(source)
        # The inbox's fsync waits for the tick's commit: one for the whole burst claimed this tick.
        try:
            if linked:
                moved = unlink_old(intent.path, claimed, step="claim", sync=ctx.journal.sync_before_commit)
            else:
                moved = claim(intent.path, claimed, sync=ctx.journal.sync_before_commit)
        except PermissionError as error:
            if self._refused_for_now(source, error):
                return False
            self._not_movable(job_id, source, intent.path, error)
            return True
        if not moved:
            log.warning("%s vanished before it could be claimed", source)
            ctx.claimed_manifests.forget(job_id)
            ctx.journal.update_job(job_id, state=JobState.DONE, outcome="rejected",
                                   error={"message": f"{source} was removed before batchd could claim it"})
            return True
        crashpoint("after-claim")
        self._release_inputs(job_id)
        job = ctx.journal.job(job_id)
        if intent.checked is not None and job.error is None:
            st = os.lstat(claimed)
            if (st.st_dev, st.st_ino) != intent.checked or st.st_nlink != 1 or not stat.S_ISREG(st.st_mode):
                # Replaced (or linked) between the read and the move: what was moved is not what was checked.
                log.warning("%s was replaced while it was being claimed; rejected", source)
                error = {"code": "replaced_while_claimed", "file": source,
                         "message": f"{source} was replaced or linked to while batchd was claiming it; "
                                    f"it is kept in this folder unread: drop it again"}
                ctx.journal.update_job(job_id, error=error)
                job = replace_row(job, error=error)
        self._received(job)
        if job.error:  # its ``rejected`` event comes when its outbox folder is published
            ctx.log_event("rejected", logging.WARNING, "rejected %s (job %s): %s", source, job_id,
                          job.error.get("message"), extra={"job": job_id, "manifest": source})
        else:
            ctx.log_event("accepted", logging.INFO, "accepted %s as job %s", source, job_id,
                          extra={"job": job_id, "manifest": source})
        return True

    def _refused_for_now(self, source: str, error: PermissionError) -> bool:
        """Whether a claim's move was refused because the inbox is not writable for batchd's user this instant
        (an operator's chown or chmod between the tick's look at the inbox and the move), not because of the
        file (another user's in a sticky folder: for good, :meth:`_not_movable`). The claim stays intended and
        is finished once batchd's user may move files out of the inbox again (:meth:`take`)."""
        if error.errno != errno.EACCES or os.access(self.ctx.settings.inbox, os.W_OK | os.X_OK):
            return False
        self._claims_unfinished = True  # (the next tick that may move files out of the inbox finishes it)
        log.info("%s: the inbox refused its move (%s); its claim is finished once batchd's user may move files "
                 "out of the inbox again", source, error.strerror or error)
        return True

    def _received(self, job: Job) -> None:
        """The claim is complete: the job is ``received``. Its verdict was committed with the claim's
        intent: a duplicate or an irregular entry is no accepted job."""
        events = [] if job.error else [self.ctx.event("accepted", replace_row(job, state=JobState.RECEIVED))]
        self.ctx.journal.update_job(job.id, state=JobState.RECEIVED, events=events)

    def finish_claim(self, job: Job) -> bool:
        """Finish a claim intended before (a crash, a full disk or a refused move cut it short); False when it
        is left ``claiming`` again (:meth:`_refused_for_now`)."""
        ctx = self.ctx
        claimed = ctx.spool(job.id).manifest_path(job.source)
        source = self._inbox_path(job.source)
        # A crash between the claim's link and its unlink leaves the same file in both places, and
        # claim() finishes that move. A different file under the same name arrived after the claim
        # was complete: it is a new manifest, left for intake.
        if os.path.lexists(source) and (not os.path.lexists(claimed) or same_file(source, claimed)):
            try:
                claim(source, claimed)
            except PermissionError as error:
                if self._refused_for_now(job.source, error):
                    return False
                self._not_movable(job.id, job.source, source, error)
                return True
        if not os.path.lexists(claimed):
            ctx.journal.update_job(job.id, state=JobState.DONE, outcome="rejected",
                                   error={"message": f"{job.source} vanished during its claim"})
            return True
        self._release_inputs(job.id)
        self._received(job)
        return True

    def _not_movable(self, job_id: str, source: str, path: Path, error: PermissionError) -> None:
        """A claimed file batchd's user may not move out of the inbox (the inbox itself is writable: another
        user's file in a folder with the sticky bit): its job is rejected, saying so, and the file is left
        where it is, never claimed again while it is unchanged (after a restart too)."""
        log.warning("%s cannot be moved out of the inbox by batchd's user (%s); rejected, and left there",
                    source, error.strerror or error)
        self._remember_unmovable(path)
        # 'received' with the error: delivered as any rejected job, a folder saying why (and no manifest in it)
        self.ctx.journal.update_job(job_id, state=JobState.RECEIVED, error={
            "code": "not_movable", "file": source,
            "message": f"{source} cannot be moved out of the inbox by batchd's user ({error.strerror or error}): "
                       f"the inbox has the sticky bit and the file is another user's. It is left there; drop it "
                       f"again as batchd's user, or let the inbox's owner or batchd's user own it"})

    def _rejected_as_unmovable_before(self, path: Path, entry: Entry) -> bool:
        """Whether ``entry`` is another user's file in a sticky inbox that an earlier run rejected as not movable,
        unchanged since: left alone, as that run left it (a restart would reject it once more, another folder and
        another ``rejected`` event for the same file). Looked up only for such a file."""
        if not self._foreign_in_sticky_inbox(entry.owner):
            return False  # batchd's user may move it: it is claimed as any file
        if not self.ctx.journal.rejected_as_unmovable(path.name, hashlib.sha256(entry.content).hexdigest()):
            return False
        self._remember_unmovable(path)
        return True

    def _unread_rejected_as_unmovable_before(self, path: Path) -> bool:
        """The same for such a file batchd's user may not even read (rejected unread): known by its name and its
        last change, whose time (ctime) only the kernel sets; a file changed, or put in its place, since the
        rejection is newer than it, and claimed again. Looked at through a descriptor that reads nothing."""
        if not hasattr(os, "O_PATH"):
            return False  # (not Linux: such a file is rejected again after a restart)
        try:
            fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode) or not self._foreign_in_sticky_inbox(st.st_uid):
            return False
        if not self.ctx.journal.rejected_as_unmovable(path.name, None, unchanged_since=st.st_ctime):
            return False
        self._remember_unmovable(path)
        return True

    def _foreign_in_sticky_inbox(self, owner: int) -> bool:
        """Whether a file of ``owner`` is one batchd's user may not move out of the inbox: another user's, in an
        inbox with the sticky bit that batchd's user does not own."""
        euid = os.geteuid()
        if owner == euid or euid == 0:
            return False
        try:
            inbox = os.stat(self.ctx.settings.inbox)
        except OSError:
            return False
        return bool(inbox.st_mode & stat.S_ISVTX) and inbox.st_uid != euid

    def _remember_unmovable(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            self._unmovable[(path.name, st.st_size, st.st_mtime_ns)] = None
            if len(self._unmovable) > UNMOVABLE_KEPT:
                del self._unmovable[next(iter(self._unmovable))]

    def _inbox_path(self, source: str) -> Path:
        """The inbox entry a job's ``source`` name came from (it differs for a non-UTF-8 file name)."""
        inbox = self.ctx.settings.inbox
        path = inbox / source
        if not os.path.lexists(path):
            for name in os.listdir(inbox):
                if name != source and readable_name(name) == source:
                    return inbox / name
        return path

    def _below_free_space_floor(self) -> bool:
        """Whether the state dir's filesystem has less than ``min_free_mb`` left; says so when that changes."""
        settings = self.ctx.settings
        floor = settings.min_free_mb
        free = fs.free_mb(settings.state_dir) if floor else None
        low = free is not None and free < floor
        if low and self.claiming_paused is None:
            log.warning("only %.1f MB free on %s's filesystem, below min_free_mb = %g: not claiming new "
                        "manifests until there is more room (jobs already claimed go on)",
                        free, settings.state_dir, floor)
        elif not low and self.claiming_paused is not None:
            log.info("%s: claiming new manifests again", free_space(settings.state_dir))
        self.claiming_paused = f"{free:.1f} MB free, below min_free_mb = {floor:g}" if low else None
        return low


def free_space(state_dir: Path) -> str:
    free = fs.free_mb(state_dir)
    return "free space unknown" if free is None else f"{free:.1f} MB free on {state_dir}'s filesystem"


#: Longest file name batchd gives a job (its spool file, its outbox folder): NAME_MAX of common filesystems.
NAME_BYTES = 255


def readable_name(name: str) -> str:
    r"""A file name as valid UTF-8 text: undecodable bytes written as ``\xNN`` (``caf\xe9.toml``).

    Each such byte takes four characters, so a long name of them would be too long to be a file name
    itself (the job's spool file, its outbox folder): past :data:`NAME_BYTES` it is cut, and a digest
    of the whole name keeps two long names that begin alike apart (``\xff\xff…-3f2a9c0d1b7e.toml``)."""
    raw = os.fsencode(name)
    text = raw.decode("utf-8", "backslashreplace")
    if len(text.encode()) <= NAME_BYTES:
        return text
    suffix = next((s for s in MANIFEST_SUFFIXES + CONTROL_SUFFIXES if text.lower().endswith(s)), "")
    tail = f"…-{hashlib.sha256(raw).hexdigest()[:12]}{text[len(text) - len(suffix):]}"
    head = text[:len(text) - len(suffix)]
    head = head.encode()[:NAME_BYTES - len(tail.encode())].decode("utf-8", "ignore")  # whole characters only
    head = re.sub(r"\\(x[0-9a-f]?)?$", "", head)  # not half an escape
    return head + tail


def once_candidates(inbox: Path) -> set[str]:
    """The inbox entries ``run --once`` waits for: a manifest-named entry of any kind becomes a job
    (irregular ones are rejected); a NAME.cancel that is not a regular file is only warned about."""
    return {p.name for p in inbox.iterdir()
            if not is_temp_name(p.name)
            and (p.suffix.lower() in MANIFEST_SUFFIXES or p.suffix.lower() in CONTROL_SUFFIXES and is_regular_file(p))}
