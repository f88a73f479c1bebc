"""Google API errors as the emulator answers them.

Every failure leaves the emulator as ``{"error": {"code": N, "message": "...", "status": "NAME"}}`` with
the matching HTTP status, the envelope Google's front end uses, with Google's ``details`` where it sends
them: an ``ErrorInfo`` (reason ``API_KEY_INVALID``) for a key it does not know, and ``QuotaFailure``,
``Help`` and ``RetryInfo`` on a 429. A failed request inside a batch has no ``details``: google-genai
parses those into ``JobError(details: list[str])``, which Google's ``details`` objects would break.
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


#: Seconds a 429's ``RetryInfo`` asks the client to wait.
RETRY_DELAY_SECONDS = 2

_TYPE = "type.googleapis.com/google.rpc."


class ApiError(Exception):
    """A failure answered to the client; raised anywhere below the HTTP layer."""

    def __init__(self, code: int, message: str, status: str | None = None, details: list[dict] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS_NAMES.get(code, "UNKNOWN")
        self.details = details

    def envelope(self) -> dict:
        error = {"code": self.code, "message": self.message, "status": self.status}
        if self.details:
            error["details"] = self.details
        return {"error": error}

    def status_object(self) -> dict:
        """The google.rpc.Status form used for one failed request inside a batch."""
        return {"code": self.code, "message": self.message, "status": self.status}


def invalid(message: str) -> ApiError:
    return ApiError(400, message, "INVALID_ARGUMENT")


def not_found(message: str = "Requested entity was not found.") -> ApiError:
    return ApiError(404, message, "NOT_FOUND")


def injected(code: int) -> ApiError:
    """The error an ``http=`` fault answers with."""
    if code == 429:
        return quota_exhausted()
    return ApiError(code, DEFAULT_MESSAGES.get(code, f"Emulated failure (HTTP {code})."))


def invalid_api_key() -> ApiError:
    """What Google answers a key it does not know: 400, not 401, with the reason in an ErrorInfo."""
    message = "API key not valid. Please pass a valid API key."
    return ApiError(400, message, "INVALID_ARGUMENT", details=[
        {"@type": _TYPE + "ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com",
         "metadata": {"service": "generativelanguage.googleapis.com"}},
        {"@type": _TYPE + "LocalizedMessage", "locale": "en-US", "message": message},
    ])


def quota_exhausted(metric: str = "generate_content_requests", quota_id: str = "GenerateRequestsPerMinutePerProjectPerModel",
                    value: str = "emulated") -> ApiError:
    """A 429 as the Gemini API sends it: which quota, where to read about it, and when to retry."""
    return ApiError(429, DEFAULT_MESSAGES[429], "RESOURCE_EXHAUSTED", details=[
        {"@type": _TYPE + "QuotaFailure", "violations": [
            {"quotaMetric": f"generativelanguage.googleapis.com/{metric}", "quotaId": quota_id, "quotaValue": value}]},
        {"@type": _TYPE + "Help", "links": [
            {"description": "Learn more about Gemini API quotas", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
        {"@type": _TYPE + "RetryInfo", "retryDelay": f"{RETRY_DELAY_SECONDS}s"},
    ])
