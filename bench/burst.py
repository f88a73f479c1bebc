"""Burst benchmark: N small manifests dropped at once into the inbox of a running ``batchd run`` (service mode).

batchd runs as a service on the embedded emulator in a temporary workspace with bench/e2e.py's
settings (0.2 s polls, no settle wait, emulated jobs done at once). Once it says READY=1 (on a
$NOTIFY_SOCKET of our own), N 2-request manifests (translate and sentiment alternating, as in
bench/many_jobs.py) are written under temp names beside the inbox and renamed into it in one go, as
a user's tool would. Measured: wall seconds from the first rename until all N job folders are in
outbox/ (or ``--timeout``, then how many were delivered), the peak thread count of the batchd process
(from /proc/PID/status, also of its child processes: the embedded emulator), and the peak RSS of
batchd and its children (TreeMemory). Then batchd is stopped with SIGTERM and its exit is awaited.

The baseline, measured in the same run: the same N jobs' SDK calls (create with the two requests
inline, get until done, write the answers) made by a plain script with a ThreadPoolExecutor(4)
against an emulator of its own (bench/many_jobs.py's floor, on 4 threads). The ratio is batchd's
wall seconds over the baseline's. A timeline (inbox left, outbox delivered, threads, CPU % of
batchd and of the emulator, batchd's last STATUS= line) is printed every ``--every`` seconds.

    python bench/burst.py --manifests 3000
    python bench/burst.py --manifests 10000 --timeout 900
    python bench/burst.py --manifests 50                 # a quick check
"""

from __future__ import annotations

import time

from common import CONFIG, Batchd, Workspace, header, parser, report, sdk_floor, small_manifest

FLOOR_THREADS = 4


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--manifests", type=int, default=3000, help="manifests dropped at once (3000)")
    p.add_argument("--every", type=float, default=10.0, help="timeline line every this many seconds (10; 0: none)")
    p.add_argument("--no-floor", action="store_true", help="skip the 4-thread SDK baseline")
    args = p.parse_args()
    n = args.manifests
    header(f"burst: {n} manifests into a running batchd")

    floor_s = floor_done = None
    if not args.no_floor:
        with Workspace("", keep=False, prefix="batchd-floor-") as floor_ws:
            floor_s, floor_done = sdk_floor(floor_ws.path / "floor", n, threads=FLOOR_THREADS, timeout=args.timeout)
        print(f"  floor ({FLOOR_THREADS} threads): {floor_done} jobs in {floor_s:.2f} s", flush=True)

    with Workspace(CONFIG, keep=args.keep) as ws:
        def probe() -> dict:
            return {"inbox": sum(1 for _ in ws.inbox.iterdir()), "delivered": ws.delivered(),
                    "status": daemon.notify.statuses[-1][1] if daemon.notify.statuses else ""}

        daemon = Batchd(ws, timeline_every=args.every, probe=probe if args.every else None)
        with daemon:
            ready_s = daemon.wait_ready()
            staged = [ws.stage(f"m{i:05d}.toml", small_manifest(i)) for i in range(n)]
            started = time.perf_counter()
            for path in staged:
                ws.drop(path)
            dropped_s = time.perf_counter() - started
            delivered = 0
            deadline = started + args.timeout
            while time.perf_counter() < deadline and daemon.alive():
                delivered = ws.delivered()
                if delivered >= n:
                    break
                time.sleep(0.05)
            wall = time.perf_counter() - started
            delivered = ws.delivered()
            stop_started = time.perf_counter()
            code = daemon.stop()
            stop_s = time.perf_counter() - stop_started
        if args.every:
            print("  timeline:")
            daemon.sampler.print_timeline()
        states: dict[str, int] = {}
        for summary in ws.summaries():
            states[summary["state"]] = states.get(summary["state"], 0) + 1
        if code != 0 or delivered < n:
            print(f"  batchd log tail:\n{daemon.log_tail()}")
        main_threads, child_threads, tree_threads = daemon.peak_threads()
        rss, main_rss, child_rss = daemon.rss_mb()
        rows = [
            ("manifests", n),
            ("delivered", f"{delivered} of {n}" + ("" if delivered >= n else f" (timed out after {args.timeout:g} s)")),
            ("states", states),
            ("ready after start s", ready_s),
            ("rename loop s", dropped_s),
            ("wall s (first rename -> all delivered)", wall),
            ("jobs/s", delivered / wall),
            ("peak threads batchd", main_threads),
            ("peak threads emulator (child)", child_threads),
            ("peak threads tree", tree_threads),
            ("peak RSS MB (batchd + emulator)", f"{rss:.1f} ({main_rss:.1f} + {child_rss:.1f})"),
            ("CPU s", {k: round(v, 1) for k, v in daemon.sampler.cpu_seconds().items()}),
            ("SIGTERM -> exit s", stop_s),
            ("exit code", code if not daemon.killed else f"{code} (SIGKILLed {daemon.stop_timeout:g} s after SIGTERM)"),
        ]
        if floor_s is not None:
            rows += [(f"floor s ({FLOOR_THREADS}-thread SDK script, {floor_done} jobs)", floor_s),
                     ("floor jobs/s", floor_done / floor_s)]
            if delivered >= n and floor_done >= n:
                rows.append(("ratio (batchd / floor)", wall / floor_s))
            elif delivered:
                rows.append(("ratio (jobs/s floor / batchd)", (floor_done / floor_s) / (delivered / wall)))
            else:
                rows.append(("ratio", f"n/a: nothing delivered in {wall:.0f} s (floor: {floor_s:.1f} s)"))
        report(rows, args.json)


if __name__ == "__main__":
    main()
