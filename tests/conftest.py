"""Shared fixtures: a batchd workspace (config, inbox, outbox, state) and the daemon as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w

REPO = Path(__file__).resolve().parent.parent

# Fast timings so a test's jobs finish in about a second.
FAST_CONFIG = {
    "inbox": "inbox",
    "outbox": "outbox",
    "state_dir": "state",
    "provider": "emulator",
    "model": "gemini-2.5-flash",
    "poll_interval": 0.1,
    "poll_max_interval": 0.3,
    "settle_seconds": 0.1,
    "incomplete_grace_seconds": 1.5,
    "rescan_seconds": 0.5,
    "submit_grace_seconds": 0.3,
}


@dataclass
class Workspace:
    root: Path

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    def configure(self, *, job_seconds: float = 0.3, faults: list[str] = (), **settings) -> None:
        """Write config.toml: the fast defaults, ``settings`` on top, and the emulator's table."""
        config = {**FAST_CONFIG, **settings, "emulator": {"job_seconds": job_seconds, "faults": list(faults)}}
        self.config.write_text(tomli_w.dumps(config))

    def drop(self, name: str, text: str) -> Path:
        """Drop a file the careful way (write a dotfile, then rename), as a producer should."""
        path = self.inbox / name
        tmp = self.inbox / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "GOOGLE_", "GEMINI_"))}
        env["BATCHD_CONFIG"] = str(self.config)
        env.update(extra)
        return env

    def batchd(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "batchd", *args], cwd=self.root, env=self.env(**env),
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *args: str, **env: str) -> subprocess.Popen:
        log = open(self.root / f"daemon-{time.monotonic_ns()}.log", "w")
        return subprocess.Popen([sys.executable, "-m", "batchd", *args], cwd=self.root, env=self.env(**env),
                                stdout=log, stderr=subprocess.STDOUT, text=True)

    def delivered(self) -> dict[str, dict]:
        """Outbox folders that are complete, by folder name, with their summary."""
        found = {}
        for folder in sorted(self.outbox.iterdir()):
            summary = folder / "summary.json"
            if folder.is_dir() and summary.exists():
                found[folder.name] = json.loads(summary.read_text())
        return found

    def wait_for(self, predicate, timeout: float = 60, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        logs = "\n".join(p.read_text()[-3000:] for p in self.root.glob("daemon-*.log"))
        raise AssertionError(f"timed out waiting for {what}\n{logs}")

    def status(self) -> list[dict]:
        result = self.batchd("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


def stop_daemon(process: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM, as systemd stops a service; return the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.wait(timeout)


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path)
    for folder in (ws.inbox, ws.outbox):
        folder.mkdir()
    ws.configure()
    return ws
