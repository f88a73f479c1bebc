"""The journal's rows as values (:class:`Job`, :class:`Chunk`), and how its JSON columns are read."""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import dataclass, fields
from typing import Any, TypeVar


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


@dataclass(frozen=True)
class SmallBuild:
    """A small job's build (batchd/spool.py), kept in the journal (``small_builds``) rather than in files of its
    spool.

    Why: each file a job creates, and frees once it is delivered, costs it an inode, and on ext4 without a
    journal every inode freed is passed over, at a cost, by each inode created in the minute after it
    (docs/design.md, "Small jobs"). A burst of small jobs paid for the index and requests files of every
    earlier one in each of its creates. Committed with the chunk's row (``built``), read by the loop and
    handed to the steps that send, split and join it; removed in the transaction that finishes the job.
    """

    requests: str  #: chunk 0's request lines, as its requests file would hold them
    index: str  #: the index lines, as index.jsonl would hold them


def new_job_id() -> str:
    """A sortable, unique job id: creation time plus randomness."""
    return time.strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(3)


#: The jobs columns that hold JSON, and those that hold a flag (0 or 1).
JOB_JSON_COLUMNS = ("error", "chunk_limits", "cost", "retry_of")
JOB_FLAG_COLUMNS = ("cancel_requested", "approved", "build_stopped", "pack")


def job_values(stored: dict[str, Any]) -> dict[str, Any]:
    """Columns of a jobs row as stored → as :class:`Job` holds them: JSON decoded, flags as bools, a
    state as a plain string. ``stored`` may hold some columns only (what an UPDATE wrote)."""
    values = dict(stored)
    for name in JOB_JSON_COLUMNS:
        if name in values:
            values[name] = json.loads(values[name]) if values[name] else None
    for name in JOB_FLAG_COLUMNS:
        if name in values:
            values[name] = bool(values[name])
    if "state" in values:
        values["state"] = str(values["state"])
    return values


def job_from_row(row: sqlite3.Row) -> Job:
    return _made(Job, job_values(dict(row)))


def chunk_values(stored: dict[str, Any]) -> dict[str, Any]:
    """Columns of a chunks row as stored → as :class:`Chunk` holds them (``stored`` may hold some only)."""
    values = dict(stored)
    if "stats" in values:
        values["stats"] = json.loads(values["stats"]) if values["stats"] else {}
    if "error" in values:
        values["error"] = json.loads(values["error"]) if values["error"] else None
    if "cancel_sent" in values:
        values["cancel_sent"] = bool(values["cancel_sent"])
    if "state" in values:
        values["state"] = str(values["state"])
    return values


def chunk_from_row(row: sqlite3.Row) -> Chunk:
    return _made(Chunk, chunk_values(dict(row)))


_Row = TypeVar("_Row", Job, Chunk)
_FIELDS = {cls: frozenset(field.name for field in fields(cls)) for cls in (Job, Chunk)}
#: A row of each kind made by its dataclass, whose attribute dict the others copy: a copy shares its
#: keys (PEP 412), as the dataclass's own rows do, where a dict filled anew takes three times the room.
_TEMPLATES = {cls: cls(**dict.fromkeys(_FIELDS[cls])) for cls in (Job, Chunk)}


def _made(cls: type[_Row], values: dict[str, Any]) -> _Row:
    """``cls(**values)``, every field given, without the dataclass's generated ``__init__``: a frozen one
    sets each of 20 to 30 fields through ``object.__setattr__``, three times the cost, and the loop makes
    a row for every read it does not keep."""
    if values.keys() != _FIELDS[cls]:
        raise TypeError(f"{cls.__name__} fields {sorted(values.keys() ^ _FIELDS[cls])} missing or unknown")
    return _with_attributes(cls, _TEMPLATES[cls], values)


def replace_row(row: _Row, **changes: Any) -> _Row:
    """``dataclasses.replace(row, **changes)`` at a tenth of the cost (see :func:`_made`): the loop makes
    one for every write of a job it keeps."""
    if not changes.keys() <= _FIELDS[type(row)]:
        raise TypeError(f"{type(row).__name__} has no fields {sorted(changes.keys() - _FIELDS[type(row)])}")
    return _with_attributes(type(row), row, changes)


def _with_attributes(cls: type[_Row], like: _Row, values: dict[str, Any]) -> _Row:
    attributes = like.__dict__.copy()
    attributes.update(values)  # existing keys only: the copy keeps sharing them
    row = object.__new__(cls)
    object.__setattr__(row, "__dict__", attributes)  # (frozen: its own __setattr__ refuses)
    return row
