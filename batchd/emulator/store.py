"""Durable emulator state: its documents in one SQLite database, the bytes of files beside it.

Layout of a state directory::

    state.db                   every document: jobs, File resources, upload sessions, webhooks with
                               their signing secrets, webhook events not yet acknowledged by their
                               receiver; and each inline job's requests, as received, and its answers
                               (the inlinedResponses list)
    blobs/<id>                 a File's bytes (uploaded, or a job's generated output ``batch-<job id>``)
    uploads/<id>.part          the bytes of an open resumable upload received so far
    webhook-signing-key.pem    the key that signs per-job webhooks' JWTs (published as a JWKS)

The daemon using the emulator is tested by SIGKILLing its process, emulator thread included, at
arbitrary points. So every document is written in a transaction of its own *before* the answer that
announces it is sent: a job the client was told about, or a file whose upload was confirmed,
survives a kill. Anything half done (a temporary file, an output still being written) is simply
redone or discarded on the next start.

Nothing here is fsynced (``synchronous = OFF``). The emulator stands in for Google's servers, whose
durability is not the local disk's: what it must survive is its own process being killed, and a
committed write survives that (the kernel's page cache outlives the process). Why a database and not
a file per document, as before: a document replaced is a file created and one deleted, and on some
filesystems each creation then costs more (ext4 without a journal looks past every recently freed
inode); a batch job took five of them. Documents kept as files by an older emulator are moved into
the database when it starts.
"""

from __future__ import annotations

from contextlib import contextmanager
import fcntl
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

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


class StateError(Exception):
    """The state directory cannot be used: another emulator holds it, or its database cannot be read."""


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
                raise StateError(f"another emulator is using the state directory {root}") from None
            time.sleep(0.05)


#: The kinds of document, each with the folder an older emulator kept them in (one JSON file each).
_LEGACY_FOLDERS = {"jobs": "batches", "files": "files", "uploads": "uploads", "webhooks": "webhooks",
                   "deliveries": "deliveries"}
KINDS = tuple(_LEGACY_FOLDERS)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (kind TEXT NOT NULL, id TEXT NOT NULL, body BLOB NOT NULL, PRIMARY KEY (kind, id));
CREATE TABLE IF NOT EXISTS inline (job_id TEXT PRIMARY KEY, input BLOB NOT NULL, output BLOB);
"""


class Store:
    """The state directory, with every document also held in memory (documents are small)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = root / "blobs"
        self.uploads_dir = root / "uploads"
        for folder in (self.blobs_dir, self.uploads_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._owner = _lock_state_dir(root)
        # One lock serializes document updates, so a read-modify-write (cancel racing a finishing
        # worker) never loses a field, and the one connection is used by one thread at a time.
        # Documents in the dicts are replaced, never mutated.
        self._lock = threading.RLock()
        path = root / "state.db"
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=OFF")  # a kill of this process, not a power cut (see the module)
            self._db.executescript(_SCHEMA)
            self._remove_leftovers()
            self._import_legacy_files()
            docs: dict[str, dict[str, Doc]] = {kind: {} for kind in KINDS}
            for kind, doc_id, body in self._db.execute("SELECT kind, id, body FROM docs"):
                docs[kind][doc_id] = decode(body)
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.OperationalError):
                raise  # locked, its permissions, a full disk: not the file's content
            self._owner.close()
            raise StateError(f"the emulator's state {path} cannot be read ({error}): it is not a SQLite database, "
                             f"or a damaged one. Move it aside to start afresh: the batches and files it held are "
                             f"forgotten (a client then finds them gone, as Google answers for a batch it no longer "
                             f"has)") from None
        self.jobs: dict[str, Doc] = docs["jobs"]
        self.files: dict[str, Doc] = docs["files"]
        self.uploads: dict[str, Doc] = docs["uploads"]
        self.webhooks: dict[str, Doc] = docs["webhooks"]
        #: Webhook deliveries not yet acknowledged (each retried until it is, or gives up).
        self.deliveries: dict[str, Doc] = docs["deliveries"]
        for part in self.uploads_dir.glob("*.part"):
            if part.name.removesuffix(".part") not in self.uploads:  # session doc never written
                part.unlink(missing_ok=True)

    def close(self) -> None:
        """Let another emulator use this state directory."""
        with self._lock:
            self._db.close()
        self._owner.close()

    # -- paths ------------------------------------------------------------------------------------

    def blob(self, file_id: str) -> Path:
        return self.blobs_dir / file_id

    def upload_part(self, upload_id: str) -> Path:
        return self.uploads_dir / f"{upload_id}.part"

    # -- jobs -------------------------------------------------------------------------------------

    def save_job(self, job: Doc) -> None:
        self._put("jobs", self.jobs, job)

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
        with self._lock, self._transaction():
            self._drop("jobs", self.jobs, job_id)
            self._db.execute("DELETE FROM inline WHERE job_id = ?", (job_id,))

    def save_inline_input(self, job_id: str, items: list) -> None:
        """An inline job's requests, as received (stored before the job's document: see the app)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO inline (job_id, input) VALUES (?, ?)", (job_id, encode(items)))

    def inline_input(self, job_id: str) -> list:
        with self._lock:
            row = self._db.execute("SELECT input FROM inline WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise FileNotFoundError(f"no stored requests for inline job {job_id}")
        return decode(row[0])

    def save_inline_output(self, job_id: str, responses: list) -> None:
        """An inline job's answers (the inlinedResponses list)."""
        with self._lock:
            self._db.execute("UPDATE inline SET output = ? WHERE job_id = ?", (encode(responses), job_id))

    def inline_output_json(self, job_id: str) -> str:
        """An inline job's answers as the JSON text they were stored in (spliced into its Operation)."""
        with self._lock:
            row = self._db.execute("SELECT output FROM inline WHERE job_id = ?", (job_id,)).fetchone()
        if row is None or row[0] is None:
            raise FileNotFoundError(f"no stored answers for inline job {job_id}")
        return row[0] if isinstance(row[0], str) else row[0].decode("utf-8")

    # -- files, upload sessions, webhooks and deliveries: one document each ----------------------

    def _put(self, kind: str, docs: dict[str, Doc], doc: Doc) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO docs (kind, id, body) VALUES (?, ?, ?)",
                             (kind, doc["id"], encode(doc)))
            docs[doc["id"]] = doc

    def _drop(self, kind: str, docs: dict[str, Doc], doc_id: str, *also: Path) -> None:
        with self._lock:
            docs.pop(doc_id, None)
            self._db.execute("DELETE FROM docs WHERE kind = ? AND id = ?", (kind, doc_id))
            for path in also:
                path.unlink(missing_ok=True)

    def save_file(self, file: Doc) -> None:
        self._put("files", self.files, file)

    def delete_file(self, file_id: str) -> None:
        self._drop("files", self.files, file_id, self.blob(file_id))

    def save_upload(self, upload: Doc) -> None:
        self._put("uploads", self.uploads, upload)

    def delete_upload(self, upload_id: str) -> None:
        self._drop("uploads", self.uploads, upload_id, self.upload_part(upload_id))

    def save_webhook(self, webhook: Doc) -> None:
        self._put("webhooks", self.webhooks, webhook)

    def delete_webhook(self, webhook_id: str) -> None:
        self._drop("webhooks", self.webhooks, webhook_id)

    def save_delivery(self, delivery: Doc) -> None:
        self._put("deliveries", self.deliveries, delivery)

    def delete_delivery(self, delivery_id: str) -> None:
        self._drop("deliveries", self.deliveries, delivery_id)

    # -- start-up ---------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _remove_leftovers(self) -> None:
        """Temporary files and unfinished outputs of a killed process are never valid state."""
        for folder in (self.root, self.blobs_dir, self.uploads_dir, *self._legacy_folders()):
            for path in folder.glob(".*.tmp"):
                path.unlink(missing_ok=True)
        for path in self.blobs_dir.glob("*.part"):
            path.unlink(missing_ok=True)

    def _legacy_folders(self) -> list[Path]:
        return [folder for folder in (self.root / name for name in _LEGACY_FOLDERS.values()) if folder.is_dir()]

    def _import_legacy_files(self) -> None:
        """Move the documents an older emulator kept as JSON files (one each) into the database: in one
        transaction, then the files are removed (a kill in between imports the same files again)."""
        found: list[Path] = []
        with self._transaction():
            for kind, name in _LEGACY_FOLDERS.items():
                folder = self.root / name
                for path in folder.glob("*.json") if folder.is_dir() else ():
                    found.append(path)
                    if kind == "jobs" and path.name.endswith((".input.json", ".output.json")):
                        job_id, _, which = path.name.removesuffix(".json").rpartition(".")
                        column = "input" if which == "input" else "output"
                        self._db.execute("INSERT OR IGNORE INTO inline (job_id, input) VALUES (?, '[]')", (job_id,))
                        self._db.execute(f"UPDATE inline SET {column} = ? WHERE job_id = ?",
                                         (path.read_bytes(), job_id))
                        continue
                    doc = decode(path.read_bytes())
                    self._db.execute("INSERT OR REPLACE INTO docs (kind, id, body) VALUES (?, ?, ?)",
                                     (kind, doc["id"], encode(doc)))
        for path in found:
            path.unlink(missing_ok=True)
        for folder in self._legacy_folders():
            if folder.name != "uploads":
                try:
                    folder.rmdir()
                except OSError:
                    pass  # something else in it: left alone
