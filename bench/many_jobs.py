"""Throughput benchmark: N small manifests through ``batchd run --once`` on the embedded emulator.

Every manifest is a 2-request job, translate and sentiment alternating, as users drop them by the
thousand. The floors are measured in the same run against the same emulator (started as batchd starts
its embedded one, in its own process, ``job_seconds = 0``): bench/floor.py, a plain script that does
per job what a plain script would with the real SDK: ``batches.create`` with the two requests inline
and ``batches.get`` until the job is done (the get also brings the inline answers back), then writes
the answers to a file; one job after another (``floor``), or from a ThreadPoolExecutor(4) (``floor4``:
a script that overlaps jobs, as batchd does with its 4 submissions in flight). batchd sends small jobs
that wait together in shared batches (batchd/daemon/pack.py), so it makes far fewer round trips; it
also keeps a journal, spools and publishes, and the ratio says what all of that costs against the
plain script.

Both are timed as a user times them, from launch: batchd's seconds run from ``batchd run --once``'s
launch until its last job is published (``exit s``: until it has also delivered the jobs' events to
the notification plugins and exited); a floor's from ``python floor.py``'s launch until it exits, the
emulator already up as a service is. Each pays its interpreter's start and its imports (the SDK's
alone is 0.4 s here); batchd also boots its embedded emulator (in a process of its own, on the other
CPU, while it imports). ``floor4 calls s`` is the 4-thread script's calls alone (from its first
create, the SDK imported), and ``ratio4-calls`` batchd's seconds over those: the floor without its
start, batchd with its own. ``start s`` is ``batchd run --once`` on an empty inbox, launch to exit.
Printed besides: jobs/s, the peak RSS of batchd with its child processes; then, from batchd's
journal, when it first claimed a manifest, and (seconds from then) when its last job was claimed and
admitted, its first and last create, when its last results were fetched and its last folder
published: which step sets the pace.

Each size is measured ``--rounds`` times (3 by default), batchd and both floors in every round, and
the medians of the rounds' ratios are printed last: a ratio pairs batchd with floors measured in the
same minute, and the median of several such pairs stands against this machine's noise (a run of
batchd or of a floor alone varies by a tenth from one minute to the next here).

    python bench/many_jobs.py --jobs 1000
    python bench/many_jobs.py --jobs 200 --jobs 2000     # per-job cost must stay flat in N
    python bench/many_jobs.py --jobs 1000 --rounds 7     # a firmer median
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import CONFIG, TreeMemory, loadavg, sdk_floor_script  # the same workspace config as the large-job benchmark
from common import small_manifest as manifest

FLOOR_THREADS = 4


def run_batchd(workspace: Path, jobs: int) -> tuple[float, float, int, int, int, float]:
    """Wall seconds until the last job is published and until ``batchd run --once`` exits (it then
    still delivers the jobs' events to the notification plugins), peak RSS of batchd and of its
    children (bytes), its exit code and the wall-clock time it was started at."""
    env = {**os.environ, "BATCHD_CONFIG": str(workspace / "config.toml")}
    published = threading.Event()
    started_wall = time.time()
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "batchd", "--log-level", "WARNING", "run", "--once"],
                               cwd=workspace, env=env)
    memory = TreeMemory(process.pid)
    published_at = []

    def watch_outbox() -> None:
        while not published.wait(0.05):
            if sum(1 for _ in (workspace / "outbox").iterdir()) >= jobs:
                published_at.append(time.perf_counter() - started)
                return

    watcher = threading.Thread(target=watch_outbox, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    published.set()
    watcher.join()
    main_rss, children_rss = memory.stop(usage.ru_maxrss * 1024)
    return ((published_at or [elapsed])[0], elapsed, main_rss, children_rss, os.waitstatus_to_exitcode(status),
            started_wall)


def stages(workspace: Path, started: float) -> dict[str, float]:
    """When batchd (started at wall-clock ``started``) first claimed a manifest, and when its jobs passed
    each step after that (seconds from that first claim), read from its journal after it exited: where
    the time goes (start, claims, admissions, creates, deliveries)."""
    db = sqlite3.connect(f"file:{workspace / 'state' / 'journal.db'}?mode=ro", uri=True)
    try:
        claimed, admitted, submitted, finished = db.execute(
            "SELECT min(created_at), max(admitted_at), max(submitted_at), max(finished_at) FROM jobs WHERE pack = 0"
        ).fetchone()
        last_claim, = db.execute("SELECT max(created_at) FROM jobs WHERE pack = 0").fetchone()
        first_create, last_create = db.execute("SELECT min(intent_at), max(intent_at) FROM chunks").fetchone()
        published, = db.execute("SELECT max(updated_at) FROM jobs WHERE state = 'done' AND pack = 0").fetchone()
    finally:
        db.close()
    return {"start to first claim": claimed - started, "claimed": last_claim - claimed, "admitted": admitted - claimed, "first_create": first_create - claimed,
            "last_create": last_create - claimed, "fetched": finished - claimed, "published": published - claimed}


def measure(jobs: int, workspace: Path) -> dict:
    """One round in ``workspace`` (an empty folder, removed by the caller after the last round of all: on
    some filesystems files are created slower the more were deleted in the minutes before, and batchd
    creates five a job where the floors create one, so a round must not follow the removal of the
    last one's workspace)."""
    floor_seconds, _ = sdk_floor_script(workspace / "floor", jobs)
    floor4_seconds, floor4_calls = sdk_floor_script(workspace / "floor4", jobs, threads=FLOOR_THREADS)

    idle = workspace / "idle"
    for folder in ("inbox", "outbox"):
        (idle / folder).mkdir(parents=True)
    (idle / "config.toml").write_text(CONFIG)
    _, start_seconds, _, _, _, _ = run_batchd(idle, 0)

    for folder in ("inbox", "outbox"):
        (workspace / folder).mkdir()
    (workspace / "config.toml").write_text(CONFIG)
    for n in range(jobs):
        (workspace / "inbox" / f"m{n:05d}.toml").write_text(manifest(n))
    seconds, exit_seconds, main_rss, children_rss, code, started = run_batchd(workspace, jobs)
    delivered = [p for p in (workspace / "outbox").iterdir() if p.is_dir()]
    states = {json.loads((p / "summary.json").read_text())["state"] for p in delivered}
    assert code == 0 and len(delivered) == jobs and states == {"succeeded"}, (code, len(delivered), states)
    timeline = stages(workspace, started)
    return {"jobs": jobs, "batchd_s": seconds, "exit_s": exit_seconds, "floor_s": floor_seconds, "ratio": seconds / floor_seconds,
            "floor4_s": floor4_seconds, "ratio4": seconds / floor4_seconds, "start_s": start_seconds,
            "floor4_calls_s": floor4_calls, "ratio4_calls": seconds / floor4_calls,
            "peak_rss_mb": (main_rss + children_rss) / 2**20, "batchd_rss_mb": main_rss / 2**20,
            "children_rss_mb": children_rss / 2**20, "stages": timeline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, action="append", help="manifests dropped (repeatable)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per size; the medians are printed last (3)")
    args = parser.parse_args()
    sizes = args.jobs or [1000]
    print(f"# load average {loadavg()} at the start")
    print(f"{'jobs':>6} {'batchd s':>9} {'jobs/s':>7} {'exit s':>7} {'floor s':>8} {'jobs/s':>7} {'ratio':>6} "
          f"{'floor4 s':>9} {'jobs/s':>7} {'ratio4':>7} {'floor4 calls s':>15} {'ratio4-calls':>13} {'start s':>8} "
          f"{'peak RSS MB':>12} "
          f"{'(batchd + emulator)':>20} {'load':>15}")
    with tempfile.TemporaryDirectory(prefix="batchd-bench-") as tmp:  # removed after the last round
        for jobs in sizes:
            rounds = []
            for n in range(max(1, args.rounds)):
                workspace = Path(tmp) / f"{jobs}-{n}"
                workspace.mkdir()
                rounds.append(measure(jobs, workspace))
                print_round(rounds[-1])
            if len(rounds) > 1:
                print_medians(jobs, rounds)


def print_medians(jobs: int, rounds: list[dict]) -> None:
    medians = {key: statistics.median(r[key] for r in rounds)
               for key in ("batchd_s", "floor_s", "floor4_s", "floor4_calls_s", "ratio", "ratio4", "ratio4_calls")}
    each = ", ".join(f"{r['ratio4']:.2f}" for r in rounds)
    print(f"{jobs:>6} median of {len(rounds)} rounds: batchd {medians['batchd_s']:.2f} s, floor "
          f"{medians['floor_s']:.2f} s, floor4 {medians['floor4_s']:.2f} s (calls {medians['floor4_calls_s']:.2f} s); "
          f"ratio {medians['ratio']:.2f}, ratio4 {medians['ratio4']:.2f} (rounds: {each}), "
          f"ratio4-calls {medians['ratio4_calls']:.2f}",
          flush=True)


def print_round(r: dict) -> None:
    print(f"{r['jobs']:>6} {r['batchd_s']:>9.2f} {r['jobs'] / r['batchd_s']:>7.1f} {r['exit_s']:>7.2f} "
          f"{r['floor_s']:>8.2f} {r['jobs'] / r['floor_s']:>7.1f} {r['ratio']:>6.2f} "
          f"{r['floor4_s']:>9.2f} {r['jobs'] / r['floor4_s']:>7.1f} {r['ratio4']:>7.2f} {r['floor4_calls_s']:>15.2f} "
          f"{r['ratio4_calls']:>13.2f} {r['start_s']:>8.2f} {r['peak_rss_mb']:>12.1f} "
          f"{r['batchd_rss_mb']:>10.1f} + {r['children_rss_mb']:>7.1f} {loadavg():>15}", flush=True)
    print("        batchd's steps, s (after the first, from its first claim): " + ", ".join(
        f"{name.replace('_', ' ')} {seconds:.2f}" for name, seconds in r["stages"].items()), flush=True)


if __name__ == "__main__":
    main()
