"""The embedded emulator in a child process, as ``batchd run`` starts it (provider = "emulator").

Kept apart from :mod:`batchd.emulator.server` so that the daemon, which only starts the child and
reads its URL, never imports uvicorn, Starlette or the emulator's app.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("batchd.emulator")


class EmulatorProcess:
    """The emulator in a child process, as ``batchd run`` embeds it.

    A process of its own gives the emulator its own interpreter: answering a million requests
    does not compete with the daemon for one GIL, much as Google's servers do not. The child
    exits when this process does, even on SIGKILL (it watches its stdin pipe), and its state
    directory lock keeps a successor from starting before it is gone.
    """

    def __init__(self, state_dir: Path, *, job_seconds: float = 2.0, concurrent_batches: int = 100,
                 faults: Sequence[str] = (), startup_seconds: float = 60.0) -> None:
        self.state_dir = Path(state_dir)
        self._command = [sys.executable, "-m", "batchd.emulator", "--host", "127.0.0.1", "--port", "0",
                         "--state-dir", str(self.state_dir), "--job-seconds", str(job_seconds),
                         "--concurrent-batches", str(concurrent_batches),
                         "--exit-with-parent", *(f"--fault={spec}" for spec in faults)]
        self._startup_seconds = startup_seconds
        self._process: subprocess.Popen | None = None
        self.base_url: str | None = None

    def start(self) -> EmulatorProcess:
        """Start the child and return once it serves."""
        return self.spawn().wait_ready()

    def spawn(self) -> EmulatorProcess:
        """Start the child without waiting for it (it boots while the caller does other work)."""
        # A process group of its own: Ctrl-C in a terminal signals the whole foreground group, and the
        # emulator must outlive the daemon's graceful stop (which records creates still in flight).
        # It stops when the daemon closes its stdin, or when the daemon dies.
        self._process = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         process_group=0)
        return self

    def wait_ready(self) -> EmulatorProcess:
        """Wait until the spawned child serves; ``base_url`` is then set."""
        if self.base_url is not None:
            return self
        timer = threading.Timer(self._startup_seconds, self._process.kill)  # a child that never answers
        timer.start()
        try:
            first_line = self._process.stdout.readline()
        finally:
            timer.cancel()
        found = re.search(r"listening on (http://\S+)", first_line)
        if found is None:
            self.stop()
            raise RuntimeError(f"the embedded emulator did not start (exit status {self._process.returncode})")
        self.base_url = found[1]
        # Whatever else it prints must not fill the pipe and block it.
        threading.Thread(target=self._process.stdout.read, name="emulator-stdout", daemon=True).start()
        log.info("embedded emulator at %s (state %s)", self.base_url, self.state_dir)
        return self

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.stdin.close()  # the child's cue to shut down cleanly
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
