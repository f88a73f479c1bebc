"""``batchd retry``: a finished job's failed or expired requests, sent again as a new job.

The retry is the job's own manifest (its copy in the job's outbox folder) plus ``retry_of``, which
names the job and a keys file listing the keys of the requests to send again; the task's other
requests are left out (see :meth:`batchd.manifest.Manifest.requests`). Both files are dropped into
the inbox the way ``batchd submit`` drops a manifest and its input file: the keys file first, so the
daemon never sees the manifest without it. The job's results.jsonl is read as a stream and the keys
are written to a file as they are found: memory does not grow with the job.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from batchd.config import Settings
from batchd.drop import drop_bytes, drop_input
from batchd.inbox import sha256_file
from batchd.journal import Job, Journal
from batchd.manifest import MANIFEST_SUFFIXES, Manifest, ManifestError, load_manifest
from batchd.states import JobState
from batchd.task import Task

#: Outcomes of jobs that ran, hence have results to retry (a rejected or cancelled job is submitted again instead).
RAN_OUTCOMES = ("succeeded", "partial", "plugin_failed", "failed")
#: The error code of the requests of a remote batch the service did not finish within 48 hours.
EXPIRED = "expired"
#: A retry's job name: the retried job's name, ``.retry-`` and a number.
_RETRY_NAME = re.compile(r"(?P<base>.+)\.retry-\d+")


class RetryError(Exception):
    """No retry could be made; the message says why and what to do."""


@dataclass(frozen=True)
class Retry:
    """What ``batchd retry`` found and dropped."""

    job: Job
    failed: int
    expired: int
    #: The retry manifest dropped into the inbox, and its keys file; None when there was nothing to retry.
    manifest: Path | None = None
    keys: Path | None = None


def finished_job(journal: Journal, ref: str) -> Job:
    """The latest job named (or with id) ``ref`` that ran to the end."""
    jobs = journal.find_jobs(ref)
    if not jobs:
        raise RetryError(f"no job named {ref!r}")
    ran = [job for job in jobs if job.state == JobState.DONE and job.outcome in RAN_OUTCOMES]
    if ran:
        return ran[-1]
    latest = jobs[-1]
    if latest.state != JobState.DONE:
        raise RetryError(f"job {latest.id} ({latest.source}) is not finished yet ({latest.state}): "
                         f"retry it once it is done")
    raise RetryError(f"job {latest.id} ({latest.source}) was {latest.outcome}, so none of its requests ran: "
                     f"submit its manifest again instead")


def retry(settings: Settings, journal: Journal, tasks: Mapping[str, Task], job: Job, *,
          failed: bool, expired: bool) -> Retry:
    """Drop a retry of ``job``'s requests that failed (``failed``) and expired (``expired``) into the inbox."""
    folder = Path(job.outbox_dir) if job.outbox_dir else None
    results = folder / "results.jsonl" if folder is not None else None
    if results is None or not results.is_file():
        raise RetryError(f"job {job.id} ({job.source}) has no results.jsonl in its outbox folder {folder} "
                         f"(moved or removed?)")
    content = _manifest_copy(settings, job, folder)
    manifest = _load_manifest(settings, tasks, job, content, folder)
    _restore_input(settings, job, manifest, folder)
    with tempfile.TemporaryDirectory(prefix="batchd-retry-") as scratch:
        keys = Path(scratch) / "keys.jsonl"
        counts = _select_keys(results, keys, failed=failed, expired=expired)
        found = Retry(job, **counts)
        if not counts["failed"] and not counts["expired"]:
            return found
        if keys.stat().st_size > settings.limits.retry_keys_bytes:
            raise RetryError(f"{sum(counts.values()):,} keys to retry take {keys.stat().st_size:,} bytes, more than "
                             f"one retry reads ({settings.limits.retry_keys_bytes:,}, [limits] retry_keys_bytes): "
                             f"raise that limit, or retry --failed and --expired apart")
        base = job.name
        if manifest.common.retry_of is not None and (name := _RETRY_NAME.fullmatch(job.name)):
            base = name["base"]  # a retry of a retry is the next retry of the first job
        document = _document(job, content)
        for number in itertools.count(1):
            stem = f"{base}.retry-{number}"
            manifest_path = settings.inbox / f"{stem}{Path(job.source).suffix}"
            keys_path = settings.inbox / f"{stem}.keys.jsonl"
            if journal.find_jobs(stem) or keys_path.exists() or any(
                    (settings.inbox / f"{stem}{suffix}").exists() for suffix in MANIFEST_SUFFIXES):
                continue
            try:
                drop_input(keys, keys_path)
            except FileExistsError:
                continue  # dropped by someone else meanwhile
            try:
                drop_bytes(_render(manifest_path, {**document, "retry_of": {"job": job.id, "keys": keys_path.name}}),
                           manifest_path)
            except FileExistsError:
                keys_path.unlink(missing_ok=True)
                continue
            return Retry(job, **counts, manifest=manifest_path, keys=keys_path)
    raise AssertionError("unreachable: itertools.count never ends")


def _manifest_copy(settings: Settings, job: Job, folder: Path) -> bytes:
    """The job's manifest as it ran: its copy in the outbox folder, checked against the journal's hash."""
    path = folder / job.source
    try:
        with path.open("rb") as file:
            content = file.read(settings.limits.manifest_bytes + 1)
    except OSError as error:
        raise RetryError(f"job {job.id}'s manifest copy {path} cannot be read: {error.strerror}") from None
    if job.manifest_sha256 is not None and hashlib.sha256(content).hexdigest() != job.manifest_sha256:
        raise RetryError(f"{path} is not the manifest job {job.id} ran (changed since): restore it")
    return content


def _restore_input(settings: Settings, job: Job, manifest: Manifest, folder: Path) -> None:
    """Input files go with their job into its outbox folder: copy the one the job read back into the
    inbox, at the same path, for the retry to read, as ``batchd submit`` does (an identical file there is
    reused, a different one is never overwritten). A retry's old keys file stays in the folder."""
    path = manifest.input_path
    if path is None or not path.is_relative_to(folder.resolve()):
        return  # inline items, or a job delivered before inputs went with it: its input is in the inbox
    destination = settings.inbox / path.relative_to(folder.resolve())
    try:
        drop_input(path, destination)
    except FileExistsError:
        raise RetryError(f"job {job.id} read {path.name}, kept in its outbox folder {folder}, but the inbox "
                         f"already has a different {destination}: move that one away and retry again") from None


def _load_manifest(settings: Settings, tasks: Mapping[str, Task], job: Job, content: bytes, folder: Path) -> Manifest:
    """The job's manifest, read with the files it read, which must be the very files the job read (the keys
    of its requests come from them): from its outbox folder, where they went with the job, else (a job
    delivered before inputs went with their job) from the inbox."""
    try:
        manifest = load_manifest(folder / job.source, root=folder, tasks=tasks, check_inputs=False, content=content,
                                 limits=settings.limits)
    except ManifestError:
        manifest = None
    try:
        if manifest is None:
            manifest = load_manifest(settings.inbox / job.source, root=settings.inbox, tasks=tasks,
                                     check_inputs=False, content=content, limits=settings.limits)
    except ManifestError as error:
        error = error.capped(settings.limits.error_chars)
        if error.field in ("input", "retry_of.keys"):
            raise RetryError(f"the retry needs the same {error.field} file job {job.id} read, in its outbox folder "
                             f"{folder} (where it went with the job) or in the inbox: {error.message}") from None
        raise RetryError(f"job {job.id}'s manifest no longer loads: {error}") from None
    # The job's content hash covers the manifest and its input files, as the claim made it.
    digest = hashlib.sha256(content)
    for path in manifest.input_files():
        digest.update(b"\0" + path.name.encode() + b"\0" + sha256_file(path).encode())
    if job.sha256 is not None and digest.hexdigest() != job.sha256:
        files = ", ".join(str(path) for path in manifest.input_files())
        raise RetryError(f"{files} differ from what job {job.id} read (changed since?): the keys of "
                         f"its requests would not match; put back the files it read and retry again")
    return manifest


def _select_keys(results: Path, keys: Path, *, failed: bool, expired: bool) -> dict[str, int]:
    """Write the keys of the chosen errors in ``results`` to ``keys`` (one JSON string a line); count them."""
    counts = {"failed": 0, "expired": 0}
    dumps = json.JSONEncoder(ensure_ascii=False).encode
    with results.open(encoding="utf-8") as lines, keys.open("w", encoding="utf-8") as out:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise RetryError(f"{results}, line {number}: not a JSON result (was the file edited?)") from None
            if not isinstance(record, dict) or record.get("status") != "error":
                continue
            code = (record.get("error") or {}).get("code")
            kind = "expired" if code == EXPIRED else "failed"
            if not (expired if kind == "expired" else failed):
                continue
            if not isinstance(record.get("key"), str):
                raise RetryError(f"{results}, line {number}: a result without its request key (was the file edited?)")
            out.write(dumps(record["key"]) + "\n")
            counts[kind] += 1
    return counts


def _document(job: Job, content: bytes) -> dict[str, Any]:
    """The job's manifest as data (it loaded above, so it parses)."""
    text = content.decode("utf-8-sig")
    if Path(job.source).suffix.lower() == ".toml":
        return tomllib.loads(text)
    return json.loads(text)


def _render(path: Path, document: dict[str, Any]) -> bytes:
    if path.suffix.lower() == ".toml":
        return tomli_w.dumps(document).encode()
    return (json.dumps(document, ensure_ascii=False, indent=2) + "\n").encode()
