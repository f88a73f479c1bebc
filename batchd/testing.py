"""Test utilities for batchd plugins: pytest fixtures and helpers, the ones batchd's own tests use.

Enable the fixtures in your project's top-level ``conftest.py``::

    pytest_plugins = ["batchd.testing"]

They are not loaded automatically (no ``pytest11`` entry point): this module imports google-genai,
uvicorn and starlette, and defines fixtures with short, common names, so autoloading it would slow
down and crowd every pytest run of every project in an environment that happens to have batchd.

Fixtures:

- ``emulator`` — a running :class:`Emulator` (the Gemini Batch API emulator on 127.0.0.1, free port,
  its own state folder), with ``base_url`` and ``client()`` for a ready google-genai client.
- ``workspace`` — a :class:`Workspace`: a temporary folder with ``config.toml`` (fast timings,
  ``provider = "emulator"``), ``inbox/``, ``outbox/``, ``state/`` and ``plugins/`` (the
  ``plugins_dir``), with helpers to drop manifests and read outbox folders.
- ``daemon`` — a :class:`DaemonRunner` on that workspace: ``run_once()`` runs ``batchd run --once`` as a
  real process; ``start()`` runs ``batchd run`` until stopped (or until the test ends).

Helpers for testing a task without a daemon: :func:`answered` and :func:`failed` build the
:class:`~batchd.task.TaskResult` values ``organize()`` receives; :func:`write_manifest` writes a
manifest for :func:`batchd.manifest.load_manifest`.

Everything talks to 127.0.0.1 only; no API key is needed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import pytest
import tomli_w
from google import genai
from google.genai import types

from batchd.emulator.server import EmulatorServer
from batchd.task import TaskRequest, TaskResult

__all__ = [
    "EMULATOR_API_KEY",
    "EMULATOR_JOB_SECONDS",
    "FAST_CONFIG",
    "DaemonRunner",
    "DaemonProcess",
    "DaemonRun",
    "Emulator",
    "OutboxFolder",
    "Workspace",
    "answered",
    "failed",
    "make_client",
    "wait_done",
    "write_manifest",
]

#: The API key the ``emulator`` fixture requires (the SDK insists on sending one).
EMULATOR_API_KEY = "test-key"
#: How long a batch job takes in the test emulators: long enough to pass through every state.
EMULATOR_JOB_SECONDS = 0.3

#: config.toml of a test workspace: fast timings so a small job is delivered in about a second.
FAST_CONFIG: dict[str, Any] = {
    "inbox": "inbox",
    "outbox": "outbox",
    "state_dir": "state",
    "plugins_dir": "plugins",
    "provider": "emulator",
    "model": "gemini-2.5-flash",
    "poll_interval": 0.1,
    "poll_max_interval": 0.3,
    "settle_seconds": 0.1,
    "incomplete_grace_seconds": 1.5,
    "rescan_seconds": 0.5,
    "submit_grace_seconds": 0.3,
    # The emulator's injected 429s and 503s are retried at once instead of after seconds.
    "retry": {"initial_seconds": 0.02, "max_seconds": 0.2},
    # Tests count the remote batches each job made (never one billed twice) by listing them after the run;
    # tests/test_daemon.py checks the deletion itself.
    "delete_finished_batches": False,
}

_T = TypeVar("_T")


# --- The emulator ------------------------------------------------------------------------------------


def make_client(base_url: str, version: str = "v1beta", *, api_key: str = EMULATOR_API_KEY, fault: str | None = None,
                timeout_ms: int | None = None, retries: int | None = None) -> genai.Client:
    """A google-genai client for an emulator at ``base_url``.

    :param fault: a fault spec sent in the ``X-Emulator-Fault`` header (see docs/emulator.md).
    :param retries: the SDK's retry attempts, with millisecond delays; default: the SDK's own.
    """
    options = types.HttpOptions(
        base_url=base_url,
        api_version=version,
        headers={"X-Emulator-Fault": fault} if fault else None,
        timeout=timeout_ms,
        retry_options=types.HttpRetryOptions(attempts=retries, initial_delay=0.01, max_delay=0.05)
        if retries else None,
    )
    return genai.Client(api_key=api_key, http_options=options)


class Emulator(EmulatorServer):
    """An :class:`~batchd.emulator.EmulatorServer` for tests: fast jobs, a known API key, ``client()``."""

    def __init__(self, state_dir: Path | str | None = None, *, job_seconds: float = EMULATOR_JOB_SECONDS,
                 api_key: str = EMULATOR_API_KEY, **options: Any) -> None:
        super().__init__(state_dir, job_seconds=job_seconds, api_key=api_key, **options)
        self.api_key = api_key
        self._clients: list[genai.Client] = []

    def client(self, version: str = "v1beta", **options: Any) -> genai.Client:
        """A google-genai client for this emulator; ``options`` as for :func:`make_client`.

        The emulator keeps it open until it stops, so ``emulator.client().batches.list()`` works
        (a google-genai client closes its connections when it is garbage-collected).
        """
        client = make_client(self.base_url, version, api_key=self.api_key, **options)
        self._clients.append(client)
        return client

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
        super().stop()


def wait_done(client: genai.Client, name: str, timeout: float = 30) -> types.BatchJob:
    """Poll batch job ``name`` until it is done; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.batches.get(name=name)
        if job.done:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} still {job.state} after {timeout} s")
        time.sleep(0.05)


# --- Manifests and results --------------------------------------------------------------------------


def write_manifest(folder: Path, name: str, manifest: Mapping[str, Any] | str) -> Path:
    """Write a manifest into ``folder`` atomically (a dotfile renamed into place) and return its path.

    :param name: the file name; without a suffix ``.toml`` is added (``.json`` writes JSON).
    :param manifest: a mapping (written as TOML or JSON) or the file's text as it is.
    """
    path = Path(folder) / (name if Path(name).suffix else f"{name}.toml")
    if isinstance(manifest, str):
        text = manifest
    elif path.suffix == ".json":
        text = json.dumps(manifest, indent=2)
    else:
        text = tomli_w.dumps(dict(manifest))
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


def answered(request: TaskRequest, text: str | None = None, data: Any = None) -> TaskResult:
    """The successful result of ``request``, as batchd hands it to ``organize()``.

    Give ``data`` (the parsed structured answer) and ``text`` defaults to its JSON; give ``text``
    alone for a plain-text answer, or both for an answer whose text does not parse.
    """
    if text is None and data is not None:
        text = json.dumps(data)
    return TaskResult(key=request.key, input=request.input, status="ok", text=text, data=data)


def failed(request: TaskRequest, message: str = "quota exhausted", code: int = 429) -> TaskResult:
    """The failed result of ``request``, as batchd hands it to ``organize()``."""
    return TaskResult(key=request.key, input=request.input, status="error", error={"code": code, "message": message})


class OutboxFolder:
    """A delivered job's outbox folder, its files parsed on first use."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def summary(self) -> dict[str, Any]:
        """``summary.json``: state, counts, tokens, timings, remote batches."""
        return json.loads((self.path / "summary.json").read_text())

    @cached_property
    def organized(self) -> Any:
        """``organized.json``, as the task organized it (absent for a rejected job)."""
        return json.loads((self.path / "organized.json").read_text())

    @cached_property
    def results(self) -> list[dict[str, Any]]:
        """``results.jsonl``, a dict per request: key, input, status, text, data, error, usage."""
        with open(self.path / "results.jsonl") as lines:
            return [json.loads(line) for line in lines if line.strip()]

    @property
    def state(self) -> str:
        return self.summary["state"]

    def __repr__(self) -> str:
        return f"<OutboxFolder {self.path}>"


# --- The workspace and the daemon ------------------------------------------------------------------


class DaemonProcess(subprocess.Popen):
    """A ``batchd`` process started by :meth:`Workspace.start`; its output goes to :attr:`log_path`."""

    log_path: Path

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (as systemd stops a service), wait, and return the exit code (0: a clean stop)."""
        if self.poll() is None:
            self.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def output(self) -> str:
        return self.log_path.read_text()


class Workspace:
    """A folder to run batchd in: config.toml, inbox/, outbox/, state/ and plugins/ (the plugins_dir)."""

    def __init__(self, root: Path, *, python: str = sys.executable) -> None:
        self.root = Path(root)
        #: The interpreter that runs ``python -m batchd``: this one, or another environment's.
        self.python = python

    @classmethod
    def create(cls, root: Path, *, python: str = sys.executable, **settings: Any) -> Workspace:
        """Make the folders and write config.toml (:meth:`configure` with ``settings``)."""
        workspace = cls(root, python=python)
        for folder in (workspace.inbox, workspace.outbox, workspace.state, workspace.plugins):
            folder.mkdir(parents=True, exist_ok=True)
        workspace.configure(**settings)
        return workspace

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
    def plugins(self) -> Path:
        """The ``plugins_dir`` of the default config: one-off ``*.py`` plugins go here."""
        return self.root / "plugins"

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    def configure(self, *, job_seconds: float = EMULATOR_JOB_SECONDS, faults: Sequence[str] = (),
                  emulator: Mapping[str, Any] | None = None, **settings: Any) -> None:
        """(Re)write config.toml: :data:`FAST_CONFIG`, ``settings`` on top, and the embedded emulator's
        ``job_seconds``, fault specs and any other ``[emulator]`` setting in ``emulator``."""
        config = {**FAST_CONFIG, **settings,
                  "emulator": {"job_seconds": job_seconds, "faults": list(faults), **(emulator or {})}}
        self.config.write_text(tomli_w.dumps(config))

    def add_plugin(self, name: str, source: str) -> Path:
        """Write a one-off plugin module ``plugins/NAME.py``; batchd loads it as plugin ``NAME``."""
        path = self.plugins / f"{name}.py"
        path.write_text(source)
        return path

    def drop(self, name: str, text: str) -> Path:
        """Drop a file into the inbox the careful way (a dotfile renamed into place), as a producer should."""
        return write_manifest(self.inbox, name, text)

    def drop_manifest(self, name: str, manifest: Mapping[str, Any] | str) -> Path:
        """Drop a manifest into the inbox: a mapping written as TOML (or JSON for ``NAME.json``), or text."""
        return write_manifest(self.inbox, name, manifest)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment batchd runs in: this one without BATCHD_*, GOOGLE_* and GEMINI_* variables,
        nor the service manager's (should the tests themselves run under systemd)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "GOOGLE_", "GEMINI_"))
               and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")}
        env["BATCHD_CONFIG"] = str(self.config)
        env.update(extra)
        return env

    def batchd(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        """Run ``batchd ARGS`` to completion; ``env`` adds environment variables."""
        return subprocess.run([self.python, "-m", "batchd", *args], cwd=self.root, env=self.env(**env),
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *args: str, process_group: int | None = None, **env: str) -> DaemonProcess:
        """Start ``batchd ARGS`` in the background, its output in a ``daemon-*.log`` file of the workspace.

        ``process_group=0`` starts it in a process group of its own, as a shell does a foreground
        command, so a test can signal the whole group the way Ctrl-C in a terminal does.
        """
        log_path = self.root / f"daemon-{time.monotonic_ns()}.log"
        with open(log_path, "w") as log:
            process = DaemonProcess([self.python, "-m", "batchd", *args], cwd=self.root, env=self.env(**env),
                                    stdout=log, stderr=subprocess.STDOUT, text=True, process_group=process_group)
        process.log_path = log_path
        return process

    def delivered(self) -> dict[str, dict[str, Any]]:
        """Outbox folders that are complete, by folder name, with their summary."""
        return {name: folder.summary for name, folder in self.outbox_folders().items()}

    def outbox_folders(self) -> dict[str, OutboxFolder]:
        """Outbox folders that are complete (batchd renames a folder in with its summary last), by name."""
        if not self.outbox.is_dir():
            return {}
        return {folder.name: OutboxFolder(folder) for folder in sorted(self.outbox.iterdir())
                if folder.is_dir() and (folder / "summary.json").exists()}

    def outbox_folder(self, name: str) -> OutboxFolder:
        """The delivered outbox folder ``name``; fails the test when there is none."""
        folder = self.outbox_folders().get(name)
        if folder is None:
            raise AssertionError(f"no outbox folder {name!r}; delivered: {sorted(self.outbox_folders())}")
        return folder

    def wait_for(self, predicate: Callable[[], _T], timeout: float = 60, what: str = "condition") -> _T:
        """Poll ``predicate`` until it returns something true, and return that; fail after ``timeout``
        seconds with the daemons' logs (a bound against hangs, not a timing assertion)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        logs = "\n".join(path.read_text()[-3000:] for path in self.root.glob("daemon-*.log"))
        raise AssertionError(f"timed out waiting for {what}\n{logs}")

    def wait_for_delivery(self, name: str, timeout: float = 60) -> OutboxFolder:
        """Wait until outbox folder ``name`` is complete, and return it."""
        return self.wait_for(lambda: self.outbox_folders().get(name), timeout, what=f"{name} delivered")

    def status(self) -> list[dict[str, Any]]:
        """``batchd status --json``."""
        result = self.batchd("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def __repr__(self) -> str:
        return f"<Workspace {self.root}>"


class DaemonRun:
    """What ``batchd run --once`` did: its exit code, output and the outbox folders complete after it."""

    def __init__(self, result: subprocess.CompletedProcess, outbox: dict[str, OutboxFolder]) -> None:
        self.returncode: int = result.returncode
        self.stdout: str = result.stdout
        self.stderr: str = result.stderr
        #: Complete outbox folders by name (all of them, including jobs of earlier runs).
        self.outbox = outbox

    def __repr__(self) -> str:
        return f"<DaemonRun exit {self.returncode}, delivered {sorted(self.outbox)}>"


class DaemonRunner:
    """``batchd run`` on a :class:`Workspace`, as a real process."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self._started: list[DaemonProcess] = []

    def _emulator_env(self, emulator: Emulator | None) -> dict[str, str]:
        if emulator is None:
            return {}
        # provider = "gemini" pointed at this emulator through the SDK's own variables.
        return {"BATCHD_PROVIDER": "gemini", "GEMINI_API_KEY": emulator.api_key,
                "GOOGLE_GEMINI_BASE_URL": emulator.base_url}

    def run_once(self, *args: str, timeout: float = 120, emulator: Emulator | None = None, **env: str) -> DaemonRun:
        """Run ``batchd run --once ARGS``: take what is in the inbox, deliver it, exit.

        The exit code is non-zero when a job failed or was rejected.

        :param emulator: talk to this emulator (as ``provider = "gemini"`` would talk to Google)
            instead of the embedded one, so the test can inspect what reached it.
        :param env: extra environment variables, e.g. ``BATCHD_LOAD_PLUGINS="keywords"``.
        """
        result = self.workspace.batchd("run", "--once", *args, timeout=timeout, **self._emulator_env(emulator), **env)
        return DaemonRun(result, self.workspace.outbox_folders())

    def start(self, *args: str, emulator: Emulator | None = None, **env: str) -> DaemonProcess:
        """Start ``batchd run ARGS`` in the background; stop it with ``.stop()`` (SIGTERM).

        A daemon still running when the test ends is stopped then (and killed if it does not stop).
        """
        process = self.workspace.start("run", *args, **self._emulator_env(emulator), **env)
        self._started.append(process)
        return process

    def stop_all(self, timeout: float = 30) -> None:
        for process in self._started:
            try:
                process.stop(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --- Fixtures ----------------------------------------------------------------------------------------


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    """A Gemini Batch API emulator of this test's own on 127.0.0.1 (``.base_url``, ``.client()``)."""
    with Emulator(tmp_path / "emulator-state") as server:
        yield server


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """A batchd workspace in a temporary folder: config.toml, inbox/, outbox/, state/, plugins/."""
    return Workspace.create(tmp_path)


@pytest.fixture
def daemon(workspace: Workspace) -> Iterator[DaemonRunner]:
    """``batchd run`` on the ``workspace`` as a real process: ``run_once()`` or ``start()``."""
    runner = DaemonRunner(workspace)
    try:
        yield runner
    finally:
        runner.stop_all()
