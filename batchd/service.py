"""batchd as a system service: the systemd notify protocol and the unit file.

**Notify.** systemd starts a ``Type=notify`` service with ``$NOTIFY_SOCKET`` set and waits for
``READY=1``; with ``WatchdogSec=`` it also sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) and restarts
the service when no ``WATCHDOG=1`` arrives in time. The protocol is one datagram per message to an
AF_UNIX socket (a path, or a Linux abstract name written with a leading ``@``), so no libsystemd
binding is needed. Outside systemd every call here is a no-op, and send errors are ignored as
sd_notify(3) recommends: a lost status line must never stop the daemon.

**Unit.** :func:`render_unit` writes the unit from the paths of one installation (the batchd
executable, the working folder, the config and the folders the daemon writes);
``contrib/systemd/batchd.service`` is the same template rendered for example paths.
"""

from __future__ import annotations

import getpass
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: STATUS= lines are sent when they change, but no more often than this.
_STATUS_MIN_SECONDS = 1.0


def notify(message: str, *, environ: os._Environ | dict | None = None) -> bool:
    """Send one notify datagram (``READY=1``, ``STATUS=...``; newline-separated for several).

    Returns True if it was sent; False when ``$NOTIFY_SOCKET`` is unset or the send failed.
    """
    address = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]  # the Linux abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def watchdog_seconds(environ: os._Environ | dict | None = None, pid: int | None = None) -> float | None:
    """The watchdog timeout systemd set for this process, or None (sd_watchdog_enabled(3))."""
    environ = environ if environ is not None else os.environ
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner and owner.strip() != str(pid if pid is not None else os.getpid()):
        return None  # meant for another process (e.g. the shell that started us)
    return usec / 1_000_000


class ServiceManager:
    """What the daemon tells its service manager; every method is cheap and safe to call often.

    ``watchdog()`` is called from the daemon's main loop (and from inside its long steps, which
    run on the same thread), so a wedged loop stops the pings and systemd restarts the service.
    It pings at half the watchdog timeout, as sd_watchdog_enabled(3) recommends.
    """

    def __init__(self, environ: os._Environ | dict | None = None):
        self._environ = environ if environ is not None else os.environ
        self.enabled = bool(self._environ.get("NOTIFY_SOCKET"))
        timeout = watchdog_seconds(self._environ) if self.enabled else None
        self.ping_interval: float | None = timeout / 2 if timeout else None
        self._next_ping = 0.0
        self._last_status: str | None = None
        self._next_status = 0.0
        self._pending_status: str | None = None
        self.stopping_sent = False

    def _send(self, message: str) -> None:
        if self.enabled:
            notify(message, environ=self._environ)

    def ready(self, status: str) -> None:
        """Startup is finished: recovery and reconciliation are done and the inbox is watched."""
        if self.stopping_sent:
            return  # SIGTERM came during startup: STOPPING=1 was final
        self._last_status = status
        self._send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def status(self, line: str) -> None:
        """Send ``line`` if it changed, at most once a second; a held-back line shortens :meth:`max_sleep`."""
        if not self.enabled or self.stopping_sent or line == self._last_status:
            self._pending_status = None
            return
        now = time.monotonic()
        if now < self._next_status:
            self._pending_status = line
            return
        self._pending_status = None
        self._last_status = line
        self._next_status = now + _STATUS_MIN_SECONDS
        self._send(f"STATUS={line}")

    def watchdog(self) -> None:
        if self.ping_interval is None:
            return
        now = time.monotonic()
        if now >= self._next_ping:
            self._next_ping = now + self.ping_interval
            self._send("WATCHDOG=1")

    def stopping(self, status: str = "stopping: finishing the current step") -> None:
        """SIGTERM arrived: from now on systemd only waits for the exit (or kills at TimeoutStopSec)."""
        if not self.stopping_sent:
            self.stopping_sent = True
            self._send(f"STOPPING=1\nSTATUS={status}")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more before systemd's start or stop timeout (EXTEND_TIMEOUT_USEC)."""
        self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def max_sleep(self, seconds: float) -> float:
        """``seconds`` shortened so the loop wakes in time for its next watchdog ping or status line."""
        now = time.monotonic()
        if self.ping_interval is not None:
            seconds = min(seconds, self._next_ping - now)
        if self._pending_status is not None:
            seconds = min(seconds, self._next_status - now)
        return max(0.0, seconds)


# -- the unit file ------------------------------------------------------------------------------

#: Where ``batchd service install`` writes: the system manager's and the user manager's unit folders.
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
UNIT_NAME = "batchd.service"


def user_unit_dir(environ: os._Environ | dict | None = None) -> Path:
    environ = environ if environ is not None else os.environ
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


@dataclass
class UnitPaths:
    """The absolute paths one installation's unit names."""

    exec_start: list[str]        # the batchd command, e.g. [".../.venv/bin/batchd"]
    working_dir: Path
    config: Path
    env_file: Path
    writable: list[Path]         # inbox, outbox, state (and anything else batchd writes)


def batchd_command() -> list[str]:
    """The installed batchd executable of this interpreter (its venv's script), else ``python -m batchd``."""
    script = Path(sys.executable).parent / "batchd"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "batchd"]


def unit_paths(settings, *, command: list[str] | None = None) -> UnitPaths:
    """The paths of the installation ``settings`` (loaded from a config file) describe."""
    if settings.config_file is None:
        raise ValueError("no config file: run `batchd init DIR` first, or pass --config PATH")
    working_dir = settings.config_file.parent
    writable = [settings.inbox, settings.outbox, settings.state_dir]
    emulator_state = settings.emulator.state_dir
    if emulator_state is not None and not any(_within(emulator_state, p) for p in writable):
        writable.append(emulator_state)
    return UnitPaths(exec_start=command or batchd_command(), working_dir=working_dir,
                     config=settings.config_file, env_file=working_dir / ENV_FILE_NAME, writable=writable)


def _within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def render_unit(paths: UnitPaths, *, user: bool = False, run_as: str | None = None) -> str:
    """The systemd unit for ``paths``; ``user`` renders it for ``systemctl --user``.

    ``run_as`` is the ``User=`` of a system unit (default: the invoking user, via sudo too; none
    for root). A user unit runs as its manager's user and takes no ``User=``.
    """
    command = " ".join(_quote(part) for part in [*paths.exec_start, "--config", str(paths.config), "run"])
    if not user and run_as is None:
        run_as = os.environ.get("SUDO_USER") or getpass.getuser()
    identity = "" if user or not run_as or run_as == "root" else f"User={run_as}\n"
    wanted_by = "default.target" if user else "multi-user.target"
    network = "" if user else "After=network-online.target\nWants=network-online.target\n"
    writable = " ".join(_quote(str(path)) for path in paths.writable)
    if user:
        # A user manager can only sandbox through an unprivileged user namespace, which many systems
        # restrict (Ubuntu 24.04's AppArmor policy, hardened kernels): there the unit would not start.
        hardening = ("# Hardening: a user unit runs with your own rights; the file-system sandbox of the\n"
                     "# system unit (ProtectSystem=strict, ReadWritePaths=, PrivateTmp=) needs user namespaces.\n"
                     "NoNewPrivileges=yes\n")
    else:
        hardening = ("# Hardening: the file system is read-only except the folders batchd writes.\n"
                     "NoNewPrivileges=yes\nProtectSystem=strict\n"
                     f"ReadWritePaths={writable}\n"
                     "PrivateTmp=yes\nPrivateDevices=yes\nProtectKernelTunables=yes\nProtectKernelModules=yes\n"
                     "ProtectControlGroups=yes\nRestrictSUIDSGID=yes\nLockPersonality=yes\n")
    return f"""\
# batchd as a systemd service, written by `batchd service install` (README: "Run as a service").
[Unit]
Description=batchd: Gemini Batch API jobs ({paths.config})
Documentation=https://ai.google.dev/gemini-api/docs/batch-mode
{network}
[Service]
# READY=1 comes once recovery is done, the inbox watched and the embedded emulator (if any) serving.
Type=notify
NotifyAccess=main
{identity}WorkingDirectory={_quote(str(paths.working_dir))}
ExecStart={command}
# `systemctl reload batchd`: the config file's [cost] and [notify] are read again (as when it changes).
ExecReload=/bin/kill -HUP $MAINPID
# GEMINI_API_KEY=... (mode 0600, never in config.toml). "-": the file is optional for the emulator.
EnvironmentFile=-{_quote(str(paths.env_file))}
# The main loop pings at half this; a wedged loop is killed and restarted. Generous, because
# in an outage one step of the loop may wait out an HTTP call's retries: 5 attempts of up to
# 60 s each plus backoff, about 320 s (results downloads run in their own pool).
WatchdogSec=600
Restart=on-failure
RestartSec=5
# Exit 78 (EX_CONFIG) is a config or plugin error, or a journal it cannot read: a restart cannot fix it.
# Exit 74 (EX_IOERR), a failed fsync or journal commit, is restarted: recovery resumes from the journal.
RestartPreventExitStatus=78
# The start calls no service (the first poll reconciles creates a crash left unconfirmed), but it may
# wait for the embedded emulator (a minute at most); a stop finishes the step in hand.
TimeoutStartSec=600
TimeoutStopSec=120
# SIGTERM to batchd only: it stops its embedded emulator itself after recording any create in
# flight. Whatever is left gets SIGKILL at TimeoutStopSec.
KillMode=mixed

{hardening}UMask=0027

[Install]
WantedBy={wanted_by}
"""


def example_unit() -> str:
    """contrib/systemd/batchd.service: the unit for an installation in /srv/batchd run by user batchd."""
    root = Path("/srv/batchd")
    paths = UnitPaths(exec_start=["/opt/batchd/venv/bin/batchd"], working_dir=root, config=root / "config.toml",
                      env_file=root / ENV_FILE_NAME, writable=[root / "inbox", root / "outbox", root / "state"])
    return render_unit(paths, run_as="batchd")


def _quote(value: str) -> str:
    # systemd's quoting is close enough to the shell's for paths (spaces, quotes).
    return shlex.quote(value)


def install_unit(text: str, target_dir: Path) -> Path:
    """Write the unit into ``target_dir`` atomically; return its path."""
    from batchd.durable import atomic_write

    target_dir.mkdir(parents=True, exist_ok=True)
    path = target_dir / UNIT_NAME
    atomic_write(path, text)
    path.chmod(0o644)
    return path


# -- batchd init ------------------------------------------------------------------------------

ENV_FILE_NAME = "batchd.env"
ENV_FILE_TEXT = """\
# Secrets for batchd, read by systemd (EnvironmentFile=) and by nothing else. Keep it mode 0600.
# Needed with provider = "gemini":
# GEMINI_API_KEY=
"""
WORKDIR_FOLDERS = ("inbox", "outbox", "plugins", "state")


def config_template() -> str:
    """The commented config.toml shipped with batchd (the same text as the repository's config.toml)."""
    from importlib.resources import files

    return files("batchd").joinpath("config_template.toml").read_text(encoding="utf-8")


def init_workdir(folder: Path, *, force: bool = False) -> list[Path]:
    """Create a working folder: config.toml, batchd.env, inbox/, outbox/, plugins/, state/.

    An existing config.toml is kept unless ``force``; existing folders and batchd.env are left
    as they are. Returns what was created or replaced.
    """
    from batchd.durable import atomic_write

    folder = folder.expanduser().resolve()
    config = folder / "config.toml"
    if config.exists() and not force:
        raise FileExistsError(f"{config} already exists (use --force to replace it with the template)")
    created = []
    folder.mkdir(parents=True, exist_ok=True)
    for name in WORKDIR_FOLDERS:
        if not (folder / name).is_dir():
            (folder / name).mkdir()
            created.append(folder / name)
    text = config_template().replace('# plugins_dir = "plugins.d"', 'plugins_dir = "plugins"')
    atomic_write(config, text)
    created.append(config)
    env_file = folder / ENV_FILE_NAME
    if not env_file.exists():
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(ENV_FILE_TEXT)
        created.append(env_file)
    return created
