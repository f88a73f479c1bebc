"""The operator's commands: init, service install, config show, doctor, status --watch, --json everywhere."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from batchd import fs, service
from batchd.emulator.server import EmulatorServer
from batchd.testing import DaemonRunner, Workspace
from conftest import REPO

TRANSLATE = 'task = "translate"\ntexts = ["Hello", "Goodbye"]\nlanguages = ["French"]\n'


def batchd(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "GOOGLE_", "GEMINI_"))}
    environ.update(env)
    return subprocess.run([sys.executable, "-m", "batchd", *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=120)


# -- init and service install -----------------------------------------------------------------


def test_init_creates_a_working_folder_that_runs_and_keeps_an_existing_config(tmp_path):
    folder = tmp_path / "work"
    result = batchd("init", str(folder), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("inbox", "outbox", "plugins", "state"):
        assert (folder / name).is_dir()
    config = (folder / "config.toml").read_text()
    assert config.startswith("# batchd configuration.") and 'provider = "emulator"' in config
    assert 'plugins_dir = "plugins"' in config
    assert stat.S_IMODE((folder / "batchd.env").stat().st_mode) == 0o600, "the secrets file is private"

    (folder / "config.toml").write_text(config + "\n# mine\n")
    again = batchd("init", str(folder), cwd=tmp_path)
    assert again.returncode == 1 and "already exists" in again.stderr and "--force" in again.stderr
    assert (folder / "config.toml").read_text().endswith("# mine\n"), "not overwritten"
    assert batchd("init", "--force", str(folder), cwd=tmp_path).returncode == 0
    assert (folder / "config.toml").read_text() == config

    # The folder works as it is: a job dropped into its inbox is delivered.
    (folder / "inbox" / "t.toml").write_text(TRANSLATE)
    run = batchd("--config", str(folder / "config.toml"), "run", "--once", "--model", "gemini-2.5-flash",
                 BATCHD_EMULATOR__JOB_SECONDS="0.2", BATCHD_POLL_INTERVAL="0.1", BATCHD_SETTLE_SECONDS="0.1",
                 cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads((folder / "outbox" / "t" / "summary.json").read_text())["state"] == "succeeded"


def test_the_init_template_is_the_shipped_config():
    assert service.config_template() == (REPO / "config.toml").read_text(), (
        "batchd/config_template.toml (what `batchd init` writes) differs from config.toml: "
        "run `cp config.toml batchd/config_template.toml`")


def test_service_install_prints_or_writes_the_unit_with_this_installations_paths(tmp_path):
    folder = tmp_path / "srv"
    assert batchd("init", str(folder), cwd=tmp_path).returncode == 0
    config = folder / "config.toml"

    printed = batchd("--config", str(config), "service", "install", "--print", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    executable = Path(sys.executable).parent / "batchd"
    expected_start = (f"ExecStart={executable} --config {config} run" if executable.exists()
                      else f"ExecStart={sys.executable} -m batchd --config {config} run")
    for line in ("Type=notify", expected_start, f"WorkingDirectory={folder}",
                 f"EnvironmentFile=-{folder / 'batchd.env'}", "Restart=on-failure", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "PrivateTmp=yes", "KillMode=mixed", "WantedBy=multi-user.target",
                 f"ReadWritePaths={folder / 'inbox'} {folder / 'outbox'} {folder / 'state'}"):
        assert line in lines, line
    assert any(line.startswith("WatchdogSec=") for line in lines)
    assert any(line.startswith("TimeoutStopSec=") for line in lines)

    target = tmp_path / "units"
    written = batchd("--config", str(config), "service", "install", "--user", "--target-dir", str(target),
                     cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    unit = (target / "batchd.service").read_text()
    assert "WantedBy=default.target" in unit and "User=" not in unit
    assert "Type=notify" in unit and "NoNewPrivileges=yes" in unit
    assert "\nProtectSystem=" not in unit, "a user manager's sandbox needs user namespaces: left out"
    assert "systemctl --user daemon-reload" in written.stdout

    no_config = batchd("service", "install", "--print", cwd=tmp_path)
    assert no_config.returncode == 1 and "batchd init" in no_config.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_rendered_unit(tmp_path):
    folder = tmp_path / "srv"
    assert batchd("init", str(folder), cwd=tmp_path).returncode == 0
    target = tmp_path / "units"
    assert batchd("--config", str(folder / "config.toml"), "service", "install", "--target-dir", str(target),
                  cwd=tmp_path).returncode == 0
    verify = subprocess.run(["systemd-analyze", "verify", str(target / "batchd.service")],
                            capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys and bad values; what it prints about the file is the verdict.
    complaints = [line for line in verify.stderr.splitlines() if "batchd.service" in line]
    assert verify.returncode == 0 and not complaints, verify.stderr


# -- config show --------------------------------------------------------------------------------


def test_config_show_names_each_settings_source(workspace: Workspace):
    result = workspace.batchd("config", "show", "--json", BATCHD_POLL_INTERVAL="7")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["config_file"] == str(workspace.config)
    settings = shown["settings"]
    assert settings["poll_interval"] == {"value": 7.0, "source": "environment BATCHD_POLL_INTERVAL"}
    assert settings["settle_seconds"]["source"] == "config file"
    assert settings["emulator.job_seconds"] == {"value": 0.3, "source": "config file"}
    assert settings["log_format"] == {"value": "text", "source": "default"}
    assert shown["secrets"] == {"GEMINI_API_KEY": "not set", "GOOGLE_API_KEY": "not set"}
    table = workspace.batchd("config", "show")
    assert table.returncode == 0 and "poll_interval" in table.stdout and "environment" in table.stdout


# -- doctor -------------------------------------------------------------------------------------


def doctor(ws: Workspace, **env: str) -> tuple[int, dict[str, dict]]:
    result = ws.batchd("doctor", "--json", **env)
    report = json.loads(result.stdout)
    assert report["ok"] == (result.returncode == 0)
    return result.returncode, {check["name"]: check for check in report["checks"]}


def test_doctor_passes_a_working_emulator_setup(workspace: Workspace):
    code, checks = doctor(workspace)
    assert code == 0, checks
    assert checks["config"]["status"] == "ok"
    assert checks["same filesystem"]["status"] == "ok"
    assert checks["provider emulator"]["status"] == "ok"
    inotify = checks["inotify"]
    assert inotify["status"] in ("ok", "warn")
    watches = Path("/proc/sys/fs/inotify/max_user_watches")
    if watches.exists():
        assert f"max_user_watches={int(watches.read_text())}" in inotify["detail"]
    text = workspace.batchd("doctor")
    assert text.returncode == 0 and "provider emulator" in text.stdout
    assert checks["journal"]["status"] == "ok" and "none yet" in checks["journal"]["detail"]


def test_doctor_says_how_the_files_the_steps_write_are_made_durable(workspace: Workspace):
    _, checks = doctor(workspace)
    together = "one syncfs of the state dir's filesystem before each journal commit"
    assert (together in checks["syncing"]["detail"]) == fs.SyncGroup.available(workspace.root), checks["syncing"]
    _, checks = doctor(workspace, BATCHD_GROUP_SYNC="false")
    assert checks["syncing"]["status"] == "ok" and "fsynced alone" in checks["syncing"]["detail"]


def test_doctor_reads_the_journal_through_beside_a_running_daemon(workspace: Workspace, daemon: DaemonRunner):
    """The journal check reads every page (quick_check) with the daemon running; a damaged journal is a
    failure (tests/test_recovery.py)."""
    process = daemon.start()
    workspace.drop("translate.toml", 'task = "translate"\ntexts = ["Hello"]\nlanguages = ["French"]\n')
    workspace.wait_for(lambda: workspace.outbox_folders(), what="the job delivered")
    code, checks = doctor(workspace)
    assert process.stop() == 0
    assert code == 0, checks
    assert checks["journal"]["status"] == "ok" and "reads through" in checks["journal"]["detail"], checks["journal"]


def test_doctor_fails_a_broken_config_with_a_fix(workspace: Workspace):
    workspace.config.write_text('provider = "emulator"\npoll_intervall = 3\n')
    code, checks = doctor(workspace)
    assert code == 1
    assert checks["config"]["status"] == "fail" and "poll_intervall" in checks["config"]["detail"]
    assert checks["config"]["fix"]
    text = workspace.batchd("doctor")
    assert text.returncode == 1 and "fix:" in text.stdout


@pytest.mark.slow
def test_doctor_checks_the_gemini_key_and_reachability(workspace: Workspace, tmp_path):
    workspace.configure(provider="gemini")
    code, checks = doctor(workspace)
    assert code == 1
    assert checks["api key"]["status"] == "fail" and "GEMINI_API_KEY" in checks["api key"]["fix"]

    with EmulatorServer(tmp_path / "google", api_key="the-right-key") as google:
        code, checks = doctor(workspace, GEMINI_API_KEY="the-right-key", GOOGLE_GEMINI_BASE_URL=google.base_url)
        assert code == 0, checks
        assert checks["provider gemini"]["status"] == "ok"

        code, checks = doctor(workspace, GEMINI_API_KEY="a-wrong-key", GOOGLE_GEMINI_BASE_URL=google.base_url)
        assert code == 1
        assert checks["provider gemini"]["status"] == "fail" and "aistudio" in checks["provider gemini"]["fix"]
        base_url = google.base_url
    # One transient answer is not a verdict: the daemon would try again, and so does doctor.
    with EmulatorServer(tmp_path / "flaky", api_key="the-right-key", faults=["503*1@list"]) as flaky:
        code, checks = doctor(workspace, GEMINI_API_KEY="the-right-key", GOOGLE_GEMINI_BASE_URL=flaky.base_url)
        assert code == 0 and checks["provider gemini"]["status"] == "ok", checks
    # Nothing listens there any more.
    code, checks = doctor(workspace, GEMINI_API_KEY="the-right-key", GOOGLE_GEMINI_BASE_URL=base_url)
    assert code == 1 and "did not answer" in checks["provider gemini"]["detail"]


def test_doctor_sees_folders_on_different_filesystems(workspace: Workspace):
    if Path("/dev/shm").stat().st_dev == workspace.root.stat().st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the test folder")
    shm = Path("/dev/shm") / f"batchd-doctor-{os.getpid()}"
    try:
        workspace.configure(outbox=str(shm / "outbox"))
        code, checks = doctor(workspace)
        assert code == 1
        assert checks["same filesystem"]["status"] == "fail" and "rename" in checks["same filesystem"]["detail"]
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_run_refuses_folders_on_different_filesystems_with_a_one_line_error(workspace: Workspace):
    if Path("/dev/shm").stat().st_dev == workspace.root.stat().st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the test folder")
    shm = Path("/dev/shm") / f"batchd-run-{os.getpid()}"
    try:
        workspace.configure(outbox=str(shm / "outbox"))
        workspace.drop("translate.toml", TRANSLATE)
        result = workspace.batchd("run", "--once")
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert "are on different filesystems" in line and str(shm / "outbox") in line
        readme = (REPO / "README.md").read_text()
        assert "`… are on different filesystems` at start" in readme, "the troubleshooting row quotes the message"
        assert (workspace.inbox / "translate.toml").exists(), "the manifest stays where it was"
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_doctor_reports_inotify_exhaustion_as_a_warning(tmp_path):
    from batchd.doctor import check_inotify

    (tmp_path / "max_user_watches").write_text("8192\n")
    (tmp_path / "max_user_instances").write_text("0\n")
    check = check_inotify(tmp_path)
    assert check.status == "warn" and "max_user_instances=0" in check.detail and "sysctl" in check.fix
    assert check_inotify(tmp_path / "missing").status == "warn"


# -- status, --watch and --json -----------------------------------------------------------------


def test_status_table_has_progress_and_watch_refreshes_until_its_count(workspace: Workspace):
    workspace.drop("translate.toml", TRANSLATE)
    assert workspace.batchd("run", "--once").returncode == 0

    table = workspace.batchd("status")
    assert table.returncode == 0
    assert "succeeded" in table.stdout and "2/2" in table.stdout and "━" in table.stdout  # the bar

    watched = workspace.batchd("status", "--watch", "--interval", "0.2", "--count", "3")
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.count("batchd status") == 3 and watched.stdout.count("2/2") == 3

    frames = workspace.batchd("status", "--watch", "--json", "--interval", "0.1", "--count", "2")
    lines = [json.loads(line) for line in frames.stdout.splitlines()]
    assert len(lines) == 2 and all(frame["jobs"][0]["done"] == 2 for frame in lines)


def test_status_watch_ends_cleanly_on_ctrl_c(workspace: Workspace):
    import signal
    import time

    # Ctrl-C as a terminal delivers it: a test run started in the background of a non-interactive shell
    # has SIGINT ignored, a disposition children inherit, and Python then never raises KeyboardInterrupt.
    watcher = subprocess.Popen([sys.executable, "-m", "batchd", "status", "--watch", "--interval", "0.1"],
                               cwd=workspace.root, env=workspace.env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 30
        line = watcher.stdout.readline()
        while "no jobs" not in line and line and time.monotonic() < deadline:
            line = watcher.stdout.readline()
        assert "no jobs" in line, "a first frame was drawn"
        watcher.send_signal(signal.SIGINT)
        # communicate, not wait: it drains both pipes meanwhile, so the watcher's frames (or anything it
        # writes to stderr) can never block it on a full pipe, and a failure shows what it said.
        _, errors = watcher.communicate(timeout=30)
        assert watcher.returncode == 0, errors
        assert "Traceback" not in errors
    finally:
        if watcher.poll() is None:
            watcher.kill()


@pytest.mark.slow  # 6-8 s of CLI processes; the default run keeps under six minutes
def test_every_read_command_speaks_json(workspace: Workspace):
    workspace.drop("translate.toml", TRANSLATE)
    assert workspace.batchd("run", "--once").returncode == 0
    for command in (["status"], ["list"], ["plugins"], ["config", "show"], ["doctor"]):
        result = workspace.batchd(*command, "--json")
        assert result.returncode == 0, (command, result.stderr)
        json.loads(result.stdout)  # the whole of stdout is one JSON document


def test_the_cost_column_shows_the_actual_cost_else_the_estimate(tmp_path):
    from rich.console import Console

    from batchd.views import jobs_table

    job = {"id": "j1", "manifest": "translate.toml", "task": "translate", "state": "done", "outcome": "succeeded",
           "requests": 4, "done": 4, "cancel_requested": False, "outbox": None, "created_at": 0.0,
           "cost": {"estimate": 0.05, "actual": 0.01234, "currency": "USD"}}
    running = {**job, "id": "j2", "manifest": "other.toml", "state": "submitted", "outcome": None, "done": 1,
               "cost": {"estimate": 0.5, "actual": None, "currency": "USD"}}
    euros = {**job, "id": "j3", "manifest": "euros.toml", "cost": {"estimate": 2.0, "actual": None, "currency": "EUR"}}
    unknown = {**job, "id": "j4", "manifest": "unknown.toml", "cost": None}

    def render(jobs):
        console = Console(width=200, record=True)
        console.print(jobs_table(jobs, now=90.0))
        return console.export_text()

    with_cost = render([job, running, euros])
    assert "cost" in with_cost and "$0.0123" in with_cost and "1/4" in with_cost and "1m" in with_cost
    assert "~$0.5000" in with_cost, "no actual cost yet: the estimate, marked"
    assert "~2.0000 EUR" in with_cost
    assert "$0.0500" not in with_cost, "the actual cost wins over the estimate"
    assert "cost" not in render([unknown]), "no column when no job has a cost"


@pytest.mark.parametrize("setting", ["inbox", "outbox", "state_dir"])
def test_a_file_where_a_configured_folder_should_be_stops_the_start_saying_which(workspace: Workspace, setting: str):
    """inbox, outbox or state_dir set to a file's path (or a path under a file): `run` says which setting and
    exits 78 (a restart cannot mend it), `doctor` fails that folder; before, both ended in a traceback
    (FileExistsError, NotADirectoryError)."""
    (workspace.root / "a-file").write_text("not a folder")
    workspace.configure(**{setting: "a-file/below" if setting == "state_dir" else "a-file"})

    run = workspace.batchd("run", "--once")
    code, checks = doctor(workspace)

    assert run.returncode == 78, run.stderr[-2000:]
    assert f"Error: {setting} " in run.stderr and "is not a folder (a file is in its way)" in run.stderr
    assert "Traceback" not in run.stderr
    assert code == 1 and checks[f"folder {setting}"]["status"] == "fail"
