"""Helpers for the tests of batchd's HTTP server: find its address in the log, GET/POST, scrape /metrics."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from batchd.testing import DaemonProcess

SERVING = re.compile(r"serving HTTP at (http://\S+?) ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_url(process: DaemonProcess, timeout: float = 30) -> str:
    """The URL the daemon serves at, from its log line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = SERVING.search(process.output())
        if found:
            return found.group(1)
        if process.poll() is not None:
            raise AssertionError(f"batchd exited {process.returncode}:\n{process.output()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"batchd did not serve HTTP:\n{process.output()[-3000:]}")


@dataclass
class Answer:
    status: int
    headers: dict
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self):
        return json.loads(self.body)


def request(url: str, *, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
            timeout: float = 10) -> Answer:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            return Answer(answer.status, {k.lower(): v for k, v in answer.headers.items()}, answer.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}, read by prometheus_client's own parser."""
    answer = request(url + "/metrics")
    assert answer.status == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until(predicate, timeout: float = 30, what: str = "condition", every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
