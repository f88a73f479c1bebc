"""Helpers shared by the emulator tests: JSONL request files and outputs; clients and waiting come from
batchd.testing, re-exported here."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from google import genai
from google.genai import types

from batchd.testing import EMULATOR_API_KEY as API_KEY
from batchd.testing import EMULATOR_JOB_SECONDS as JOB_SECONDS
from batchd.testing import make_client, wait_done

MODEL = "gemini-2.5-flash"
EMBED_MODEL = "gemini-embedding-001"
VERSIONS = ("v1", "v1beta")

__all__ = ["API_KEY", "EMBED_MODEL", "JOB_SECONDS", "MODEL", "VERSIONS", "inline_requests", "make_client",
           "output_lines", "request_lines", "wait_done", "write_jsonl"]


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
