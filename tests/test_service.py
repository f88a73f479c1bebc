"""batchd under systemd: the notify protocol against a fake NOTIFY_SOCKET, the daemon as a real process."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import tempfile
import time
from pathlib import Path

import pytest

from batchd import service
from batchd.testing import Workspace

TRANSLATE = """\
task = "translate"
texts = ["Hello", "Goodbye"]
languages = ["French"]
"""

#: The loop's own timers are long, as in production, so only the watchdog and signals can wake it.
SLOW_LOOP = {"rescan_seconds": 60.0}


class FakeSystemd:
    """The service manager's end of $NOTIFY_SOCKET: a datagram socket in a short temporary folder."""

    def __init__(self, abstract: bool = False):
        self.folder = Path(tempfile.mkdtemp(prefix="sd-"))  # AF_UNIX paths are limited to 108 bytes
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"batchd-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(str(self.folder / "notify.sock"))
            self.address = str(self.folder / "notify.sock")
        self.messages: list[list[str]] = []  # one list of lines per datagram

    def receive(self, timeout: float) -> list[str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, BlockingIOError):
            return None
        lines = data.decode().splitlines()
        self.messages.append(lines)
        return lines

    def wait_for(self, predicate, timeout: float = 60, what: str = "message") -> list[str]:
        """Receive until a datagram satisfies ``predicate``; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.receive(max(0.01, deadline - time.monotonic()))
            if lines is not None and predicate(lines):
                return lines
        raise AssertionError(f"no {what} from the daemon; got {self.messages}")

    def lines(self) -> list[str]:
        return [line for message in self.messages for line in message]

    def close(self) -> None:
        self.sock.close()
        for path in self.folder.iterdir():
            path.unlink()
        self.folder.rmdir()


@pytest.fixture
def systemd():
    fake = FakeSystemd()
    yield fake
    fake.close()


def job_states(ws: Workspace) -> list[str]:
    db = sqlite3.connect(f"file:{ws.state / 'journal.db'}?mode=ro", uri=True)
    try:
        return [row[0] for row in db.execute("SELECT state FROM jobs")]
    finally:
        db.close()


def chunk_states(ws: Workspace) -> list[tuple[str, str | None]]:
    db = sqlite3.connect(f"file:{ws.state / 'journal.db'}?mode=ro", uri=True)
    try:
        return list(db.execute("SELECT state, remote_name FROM chunks"))
    finally:
        db.close()


# -- the protocol, in process -----------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_sends_one_datagram_to_a_path_or_abstract_socket(abstract):
    fake = FakeSystemd(abstract=abstract)
    try:
        assert service.notify("READY=1\nSTATUS=hello", environ={"NOTIFY_SOCKET": fake.address})
        assert fake.receive(5) == ["READY=1", "STATUS=hello"]
    finally:
        fake.close()


def test_notify_is_a_no_op_without_a_socket_and_ignores_errors(tmp_path):
    assert service.notify("READY=1", environ={}) is False
    assert service.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}) is False
    assert service.notify("READY=1", environ={"NOTIFY_SOCKET": "relative/path"}) is False


def test_the_watchdog_is_only_ours_when_watchdog_pid_is_unset_or_ours():
    assert service.watchdog_seconds({"WATCHDOG_USEC": "4000000"}) == 4.0
    assert service.watchdog_seconds({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}) == 4.0
    assert service.watchdog_seconds({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert service.watchdog_seconds({"WATCHDOG_USEC": "0"}) is None
    assert service.watchdog_seconds({}) is None
    notifier = service.ServiceManager({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "4000000"})
    assert notifier.ping_interval == 2.0, "pings at half the timeout"
    assert notifier.max_sleep(30.0) <= 2.0, "the loop wakes in time for its next ping"


# -- the daemon as a real process -------------------------------------------------------------


def test_ready_comes_after_recovery_then_status_lines_and_stopping_on_sigterm(workspace: Workspace, systemd):
    # A crash right after a claim leaves a job in 'claiming': recovery must finish it before READY.
    workspace.configure(**SLOW_LOOP)
    workspace.drop("translate.toml", TRANSLATE)
    crashed = workspace.batchd("run", BATCHD_CRASH_AT="after-claim")
    assert crashed.returncode == -signal.SIGKILL
    assert job_states(workspace) == ["claiming"]

    daemon = workspace.start("run", NOTIFY_SOCKET=systemd.address)
    try:
        ready = systemd.wait_for(lambda lines: "READY=1" in lines, what="READY=1")
        assert "claiming" not in job_states(workspace), "READY=1 came before recovery finished"
        assert systemd.messages[0] == ["STATUS=starting: recovering"]
        assert f"MAINPID={daemon.pid}" in ready
        assert any(line.startswith("STATUS=") and "job" in line for line in ready)

        systemd.wait_for(lambda lines: "STATUS=0 jobs active, 0 remote batches running" in lines,
                         what="a status line once the job is delivered")
        assert workspace.delivered()["translate"]["state"] == "succeeded"
        statuses = [line for line in systemd.lines() if line.startswith("STATUS=")]
        assert any("1 job active" in line for line in statuses), statuses

        daemon.send_signal(signal.SIGTERM)
        systemd.wait_for(lambda lines: "STOPPING=1" in lines, what="STOPPING=1")
        # The loop was asleep until its 60 s rescan: SIGTERM must wake it, well inside this bound.
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert "READY=1" not in systemd.lines()[systemd.lines().index("STOPPING=1"):]


#: A task whose request building blocks, on the daemon's loop, until the test releases it.
BLOCKING_PLUGIN = """
import time
from pathlib import Path
from pydantic import BaseModel, ConfigDict, field_validator
from batchd import hookimpl
from batchd.task import Task, TaskRequest

HERE = Path(__file__).parent


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str]

    @field_validator("texts")
    @classmethod
    def _block(cls, texts):
        # Validation runs on the loop's thread, as the manifest is taken (requests() and organize()
        # run in threads of their own, with a bounded wait).
        if "block" in texts and not (HERE / "released").exists():
            (HERE / "blocked").touch()
            while not (HERE / "released").exists():
                time.sleep(0.02)
        return texts


class Blocking(Task):
    name = "blocking"
    Params = Params

    def inline_items(self, params):
        return "texts", params.texts

    def requests(self, params, items):
        for item in items:
            yield TaskRequest(key=item.id, prompt=item.text, input={"text": item.text})

    def organize(self, results):
        for result in results:
            yield result.key, result.text


@hookimpl
def register_tasks(register):
    register(Blocking())
"""


@pytest.mark.slow
def test_watchdog_pings_come_from_the_loop_at_half_the_timeout(workspace: Workspace, systemd):
    # WATCHDOG_USEC=1 s: a ping every 0.5 s. The loop's own timers are 60 s, so pings that keep
    # coming prove the idle loop wakes for the watchdog; each wait is a bound against a hang (a loaded
    # machine may be slow), far below the 60 s the loop would otherwise sleep. The rate itself, half
    # the timeout, is the ServiceManager's arithmetic (test_the_watchdog_is_only_ours...): no clock here.
    # No cost plugin: its estimate reads the requests in a worker thread, before the build does.
    workspace.configure(**SLOW_LOOP, disabled_plugins=["cost"])
    workspace.add_plugin("blocking", BLOCKING_PLUGIN)
    daemon = workspace.start("run", NOTIFY_SOCKET=systemd.address, WATCHDOG_USEC="1000000")
    try:
        systemd.wait_for(lambda lines: "READY=1" in lines, what="READY=1")
        for _ in range(6):  # each within 20 s, where the loop alone would sleep 60 s
            systemd.wait_for(lambda lines: lines == ["WATCHDOG=1"], timeout=20, what="WATCHDOG=1")

        # While the loop is blocked (inside a plugin, validating the manifest), nothing pings for it:
        # not a helper thread, so systemd's watchdog would see the wedge.
        workspace.drop("blocked.toml", 'task = "blocking"\ntexts = ["fine", "block"]\n')
        workspace.wait_for(lambda: (workspace.plugins / "blocked").exists(), what="the loop blocked")
        while systemd.receive(0.05) is not None:
            pass  # what was sent before the block
        pings_while_blocked = []
        for _ in range(30):  # 3 s: 6 ping intervals
            lines = systemd.receive(0.1)
            if lines and "WATCHDOG=1" in lines:
                pings_while_blocked.append(lines)
        assert pings_while_blocked == [], "a blocked loop must not ping the watchdog"
        (workspace.plugins / "released").touch()
        systemd.wait_for(lambda lines: "WATCHDOG=1" in lines, timeout=20, what="WATCHDOG=1 after the block")
        workspace.wait_for(lambda: "blocked" in workspace.delivered(), what="the blocked job delivered")
    finally:
        (workspace.plugins / "released").touch()
        assert daemon.stop() == 0


def test_no_watchdog_pings_when_the_watchdog_belongs_to_another_process(workspace: Workspace, systemd):
    workspace.configure(**SLOW_LOOP)
    daemon = workspace.start("run", NOTIFY_SOCKET=systemd.address, WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    try:
        systemd.wait_for(lambda lines: "READY=1" in lines, what="READY=1")
        workspace.drop("translate.toml", TRANSLATE)
        workspace.wait_for(lambda: "translate" in workspace.delivered(), what="the job delivered")
    finally:
        assert daemon.stop() == 0
    while systemd.receive(0.01) is not None:
        pass  # take in everything the daemon sent
    assert "STOPPING=1" in systemd.lines() and "WATCHDOG=1" not in systemd.lines()


@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c"])
def test_a_stop_during_a_create_records_the_remote_job_before_exiting_0(workspace: Workspace, systemd, stop: str):
    # The create takes 3 s: the stop arrives while it is in flight. systemd sends SIGTERM to the daemon
    # alone; Ctrl-C in a terminal sends SIGINT to the whole foreground process group, and the embedded
    # emulator must not go down with it before the daemon has recorded the create's answer.
    # No cost plugin: its estimate runs in a thread alongside the build, and the job stays 'building'
    # until it is in, so a stop landing before it (on a loaded machine) would leave the job unbuilt.
    # The build's end is taken a tick after the create starts (chunks are built in a thread of their
    # own), so a stop landing in between leaves the job 'building' with its chunk recorded: as safe.
    workspace.configure(faults=["slow=3@create"], job_seconds=5, disabled_plugins=["cost"], **SLOW_LOOP)
    daemon = workspace.start("run", process_group=0, NOTIFY_SOCKET=systemd.address)
    try:
        systemd.wait_for(lambda lines: "READY=1" in lines, what="READY=1")
        workspace.drop("translate.toml", TRANSLATE)
        systemd.wait_for(lambda lines: any("being submitted" in line for line in lines), what="a create in flight")
        if stop == "sigterm":
            daemon.send_signal(signal.SIGTERM)
        else:
            os.killpg(daemon.pid, signal.SIGINT)
        systemd.wait_for(lambda lines: "STOPPING=1" in lines, what="STOPPING=1")
        # While the create runs, the daemon asks for more stop time instead of being killed mid-way.
        systemd.wait_for(lambda lines: "EXTEND_TIMEOUT_USEC=30000000" in lines, what="EXTEND_TIMEOUT_USEC")
        assert daemon.wait(timeout=60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    # Nothing ambiguous is left: the create's answer was recorded, so no restart has to guess.
    [(state, remote_name)] = chunk_states(workspace)
    assert state == "running" and remote_name
    assert job_states(workspace) in (["submitted"], ["building"])


def test_a_second_daemon_on_the_same_state_dir_exits_with_a_clear_error(workspace: Workspace, systemd):
    first = workspace.start("run", NOTIFY_SOCKET=systemd.address)
    try:
        systemd.wait_for(lambda lines: "READY=1" in lines, what="READY=1")
        second = workspace.batchd("run", timeout=60)
        assert second.returncode == 1
        assert f"another batchd (pid {first.pid}) is already running on state dir {workspace.state}" \
            in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None, "the first daemon is untouched"
    finally:
        assert first.stop() == 0
    # Once the first one is gone, the state dir is free again.
    assert workspace.batchd("run", "--once").returncode == 0


def test_a_service_that_delivered_a_failed_job_still_stops_with_0(workspace: Workspace, systemd):
    # A rejected job is the job's outcome, written to its summary, not a failure of the service:
    # exiting 1 on SIGTERM would mark the unit failed (and --once keeps reporting it in its code).
    daemon = workspace.start("run", NOTIFY_SOCKET=systemd.address)
    try:
        systemd.wait_for(lambda lines: "READY=1" in lines, what="READY=1")
        workspace.drop("unknown.toml", 'task = "no-such-task"\n')
        workspace.wait_for(lambda: "unknown" in workspace.delivered(), what="the rejection")
        assert workspace.delivered()["unknown"]["state"] == "rejected"
    finally:
        assert daemon.stop() == 0


def test_config_and_plugin_errors_exit_78_and_the_unit_does_not_restart_on_it(workspace: Workspace):
    from batchd.cli.common import EXIT_CONFIG

    assert EXIT_CONFIG == 78  # EX_CONFIG of sysexits.h, what RestartPreventExitStatus names
    unit = workspace.batchd("service", "install", "--print")
    assert unit.returncode == 0, unit.stderr
    assert f"\nRestartPreventExitStatus={EXIT_CONFIG}\n" in unit.stdout
    assert "\nRestart=on-failure\n" in unit.stdout

    workspace.config.write_text(workspace.config.read_text() + 'no_such_setting = 1\n')
    bad_config = workspace.batchd("run")
    assert bad_config.returncode == EXIT_CONFIG, bad_config.stderr
    assert "no_such_setting" in bad_config.stderr and "Traceback" not in bad_config.stderr

    workspace.configure()
    workspace.add_plugin("broken", "raise ImportError('not today')\n")
    bad_plugin = workspace.batchd("run")
    assert bad_plugin.returncode == EXIT_CONFIG, bad_plugin.stderr
    assert "not today" in bad_plugin.stderr and "Traceback" not in bad_plugin.stderr
