"""Every place the crash tests may kill batchd, in one registry.

``BATCHD_CRASH_AT=<point>`` makes the process SIGKILL itself at that point (``BATCHD_CRASH_SIGNAL=SIGTERM``
sends a stop request there instead, as systemd would at that instant). Each point sits between an
intent committed to the journal and its effect, or between an effect and its record: the tests kill
the daemon at every one and prove that a restart loses nothing and bills nothing twice
(docs/design.md, "Crash points").
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Callable

log = logging.getLogger("batchd")

#: point → where it is. Met by every job, in the order a job meets them.
ON_EVERY_JOB = {
    "after-claim": "manifest renamed into the spool, job not yet 'received'",
    "while-building": "a second chunk built: recorded, the first perhaps out (a job estimated before admission), or held",
    "after-intent": "create intent committed, batches.create not yet sent",
    "after-upload": "a file chunk's requests uploaded, the file's name not yet recorded",
    "after-create": "the remote job exists, its name not yet recorded",
    "while-polling": "remote jobs running, mid poll",
    "after-download": "results fetched into the spool, outbox not yet written",
    "after-publish": "outbox folder published, job not yet marked done",
}
#: Met only by a job being cancelled.
ON_CANCEL = {
    "after-cancel-request": "the cancel request committed, its NAME.cancel not yet removed, nothing sent",
    "after-cancel": "batches.cancel answered for a remote job, not yet recorded (cancel_sent)",
}
#: Met only when a remote batch expired and its chunk is submitted again.
ON_RESUBMIT = {
    "after-resubmit-intent": "the resubmission's create intent committed, batches.create not yet sent",
    "after-resubmit-create": "the resubmission's remote job exists, its name not yet recorded",
}
#: Met only by a job whose requests upload files (a folder input, file_column: see batchd.media).
ON_MEDIA = {
    "after-media-intent": "a file's upload intent committed (state 'uploading'), nothing sent",
    "after-media-upload": "a file of the requests uploaded, its name not yet recorded (state 'uploading')",
}
#: Met by every job whose result writer has ended (its answers are in the request cache when it is on).
ON_CACHE = {
    "after-cache-store": "results written and the job's answers stored in the request cache, outbox not yet published",
}
#: Met only by small jobs sent together in a pack (batchd.daemon.pack).
ON_PACK = {
    "after-pack-requests": "a pack's requests file written and synced, the pack and its members' moves not yet committed",
    "after-pack-split": "a pack's results split into its members' shares, not yet committed with their moves",
}
CRASH_POINTS = {**ON_EVERY_JOB, **ON_CANCEL, **ON_RESUBMIT, **ON_MEDIA, **ON_CACHE, **ON_PACK}

#: Commits the transitions the loop has grouped so far (``Journal.flush``, set by the daemon): a crash
#: point means "everything before this point is committed", as it was when each transition committed
#: on its own.
commit_pending: Callable[[], None] = lambda: None


def crashpoint(name: str) -> None:
    """Die here, as abruptly as a power cut would, if the crash tests asked for it."""
    if name not in CRASH_POINTS:
        raise KeyError(f"unknown crash point {name!r}: add it to batchd.daemon.crashpoints")
    if os.environ.get("BATCHD_CRASH_AT") == name:
        commit_pending()
        signum = signal.Signals[os.environ.get("BATCHD_CRASH_SIGNAL", "SIGKILL")]
        log.warning("crash point %s: sending the process %s", name, signum.name)
        os.kill(os.getpid(), signum)
