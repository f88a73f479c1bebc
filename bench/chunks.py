"""Chunking benchmark: one N-request job as 100-request inline chunks vs as one uploaded file chunk.

The same CSV sentiment job (N rows, bench/e2e.py's reviews; ``input = "reviews.csv"``) runs through
``batchd run --once`` on the embedded emulator in a fresh temporary workspace with bench/e2e.py's
settings, twice over:

* inline: ``chunk_max_requests = 100`` and ``inline_max_requests = 100``: N / 100 remote batches, each
  created with its requests inline (10,000 requests: 100 batches);
* file: ``chunk_max_requests = 50000`` (and the same ``inline_max_requests = 100``): one remote batch
  whose requests are uploaded as a JSONL file.

Measured per run: wall seconds from the start of ``batchd run --once`` (the manifest and its CSV are
already in the inbox) until the job's folder is in outbox/ (``delivered s``) and until batchd exits
(``exit s``), and the number of remote batches summary.json lists. The two layouts alternate
``--repeat`` times; the medians are printed with the ratio inline / file (the file chunk is the
baseline: the same job with the fewest round trips).

    python bench/chunks.py                        # 10,000 requests, 3 runs of each
    python bench/chunks.py --requests 1000 --repeat 1     # a quick check
"""

from __future__ import annotations

import time

from common import CONFIG, Batchd, Workspace, config_with, header, median, parser, report, write_csv

LAYOUTS = {
    "inline": {"chunk_max_requests": 100, "inline_max_requests": 100},
    "file": {"chunk_max_requests": 50_000, "inline_max_requests": 100},
}


def run_once(rows: int, settings: dict, timeout: float, keep: bool) -> dict:
    with Workspace(config_with(CONFIG, **settings), keep=keep) as ws:
        write_csv(ws.inbox / "reviews.csv", rows)
        (ws.inbox / "reviews.toml").write_text('task = "sentiment"\ninput = "reviews.csv"\n')
        with Batchd(ws, once=True) as daemon:
            delivered_s = None
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and daemon.alive():
                if ws.delivered():
                    delivered_s = time.perf_counter() - daemon.started
                    break
                time.sleep(0.01)
            code = daemon.wait(max(0.0, deadline - time.monotonic()))
            if delivered_s is None and ws.delivered():
                delivered_s = time.perf_counter() - daemon.started
            daemon.stop()
            code = daemon.exit_code if code is None else code
        summaries = ws.summaries()
        summary = summaries[0] if summaries else {}
        if code != 0 or summary.get("state") != "succeeded":
            print(f"  run failed (exit {code}, state {summary.get('state')}):\n{daemon.log_tail()}", flush=True)
        return {"delivered_s": delivered_s, "exit_s": daemon.exit_seconds, "code": code,
                "state": summary.get("state"), "batches": len(summary.get("remote_batches") or []),
                "total": (summary.get("counts") or {}).get("total"), "rss_mb": daemon.rss_mb()[0]}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--requests", type=int, default=10_000, help="rows in the job (10000)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each layout, alternating (3)")
    args = p.parse_args()
    header(f"chunks: one {args.requests}-request sentiment job, 100-request inline chunks vs one file chunk")
    runs: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    for attempt in range(args.repeat):
        for name, settings in LAYOUTS.items():
            run = run_once(args.requests, settings, args.timeout, args.keep)
            runs[name].append(run)
            delivered = "-" if run["delivered_s"] is None else f"{run['delivered_s']:.2f}"
            print(f"  run {attempt + 1} {name:>6}: delivered {delivered} s, exit {run['exit_s']:.2f} s, "
                  f"{run['batches']} remote batches, {run['total']} requests, state {run['state']}, "
                  f"exit code {run['code']}, peak RSS {run['rss_mb']:.0f} MB", flush=True)

    def med(name: str, key: str) -> float | None:
        values = [run[key] for run in runs[name] if run[key] is not None]
        return median(values) if values else None

    rows = []
    for name in LAYOUTS:
        rows += [(f"{name}: remote batches", runs[name][0]["batches"]),
                 (f"{name}: delivered s (median of {args.repeat})", med(name, "delivered_s")),
                 (f"{name}: exit s (median)", med(name, "exit_s"))]
    inline_s, file_s = med("inline", "delivered_s"), med("file", "delivered_s")
    if inline_s and file_s:
        rows.append(("ratio delivered (inline / file)", inline_s / file_s))
    rows.append(("ratio exit (inline / file)", med("inline", "exit_s") / med("file", "exit_s")))
    report(rows, args.json)


if __name__ == "__main__":
    main()
