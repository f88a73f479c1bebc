"""Media inputs: files (PDF, images, audio, video, text) sent to the model beside a prompt.

A request's files come from its item (a folder input, or a CSV/JSONL column named by ``file_column``)
or from the task itself (:attr:`batchd.task.TaskRequest.files`). Each is resolved while the job is
built, in the build's thread (:class:`MediaResolver`):

- opened without following a symlink, one folder at a time from the inbox (``O_NOFOLLOW``), and
  checked through that descriptor: a regular file, at most :data:`MAX_FILE_BYTES`, of a supported
  MIME type (by its extension, else by its first bytes). Anything else fails that item only, with a
  clear error in its result; the job goes on.
- up to ``media_inline_max_bytes`` it goes into the request itself as an ``inlineData`` part (base64):
  cheaper than an upload, a listing and a delete for a small image.
- a larger one is copied into the job's spool under its SHA-256 (``media/<sha256>``), hashed as it is
  copied: what was checked and hashed is what is uploaded, whatever happens to the inbox's copy.
  Its request holds a ``fileData`` part naming it by a placeholder URI (``batchd-media:<sha256>``),
  replaced by the File's URI when the chunk is sent (:func:`resolve_request`).

The uploads themselves are the daemon's (see :mod:`batchd.daemon.media`): one per content hash,
display name ``batchd-media-<sha256>``, an intent in the journal (``media`` table) before it is made,
looked up by that name before uploading again, reused across chunks and jobs while the service keeps it.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import secrets
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchd import fs
from batchd.inbox import entry_kind

#: The Files API's limit for one file (2 GB).
MAX_FILE_BYTES = 2 * 1024**3
#: Default of ``media_inline_max_bytes``: files up to this size go inline (base64) in the request.
INLINE_MAX_BYTES = 64 * 1024
#: A file uploaded earlier is reused only while it has at least this long to live (Google keeps files
#: 48 h, and a batch may take 24 h before it runs): else it is uploaded again.
REUSE_MIN_SECONDS = 25 * 3600
#: The placeholder scheme of a ``fileData.fileUri`` in a built chunk, until the chunk is sent.
PLACEHOLDER = "batchd-media:"

#: The MIME types Gemini reads, by file extension (Google's "supported file formats" lists).
MIME_BY_SUFFIX = {
    ".pdf": "application/pdf",
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
    ".heic": "image/heic", ".heif": "image/heif",
    ".wav": "audio/wav", ".mp3": "audio/mp3", ".aiff": "audio/aiff", ".aac": "audio/aac",
    ".ogg": "audio/ogg", ".flac": "audio/flac",
    ".mp4": "video/mp4", ".mpeg": "video/mpeg", ".mpg": "video/mpg", ".mov": "video/mov", ".avi": "video/avi",
    ".flv": "video/x-flv", ".webm": "video/webm", ".wmv": "video/wmv", ".3gp": "video/3gpp",
    ".txt": "text/plain", ".md": "text/md", ".csv": "text/csv", ".html": "text/html", ".htm": "text/html",
    ".xml": "text/xml", ".rtf": "text/rtf", ".css": "text/css", ".js": "text/javascript", ".py": "text/x-python",
}
#: The MIME types a request part may carry: the ones batchd picks, and other names Google accepts for them.
SUPPORTED_MIME_TYPES = frozenset(MIME_BY_SUFFIX.values()) | {
    "audio/mpeg", "audio/x-wav", "text/markdown", "application/json", "application/x-javascript",
    "text/x-typescript", "application/x-typescript", "application/rtf", "application/x-python-code",
}

#: Leading bytes of the binary formats, for files whose extension is missing or unknown.
_MAGIC = (
    (b"%PDF-", "application/pdf"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"ID3", "audio/mp3"),
    (b"fLaC", "audio/flac"),
    (b"OggS", "audio/ogg"),
    (b"\x1a\x45\xdf\xa3", "video/webm"),
)
_SNIFF_BYTES = 16


class MediaError(Exception):
    """A file that cannot be sent: its item gets this error as its result (``code`` "bad_file")."""


def sniff(head: bytes) -> str | None:
    """The MIME type the first bytes of a file show, or None."""
    for magic, mime in _MAGIC:
        if head.startswith(magic):
            return mime
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head[4:8] == b"ftyp":
        return "video/mp4"
    return None


def mime_type_of(name: str, head: bytes) -> str:
    """A supported MIME type for a file named ``name`` starting with ``head`` (raises MediaError).

    The extension decides; a file whose extension is unknown is taken by its first bytes. A file
    whose first bytes show a different binary format than its extension says is refused: sent as
    what it is not, it would fail at the service, or be read wrong.
    """
    suffix = os.path.splitext(name)[1].lower()
    by_name = MIME_BY_SUFFIX.get(suffix)
    by_content = sniff(head)
    if by_name is None:
        if by_content is None:
            listed = ", ".join(sorted({s for s in MIME_BY_SUFFIX}))
            raise MediaError(f"unsupported file type {suffix or '(no extension)'!r}: the model reads {listed}")
        return by_content
    if by_content is not None and by_content.split("/")[0] != by_name.split("/")[0]:
        raise MediaError(f"its content is {by_content}, not the {by_name} its extension {suffix!r} says")
    return by_name


@dataclass(frozen=True, slots=True)
class MediaRef:
    """A resolved file part of a request."""

    sha256: str
    mime_type: str
    size: int
    #: base64 of the bytes when the file goes inline, else None (uploaded).
    inline_data: str | None = None

    def part(self) -> dict[str, Any]:
        """The request part: ``inlineData``, or ``fileData`` with the placeholder URI."""
        if self.inline_data is not None:
            return {"inlineData": {"mimeType": self.mime_type, "data": self.inline_data}}
        return {"fileData": {"mimeType": self.mime_type, "fileUri": PLACEHOLDER + self.sha256}}


def display_name(sha256: str) -> str:
    """The Files API display name of the upload of content ``sha256`` (how it is found again)."""
    return f"batchd-media-{sha256}"


def describe_name(name: str) -> str:
    """A file name for a message: one whose bytes are not UTF-8 shows them escaped."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


class MediaResolver:
    """Resolves the files of a job's requests (in its build thread); see the module's docstring.

    :param root: the folder files must stay in (the inbox); paths are relative to it.
    :param store: the job's ``media/`` folder in its spool, where uploaded files are kept by hash; None
        to check and size the files only, keeping nothing (an estimate before the build).
    """

    #: Resolutions kept, so the several requests of one item (an analysis) read its file once.
    CACHED = 64

    def __init__(self, root: Path, store: Path | None, *, inline_max_bytes: int = INLINE_MAX_BYTES,
                 max_bytes: int = MAX_FILE_BYTES) -> None:
        self.root = Path(root)
        self.store = Path(store) if store is not None else None
        self.inline_max_bytes = inline_max_bytes
        self.max_bytes = max_bytes
        self._cache: OrderedDict[str, MediaRef | MediaError] = OrderedDict()

    def resolve(self, reference: str, mime_type: str | None = None) -> MediaRef:
        """The part for the file ``reference`` names (relative to the root); raises MediaError."""
        key = f"{reference}\0{mime_type or ''}"
        cached = self._cache.get(key)
        if cached is None:
            try:
                cached = self._resolve(reference, mime_type)
            except MediaError as error:
                cached = error
            self._cache[key] = cached
            if len(self._cache) > self.CACHED:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        if isinstance(cached, MediaError):
            raise cached
        return cached

    def _resolve(self, reference: str, mime_type: str | None) -> MediaRef:
        shown = describe_name(reference)
        if not reference or "\0" in reference:
            raise MediaError("an empty file name, or one with a NUL character")
        parts = Path(reference).parts
        if Path(reference).is_absolute() or ".." in parts:
            raise MediaError(f"{shown}: give a path inside the inbox, relative to the manifest (no '..')")
        try:
            fd = _open_beneath(self.root, parts)
        except MediaError as error:
            raise MediaError(f"{shown}: {error}") from None
        try:
            return self._read(fd, parts[-1], mime_type, shown)
        except OSError as error:
            if self.store is not None and error.filename is not None and str(error.filename).startswith(str(self.store)):
                raise  # writing the job's spool (a full disk): the build is tried again, as for its chunks
            raise MediaError(f"{shown}: cannot be read: {error.strerror or error}") from None

    def _read(self, fd: int, name: str, mime_type: str | None, shown: str) -> MediaRef:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise MediaError(f"{shown}: not a regular file ({_kind(st.st_mode)})")
        with open(fd, "rb", buffering=0) as file:
            if st.st_nlink != 1:
                # A hard link may name a file its dropper cannot read: batchd would send it to the service.
                raise MediaError(f"{shown}: a file with {st.st_nlink} hard links; batchd reads only files with one")
            if st.st_size > self.max_bytes:
                raise MediaError(f"{shown}: {st.st_size:,} bytes, larger than the {self.max_bytes:,} bytes a file "
                                 f"may have (the Files API's limit)")
            if st.st_size == 0:
                raise MediaError(f"{shown}: the file is empty")
            head = file.read(_SNIFF_BYTES)
            try:
                mime = mime_type or mime_type_of(name, head)
            except MediaError as error:
                raise MediaError(f"{shown}: {error}") from None
            if mime not in SUPPORTED_MIME_TYPES:
                raise MediaError(f"{shown}: MIME type {mime!r} is not one the model reads")
            if self.store is None:
                return MediaRef("", mime, st.st_size)  # checked and sized: all an estimate needs
            if st.st_size <= self.inline_max_bytes:
                data = head + file.read(self.inline_max_bytes + 1 - len(head))
                if len(data) > self.inline_max_bytes:
                    raise MediaError(f"{shown}: the file grew while it was read")
                return MediaRef(hashlib.sha256(data).hexdigest(), mime, len(data),
                                base64.b64encode(data).decode("ascii"))
            return self._keep(file, head, mime, shown)

    def _keep(self, file, head: bytes, mime: str, shown: str) -> MediaRef:
        """Copy the file into the store while hashing it (bounded memory); its hash names the copy."""
        self.store.mkdir(parents=True, exist_ok=True)
        temporary = self.store / f".part-{secrets.token_hex(8)}"
        digest = hashlib.sha256(head)
        size = len(head)
        try:
            with fs.naming(temporary), open(temporary, "xb") as out:
                out.write(head)
                while True:
                    try:
                        block = file.read(1 << 20)
                    except OSError as error:  # the source, not the spool
                        raise MediaError(f"{shown}: cannot be read: {error.strerror or error}") from None
                    if not block:
                        break
                    size += len(block)
                    if size > self.max_bytes:
                        raise MediaError(f"{shown}: grew past {self.max_bytes:,} bytes while it was read")
                    digest.update(block)
                    out.write(block)
                out.flush()
                fs.fsync(out.fileno(), temporary, "requests")
            sha256 = digest.hexdigest()
            os.replace(temporary, self.store / sha256)
        finally:
            temporary.unlink(missing_ok=True)
        return MediaRef(sha256, mime, size)


def _open_beneath(root: Path, parts: tuple[str, ...]) -> int:
    """A descriptor of the file ``parts`` names under ``root``, reached one folder at a time without
    following a symlink, opened ``O_NONBLOCK`` (a FIFO opens at once and is refused by its type)."""
    folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            try:
                inner = os.open(part, flags, dir_fd=folder)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    raise MediaError("a symlink: batchd never follows one") from None
                if error.errno == errno.ENOTDIR:
                    raise MediaError(f"{describe_name(part)!r} is not a folder") from None
                if error.errno == errno.ENOENT:
                    raise MediaError("no such file") from None
                raise MediaError(f"cannot be opened: {error.strerror}") from None
            os.close(folder)
            folder = inner
        return folder
    except BaseException:
        os.close(folder)
        raise


#: How an error names an entry that is no regular file (batchd.inbox.entry_kind's words for it).
_KINDS = {"symlink": "a symlink", "directory": "a folder", "fifo": "a FIFO", "socket": "a socket",
          "device": "a device"}


def _kind(mode: int) -> str:
    return _KINDS.get(entry_kind(mode), "not a file")


def media_hashes(request: dict[str, Any]) -> set[str]:
    """The content hashes a built request line's placeholder ``fileData`` parts name."""
    found = set()
    for content in request.get("contents") or ():
        for part in content.get("parts") or ():
            uri = (part.get("fileData") or {}).get("fileUri", "") if isinstance(part, dict) else ""
            if uri.startswith(PLACEHOLDER):
                found.add(uri[len(PLACEHOLDER):])
    return found


def resolve_request(request: dict[str, Any], uris: dict[str, str]) -> dict[str, Any]:
    """The request with each placeholder ``fileData.fileUri`` replaced by its File's URI (in place)."""
    for content in request.get("contents") or ():
        for part in content.get("parts") or ():
            file_data = part.get("fileData") if isinstance(part, dict) else None
            uri = file_data.get("fileUri", "") if isinstance(file_data, dict) else ""
            if uri.startswith(PLACEHOLDER):
                try:
                    file_data["fileUri"] = uris[uri[len(PLACEHOLDER):]]
                except KeyError:
                    raise RuntimeError(f"no uploaded file is recorded for {uri}") from None
    return request
