"""Google API errors as the emulator answers them.

Every failure leaves the emulator as ``{"error": {"code": N, "message": "...", "status": "NAME"}}`` with
the matching HTTP status, the envelope Google's front end uses. No ``details`` list: google-genai parses
per-request errors into ``JobError(details: list[str])`` and Google's ``details`` objects would break it.
"""

from __future__ import annotations

#: HTTP status -> google.rpc.Code name, for the statuses the emulator produces or injects.
STATUS_NAMES: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ALREADY_EXISTS",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

#: The messages Google sends for the statuses a fault injects (so client logs look familiar).
DEFAULT_MESSAGES: dict[int, str] = {
    408: "Request timed out.",
    429: "Resource has been exhausted (e.g. check quota).",
    500: "An internal error has occurred. Please retry or report in "
         "https://developers.generativeai.google/guide/troubleshooting",
    502: "Bad gateway.",
    503: "The service is currently unavailable.",
    504: "Deadline expired before operation could complete.",
}


class ApiError(Exception):
    """A failure answered to the client; raised anywhere below the HTTP layer."""

    def __init__(self, code: int, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS_NAMES.get(code, "UNKNOWN")

    def envelope(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}

    def status_object(self) -> dict:
        """The google.rpc.Status form used for one failed request inside a batch."""
        return {"code": self.code, "message": self.message, "status": self.status}


def invalid(message: str) -> ApiError:
    return ApiError(400, message, "INVALID_ARGUMENT")


def not_found(message: str = "Requested entity was not found.") -> ApiError:
    return ApiError(404, message, "NOT_FOUND")


def injected(code: int) -> ApiError:
    """The error an ``http=`` fault answers with."""
    return ApiError(code, DEFAULT_MESSAGES.get(code, f"Emulated failure (HTTP {code})."))
