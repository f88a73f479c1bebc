"""Slow-service benchmark: how long manifests wait to be submitted while the service is slow to answer polls.

A real service's ``batches.list`` can take seconds under load, and a job running for hours is polled
all that time. batchd runs as a service with the SHIPPED settings (the config.toml at the root of this
checkout; poll_interval 0.5 s, embedded emulator with job_seconds 2), N 2-request manifests are
renamed into its inbox one every ``--gap`` seconds, so that polls run all the while (the jobs already
submitted are running), and each one's wait from its drop to its ``submitted`` state (read from
batchd's journal once all are submitted: the remote batch exists) is measured.

Two runs, one after the other: the baseline with a prompt service, then the same with every list
answered ``--slow`` seconds late (the emulator's ``slow=S@list`` fault, which only the list has: the
creates answer at once). Printed: p50 / p99 / max of drop -> submitted in both, and their ratios. A
daemon whose loop waits in the poll's list holds every claim and create meanwhile; one that reads
the list in a thread of its own should not care.

    python bench/slow_poll.py                     # 30 manifests, lists 2 s late
    python bench/slow_poll.py --slow 5 --manifests 20
"""

from __future__ import annotations

import json
import sqlite3
import time

from common import SHIPPED_CONFIG, Batchd, Workspace, header, parser, percentile, report, small_manifest


def run(manifests: int, gap: float, slow: float, timeout: float) -> tuple[list[float], str]:
    """Drop -> submitted seconds of each manifest, with lists answered ``slow`` seconds late (0: at once)."""
    env = {"BATCHD_EMULATOR__FAULTS": json.dumps([f"slow={slow:g}@list"] if slow else [])}
    with Workspace(SHIPPED_CONFIG.read_text()) as ws, Batchd(ws, env=env, log_level=None) as daemon:
        daemon.wait_ready()
        dropped: dict[str, float] = {}
        for n in range(manifests):
            name = f"slow{n:05d}.toml"
            dropped[name] = ws.drop_text(name, small_manifest(n))
            time.sleep(gap)
        journal = ws.path / "state" / "journal.db"
        deadline = time.monotonic() + timeout
        submitted: dict[str, float] = {}
        while len(submitted) < manifests and time.monotonic() < deadline and daemon.alive():
            time.sleep(0.2)
            db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
            try:
                submitted = dict(db.execute("SELECT source, submitted_at FROM jobs "
                                            "WHERE pack = 0 AND submitted_at IS NOT NULL").fetchall())
            finally:
                db.close()
        daemon.stop()
        missing = manifests - len(submitted)
        tail = f"; {missing} not submitted within {timeout:g} s:\n{daemon.log_tail()}" if missing else ""
    return [submitted[name] - dropped[name] for name in dropped if name in submitted], tail


def stats(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"p50 {percentile(ms, 50):8.1f}  p99 {percentile(ms, 99):8.1f}  max {max(ms):8.1f}  (n={len(ms)})"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--manifests", type=int, default=30, help="manifests dropped (30)")
    p.add_argument("--gap", type=float, default=0.3, help="seconds between two drops (0.3)")
    p.add_argument("--slow", type=float, default=2.0, help="seconds each list is answered late in the second run (2)")
    args = p.parse_args()
    header(f"slow poll: drop -> submitted, {args.manifests} manifests one every {args.gap:g} s, shipped settings, "
           f"lists at once vs {args.slow:g} s late")
    prompt, prompt_tail = run(args.manifests, args.gap, 0.0, args.timeout)
    slow, slow_tail = run(args.manifests, args.gap, args.slow, args.timeout)
    for tail in (prompt_tail, slow_tail):
        if tail:
            print(tail.lstrip("; "), flush=True)
    rows = [("prompt service: drop -> submitted ms", stats(prompt)),
            (f"lists {args.slow:g} s late: drop -> submitted ms", stats(slow)),
            ("ratio p50 (slow lists / prompt)", percentile(slow, 50) / percentile(prompt, 50)),
            ("ratio p99 (slow lists / prompt)", percentile(slow, 99) / percentile(prompt, 99))]
    report(rows, args.json)


if __name__ == "__main__":
    main()
