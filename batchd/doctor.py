"""``batchd doctor``: checks an installation the way an operator would, each with a fix.

A check is ``ok``, ``warn`` (batchd works, but not as well as it could) or ``fail`` (batchd will not
work); ``batchd doctor`` exits non-zero if any check fails. Checks never change anything: folders
that do not exist yet are judged by the folder they would be created in, and the emulator check
runs a throw-away emulator in a temporary folder, never the daemon's.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

INOTIFY_DIR = Path("/proc/sys/fs/inotify")
#: Seconds a reachability check may take before it counts as unreachable.
REACH_TIMEOUT_SECONDS = 10.0


@dataclass
class Check:
    name: str
    status: str          # "ok", "warn" or "fail"
    detail: str
    fix: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def run_checks(load_settings: Callable, *, inotify_dir: Path = INOTIFY_DIR) -> list[Check]:
    """Every check, in the order a failure is easiest to understand; later ones need the config."""
    from batchd.config import ConfigError

    try:
        settings = load_settings()
    except ConfigError as error:
        return [Check("config", "fail", str(error),
                      "fix the file/key named above; `batchd init DIR` writes a commented config.toml")]
    where = f"loaded from {settings.config_file}" if settings.config_file else "no config file: defaults and BATCHD_*"
    checks = [Check("config", "ok", where)]
    checks.append(check_plugins(settings))
    checks.extend(check_folders(settings))
    checks.append(check_free_space(settings))
    checks.append(check_syncing(settings))
    checks.append(check_inotify(inotify_dir))
    checks.append(check_daemon(settings))
    checks.append(check_journal(settings))
    checks.append(check_cache(settings))
    checks.extend(check_provider(settings))
    return checks


def check_plugins(settings) -> Check:
    from batchd.plugins import PluginError, tasks_for

    try:
        tasks = tasks_for(settings)
    except PluginError as error:
        return Check("plugins", "fail", str(error),
                     "fix the plugin, or leave it out with disabled_plugins = [\"NAME\"] in config.toml")
    return Check("plugins", "ok", f"tasks: {', '.join(sorted(tasks)) or 'none'}")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_folders(settings) -> list[Check]:
    folders = {"inbox": settings.inbox, "outbox": settings.outbox, "state_dir": settings.state_dir}
    checks = []
    devices = {}
    for name, folder in folders.items():
        existing = _existing_ancestor(folder)
        if existing.exists() and not existing.is_dir():
            checks.append(Check(f"folder {name}", "fail", f"{existing} is not a folder",
                                f"point {name} at a folder, or remove {existing}"))
            continue
        if not os.access(existing, os.W_OK | os.X_OK):
            checks.append(Check(f"folder {name}", "fail", f"{existing} is not writable by this user",
                                f"chown/chmod {existing}, or run batchd as its owner"))
            continue
        devices[name] = existing.stat().st_dev
        state = "exists" if folder.is_dir() else f"will be created in {existing}"
        checks.append(Check(f"folder {name}", "ok", f"{folder} ({state})"))
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on device {device}" for name, device in devices.items())
        checks.append(Check("same filesystem", "fail",
                            f"inbox, outbox and state_dir are on different filesystems ({where}): claims and "
                            "deliveries are renames, which are only atomic within one filesystem",
                            "put inbox, outbox and state_dir under one folder on one disk (see `batchd init`)"))
    elif len(devices) == len(folders):
        checks.append(Check("same filesystem", "ok", "inbox, outbox and state_dir share one filesystem: "
                                                     "claims and deliveries are atomic renames"))
    return checks


def check_free_space(settings) -> Check:
    """The room left where the state dir is, against the floor below which the daemon claims nothing."""
    from batchd.fs import free_mb

    where = _existing_ancestor(settings.state_dir)
    free = free_mb(where)
    floor = settings.min_free_mb
    if free is None:
        return Check("free space", "warn", f"cannot tell how much room is left on {where}'s filesystem")
    detail = f"{free:,.0f} MB free on {where}'s filesystem (min_free_mb = {floor:g})"
    if free < floor:
        return Check("free space", "fail", f"{detail}: the daemon claims no new manifest until there is more",
                     "free some space on that disk (delivered outbox folders, old logs), or lower min_free_mb")
    if free < 2 * floor:
        return Check("free space", "warn", f"{detail}: close to the floor below which no manifest is claimed",
                     "free some space on that disk before it fills up")
    return Check("free space", "ok", detail)


def check_syncing(settings) -> Check:
    """How the steps' files are made durable: together (one syncfs before each journal commit) or an fsync
    each; where group_sync is asked for and this system's syncfs cannot stand for fsyncs, the reason."""
    from batchd.fs import SyncGroup

    if not settings.group_sync:
        return Check("syncing", "ok", "group_sync = false: every file and folder a step writes is fsynced alone")
    why_not = SyncGroup.unavailable_because(_existing_ancestor(settings.state_dir))
    if why_not is not None:
        return Check("syncing", "ok", f"group_sync is on, but {why_not}: every file a step writes is fsynced alone")
    return Check("syncing", "ok", "the files the steps write are made durable together: one syncfs of the state "
                                  "dir's filesystem before each journal commit (group_sync)")


def _inotify_instances_in_use() -> int | None:
    """inotify instances held by this user's processes (what max_user_instances limits)."""
    uid = os.getuid()
    used = 0
    try:
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return None
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            if os.stat(fd_dir).st_uid != uid:
                continue
            for fd in os.listdir(fd_dir):
                if os.readlink(f"{fd_dir}/{fd}") == "anon_inode:inotify":
                    used += 1
        except OSError:
            continue  # gone, or not ours to read
    return used


def check_inotify(inotify_dir: Path = INOTIFY_DIR) -> Check:
    fix = ("raise the limits: sudo sysctl fs.inotify.max_user_instances=1024 fs.inotify.max_user_watches=524288 "
           "(persist them in /etc/sysctl.d/60-inotify.conf)")
    try:
        watches = int((inotify_dir / "max_user_watches").read_text())
        instances = int((inotify_dir / "max_user_instances").read_text())
    except (OSError, ValueError):
        return Check("inotify", "warn", f"no inotify limits in {inotify_dir}: batchd watches the inbox by polling",
                     "nothing to do on non-Linux systems; on Linux check that /proc is mounted")
    used = _inotify_instances_in_use()
    detail = f"max_user_watches={watches}, max_user_instances={instances}"
    if used is not None:
        detail += f", instances in use by this user: {used}"
    # batchd needs one instance and one watch (the inbox is watched without its subfolders).
    if watches < 1 or instances < 1 or (used is not None and used >= instances):
        return Check("inotify", "warn", detail + ": no inotify instance is free, so batchd would fall back to "
                                                 "polling the inbox (slower to notice new files)", fix)
    return Check("inotify", "ok", detail)


def check_daemon(settings) -> Check:
    from batchd.statedir import lock_holder

    pid = lock_holder(settings.state_dir)
    if pid is None:
        return Check("daemon", "ok", f"no batchd is running on {settings.state_dir}")
    return Check("daemon", "ok", f"batchd is running on {settings.state_dir}" + (f" (pid {pid})" if pid else ""))


def check_journal(settings) -> Check:
    """The journal read through (SQLite's ``quick_check``, read-only, beside a running daemon): a damaged
    page stops the daemon when it meets it, at a start or while running."""
    import sqlite3

    from batchd.journal import Journal, JournalUnreadable, journal_path

    path = journal_path(settings.state_dir)
    if not path.exists():
        return Check("journal", "ok", f"none yet at {path} (the daemon's first start makes it)")
    fix = (f"stop batchd; restore {path.name} from a backup (with its -wal file), or salvage what SQLite can read: "
           f"`sqlite3 {path.name} .recover | sqlite3 recovered.db`, then put recovered.db in its place")
    try:
        journal = Journal(path, readonly=True)
    except JournalUnreadable as error:
        return Check("journal", "fail", f"{path} cannot be read ({error.reason}): it is not a SQLite database, or a "
                     f"damaged one", fix)
    except sqlite3.OperationalError as error:
        return Check("journal", "warn", f"{path} could not be opened to check it: {error}")
    try:
        problem = journal.check()
        size = path.stat().st_size
    finally:
        journal.close()
    if problem is not None:
        return Check("journal", "fail", f"{path} is damaged: {problem}", fix)
    return Check("journal", "ok", f"{path} reads through ({size / 1e6:.1f} MB)")


def check_cache(settings) -> Check:
    """The request cache read through, like the journal: a damaged one costs money (every request is sent
    again and no answer is kept), never a job."""
    import sqlite3

    from batchd.cache import cache_path, damage_fix
    from batchd.fs import damage_found

    path = cache_path(settings.state_dir)
    if not path.exists():
        return Check("request cache", "ok", f"none yet at {path}")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            problem = damage_found(db)
        finally:
            db.close()
    except sqlite3.DatabaseError as error:  # (locked past the timeout, unreadable for its permissions)
        return Check("request cache", "warn", f"{path} could not be checked: {error}")
    if problem is not None:
        return Check("request cache", "warn", f"{path} is damaged ({problem}): jobs send every request again and "
                     f"keep no answers", damage_fix(path))
    return Check("request cache", "ok", f"{path} reads through")


def check_provider(settings) -> list[Check]:
    if settings.provider == "emulator":
        return [check_emulator(settings)]
    key = check_api_key(settings)
    if key.status == "fail":
        return [key]
    return [key, check_gemini_reachable(settings)]


def check_emulator(settings) -> Check:
    """The embedded emulator starts and answers a list call through the SDK (in a throw-away folder)."""
    from batchd.emulator.process import EmulatorProcess
    from batchd.provider import Provider, RetryPolicy

    with tempfile.TemporaryDirectory(prefix="batchd-doctor-") as folder:
        emulator = EmulatorProcess(Path(folder), job_seconds=settings.emulator.job_seconds,
                                   faults=list(settings.emulator.faults), startup_seconds=REACH_TIMEOUT_SECONDS * 3)
        try:
            emulator.start()
            with Provider(api_key="batchd-doctor", base_url=emulator.base_url, api_version=settings.api_version,
                          retry=RetryPolicy(attempts=3, initial_delay=0.5, max_delay=2.0),
                      timeout_s=REACH_TIMEOUT_SECONDS) as provider:
                provider.answers()
        except Exception as error:  # noqa: BLE001 - any failure is the finding
            return Check("provider emulator", "fail", f"the embedded emulator did not start or answer: {error}",
                         "run `batchd emulator --port 8765` to see why; reinstall batchd if it cannot import")
        finally:
            emulator.stop()
    return Check("provider emulator", "ok", "the embedded emulator starts and answers (nothing leaves this machine)")


def check_api_key(settings) -> Check:
    from batchd.config import ConfigError

    try:
        settings.gemini_api_key()
    except ConfigError:
        return Check("api key", "fail", 'provider = "gemini" and neither GEMINI_API_KEY nor GOOGLE_API_KEY is set',
                     "put GEMINI_API_KEY=... in batchd.env (mode 0600; the unit's EnvironmentFile=) or export it; "
                     "never in config.toml")
    name = "GOOGLE_API_KEY" if os.environ.get("GOOGLE_API_KEY") else "GEMINI_API_KEY"
    return Check("api key", "ok", f"{name} is set")


def check_gemini_reachable(settings) -> Check:
    """One cheap batches.list call (a page of one), bounded by a timeout; a transient answer (503, 429, a
    dropped connection) is tried twice more within a few seconds, as the daemon would, before it fails."""
    from batchd.provider import Provider, RetryPolicy, is_auth_error

    base = os.environ.get("GOOGLE_GEMINI_BASE_URL") or "https://generativelanguage.googleapis.com"
    try:
        with Provider(api_key=settings.gemini_api_key(), api_version=settings.api_version,
                      retry=RetryPolicy(attempts=3, initial_delay=0.5, max_delay=2.0),
                      timeout_s=REACH_TIMEOUT_SECONDS) as provider:
            provider.answers()
    except Exception as error:  # noqa: BLE001 - any failure is the finding
        if is_auth_error(error):
            return Check("provider gemini", "fail", f"{base} refused the API key: {error}",
                         "check the key at https://aistudio.google.com/apikey and update batchd.env")
        return Check("provider gemini", "fail", f"{base} did not answer batches.list: {type(error).__name__}: {error}",
                     "check network access and proxies (HTTPS_PROXY) from this host, and GOOGLE_GEMINI_BASE_URL "
                     "if set; the unit's hardening allows outbound network")
    return Check("provider gemini", "ok", f"{base} answered batches.list")
