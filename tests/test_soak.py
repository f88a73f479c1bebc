"""Soak: many manifests, a daemon SIGKILLed (and now and then SIGTERMed) at random moments and
restarted, against a faulty service that outlives every kill; at the end nothing is lost and
nothing was billed twice (reliability.md B8, "Soak test"; the invariants are in tests/invariants.py).

The default size keeps the test under a minute on two busy cores. A longer run, by hand::

    BATCHD_SOAK_MANIFESTS=400 BATCHD_SOAK_KILLS=60 BATCHD_SOAK_SEED=7 .venv/bin/pytest -q tests/test_soak.py

``BATCHD_SOAK_SEED`` replays a run: the manifests, the drop times and the kill times all come from it
(the moments a kill lands in the daemon's work still depend on the machine's speed).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from google.genai import types

from batchd.testing import DaemonRunner, Emulator, Workspace, write_manifest
from invariants import Dropped, assert_invariants, assert_nothing_lost

MANIFESTS = int(os.environ.get("BATCHD_SOAK_MANIFESTS", "36"))
KILLS = int(os.environ.get("BATCHD_SOAK_KILLS", "12"))
SEED = int(os.environ.get("BATCHD_SOAK_SEED", "20261201"))
#: How long a daemon lives between kills, in seconds (it needs about one to start).
LIFETIME = (float(os.environ.get("BATCHD_SOAK_MIN_LIFE", "0.4")), float(os.environ.get("BATCHD_SOAK_MAX_LIFE", "3.0")))
#: Share of the stops that are SIGTERM (a clean stop, exit 0) instead of SIGKILL.
SIGTERM_SHARE = 0.2

#: What a busy real service does: throttling and outages on every route (creates included, so
#: reconcile-before-retry is exercised), answers out of order and without their keys, failed requests.
FAULTS = ["http=429:0.04", "http=503:0.04", "shuffle", "drop-metadata=0.3", "fail-requests=0.05"]

#: Small chunks, inline only up to two requests: every job has several remote jobs, inline and file.
SOAK_CONFIG = {"chunk_max_requests": 4, "inline_max_requests": 2, "max_concurrent_submissions": 2,
               "settle_seconds": 0.05, "rescan_seconds": 0.5, "incomplete_grace_seconds": 0.5}

WORDS = "apple river quiet storm amber wheel paper lantern copper meadow violet anchor".split()
LANGUAGES = ["Spanish", "French", "German", "Italian"]


def sentence(rng: random.Random, n: int) -> str:
    return f"{' '.join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))} #{n}"


def make_manifest(rng: random.Random, n: int, folder: Path) -> tuple[str, dict | str]:
    """The ``n``-th manifest of the run (its name and content); some read their items from a CSV beside it."""
    kind = rng.choice(["translate", "translate", "sentiment", "sentiment-csv", "variations", "malformed"])
    # Every few manifests reuse an earlier name: the same name with new content is a new job.
    name = f"job-{rng.randrange(n)}" if n > 4 and rng.random() < 0.15 else f"job-{n}"
    if kind == "translate":
        return name, {"task": "translate", "texts": [sentence(rng, n * 10 + i) for i in range(rng.randint(1, 3))],
                      "languages": rng.sample(LANGUAGES, rng.randint(1, 3))}
    if kind == "sentiment":
        return name, {"task": "sentiment",
                      "items": [{"id": f"r{i}", "text": sentence(rng, n * 10 + i)} for i in range(rng.randint(1, 7))]}
    if kind == "sentiment-csv":
        csv = f"items-{n}.csv"
        rows = "".join(f"c{i},{sentence(rng, n * 10 + i)}\n" for i in range(rng.randint(1, 9)))
        (folder / csv).write_text("id,text\n" + rows)
        return name, {"task": "sentiment", "input": csv}
    if kind == "variations":
        return name, {"task": "variations", "base_content": sentence(rng, n),
                      "variations": [{"id": f"v{i}", "tone": rng.choice(["formal", "playful"]), "length": "short",
                                      "audience": "everyone", "style": "post"} for i in range(rng.randint(1, 3))]}
    return name, f'task = "translate"\ntexts = ["{sentence(rng, n)}"\n'  # syntax error: rejected


class Producer:
    """Drops the run's manifests into the inbox the careful way, one name at a time."""

    def __init__(self, ws: Workspace, rng: random.Random, count: int) -> None:
        self.ws, self.rng, self.count = ws, rng, count
        self.dropped: list[Dropped] = []

    @property
    def done(self) -> bool:
        return len(self.dropped) >= self.count

    def drop_one(self) -> None:
        n = len(self.dropped)
        name, manifest = make_manifest(self.rng, n, self.ws.inbox)
        if (self.ws.inbox / f"{name}.toml").exists():
            name = f"job-{n}"  # that name is still waiting: never replace a manifest not yet taken
        path = write_manifest(self.ws.inbox, f"{name}.toml", manifest)
        self.dropped.append(Dropped.of(path, rejected=isinstance(manifest, str)))

    def drop_some(self, most: int) -> None:
        for _ in range(self.rng.randint(0, most)):
            if not self.done:
                self.drop_one()


def request_files(client) -> list[str]:
    return [f.name for f in client.files.list(config={"page_size": 100}) if f.source == types.FileSource.UPLOADED]


def all_delivered(ws: Workspace, count: int) -> bool:
    return len(ws.outbox_folders()) >= count and not any(p.suffix == ".toml" for p in ws.inbox.iterdir())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_soak_random_kills_under_faults_lose_nothing_and_bill_nothing_twice(tmp_path: Path):
    rng = random.Random(SEED)
    ws = Workspace.create(tmp_path / "ws", provider="gemini", **SOAK_CONFIG)
    runner = DaemonRunner(ws)
    producer = Producer(ws, rng, MANIFESTS)
    stops = {"SIGKILL": 0, "SIGTERM": 0}
    # The service runs in this process, so it outlives every daemon it serves.
    with Emulator(tmp_path / "google", faults=FAULTS) as google:
        try:
            for _ in range(KILLS):
                process = runner.start(emulator=google)
                stop_at = time.monotonic() + rng.uniform(*LIFETIME)
                while time.monotonic() < stop_at:
                    producer.drop_some(3)
                    time.sleep(rng.uniform(0.02, 0.3))
                assert process.poll() is None, f"the daemon died by itself:\n{process.output()[-3000:]}"
                if rng.random() < SIGTERM_SHARE:
                    code = process.stop(timeout=60)
                    # Only a stop that lands while the interpreter itself is still starting, before
                    # batchd's first line of code, may end by the signal; after that it exits 0.
                    assert code == 0 or (code == -signal.SIGTERM and not process.output()), \
                        f"exit {code}:\n{process.output()[-3000:]}"
                    stops["SIGTERM"] += 1
                else:
                    process.kill()
                    process.wait()
                    stops["SIGKILL"] += 1
                assert_nothing_lost(ws, producer.dropped)

            while not producer.done:
                producer.drop_one()
            process = runner.start(emulator=google)
            ws.wait_for(lambda: "batchd ready" in process.output(), what="the last daemon up")
            ws.wait_for(lambda: all_delivered(ws, MANIFESTS), timeout=300, what=f"all {MANIFESTS} delivered")
            # Every request file uploaded for a file chunk is deleted once its chunk is done, whatever
            # the kills interrupted (uploads, records, creates, deletes); results files stay.
            service = google.client(retries=8)
            ws.wait_for(lambda: not request_files(service), timeout=120, what="every request file deleted")
            assert process.stop(timeout=60) == 0, process.output()[-3000:]
        finally:
            runner.stop_all()
        remote = list(google.client(retries=8).batches.list(config={"page_size": 100}))

    report = assert_invariants(ws, producer.dropped, remote)
    assert report["folders"] == MANIFESTS
    assert report["remote_jobs"] >= report["chunks"] > 0
    print(f"soak seed {SEED}: {MANIFESTS} manifests, stops {stops}, {report}")
