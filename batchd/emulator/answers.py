"""One request in, one answer out: validation shared by online routes and batch jobs.

The content of an answer comes from the pluggable responder (``responder.py``); this module checks
a request the way the real service does first, so online calls get a 400 and a bad line inside a
batch gets a per-request error instead of reaching the responder: its shape (``shapes.py``: unknown
names, mistyped values), then what Google checks beyond the shape (empty contents, roles, response
MIME types).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from batchd.emulator import shapes
from batchd.emulator.errors import ApiError, invalid
from batchd.emulator.files import referenced_file_id
from batchd.emulator.responder import Responder
from batchd.media import SUPPORTED_MIME_TYPES

ROLES = ("user", "model")
#: What ``response_mime_type`` may be, in the words of Google's error.
RESPONSE_MIME_TYPES = ("text/plain", "application/json", "application/xml", "application/yaml", "text/x.enum")


def check_generate_request(request: Any, where: str = "GenerateContentRequest", *, path: str = "",
                           shape: bool = True) -> None:
    """Raise the 400 Google answers ``request`` with, if any. ``path``: where the request sits in the
    body (for field paths); ``shape``: False when the whole body's shape was checked already."""
    if not isinstance(request, dict):
        raise invalid(f"* {where}: a GenerateContentRequest must be a JSON object.")
    if shape:
        shapes.check(request, shapes.generate_content_request(), path)
    contents = request.get("contents")
    if not contents:
        raise invalid(f"* {where}.contents: contents is not specified")
    if not isinstance(contents, list):
        raise invalid(f"* {where}.contents: must be a list of Content objects")
    for index, content in enumerate(contents):
        if not isinstance(content, dict) or not content.get("parts"):
            raise invalid(f"* {where}.contents[{index}].parts: contents.parts must not be empty.")
        if content.get("role") not in (None, "", *ROLES):
            raise invalid(f"Please use a valid role: {', '.join(ROLES)}.")
    generation_config = request.get("generationConfig") or {}
    mime_type = generation_config.get("responseMimeType") if isinstance(generation_config, dict) else None
    if mime_type not in (None, "", *RESPONSE_MIME_TYPES):
        allowed = ", ".join(f"`{name}`" for name in RESPONSE_MIME_TYPES[:-1])
        raise invalid(f"* {where}.generation_config.response_mime_type: allowed mimetypes are {allowed} and "
                      f"`{RESPONSE_MIME_TYPES[-1]}`.")


def check_embed_request(request: Any, where: str = "EmbedContentRequest", *, path: str = "",
                        shape: bool = True) -> None:
    if not isinstance(request, dict):
        raise invalid(f"* {where}: an EmbedContentRequest must be a JSON object.")
    if shape:
        shapes.check(request, shapes.embed_content_request(), path)
    content = request.get("content")
    if not isinstance(content, dict) or not content.get("parts"):
        raise invalid(f"* {where}.content: content is not specified")


def check_media_parts(request: dict, where: str = "GenerateContentRequest") -> None:
    """Refuse a part of a MIME type the models do not read, as Google does (400 "Unsupported MIME
    type"); an ``inlineData`` part must name its type, and hold at most 20 MB (a request's limit)."""
    for content in request.get("contents") or []:
        for part in (content or {}).get("parts") or [] if isinstance(content, dict) else []:
            if not isinstance(part, dict):
                continue
            for name in ("inlineData", "inline_data", "fileData", "file_data"):
                blob = part.get(name)
                if not isinstance(blob, dict):
                    continue
                mime = blob.get("mimeType", blob.get("mime_type"))
                if mime in (None, "") and name.startswith("inline"):
                    raise invalid(f"* {where}.contents.parts.inline_data.mime_type: mime type is not specified")
                if mime not in (None, "") and mime not in SUPPORTED_MIME_TYPES:
                    raise invalid(f"Unsupported MIME type: {mime}")
                data = blob.get("data")
                if name.startswith("inline") and isinstance(data, str) and len(data) > INLINE_DATA_MAX_CHARS:
                    raise invalid(f"* {where}: request payload size exceeds the limit: 20971520 bytes.")


#: base64 characters of 20 MB, the most a request can carry inline.
INLINE_DATA_MAX_CHARS = 20 * 1024 * 1024 * 4 // 3


def check_file_references(request: dict, file_exists: Callable[[str], bool]) -> None:
    """A part whose ``fileData.fileUri`` names a File that does not exist (never did, was deleted,
    or expired) is refused as ``files.get`` of it is: 403, as Google does not tell a missing file
    from someone else's."""
    for content in [*(request.get("contents") or []), request.get("systemInstruction")]:
        for part in (content or {}).get("parts") or [] if isinstance(content, dict) else []:
            file_data = part.get("fileData") if isinstance(part, dict) else None
            uri = file_data.get("fileUri") if isinstance(file_data, dict) else None
            file_id = referenced_file_id(uri) if isinstance(uri, str) else None
            if file_id is not None and not file_exists(file_id):
                raise ApiError(403, f"You do not have permission to access the File {file_id} or it may not exist.",
                               "PERMISSION_DENIED")


class Answerer:
    """Validates one request of a kind ("generate" or "embed") and asks the responder for the answer.
    ``file_exists(id)``: whether a File is there to be referenced (by default, every one is)."""

    def __init__(self, responder: Responder, file_exists: Callable[[str], bool] = lambda file_id: True) -> None:
        self.responder = responder
        self.file_exists = file_exists

    def generate(self, request: Any, model: str, path: str = "") -> dict:
        check_generate_request(request, path=path)
        check_media_parts(request)
        check_file_references(request, self.file_exists)
        return self.responder.generate(request, model)

    def embed(self, request: Any, model: str, path: str = "") -> dict:
        check_embed_request(request, path=path)
        return self.responder.embed(request, model)

    def answer(self, kind: str, request: Any, model: str) -> dict:
        return self.embed(request, model) if kind == "embed" else self.generate(request, model)
