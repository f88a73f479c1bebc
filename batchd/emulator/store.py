"""Durable emulator state: one small JSON document per job, file and upload session, plus blobs.

Layout of a state directory::

    batches/<id>.json          the job record (see jobs.py)
    batches/<id>.input.json    an inline job's requests, as received
    batches/<id>.output.json   an inline job's answers (the inlinedResponses list)
    files/<id>.json            a File resource
    blobs/<id>                 its bytes (uploaded, or a job's generated output ``batch-<job id>``)
    uploads/<id>.json          an open resumable upload session
    uploads/<id>.part          the bytes received so far
    webhooks/<id>.json         a static webhook, with its signing secrets
    deliveries/<id>.json       a webhook event not yet acknowledged by its receiver
    webhook-signing-key.pem    the key that signs per-job webhooks' JWTs (published as a JWKS)

The daemon using the emulator is tested by SIGKILLing its process, emulator thread included, at
arbitrary points. So every document is replaced atomically (write a temporary file, rename it over
the old one) and is written *before* the answer that announces it is sent: a job the client was told
about, or a file whose upload was confirmed, survives a kill. Anything half done (a temporary file,
an output still being written) is simply redone or discarded on the next start.

Nothing here is fsynced. The emulator stands in for Google's servers, whose durability is not the
local disk's: what it must survive is its own process being killed, and a rename survives that
(the kernel's page cache outlives the process). An fsync would only defend against the test
machine losing power, at a cost of 8 disk flushes per batch job that slowed every daemon test on a
slow disk; batchd's own journal, spool and outbox are fsynced (batchd/durable.py).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from batchd.jsonfast import dumps as encode
from batchd.jsonfast import loads as decode


Doc = dict[str, Any]


def replace_file(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` all-or-nothing against a kill of this process (not a power cut:
    see the module): a dotfile temp beside it, renamed over it. A temp a kill leaves is removed at start."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    """A compact JSON document, replaced all-or-nothing (see :func:`replace_file`)."""
    replace_file(path, encode(value))


def _lock_state_dir(root: Path, wait_seconds: float = 30.0):
    """Own ``root`` for as long as the returned file stays open: two emulators on one state dir
    would process the same jobs twice. Waits a while, as an emulator whose parent was just killed
    may still be shutting down."""
    owner = open(root / ".lock", "a+")
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return owner
        except BlockingIOError:
            if time.monotonic() >= deadline:
                owner.close()
                raise RuntimeError(f"another emulator is using the state directory {root}") from None
            time.sleep(0.05)


class Store:
    """The state directory, with every document also held in memory (documents are small)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.batches_dir = root / "batches"
        self.files_dir = root / "files"
        self.blobs_dir = root / "blobs"
        self.uploads_dir = root / "uploads"
        self.webhooks_dir = root / "webhooks"
        self.deliveries_dir = root / "deliveries"
        for folder in self._folders():
            folder.mkdir(parents=True, exist_ok=True)
        self._owner = _lock_state_dir(root)
        # One lock serializes document updates, so a read-modify-write (cancel racing a finishing
        # worker) never loses a field. Documents in the dicts are replaced, never mutated.
        self._lock = threading.RLock()
        self._remove_leftovers()
        self.jobs: dict[str, Doc] = self._load(self.batches_dir, skip_suffixes=(".input.json", ".output.json"))
        self.files: dict[str, Doc] = self._load(self.files_dir)
        self.uploads: dict[str, Doc] = self._load(self.uploads_dir)
        self.webhooks: dict[str, Doc] = self._load(self.webhooks_dir)
        #: Webhook deliveries not yet acknowledged (each retried until it is, or gives up).
        self.deliveries: dict[str, Doc] = self._load(self.deliveries_dir)
        for part in self.uploads_dir.glob("*.part"):
            if part.name.removesuffix(".part") not in self.uploads:  # session doc never written
                part.unlink(missing_ok=True)

    def close(self) -> None:
        """Let another emulator use this state directory."""
        self._owner.close()

    # -- paths ------------------------------------------------------------------------------------

    def blob(self, file_id: str) -> Path:
        return self.blobs_dir / file_id

    def upload_part(self, upload_id: str) -> Path:
        return self.uploads_dir / f"{upload_id}.part"

    def job_input(self, job_id: str) -> Path:
        return self.batches_dir / f"{job_id}.input.json"

    def job_output(self, job_id: str) -> Path:
        return self.batches_dir / f"{job_id}.output.json"

    # -- jobs -------------------------------------------------------------------------------------

    def save_job(self, job: Doc) -> None:
        with self._lock:
            atomic_write_json(self.batches_dir / f"{job['id']}.json", job)
            self.jobs[job["id"]] = job

    def update_job(self, job_id: str, **changes: Any) -> Doc | None:
        """Apply ``changes`` to a stored job; None when the job was deleted meanwhile."""
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            job = {**job, **changes}
            self.save_job(job)
            return job

    def delete_job(self, job_id: str) -> None:
        with self._lock:
            self.jobs.pop(job_id, None)
            for path in (self.batches_dir / f"{job_id}.json", self.job_input(job_id), self.job_output(job_id)):
                path.unlink(missing_ok=True)

    # -- files, upload sessions, webhooks and deliveries: one document each ----------------------

    def _put(self, folder: Path, docs: dict[str, Doc], doc: Doc) -> None:
        with self._lock:
            atomic_write_json(folder / f"{doc['id']}.json", doc)
            docs[doc["id"]] = doc

    def _drop(self, folder: Path, docs: dict[str, Doc], doc_id: str, *also: Path) -> None:
        with self._lock:
            docs.pop(doc_id, None)
            for path in (folder / f"{doc_id}.json", *also):
                path.unlink(missing_ok=True)

    def save_file(self, file: Doc) -> None:
        self._put(self.files_dir, self.files, file)

    def delete_file(self, file_id: str) -> None:
        self._drop(self.files_dir, self.files, file_id, self.blob(file_id))

    def save_upload(self, upload: Doc) -> None:
        self._put(self.uploads_dir, self.uploads, upload)

    def delete_upload(self, upload_id: str) -> None:
        self._drop(self.uploads_dir, self.uploads, upload_id, self.upload_part(upload_id))

    def save_webhook(self, webhook: Doc) -> None:
        self._put(self.webhooks_dir, self.webhooks, webhook)

    def delete_webhook(self, webhook_id: str) -> None:
        self._drop(self.webhooks_dir, self.webhooks, webhook_id)

    def save_delivery(self, delivery: Doc) -> None:
        self._put(self.deliveries_dir, self.deliveries, delivery)

    def delete_delivery(self, delivery_id: str) -> None:
        self._drop(self.deliveries_dir, self.deliveries, delivery_id)

    # -- start-up ---------------------------------------------------------------------------------

    def _folders(self) -> tuple[Path, ...]:
        return (self.batches_dir, self.files_dir, self.blobs_dir, self.uploads_dir, self.webhooks_dir,
                self.deliveries_dir)

    def _remove_leftovers(self) -> None:
        """Temporary files and unfinished outputs of a killed process are never valid state."""
        for folder in self._folders():
            for path in folder.glob(".*.tmp"):
                path.unlink(missing_ok=True)
        for path in self.blobs_dir.glob("*.part"):
            path.unlink(missing_ok=True)

    @staticmethod
    def _load(folder: Path, skip_suffixes: tuple[str, ...] = ()) -> dict[str, Doc]:
        docs = {}
        for path in folder.glob("*.json"):
            if path.name.endswith(skip_suffixes):
                continue
            doc = decode(path.read_bytes())
            docs[doc["id"]] = doc
        return docs
