"""Webhooks benchmark: remote calls per completed job, and end-of-job -> outbox latency, with and without push.

Two runs of ``batchd run`` as a service against the same standalone emulator (``python -m
batchd.emulator`` in a process of its own, reached with provider "gemini" and GOOGLE_GEMINI_BASE_URL, as
Google would be), each in a workspace of its own with the SHIPPED config.toml's settings but for the polls,
set as config.toml advises for the real service (poll_interval 5 s, doubling up to poll_max_interval 60 s
while nothing changes) and ``http`` on a free port:

- **polling** (the baseline): no webhook; batchd learns that a batch ended from its next poll.
- **push**: ``webhook_public_url`` names the daemon's /webhooks/gemini, so every batch is created with a
  per-job ``webhook_config``; the emulator POSTs ``batch.succeeded`` (an RS256 JWT) when it ends, and
  batchd gets and fetches that batch at once. Polls go on, ``webhook_poll_interval`` apart once a
  delivery was seen.

In each run ``--jobs`` 2-request manifests (translate and sentiment alternating) are dropped
``--spacing`` seconds apart; each batch runs ``--job-seconds``. Measured per job: the batch's
``end_time`` (from the emulator, read with the SDK) to the moment its outbox folder appears (watched
every 5 ms); and, from the daemon's own /metrics (``batchd_remote_calls_total``) after every job is
delivered, the calls to the service per completed job, all of them and those that only watch
(``batches.get`` + ``batches.list``). Printed: both runs and the push/polling ratios.

    python bench/webhooks.py                    # 10 jobs
    python bench/webhooks.py --jobs 3           # a quick check
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

from common import SHIPPED_CONFIG, Batchd, Emulator, Workspace, config_with, header, parser, percentile, report, \
    sdk_client, small_manifest, wait_until

API_KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def remote_calls(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    calls = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "batchd_remote_calls_total":
                calls[sample.labels["method"]] = sample.value
    return calls


def watch_outbox(outbox: Path, seen: dict[str, float], stop: threading.Event) -> None:
    """Record when each job folder appears in the outbox (batchd publishes a folder with one rename)."""
    while not stop.is_set():
        try:
            with os.scandir(outbox) as entries:
                for entry in entries:
                    if not entry.name.startswith(".") and entry.name not in seen:
                        seen[entry.name] = time.time()
        except FileNotFoundError:
            pass
        time.sleep(0.005)


def one_run(label: str, emulator: Emulator, args, *, push: bool) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = {"provider": "gemini", "http": f"127.0.0.1:{port}", "poll_interval": args.poll_interval,
                "poll_max_interval": args.poll_max_interval}
    if push:
        settings["webhook_public_url"] = f"{url}/webhooks/gemini"
    base = "\n".join(line for line in SHIPPED_CONFIG.read_text().splitlines()
                     if line.split("=")[0].strip() not in settings)
    config = config_with(base, **settings)
    env = {"GEMINI_API_KEY": API_KEY, "GOOGLE_GEMINI_BASE_URL": emulator.base_url}
    client = sdk_client(emulator.base_url, API_KEY)
    with Workspace(config, keep=args.keep, prefix=f"batchd-bench-{label}-") as ws, Batchd(ws, env=env) as daemon:
        daemon.wait_ready()
        if not wait_until(lambda: _ready(url), 60):
            raise RuntimeError(f"{label}: /readyz never answered 200")
        before = remote_calls(url)
        seen: dict[str, float] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=watch_outbox, args=(ws.outbox, seen, stop), daemon=True)
        watcher.start()
        names = []
        for n in range(args.jobs):
            name = f"{label}-{n:03d}"
            names.append(name)
            ws.drop_text(f"{name}.toml", small_manifest(n))
            time.sleep(args.spacing)
        if not wait_until(lambda: all(name in seen for name in names), args.timeout):
            raise RuntimeError(f"{label}: not every job was delivered within {args.timeout} s")
        stop.set()
        watcher.join()
        time.sleep(0.5)  # the last fetch's calls are counted
        after = remote_calls(url)
        latencies = []
        for name in names:
            summary = json.loads((ws.outbox / name / "summary.json").read_text())
            if summary["state"] != "succeeded":
                raise RuntimeError(f"{label}: {name} ended {summary['state']}")
            for remote in summary["remote_batches"]:
                ended = client.batches.get(name=remote["name"]).end_time.timestamp()
                latencies.append(seen[name] - ended)
    calls = {method: after.get(method, 0) - before.get(method, 0) for method in after}
    watching = calls.get("batches.get", 0) + calls.get("batches.list", 0)
    return {"label": label, "calls": sum(calls.values()) / args.jobs, "watch_calls": watching / args.jobs,
            "by_method": calls, "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "max": max(latencies)}


def _ready(url: str) -> bool:
    try:
        return urllib.request.urlopen(url + "/readyz", timeout=2).status == 200
    except OSError:
        return False


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, default=10, help="manifests per run (10)")
    p.add_argument("--job-seconds", type=float, default=3.0, help="how long each emulated batch runs (3)")
    p.add_argument("--poll-interval", type=float, default=5.0,
                   help="poll_interval of both runs (5: what config.toml advises with gemini)")
    p.add_argument("--poll-max-interval", type=float, default=60.0, help="poll_max_interval of both runs (60)")
    p.add_argument("--spacing", type=float, default=0.5, help="seconds between two drops (0.5)")
    args = p.parse_args()
    header(f"webhooks: {args.jobs} jobs a run, batches of {args.job_seconds:g} s, polling vs push")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="batchd-bench-emulator-") as state, \
            Emulator(Path(state), job_seconds=args.job_seconds, api_key=API_KEY) as emulator:
        runs = [one_run("polling", emulator, args, push=False), one_run("push", emulator, args, push=True)]
    polling, push = runs
    for run in runs:
        print(f"  {run['label']:8s} remote calls per job {run['calls']:6.2f} (get+list {run['watch_calls']:5.2f});"
              f"  end -> outbox p50 {run['p50'] * 1000:7.0f} ms  p99 {run['p99'] * 1000:7.0f} ms"
              f"  max {run['max'] * 1000:7.0f} ms   {json.dumps(run['by_method'], sort_keys=True)}", flush=True)
    report([("jobs per run", args.jobs),
            ("remote calls per job, polling", round(polling["calls"], 2)),
            ("remote calls per job, push", round(push["calls"], 2)),
            ("calls ratio push/polling", round(push["calls"] / polling["calls"], 3)),
            ("get+list per job, polling", round(polling["watch_calls"], 2)),
            ("get+list per job, push", round(push["watch_calls"], 2)),
            ("get+list ratio push/polling", round(push["watch_calls"] / max(polling["watch_calls"], 1e-9), 3)),
            ("end->outbox p50 ms, polling", round(polling["p50"] * 1000)),
            ("end->outbox p50 ms, push", round(push["p50"] * 1000)),
            ("latency ratio push/polling (p50)", round(push["p50"] / polling["p50"], 3))],
           as_json=args.json)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
