"""Control files: ``NAME.cancel`` (``batchd cancel``) and ``NAME.approve`` (``batchd approve``) dropped into
the inbox flag NAME's unfinished jobs.

Intake hands each one it finds here, and at start the cancels dropped while batchd was down (before
reconciling: a job cancelled by then gets no create for a chunk whose create a crash left unconfirmed).
A file is taken once: the flags it sets and its record (``control_files_taken``: name, inode, ctime)
commit together, then it is removed. One batchd's user may not remove (another user's, in a folder
with the sticky bit) stays where it is, and the record keeps a restart from taking it again: a job of
its name claimed since is not one it asked about. A crash between the commit and the removal leaves
batchd's own file, removed at the restart without acting on it twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable

from batchd.daemon.context import Context, is_regular_file
from batchd.daemon.crashpoints import crashpoint
from batchd.inbox import is_temp_name
from batchd.manifest import MANIFEST_SUFFIXES, is_valid_text
from batchd.states import JobState

log = logging.getLogger("batchd")

CANCEL_SUFFIX = ".cancel"
APPROVE_SUFFIX = ".approve"
CONTROL_SUFFIXES = (CANCEL_SUFFIX, APPROVE_SUFFIX)
#: Control files taken that the journal remembers (by name, inode and last change), the newest.
CONTROL_FILES_KEPT = 10_000


class ControlFiles:
    def __init__(self, ctx: Context, *, on_flag: Callable[[], None], left: Callable[[Path], None]):
        self.ctx = ctx
        #: Called when a job was approved or cancelled (a held job is reviewed at once).
        self._on_flag = on_flag
        #: Called with a file batchd's user may not remove: intake leaves it alone while it is unchanged.
        self._left = left

    def take_cancel_files(self) -> None:
        """Take the NAME.cancel files dropped while batchd was down."""
        for path in sorted(self.ctx.settings.inbox.iterdir()):
            if (path.suffix.lower() == CANCEL_SUFFIX and not is_temp_name(path.name) and is_valid_text(path.name)
                    and is_regular_file(path)):
                self.take(path)

    def take(self, path: Path) -> None:
        """Flag the unfinished jobs named after ``path`` (cancel or approve), then remove it once that is
        committed; one whose manifest is still settling in the inbox waits for its job."""
        ctx = self.ctx
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return  # gone since the scan
        if ctx.journal.control_file_taken(path.name, st.st_ino, st.st_ctime_ns):
            # Taken before a restart and left: batchd's user may not remove it (or was killed before it did).
            # The jobs it asked about were flagged then; one of its name claimed since is not one of them.
            with contextlib.suppress(FileNotFoundError, PermissionError):
                path.unlink()
            self._left(path)
            return
        name = path.stem
        jobs = [job for job in ctx.journal.find_jobs(name) if job.state != JobState.DONE]
        if not jobs and any((ctx.settings.inbox / (name + suffix)).exists() for suffix in MANIFEST_SUFFIXES):
            return  # the manifest is still settling; flag it once it is a job
        cancel = path.suffix.lower() == CANCEL_SUFFIX
        for job in jobs:
            if cancel:
                ctx.journal.update_job(job.id, cancel_requested=1)
                log.info("cancel requested for job %s (%s)", job.id, job.source)
            else:
                ctx.journal.update_job(job.id, approved=1)
                log.info("job %s (%s) approved%s", job.id, job.source,
                         "" if job.state == JobState.HELD else " ahead of its budget check")
            self._on_flag()  # a held job is released, or delivered cancelled, on this tick
        if not jobs:
            log.warning("%s: no unfinished job named %r", path.name, name)
        ctx.journal.note_control_file_taken(path.name, st.st_ino, st.st_ctime_ns, keep=CONTROL_FILES_KEPT)
        if jobs and cancel:
            crashpoint("after-cancel-request")
        ctx.journal.after_commit(lambda: self._remove(path))

    def _remove(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except PermissionError:
            # Another user's request in a shared drop folder (the sticky bit): acted on, and its owner's to remove.
            log.info("%s was acted on; batchd's user may not remove it (another user's, in a folder with the sticky "
                     "bit): left there, and not taken again while unchanged", path.name)
            self._left(path)
