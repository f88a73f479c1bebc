"""One request in, one answer out: validation shared by online routes and batch jobs.

The content of an answer comes from the pluggable responder (``responder.py``); this module checks
a request the way the real service does first, so online calls get a 400 and a bad line inside a
batch gets a per-request error instead of reaching the responder.
"""

from __future__ import annotations

from typing import Any

from batchd.emulator.errors import invalid
from batchd.emulator.responder import Responder


def check_generate_request(request: Any, where: str = "GenerateContentRequest") -> None:
    if not isinstance(request, dict):
        raise invalid(f"* {where}: a GenerateContentRequest must be a JSON object.")
    contents = request.get("contents")
    if not contents:
        raise invalid(f"* {where}.contents: contents is not specified")
    if not isinstance(contents, list):
        raise invalid(f"* {where}.contents: must be a list of Content objects")
    for index, content in enumerate(contents):
        if not isinstance(content, dict) or not content.get("parts"):
            raise invalid(f"* {where}.contents[{index}].parts: contents.parts must not be empty.")


def check_embed_request(request: Any, where: str = "EmbedContentRequest") -> None:
    if not isinstance(request, dict):
        raise invalid(f"* {where}: an EmbedContentRequest must be a JSON object.")
    content = request.get("content")
    if not isinstance(content, dict) or not content.get("parts"):
        raise invalid(f"* {where}.content: content is not specified")


class Answerer:
    """Validates one request of a kind ("generate" or "embed") and asks the responder for the answer."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder

    def generate(self, request: Any, model: str) -> dict:
        check_generate_request(request)
        return self.responder.generate(request, model)

    def embed(self, request: Any, model: str) -> dict:
        check_embed_request(request)
        return self.responder.embed(request, model)

    def answer(self, kind: str, request: Any, model: str) -> dict:
        return self.embed(request, model) if kind == "embed" else self.generate(request, model)
