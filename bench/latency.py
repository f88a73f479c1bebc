"""Latency benchmark: drop -> remote create, for manifests renamed into the inbox of a running ``batchd run``.

batchd runs as a service with the SHIPPED settings: the config.toml at the root of this checkout
copied as is into a temporary workspace (its inbox/outbox/state paths are relative, so they land
in the workspace; provider "emulator": the embedded emulator, job_seconds 2; settle_seconds 1,
poll_interval 0.5, count_tokens on, ...). Once it says READY=1, N 2-request manifests (translate and
sentiment alternating) are dropped one by one: each written under a temp name beside the inbox and
renamed into it, the next one only once the previous one's remote batch exists. The embedded
emulator is found from outside by its listening socket on 127.0.0.1 in batchd's process tree and
read with the real google-genai SDK: ``client.batches.list`` (first page, newest first) is polled
every ``--poll`` seconds until a new batch shows up; its ``create_time`` (stamped by the emulator
with this machine's clock) minus the time of the rename is the latency. Also measured: when the file
left the inbox (batchd's claim), so the latency splits into drop -> claim (settling) and claim ->
create (parse, estimate with countTokens, build, submit).

The baseline, measured in the same run against the same emulator: N bare ``batches.create`` calls
of a 2-request inline batch with the SDK, the latency being create_time minus the time the call
started (the round trip is printed too). Printed: p50 / p99 / max in ms of both and the p50 ratio.

    python bench/latency.py                     # 50 manifests
    python bench/latency.py --manifests 10      # a quick check
"""

from __future__ import annotations

import os
import threading
import time

from common import MODEL, SHIPPED_CONFIG, Batchd, Workspace, header, parser, percentile, report, sdk_client, \
    small_manifest


def newest_batches(client) -> list:
    return list(client.batches.list(config={"page_size": 20}).page)


def watch_claim(path, claims: list[float], timeout: float) -> None:
    """Append the time ``path`` left the inbox (batchd's claim renames it away), polling every 0.5 ms."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if not os.path.lexists(path):
            claims.append(time.time())
            return
        time.sleep(0.0005)


def stats(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (f"p50 {percentile(ms, 50):8.1f}  p99 {percentile(ms, 99):8.1f}  max {max(ms):8.1f}  "
            f"min {min(ms):8.1f}  (n={len(ms)})")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--manifests", type=int, default=50, help="manifests dropped one by one (50)")
    p.add_argument("--poll", type=float, default=0.005, help="seconds between two batches.list calls (0.005)")
    p.add_argument("--per-manifest-timeout", type=float, default=60.0,
                   help="give up waiting for one manifest's create after this many seconds (60)")
    args = p.parse_args()
    header(f"latency: drop -> remote create, {args.manifests} manifests, shipped settings ({SHIPPED_CONFIG})")

    from google.genai import types

    with Workspace(SHIPPED_CONFIG.read_text(), keep=args.keep) as ws, Batchd(ws, log_level=None) as daemon:  # the shipped log_level too
        ready_s = daemon.wait_ready()
        url = daemon.emulator_url()
        client = sdk_client(url, api_key="bench")
        seen = {job.name for job in newest_batches(client)}
        to_create, to_claim, claim_to_create, polled_lag, missed = [], [], [], [], 0
        deadline = time.monotonic() + args.timeout
        for n in range(args.manifests):
            if time.monotonic() > deadline or not daemon.alive():
                break
            name = f"lat{n:05d}.toml"
            staged = ws.stage(name, small_manifest(n))
            claims: list[float] = []
            watcher = threading.Thread(target=watch_claim, args=(ws.inbox / name, claims, args.per_manifest_timeout))
            dropped = ws.drop(staged)
            watcher.start()
            created = None
            give_up = time.monotonic() + args.per_manifest_timeout
            while created is None and time.monotonic() < give_up:
                for job in newest_batches(client):
                    if job.name not in seen:
                        seen.add(job.name)
                        created = job
                        polled_lag.append(time.time() - job.create_time.timestamp())
                        break
                else:
                    time.sleep(args.poll)
            if created is None:
                missed += 1
                print(f"  {name}: no remote batch within {args.per_manifest_timeout:g} s", flush=True)
                continue
            to_create.append(created.create_time.timestamp() - dropped)
            watcher.join()
            if claims:
                to_claim.append(claims[0] - dropped)
                claim_to_create.append(created.create_time.timestamp() - claims[0])

        # The baseline: bare creates against the same emulator, one after another.
        bare, round_trips = [], []
        for n in range(len(to_create) or args.manifests):
            requests = [{"contents": [{"parts": [{"text": f"Text {k} of job {n}."}], "role": "user"}],
                         "metadata": {"key": str(k)}} for k in (1, 2)]
            started_wall, started = time.time(), time.perf_counter()
            job = client.batches.create(model=MODEL, src=requests,
                                        config=types.CreateBatchJobConfig(display_name=f"bare-{n}"))
            round_trips.append(time.perf_counter() - started)
            bare.append(job.create_time.timestamp() - started_wall)
        code = daemon.stop()
        if code != 0 or missed:
            print(f"  batchd log tail:\n{daemon.log_tail()}")

    rows = [("manifests measured", f"{len(to_create)} of {args.manifests}" + (f" ({missed} missed)" if missed else "")),
            ("ready after start s", ready_s),
            ("emulator", url),
            ("batchd drop -> create ms", stats(to_create)),
            ("  drop -> claim (file gone from inbox) ms", stats(to_claim) if to_claim else "n/a"),
            ("  claim -> create ms", stats(claim_to_create) if claim_to_create else "n/a"),
            ("  create seen by the poll, ms after create", stats(polled_lag) if polled_lag else "n/a"),
            ("bare SDK create ms (call start -> create_time)", stats(bare)),
            ("bare SDK create round trip ms", stats(round_trips)),
            ("ratio p50 (batchd / bare create)", percentile(to_create, 50) / percentile(bare, 50)),
            ("ratio p50 (batchd / bare create round trip)", percentile(to_create, 50) / percentile(round_trips, 50)),
            ("exit code after SIGTERM", code)]
    report(rows, args.json)


if __name__ == "__main__":
    main()
