"""Helpers shared by the service-mode benchmarks (burst, latency, chunks, notify, many_jobs).

batchd is treated as a black box: it runs as ``sys.executable -m batchd ... run`` (so the virtual
environment that runs the benchmark decides which batchd code runs) in a temporary workspace whose
``config.toml`` ``BATCHD_CONFIG`` names; manifests are dropped the way a user's tool drops them
(written under a temp name, then renamed into ``inbox/``); what comes out is read from ``outbox/``,
from ``/proc`` (threads, CPU, peak RSS) and from the systemd notify protocol (``READY=1`` and
``STATUS=`` lines on a ``$NOTIFY_SOCKET`` of our own). Nothing of ``batchd.daemon`` is imported.

Not a benchmark itself; see the scripts beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import floor
from e2e import CONFIG, TreeMemory, write_csv  # noqa: F401  (re-exported for the scripts)
from floor import MODEL, sdk_client  # noqa: F401  (re-exported for the scripts)

REPO = Path(__file__).resolve().parents[1]
#: The config.toml shipped at the root of the checkout this script belongs to.
SHIPPED_CONFIG = REPO / "config.toml"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- command line and printing ------------------------------------------------------------------------

def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the script's docstring as help and the options every script has."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeout", type=float, default=600.0, help="give up on batchd after this many seconds (600)")
    p.add_argument("--keep", action="store_true", help="keep the temporary workspace (its path is printed)")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    return p


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def header(title: str) -> None:
    print(f"# {title}  (python {sys.executable}, {os.cpu_count()} cores, load average {loadavg()})", flush=True)


def report(rows: list[tuple[str, object]], as_json: bool = False, **extra) -> None:
    """Print ``label: value`` rows aligned, the load average last; with ``as_json`` also one JSON line."""
    rows = [*rows, ("load average (1/5/15 min)", loadavg())]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        if isinstance(value, float):
            value = f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        print(f"  {label:<{width}}  {value}", flush=True)
    if as_json:
        print(json.dumps({**{label: value for label, value in rows}, **extra}, default=str), flush=True)


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def median(values: list[float]) -> float:
    return statistics.median(values)


# -- workspaces and manifests -------------------------------------------------------------------------

class Workspace:
    """A temporary folder with ``inbox/``, ``outbox/``, ``staging/`` (temp files, same filesystem) and
    ``config.toml``; removed on exit unless ``keep``."""

    def __init__(self, config: str, *, keep: bool = False, prefix: str = "batchd-bench-") -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self.keep = keep
        self.inbox, self.outbox, self.staging = self.path / "inbox", self.path / "outbox", self.path / "staging"
        for folder in (self.inbox, self.outbox, self.staging):
            folder.mkdir()
        self.config = self.path / "config.toml"
        self.config.write_text(config)

    def stage(self, name: str, text: str) -> Path:
        """Write a manifest under a temp name, not yet in the inbox."""
        temp = self.staging / f".{name}.part"
        temp.write_text(text)
        return temp

    def drop(self, staged: Path) -> float:
        """Rename a staged file into the inbox (``time.time()`` just before the rename is returned)."""
        at = time.time()
        os.rename(staged, self.inbox / staged.name[1:].removesuffix(".part"))
        return at

    def drop_text(self, name: str, text: str) -> float:
        return self.drop(self.stage(name, text))

    def delivered(self) -> int:
        """Job folders in the outbox (batchd publishes a whole folder with one rename)."""
        with os.scandir(self.outbox) as entries:
            return sum(1 for entry in entries if not entry.name.startswith(".") and entry.is_dir())

    def summaries(self) -> list[dict]:
        return [json.loads((p / "summary.json").read_text()) for p in sorted(self.outbox.iterdir())
                if p.is_dir() and not p.name.startswith(".")]

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.keep:
            print(f"  (workspace kept: {self.path})", flush=True)
        else:
            shutil.rmtree(self.path, ignore_errors=True)


def small_manifest(n: int) -> str:
    """A 2-request manifest, translate and sentiment alternating (as bench/many_jobs.py drops them)."""
    texts = f'texts = ["Order {n} arrived on time.", "The box for order {n} was damaged."]\n'
    if n % 2:
        return 'task = "sentiment"\n' + texts
    return 'task = "translate"\n' + texts + 'languages = ["French"]\n'


def config_with(base: str, **settings) -> str:
    """``base`` (TOML) with top-level ``settings`` put first (a key may appear only once: give new ones)."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n" + base


# -- /proc --------------------------------------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from the parent pids in /proc/*/stat.

    bench/e2e.py's ``_process_tree`` reads /proc/PID/task/*/children of every thread, which costs
    thousands of reads per sample once batchd has thousands of threads (a burst); this costs one read
    per process on the machine, whatever their threads.
    """
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, index = [pid], 0
    while index < len(tree):
        tree += children.get(tree[index], [])
        index += 1
    return tree


class CheapTreeMemory(TreeMemory):
    """bench/e2e.py's TreeMemory (the sum of every process's VmHWM, exact whenever it is sampled), its
    tree found with :func:`process_tree` every ``every`` seconds."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        super().__init__(pid, every)

    def _sample(self, every: float) -> None:
        from e2e import _high_water_mark

        while not self._done.wait(every):
            for pid in process_tree(self.pid):
                self.peaks[pid] = max(self.peaks.get(pid, 0), _high_water_mark(pid))


def _status_field(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def listening_urls(pid: int) -> list[str]:
    """``http://127.0.0.1:PORT`` of every TCP socket listening on 127.0.0.1 in ``pid``'s process tree
    (how the embedded emulator, started on a free port, is found from outside)."""
    inodes = set()
    for member in process_tree(pid):
        try:
            for fd in os.scandir(f"/proc/{member}/fd"):
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    urls = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and inode in inodes:  # LISTEN
            address, port = local.split(":")
            if address == "0100007F":  # 127.0.0.1, little-endian
                urls.append(f"http://127.0.0.1:{int(port, 16)}")
    return urls


class TreeSampler:
    """Samples a process tree from /proc every ``every`` seconds: each process's thread count (peak kept),
    CPU seconds, and a timeline of ``probe()`` values (e.g. inbox and outbox counts) every ``timeline_every``."""

    def __init__(self, pid: int, *, every: float = 0.2, timeline_every: float = 0.0,
                 probe=None) -> None:
        self.pid = pid
        self.peak_threads: dict[int, int] = {}
        self.peak_tree_threads = 0
        self.cpu_ticks: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.timeline: list[dict] = []
        self._probe = probe
        self._timeline_every = timeline_every
        self._started = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        next_line = self._started
        last_cpu: dict[int, int] = {}
        last_at = self._started
        while not self._done.wait(every):
            total = 0
            for pid in process_tree(self.pid):
                threads = _status_field(pid, "Threads")
                if threads is None:
                    continue
                total += threads
                self.peak_threads[pid] = max(self.peak_threads.get(pid, 0), threads)
                ticks = _cpu_ticks(pid)
                if ticks is not None:
                    self.cpu_ticks[pid] = ticks
                if pid not in self.names:
                    cmd = _cmdline(pid)
                    self.names[pid] = "emulator" if "batchd.emulator" in cmd else \
                        ("batchd" if pid == self.pid else cmd[:40])
            self.peak_tree_threads = max(self.peak_tree_threads, total)
            now = time.monotonic()
            if self._timeline_every and now >= next_line:
                next_line = now + self._timeline_every
                line = {"t": round(now - self._started, 1), "threads": total,
                        **{f"cpu% {self.names.get(pid, pid)}": round(100 * (ticks - last_cpu.get(pid, 0))
                                                                    / CLOCK_TICKS / max(now - last_at, 1e-6))
                           for pid, ticks in self.cpu_ticks.items()}}
                last_cpu, last_at = dict(self.cpu_ticks), now
                if self._probe is not None:
                    line.update(self._probe())
                self.timeline.append(line)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def cpu_seconds(self) -> dict[str, float]:
        return {f"{self.names.get(pid, pid)} ({pid})": ticks / CLOCK_TICKS for pid, ticks in self.cpu_ticks.items()}

    def print_timeline(self) -> None:
        for line in self.timeline:
            print("   ", "  ".join(f"{key}={value}" for key, value in line.items()), flush=True)


class NotifySocket:
    """The service manager's end of ``$NOTIFY_SOCKET``: records READY=1 and every STATUS= line batchd sends."""

    def __init__(self) -> None:
        self._folder = tempfile.mkdtemp(prefix="sd-")  # AF_UNIX paths are limited to 108 bytes
        self.address = os.path.join(self._folder, "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.address)
        self._sock.settimeout(0.2)
        self.ready = threading.Event()
        self.statuses: list[tuple[float, str]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode(errors="replace").splitlines():
                if line == "READY=1":
                    self.ready.set()
                elif line.startswith("STATUS="):
                    self.statuses.append((time.time(), line[7:]))

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        self._sock.close()
        shutil.rmtree(self._folder, ignore_errors=True)


# -- batchd as a process ------------------------------------------------------------------------------

class Batchd:
    """``python -m batchd [--log-level WARNING] run [--once]`` in ``workspace`` (stdout and stderr to its batchd.log), with its peak RSS (TreeMemory),
    thread counts and CPU (TreeSampler) and its systemd notifications (NotifySocket).

    ``with Batchd(ws) as daemon: daemon.wait_ready(); ...``; leaving the block sends SIGTERM, waits
    ``stop_timeout`` seconds, then SIGKILLs whatever of its process tree is left.
    """

    def __init__(self, workspace: Workspace, *, once: bool = False, env: dict | None = None,
                 timeline_every: float = 0.0, probe=None, stop_timeout: float = 120.0,
                 log_level: str | None = "WARNING") -> None:
        self.workspace = workspace
        self.notify = NotifySocket()
        self.log_path = workspace.path / "batchd.log"
        self._log = open(self.log_path, "wb")
        environ = {**os.environ, "BATCHD_CONFIG": str(workspace.config), "NOTIFY_SOCKET": self.notify.address,
                   **(env or {})}
        for variable in ("WATCHDOG_USEC", "WATCHDOG_PID"):
            environ.pop(variable, None)
        self.started = time.perf_counter()
        self.started_wall = time.time()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "batchd", *(["--log-level", log_level] if log_level else []),
             "run", *(["--once"] if once else [])],
            cwd=workspace.path, env=environ, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.process.pid
        self.memory = CheapTreeMemory(self.pid)
        self.sampler = TreeSampler(self.pid, timeline_every=timeline_every, probe=probe)
        self.stop_timeout = stop_timeout
        self.exit_code: int | None = None
        self.killed = False  # SIGKILLed after stop_timeout
        self.exit_seconds: float | None = None
        self.main_rss = self.children_rss = 0
        self._known_pids: set[int] = {self.pid}

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds until READY=1 (the daemon recovered, reconciled and watches the inbox)."""
        deadline = time.monotonic() + timeout
        while not self.notify.ready.wait(0.1):
            self._known_pids.update(process_tree(self.pid))
            if self.process.poll() is not None:
                raise RuntimeError(f"batchd exited with {self.process.returncode} before READY=1:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no READY=1 from batchd within {timeout:g} s:\n{self.log_tail()}")
        self._known_pids.update(process_tree(self.pid))
        return time.perf_counter() - self.started

    def emulator_url(self, timeout: float = 30.0) -> str:
        """The embedded emulator's base URL, found from its listening socket."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            urls = listening_urls(self.pid)
            if urls:
                return urls[0]
            time.sleep(0.1)
        raise RuntimeError("no listening socket on 127.0.0.1 in batchd's process tree")

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if not self._log.closed:
            self._log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait(self, timeout: float) -> int | None:
        """Wait for a ``--once`` run to exit by itself (None if it is still running after ``timeout``)."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.process.returncode

    def stop(self) -> int | None:
        """SIGTERM, wait (``stop_timeout``), then SIGKILL the rest of the tree; records exit code and peak RSS."""
        if self.exit_code is not None:
            return self.exit_code
        self._known_pids.update(process_tree(self.pid))
        if self.process.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            # wait4 (not Popen.wait) for ru_maxrss; Popen does not reap it behind our back here.
            deadline = time.monotonic() + self.stop_timeout
            while True:
                pid, status, usage = os.wait4(self.pid, os.WNOHANG)
                if pid:
                    self.exit_code = os.waitstatus_to_exitcode(status)
                    self.process.returncode = self.exit_code
                    maxrss = usage.ru_maxrss * 1024
                    break
                if not self.killed and time.monotonic() > deadline:
                    print(f"  batchd did not stop within {self.stop_timeout:g} s of SIGTERM: SIGKILL", flush=True)
                    os.kill(self.pid, signal.SIGKILL)
                    self.killed = True
                time.sleep(0.05)
        except ChildProcessError:  # already reaped by Popen.poll/wait
            self.exit_code = self.process.returncode
            maxrss = 0
        self.exit_seconds = time.perf_counter() - self.started
        self.sampler.stop()
        self.main_rss, self.children_rss = self.memory.stop(maxrss)
        self._kill_leftovers()
        self.notify.close()
        self._log.close()
        return self.exit_code

    def _kill_leftovers(self) -> None:
        """The embedded emulator leaves by itself once batchd is gone; make sure of it."""
        deadline = time.monotonic() + 10
        for pid in self._known_pids - {self.pid}:
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if Path(f"/proc/{pid}").exists() and "batchd" in _cmdline(pid):
                print(f"  killing leftover process {pid} ({_cmdline(pid)[:60]})", flush=True)
                os.kill(pid, signal.SIGKILL)

    def peak_threads(self) -> tuple[int, int, int]:
        """Peak thread count of batchd itself, of its children (largest), and of the whole tree at once."""
        main = self.sampler.peak_threads.get(self.pid, 0)
        others = max((n for pid, n in self.sampler.peak_threads.items() if pid != self.pid), default=0)
        return main, others, self.sampler.peak_tree_threads

    def rss_mb(self) -> tuple[float, float, float]:
        """Peak RSS (MB) of batchd + children, batchd, children (after :meth:`stop`)."""
        return ((self.main_rss + self.children_rss) / 2**20, self.main_rss / 2**20, self.children_rss / 2**20)

    def __enter__(self) -> Batchd:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def wait_until(predicate, timeout: float, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


# -- the SDK floor ------------------------------------------------------------------------------------

class Emulator:
    """A standalone emulator (``python -m batchd.emulator`` on a free port) in a process of its own, as
    batchd runs its embedded one; ``base_url`` once started."""

    def __init__(self, state_dir: Path, *, job_seconds: float = 0.0, api_key: str | None = None) -> None:
        self.state_dir = Path(state_dir)
        self._command = [sys.executable, "-m", "batchd.emulator", "--host", "127.0.0.1", "--port", "0",
                         "--state-dir", str(self.state_dir), "--job-seconds", str(job_seconds),
                         *(["--api-key", api_key] if api_key else []), "--exit-with-parent"]
        self.process: subprocess.Popen | None = None
        self.base_url: str | None = None

    def __enter__(self) -> Emulator:
        self.process = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        start_new_session=True)
        timer = threading.Timer(60, self.process.kill)
        timer.start()
        try:
            line = self.process.stdout.readline()
        finally:
            timer.cancel()
        if "listening on " not in line:
            self.__exit__()
            raise RuntimeError(f"the emulator did not start: {line!r}")
        self.base_url = line.split("listening on ", 1)[1].split()[0]
        threading.Thread(target=self.process.stdout.read, daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process is None:
            return
        self.process.stdin.close()  # its cue to stop cleanly
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def sdk_floor(folder: Path, jobs: int, threads: int = 1, timeout: float = 1e9) -> tuple[float, int]:
    """Seconds for ``jobs`` create + get round trips with the SDK against a fresh emulator (``job_seconds = 0``),
    made in this process (the SDK imported before timing), one after another (``threads = 1``) or from a
    ThreadPoolExecutor(``threads``); and the jobs done (bench/floor.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    with Emulator(folder / "emulator", job_seconds=0) as emulator:
        return floor.run(emulator.base_url, jobs, folder / "out", threads=threads, timeout=timeout)


def sdk_floor_script(folder: Path, jobs: int, threads: int = 1) -> tuple[float, float]:
    """bench/floor.py run as a process against a fresh emulator (``job_seconds = 0``), already up as a
    service is: its wall seconds from launch to exit (interpreter and SDK import included, as a user's
    ``time python script.py`` says), and the seconds of its calls alone."""
    folder.mkdir(parents=True, exist_ok=True)
    with Emulator(folder / "emulator", job_seconds=0) as emulator:
        started = time.perf_counter()
        ran = subprocess.run([sys.executable, floor.__file__, "--base-url", emulator.base_url, "--jobs", str(jobs),
                              "--threads", str(threads), "--out", str(folder / "out")],
                             capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - started
    outcome = json.loads(ran.stdout)
    if outcome["done"] != jobs:
        raise RuntimeError(f"the floor did {outcome['done']} of {jobs} jobs")
    return seconds, outcome["seconds"]


# -- an HTTP sink for webhooks ------------------------------------------------------------------------

class HttpSink:
    """Counts (and keeps) every POST body on ``http://127.0.0.1:PORT/hook``, answering 200 at once;
    ``arrivals`` are ``time.perf_counter()`` values."""

    def __init__(self) -> None:
        sink = self
        self.bodies: list[bytes] = []
        self.arrivals: list[float] = []
        self.lock = threading.Lock()
        self.reached = threading.Event()
        self.target = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive when a client wants it (urllib closes anyway)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with sink.lock:
                    sink.bodies.append(body)
                    sink.arrivals.append(time.perf_counter())
                    if sink.target and len(sink.arrivals) >= sink.target:
                        sink.reached.set()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def count(self) -> int:
        with self.lock:
            return len(self.arrivals)

    def reset(self, target: int = 0) -> None:
        with self.lock:
            self.bodies.clear()
            self.arrivals.clear()
            self.target = target
            self.reached.clear()

    def __enter__(self) -> HttpSink:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()
