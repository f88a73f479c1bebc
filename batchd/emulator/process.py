"""The embedded emulator in a child process, as ``batchd run`` starts it (provider = "emulator").

Kept apart from :mod:`batchd.emulator.server` so that the daemon, which only starts the child and
reads its URL, never imports uvicorn, Starlette or the emulator's app.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchd.config import Settings

log = logging.getLogger("batchd.emulator")


#: A child that exited while batchd runs is started again after this long, doubling while it fails to start.
RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 60.0


class EmulatorFailed(RuntimeError):
    """The embedded emulator exited before it served (its own error is on stderr, above)."""


class EmulatorProcess:
    """The emulator in a child process, as ``batchd run`` embeds it.

    A process of its own gives the emulator its own interpreter: answering a million requests
    does not compete with the daemon for one GIL, much as Google's servers do not. The child
    exits when this process does, even on SIGKILL (it watches its stdin pipe), and its state
    directory lock keeps a successor from starting before it is gone.

    With ``restart``, a child that exits while nobody stopped it (killed, crashed) is started again on
    the same port, after a wait that doubles while it keeps failing: its clients, which know only that
    URL, see an outage of the service and retry, as they would with Google's.
    """

    def __init__(self, state_dir: Path, *, job_seconds: float = 2.0, concurrent_batches: int = 100,
                 faults: Sequence[str] = (), startup_seconds: float = 60.0, restart: bool = False) -> None:
        self.state_dir = Path(state_dir)
        self._options = ["--state-dir", str(self.state_dir), "--job-seconds", str(job_seconds),
                         "--concurrent-batches", str(concurrent_batches),
                         "--exit-with-parent", *(f"--fault={spec}" for spec in faults)]
        self._port = 0  # any free one at first; the same one when started again
        self._startup_seconds = startup_seconds
        self._restart = restart
        self._process: subprocess.Popen | None = None
        self.base_url: str | None = None
        self._failure: EmulatorFailed | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # the child is replaced (a restart) or stopped by one thread at a time

    @classmethod
    def embedded(cls, settings: Settings) -> EmulatorProcess:
        """The emulator ``batchd run`` embeds for ``settings`` (``provider = "emulator"``), not yet spawned."""
        emulator = settings.emulator
        return cls(emulator.state_dir or settings.state_dir / "emulator", job_seconds=emulator.job_seconds,
                   concurrent_batches=emulator.concurrent_batches, faults=list(emulator.faults), restart=True)

    def can_start(self) -> bool:
        """Whether its state directory is (or can be made) a writable folder: else the child would only fail,
        saying what the daemon's own start says better (a read-only disk, a folder it may not write)."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        return os.access(self.state_dir, os.W_OK | os.X_OK)

    def start(self) -> EmulatorProcess:
        """Start the child and return once it serves."""
        return self.spawn().wait_ready()

    def spawn(self) -> EmulatorProcess:
        """Start the child without waiting for it (it boots while the caller does other work), unless it was
        spawned already or failed to start."""
        if self._process is not None or self._failure is not None:
            return self
        self._stopping.clear()
        self._process = self._popen()
        return self

    def _popen(self) -> subprocess.Popen:
        # A process group of its own: Ctrl-C in a terminal signals the whole foreground group, and the
        # emulator must outlive the daemon's graceful stop (which records creates still in flight).
        # It stops when the daemon closes its stdin, or when the daemon dies.
        command = [sys.executable, "-m", "batchd.emulator", "--host", "127.0.0.1", "--port", str(self._port),
                   *self._options]
        return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, process_group=0)

    def wait_ready(self) -> EmulatorProcess:
        """Wait until the spawned child serves; ``base_url`` is then set."""
        if self.base_url is not None:
            return self
        if self._failure is not None:
            raise self._failure
        process, expired = self._process, threading.Event()

        def stop_waiting() -> None:  # a child that never answers
            expired.set()
            process.kill()

        timer = threading.Timer(self._startup_seconds, stop_waiting)
        timer.start()
        try:
            first_line = process.stdout.readline()
        finally:
            timer.cancel()
        found = re.search(r"listening on (http://\S+)", first_line)
        if found is None:
            self.stop()
            why = (f"did not serve within {self._startup_seconds:g} s and was stopped" if expired.is_set()
                   else f"did not start: it exited with status {process.returncode}, saying why on stderr (above)")
            self._failure = EmulatorFailed(f"the embedded emulator (state {self.state_dir}) {why}")
            raise self._failure
        self.base_url = found[1]
        self._port = int(found[1].rpartition(":")[2])
        threading.Thread(target=self._watch, args=(process,), name="emulator-watch", daemon=True).start()
        log.info("embedded emulator at %s (state %s)", self.base_url, self.state_dir)
        return self

    def _watch(self, process: subprocess.Popen) -> None:
        """Read what the child prints (it must not fill the pipe and block it) until it exits; with
        ``restart``, start it again unless it was stopped."""
        delay = RESTART_FIRST_SECONDS
        while True:
            process.stdout.read()
            status = process.wait()
            if not self._restart or self._stopping.is_set():
                return
            log.error("the embedded emulator exited (status %s) while batchd runs; starting it again at %s in %g s",
                      status, self.base_url, delay)
            while True:
                if self._stopping.wait(delay):
                    return
                started = self._start_again()
                if started is not None:
                    break
                delay = min(2 * delay, RESTART_MAX_SECONDS)
                log.error("the embedded emulator did not start again (its error is above); next try in %g s", delay)
            process, delay = started, RESTART_FIRST_SECONDS
            log.warning("the embedded emulator serves again at %s", self.base_url)

    def _start_again(self) -> subprocess.Popen | None:
        """A new child on the same port, once it serves (None: it did not start, or a stop came first)."""
        with self._lock:
            if self._stopping.is_set():
                return None
            process = self._process = self._popen()
        if "listening on" in process.stdout.readline():
            return process
        process.wait()
        return None

    def stop(self) -> None:
        self._stopping.set()  # first: the watcher must not take this exit for a crash
        with self._lock:
            process, self._process = self._process, None
        if process is None:
            return
        process.stdin.close()  # the child's cue to shut down cleanly
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self.base_url = None  # (gone with it: a start spawns another)

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
