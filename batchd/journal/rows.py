"""The journal's rows as values (:class:`Job`, :class:`Chunk`), and how its JSON columns are written."""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from batchd.logs import redact_data


def redacted_json(value: Any) -> str:
    """JSON for the journal, secrets masked: an error or an event may quote an API key, and the
    journal is what ``batchd status``, the outbox and the notification plugins are made from."""
    return json.dumps(redact_data(value), ensure_ascii=False)


@dataclass(frozen=True)
class Job:
    id: str
    name: str
    source: str
    sha256: str | None
    state: str
    outcome: str | None
    task: str | None
    model: str | None
    error: dict | None
    cancel_requested: bool
    outbox_dir: str | None
    chunk_limits: dict | None
    created_at: float
    updated_at: float
    submitted_at: float | None
    finished_at: float | None
    cost: dict | None = None
    spend: float | None = None
    admitted_at: float | None = None
    hold: str | None = None
    approved: bool = False
    build_stopped: bool = False
    manifest_sha256: str | None = None
    retry_of: dict | None = None
    kind: str = "generate"
    pack: bool = False  # batchd's own job carrying small jobs' chunks (batchd/daemon/pack.py)


@dataclass(frozen=True)
class Chunk:
    job_id: str
    idx: int
    display_name: str
    mode: str
    request_count: int
    byte_size: int
    state: str
    remote_name: str | None
    remote_state: str | None
    stats: dict
    uploaded_file: str | None
    intent_at: float | None
    cancel_sent: bool
    error: dict | None
    resubmits: int = 0
    upload_state: str | None = None
    packed_in: str | None = None  # the pack (a job id) its requests were sealed into


def new_job_id() -> str:
    """A sortable, unique job id: creation time plus randomness."""
    return time.strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(3)


def job_from_row(row: sqlite3.Row) -> Job:
    data = dict(row)
    data["error"] = json.loads(data["error"]) if data["error"] else None
    data["chunk_limits"] = json.loads(data["chunk_limits"]) if data["chunk_limits"] else None
    data["cost"] = json.loads(data["cost"]) if data.get("cost") else None
    data["retry_of"] = json.loads(data["retry_of"]) if data.get("retry_of") else None
    data["cancel_requested"] = bool(data["cancel_requested"])
    data["approved"] = bool(data.get("approved"))
    data["build_stopped"] = bool(data.get("build_stopped"))
    data["pack"] = bool(data.get("pack"))
    return Job(**data)


def chunk_from_row(row: sqlite3.Row) -> Chunk:
    data = dict(row)
    data["stats"] = json.loads(data["stats"]) if data["stats"] else {}
    data["error"] = json.loads(data["error"]) if data["error"] else None
    data["cancel_sent"] = bool(data["cancel_sent"])
    return Chunk(**data)
