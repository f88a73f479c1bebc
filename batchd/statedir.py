"""What a state dir holds beside the journal: the lock that makes it one daemon's (with that daemon's
pid) and what the daemon is waiting on, for ``batchd status`` and ``batchd doctor``.

Kept out of :mod:`batchd.daemon` so that reading them imports neither the SDK nor the steps.
"""

from __future__ import annotations

import fcntl
import json
import time
from pathlib import Path


def lock_path(state_dir: Path) -> Path:
    """The file whose flock makes a state dir one daemon's."""
    return state_dir / "batchd.lock"


def lock_holder(state_dir: Path) -> int | None:
    """The pid of the daemon running on ``state_dir`` (0: running, pid unknown), or None if none is."""
    try:
        with open(lock_path(state_dir)) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = f.read().strip()
                return int(text) if text.isdigit() else 0  # held, pid not written yet
            return None
    except (FileNotFoundError, NotADirectoryError):  # (no state dir: a file in its way is the folder check's)
        return None


def notices_path(state_dir: Path) -> Path:
    """What the running daemon is waiting on, for ``batchd status`` (see ``Daemon.notices``)."""
    return state_dir / "notices.json"


def render_notice(notice: str | dict, now: float | None = None) -> str:
    """A notice as a line: a wait with an end (``{"text", "until"}``) says how long it has left."""
    if not isinstance(notice, dict):
        return str(notice)
    text = str(notice.get("text", ""))
    until = notice.get("until")
    if isinstance(until, (int, float)):
        left = max(0, round(until - (time.time() if now is None else now)))
        text += f", retry in {left} s" if left else ", retrying now"
    return text


def read_notices(state_dir: Path) -> tuple[int | None, list[str]]:
    """The running daemon's pid and notices; none when no daemon holds the state dir (a killed one's
    notices are stale)."""
    pid = lock_holder(state_dir)
    if pid is None:
        return None, []
    try:
        notices = json.loads(notices_path(state_dir).read_text())["notices"]
    except (OSError, ValueError, KeyError, TypeError):
        return pid, []
    return pid, [render_notice(notice) for notice in notices] if isinstance(notices, list) else []
