"""Notification benchmark: job events from a running ``batchd run`` to a local webhook sink, events/s.

A local HTTP sink (http://127.0.0.1:PORT/hook, answering 200 at once) is the ``webhook`` plugin's only
URL (``[notify.webhook] urls``); the ``log`` plugin stays on, as shipped. batchd runs as a service on
the embedded emulator with bench/e2e.py's settings (0.2 s polls, no settle wait, emulated jobs done
at once). Once it says READY=1, enough 2-request manifests for ``--events`` events are renamed into
the inbox at once (each job makes 3: accepted, submitted, succeeded; progress events, if any, count
too). Measured: seconds from the first rename until the sink has received ``--events`` POSTs (or
``--timeout``), hence events/s end to end; also when the last job folder was in outbox/, how many
events had arrived by then and the rate of those that came after (the delivery backlog draining).

The baseline, measured in the same run against the same sink: a plain loop POSTing the same JSON
bodies (the first ``--events`` the sink received from batchd, with the plugin's headers) one after
another with urllib, as the plugin does. Printed: events/s of both and the ratio (baseline / batchd).

    python bench/notify.py                      # 10,000 events (3,334 manifests)
    python bench/notify.py --events 150         # a quick check
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from collections import Counter

from common import CONFIG, Batchd, HttpSink, Workspace, header, parser, report, small_manifest

EVENTS_PER_JOB = 3  # accepted, submitted, succeeded
#: A ``submitted`` event as batchd sends it, for a baseline when batchd delivered none.
SAMPLE_EVENT = json.dumps({
    "id": "20261203120000-abcdef:submitted", "kind": "submitted", "time": "2026-12-03T12:00:00Z",
    "job_id": "20261203120000-abcdef", "job": "n00000", "manifest": "n00000.toml", "task": "translate",
    "model": "gemini-2.5-flash", "state": "submitted", "counts": {"total": 2, "done": 0},
    "cost": {"estimate": 0.000123, "actual": None, "currency": "USD"}, "outbox": None, "reason": None,
    "error": None}, separators=(",", ":")).encode()


def post_all(url: str, bodies: list[bytes]) -> float:
    """Seconds to POST every body in turn, as the webhook plugin posts one event."""
    started = time.perf_counter()
    for body in bodies:
        event = json.loads(body)
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "batchd-bench",
            "X-Batchd-Event": event["kind"], "X-Batchd-Event-Id": event["id"]})
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()
    return time.perf_counter() - started


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--events", type=int, default=10_000, help="events to wait for at the sink (10000)")
    p.add_argument("--every", type=float, default=10.0, help="timeline line every this many seconds (10; 0: none)")
    args = p.parse_args()
    target = args.events
    manifests = math.ceil(target / EVENTS_PER_JOB)
    header(f"notify: {target} job events ({manifests} manifests) to a local webhook sink")

    with HttpSink() as sink:
        config = CONFIG + f'\n[notify.webhook]\nurls = ["{sink.url}"]\n'
        with Workspace(config, keep=args.keep) as ws:
            def probe() -> dict:
                return {"inbox": sum(1 for _ in ws.inbox.iterdir()), "delivered": ws.delivered(),
                        "events": sink.count()}

            with Batchd(ws, timeline_every=args.every, probe=probe if args.every else None) as daemon:
                daemon.wait_ready()
                sink.reset(target)  # nothing is expected before the drop; start counting now
                staged = [ws.stage(f"n{i:05d}.toml", small_manifest(i)) for i in range(manifests)]
                started = time.perf_counter()
                for path in staged:
                    ws.drop(path)
                all_delivered_at = None
                deadline = started + args.timeout
                while time.perf_counter() < deadline and daemon.alive() and not sink.reached.is_set():
                    if all_delivered_at is None and ws.delivered() >= manifests:
                        all_delivered_at = time.perf_counter()
                    sink.reached.wait(0.05)
                reached_at = time.perf_counter()
                arrived = sink.count()
                if all_delivered_at is None and ws.delivered() >= manifests:
                    all_delivered_at = reached_at
                code = daemon.stop()
            if args.every:
                print("  timeline:")
                daemon.sampler.print_timeline()
            if code != 0 or arrived < target:
                print(f"  batchd log tail:\n{daemon.log_tail()}")

        with sink.lock:
            bodies, arrivals = list(sink.bodies[:target]), list(sink.arrivals)
        kinds = Counter(json.loads(body)["kind"] for body in bodies)
        unique = len({json.loads(body)["id"] for body in bodies})
        seconds = min(reached_at, arrivals[target - 1] if len(arrivals) >= target else reached_at) - started
        batchd_eps = min(arrived, target) / seconds
        rows = [("events arrived", f"{min(arrived, target)} of {target}" + ("" if arrived >= target else
                                                                           f" (timed out after {args.timeout:g} s)")),
                ("kinds", dict(kinds)), ("distinct event ids", unique),
                ("batchd s (first rename -> last event)", seconds), ("batchd events/s", batchd_eps)]
        if all_delivered_at is not None:
            by_then = sum(1 for at in arrivals if at <= all_delivered_at)
            rows += [("all jobs in outbox after s", all_delivered_at - started),
                     ("events arrived by then", by_then)]
            after = [at for at in arrivals[:target] if at > all_delivered_at]
            if len(after) > 1:
                rows.append(("events/s after the last job was delivered", len(after) / (after[-1] - all_delivered_at)))
        # The baseline: the same bodies POSTed by a plain loop to the same sink (``--events`` of them:
        # those batchd delivered, repeated if it delivered fewer).
        sink.reset()
        if len(bodies) < target:
            rows.append(("baseline bodies", f"{len(bodies)} distinct from batchd, repeated to {target}"))
            bodies = [(bodies or [SAMPLE_EVENT])[i % max(len(bodies), 1)] for i in range(target)]
        baseline_s = post_all(sink.url, bodies)
        baseline_eps = len(bodies) / baseline_s
        rows += [("baseline s (plain urllib loop, same bodies)", baseline_s), ("baseline events/s", baseline_eps),
                 ("ratio (baseline events/s / batchd events/s)", baseline_eps / batchd_eps),
                 ("batchd exit code after SIGTERM", code if not daemon.killed else
                  f"{code} (SIGKILLed {daemon.stop_timeout:g} s after SIGTERM)")]
        report(rows, args.json)


if __name__ == "__main__":
    main()
