"""Helpers shared by the emulator tests: real google-genai clients for the emulator, JSONL files, waiting."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from google import genai
from google.genai import types

API_KEY = "test-key"
MODEL = "gemini-2.5-flash"
EMBED_MODEL = "gemini-embedding-001"
JOB_SECONDS = 0.3
VERSIONS = ("v1", "v1beta")


def make_client(base_url: str, version: str = "v1beta", *, fault: str | None = None, api_key: str = API_KEY,
                timeout_ms: int | None = None, retries: int | None = None) -> genai.Client:
    """A google-genai client for the emulator; ``fault`` travels in the ``X-Emulator-Fault`` header."""
    options = types.HttpOptions(
        base_url=base_url,
        api_version=version,
        headers={"X-Emulator-Fault": fault} if fault else None,
        timeout=timeout_ms,
        retry_options=types.HttpRetryOptions(attempts=retries, initial_delay=0.01, max_delay=0.05)
        if retries else None,
    )
    return genai.Client(api_key=api_key, http_options=options)


def wait_done(client: genai.Client, name: str, timeout: float = 30) -> types.BatchJob:
    deadline = time.monotonic() + timeout
    while True:
        job = client.batches.get(name=name)
        if job.done:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} still {job.state} after {timeout} s")
        time.sleep(0.05)


def inline_requests(count: int, prefix: str = "req") -> list[dict]:
    return [{"contents": [{"parts": [{"text": f"prompt number {i}"}], "role": "user"}],
             "metadata": {"key": f"{prefix}-{i}"}} for i in range(count)]


def write_jsonl(path: Path, lines: Iterable[dict | str]) -> Path:
    with open(path, "w") as file:
        for line in lines:
            file.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def request_lines(count: int, prefix: str = "k") -> Iterator[dict]:
    for i in range(count):
        yield {"key": f"{prefix}{i}", "request": {"contents": [{"parts": [{"text": f"line {i}"}]}]}}


def output_lines(client: genai.Client, job: types.BatchJob) -> list[dict]:
    data = client.files.download(file=job.dest.file_name)
    return [json.loads(line) for line in data.decode().splitlines()]
