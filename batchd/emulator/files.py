"""Files: Google's resumable upload protocol, streamed to disk, and the File resource JSON.

An upload is a session (``start``) followed by chunks POSTed to the session URL the start answer
gave (``X-Goog-Upload-URL``, which names this emulator and carries an unguessable id: the id is the
only authorisation a chunk has, as google-genai sends chunks without the API key). Chunks are
written at their ``X-Goog-Upload-Offset`` straight from the socket to ``uploads/<id>.part``; nothing
holds a whole chunk, let alone the file, in memory. The last chunk (``upload, finalize``) is moved
into ``blobs/`` and recorded as a File before its answer is sent (durable against a kill of the
process, as all the emulator's state: see store.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from batchd.emulator.errors import ApiError, invalid, not_found
from batchd.emulator.store import Doc, Store
from batchd.emulator.wire import new_id, rfc3339

#: Every chunk of a resumable upload but the one that finalizes it is a multiple of this many bytes
#: (announced in ``X-Goog-Upload-Chunk-Granularity``, as Google's resumable protocol does).
CHUNK_GRANULARITY = 256 * 1024

#: The service's limit for one file (discovery document ``media.upload.maxSize``).
MAX_FILE_BYTES = 2 * 1024**3
#: ``File.display_name``: "must be no more than 512 characters in length" (google-genai's File type).
MAX_DISPLAY_NAME_CHARS = 512
#: User-chosen file ids: what the real service accepts (lowercase alphanumerics and dashes, <= 40).
_FILE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


def render_file(doc: Doc, base_url: str, api_version: str, expire_seconds: float) -> dict:
    """The File resource JSON (``sizeBytes`` as an int64 string, as the service sends it)."""
    created = rfc3339(doc["createTime"])
    file: dict[str, Any] = {"name": f"files/{doc['id']}"}
    if doc.get("displayName"):
        file["displayName"] = doc["displayName"]
    file.update({
        "mimeType": doc["mimeType"],
        "sizeBytes": str(doc["sizeBytes"]),
        "createTime": created,
        "updateTime": created,
        "expirationTime": rfc3339(doc["createTime"] + expire_seconds),
    })
    if doc.get("sha256"):
        # The service sends base64 of the hex digest (sic).
        file["sha256Hash"] = base64.b64encode(doc["sha256"].encode()).decode()
    # Google's form, whatever the emulator's address: the SDKs turn it back into ``files/<id>``
    # (files.get(name=file.uri), files.download(file=...)) and requests reference files by it.
    file["uri"] = f"{GOOGLE_API_ROOT}/{api_version}/files/{doc['id']}"
    if doc["source"] == "GENERATED":  # the one URL clients fetch as it is: it names the emulator
        file["downloadUri"] = f"{base_url}/download/{api_version}/files/{doc['id']}:download?alt=media"
    file["state"] = "ACTIVE"
    file["source"] = doc["source"]
    return file


GOOGLE_API_ROOT = "https://generativelanguage.googleapis.com"
#: A File referenced in a request's ``fileData.fileUri``: Google's URI, one naming the emulator's
#: address (as the emulator wrote them before), or the bare resource name.
_FILE_URI = re.compile(r"(?:https?://[^/]+/v1[a-z0-9]*/)?files/(?P<id>[a-z0-9-]{1,40})")


def referenced_file_id(uri: str) -> str | None:
    """The id of the File a ``fileData.fileUri`` names, or None for any other URI (a web page, gs://)."""
    match = _FILE_URI.fullmatch(uri)
    return match["id"] if match else None


@dataclass
class _Session:
    """In-memory companion of an upload session: a lock and the running checksum."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    sha256: Any = field(default_factory=hashlib.sha256)
    hashed: int = 0  # bytes covered by ``sha256``; behind the file size after an out-of-order write


@dataclass
class ChunkResult:
    status: str  # X-Goog-Upload-Status: "active" or "final"
    received: int
    file: Doc | None = None


class Uploads:
    def __init__(self, store: Store, max_file_bytes: int = MAX_FILE_BYTES) -> None:
        self.store = store
        self.max_file_bytes = max_file_bytes
        self._sessions: dict[str, _Session] = {}

    def start(self, body: dict, headers: Any, fault_header: str | None = None) -> str:
        """Open a session for the ``{"file": {...}}`` start body; returns the upload id.

        ``fault_header`` (the start's ``X-Emulator-Fault``) is kept for the session's chunks.
        """
        meta = body.get("file") or {}
        declared = headers.get("x-goog-upload-header-content-length") or meta.get("sizeBytes")
        try:
            declared_size = int(declared) if declared not in (None, "") else None
        except ValueError:
            raise invalid(f"Invalid file size {declared!r}.") from None
        if declared_size is not None and declared_size > self.max_file_bytes:
            raise invalid(f"File size {declared_size} exceeds the maximum of {self.max_file_bytes} bytes.")
        mime_type = headers.get("x-goog-upload-header-content-type") or meta.get("mimeType")
        if not mime_type:
            raise invalid("* File.mime_type: mime type is not specified")
        display_name = meta.get("displayName")
        if display_name is not None and (not isinstance(display_name, str) or len(display_name) > MAX_DISPLAY_NAME_CHARS):
            raise invalid(f"* File.display_name: must be a string of at most {MAX_DISPLAY_NAME_CHARS} characters")
        file_id = self._choose_id(meta.get("name"))
        upload_id = secrets.token_urlsafe(32)
        self.store.upload_part(upload_id).touch()
        self.store.save_upload({
            "id": upload_id, "fileId": file_id, "displayName": display_name,
            "mimeType": mime_type, "declaredSize": declared_size, "createTime": time.time(),
            "faultHeader": fault_header,
        })
        return upload_id

    def _choose_id(self, name: str | None) -> str:
        if not name:
            return new_id(12)
        file_id = name.removeprefix("files/")
        if not _FILE_ID.match(file_id):
            raise invalid(f"Invalid file name {name!r}: use up to 40 lowercase letters, digits and dashes.")
        if file_id in self.store.files or any(u["fileId"] == file_id for u in self.store.uploads.values()):
            raise ApiError(409, f"File files/{file_id} already exists.", "ALREADY_EXISTS")
        return file_id

    async def chunk(self, upload_id: str, request: Request) -> ChunkResult:
        """Handle one POST to a session URL (``upload``, ``upload, finalize`` or ``query``)."""
        upload = self.store.uploads.get(upload_id)
        if upload is None:
            raise not_found("No such upload session (it finished, failed or never existed).")
        session = self._sessions.setdefault(upload_id, _Session())
        async with session.lock:
            commands = {c.strip() for c in request.headers.get("x-goog-upload-command", "upload").lower().split(",")}
            part = self.store.upload_part(upload_id)
            received = part.stat().st_size
            if "query" in commands:
                return ChunkResult("active", received)
            offset_header = request.headers.get("x-goog-upload-offset")
            offset = int(offset_header) if offset_header and offset_header.isdigit() else received
            if offset > received:
                raise invalid(f"Upload offset {offset} is past the {received} bytes received so far.")
            received = await self._write(upload_id, session, part, offset, request.stream())
            if "finalize" not in commands:
                if (received - offset) % CHUNK_GRANULARITY:
                    # Only the last chunk may be of any size; the others are whole granules, as the
                    # start answer said (X-Goog-Upload-Chunk-Granularity). Refused whole: not stored.
                    with open(part, "r+b") as out:
                        out.truncate(offset)
                    session.hashed = -1
                    raise invalid(f"Upload chunk of {received - offset} bytes at offset {offset} is not a multiple "
                                  f"of the chunk granularity ({CHUNK_GRANULARITY} bytes); only the chunk that "
                                  f"finalizes the upload may be smaller.")
                return ChunkResult("active", received)
            file = await run_in_threadpool(self._finalize, upload, session, part, received)
            self._sessions.pop(upload_id, None)
            return ChunkResult("final", received, file)

    async def whole(self, meta: Doc, headers: Any, chunks: AsyncIterator[bytes]) -> Doc:
        """A simple (raw) or multipart upload: one request opens the session, brings every byte and
        finalizes it. ``meta``: the File's fields (``mimeType``, ``displayName``, ``name``)."""
        upload_id = await run_in_threadpool(self.start, {"file": meta}, headers)
        upload = self.store.uploads[upload_id]
        session = self._sessions.setdefault(upload_id, _Session())
        try:
            async with session.lock:
                part = self.store.upload_part(upload_id)
                size = await self._write(upload_id, session, part, 0, chunks)
                return await run_in_threadpool(self._finalize, upload, session, part, size)
        except BaseException:
            self.store.delete_upload(upload_id)  # nobody can resume it: it had no session URL
            raise
        finally:
            self._sessions.pop(upload_id, None)

    async def _write(self, upload_id: str, session: _Session, part: Any, offset: int,
                     chunks: AsyncIterator[bytes]) -> int:
        position = offset
        with open(part, "r+b") as out:
            out.truncate(offset)  # a resent chunk replaces what it covered before
            out.seek(offset)
            if offset != session.hashed:
                session.hashed = -1  # not contiguous any more: hash the whole file at finalize
            async for data in chunks:
                position += len(data)
                if position > self.max_file_bytes:
                    self.store.delete_upload(upload_id)
                    self._sessions.pop(upload_id, None)
                    raise invalid(f"File exceeds the maximum of {self.max_file_bytes} bytes.")
                out.write(data)
                if session.hashed >= 0:
                    session.sha256.update(data)
            if session.hashed >= 0:
                session.hashed = position
        return position

    def _finalize(self, upload: Doc, session: _Session, part: Any, size: int) -> Doc:
        declared = upload.get("declaredSize")
        if declared is not None and declared != size:
            raise invalid(f"Upload finalized with {size} bytes but {declared} were announced.")
        if session.hashed != size:
            session.sha256 = hashlib.sha256()
            with open(part, "rb") as data:
                while block := data.read(1 << 20):
                    session.sha256.update(block)
        file_id = upload["fileId"]
        os.replace(part, self.store.blob(file_id))
        doc = {
            "id": file_id, "displayName": upload.get("displayName"), "mimeType": upload["mimeType"],
            "sizeBytes": size, "createTime": time.time(), "sha256": session.sha256.hexdigest(), "source": "UPLOADED",
        }
        self.store.save_file(doc)
        self.store.delete_upload(upload["id"])
        return doc
