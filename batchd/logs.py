"""Log lines for people and for journald, and the one place secrets are kept out of them.

Every line goes to stderr as ``key=value`` fields (``level=info logger=batchd msg="..."``, plus any
``extra={...}`` fields of the call), or as one JSON object per line with ``log_format = "json"``.
Under systemd (``$JOURNAL_STREAM`` names our stderr) lines carry no timestamp, since the journal
stamps them itself, and start with the ``<N>`` syslog priority prefix journald reads, so
``journalctl -p warning`` works. A traceback stays inside its record's line (newlines escaped), so
one event is one journal entry.

**Secrets.** :func:`register_secret` adds a value (the API key, a webhook secret, any
``SecretStr`` setting) to a process-wide registry; every formatted log line, and whatever else is
passed through :func:`redact` / :func:`redact_data` (``summary.json``, ``batchd config show``), has
those values replaced by ``***``. Redacting the formatted line, not the message, also covers
exception texts and third-party loggers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
MASK = "***"
#: Shorter values are not treated as secrets: masking "a" everywhere would garble every line.
_MIN_SECRET_LENGTH = 6

#: The registered secrets, longest first (one may contain another), with each one's form inside a JSON
#: string. Replaced whole on registration, so readers in other threads need no lock.
_secrets: tuple[str, ...] = ()
_secrets_in_json: tuple[str, ...] = ()
_secrets_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Never show ``value`` in a log line or in anything passed through :func:`redact`."""
    global _secrets, _secrets_in_json
    if value and len(value) >= _MIN_SECRET_LENGTH:
        with _secrets_lock:
            if value not in _secrets:
                _secrets = tuple(sorted({*_secrets, value}, key=len, reverse=True))
                _secrets_in_json = tuple(json.dumps(secret, ensure_ascii=False)[1:-1] for secret in _secrets)


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_data(value: Any) -> Any:
    """JSON-like data with every string redacted (keys too)."""
    if not _secrets:
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_data(key): redact_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(item) for item in value]
    return value


def redacted_json(value: Any) -> str:
    """``value`` as JSON (``ensure_ascii=False``), every string in it redacted (keys too).

    The JSON is written first and walked only when a secret shows in it: the journal writes JSON at every
    step of every job and almost never holds a secret, and a walk of every string redacted each of them
    (a fifth of the cost of a job's transitions under a burst). A match is not masked in the text itself,
    where it could be a number's digits or cross from one string to the next."""
    text = json.dumps(value, ensure_ascii=False)
    if any(secret in text for secret in _secrets) or any(secret in text for secret in _secrets_in_json):
        text = json.dumps(redact_data(value), ensure_ascii=False)
    return text


# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is a field.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# journald reads a leading "<N>" as the entry's syslog priority (systemd.exec, SyslogLevelPrefix=).
_SYSLOG_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class FailureRun:
    """A run of failures of one thing (a poll, a plugin's deliveries), said without flooding the log: the
    first failure of a run in full, the next ones summed up once every ``every`` seconds at most, and the
    run's end. An outage of hours is then a few lines, not one per attempt."""

    def __init__(self, every: float):
        self.every = every
        self.failures = 0  # in this run
        self._unsaid = 0  # since the last line
        self._said_at = float("-inf")  # time.monotonic()

    def failed(self) -> bool:
        """Count a failure; True when it is the first of a run, to be said in full."""
        self.failures += 1
        if self.failures == 1:
            self._said_at = time.monotonic()
            return True
        self._unsaid += 1
        return False

    def summary(self, *, now: bool = False) -> tuple[int, float] | None:
        """``(failures, seconds)`` since the last line, when they are to be summed up: ``every`` seconds after
        it, or ``now`` (at a stop); None otherwise."""
        seconds = time.monotonic() - self._said_at
        if not self._unsaid or not (now or seconds >= self.every):
            return None
        unsaid, self._unsaid, self._said_at = self._unsaid, 0, time.monotonic()
        return unsaid, seconds

    def say(self, logger: logging.Logger, what: str, many: str, extra: dict | None = None) -> None:
        """Count the failure ``what`` (a line, in full) and say it as a run is said: the first as it is, then
        ``many`` ("fetches failed") counted once every ``every`` seconds with the last one, the rest at DEBUG."""
        if self.failed():
            logger.warning("%s (further such failures are summed up every %g s)", what, self.every, extra=extra)
        elif summary := self.summary():
            logger.warning("%d more %s in the last %.0f s, %d in a row; the last: %s", summary[0], many, summary[1],
                           self.failures, what, extra=extra)
        else:
            logger.debug("%s", what, extra=extra)

    def succeeded(self) -> int:
        """The failures of the run this success ends (0: none), to say it is over."""
        failures, self.failures, self._unsaid = self.failures, 0, 0
        return failures


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _RECORD_ATTRS and not key.startswith("_")}


def _quoted(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    if text and not any(c in text for c in ' "=\\\n\r\t') and text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=False)  # quotes, and escapes newlines: one record, one line


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info logger=batchd msg="..." job=...``; no ``ts`` under journald."""

    def __init__(self, *, journald: bool = False):
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {}
        if not self.journald:
            fields["ts"] = _timestamp(record.created)
        fields["level"] = record.levelname.lower()
        fields["logger"] = record.name
        fields["msg"] = record.getMessage()
        fields.update(_extra_fields(record))
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        line = " ".join(f"{key}={_quoted(value)}" for key, value in fields.items())
        if self.journald:
            line = f"<{_SYSLOG_PRIORITY.get(record.levelname, 6)}>{line}"
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (unless under journald), ``level``, ``logger``, ``msg``, extras, ``exc``."""

    def __init__(self, *, journald: bool = False):
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {} if self.journald else {"ts": _timestamp(record.created)}
        data.update(level=record.levelname.lower(), logger=record.name, msg=record.getMessage())
        data.update(_extra_fields(record))
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(data, default=str, ensure_ascii=False))


_last_second: tuple[int, str] = (-1, "")  # the whole second formatted last: records come many a second


def _timestamp(created: float) -> str:
    global _last_second
    second, text = _last_second
    if int(created) != second:
        second, text = int(created), time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        _last_second = (second, text)
    return f"{text}.{int(created % 1 * 1000):03d}Z"


def under_journald(stream: TextIO | None = None, environ: dict | os._Environ | None = None) -> bool:
    """True if ``stream`` (stderr) is connected to the journal: ``$JOURNAL_STREAM`` names its device and inode."""
    value = (environ if environ is not None else os.environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


_handler: logging.Handler | None = None


def setup_logging(level: str = "INFO", fmt: str = "text", *, stream: TextIO | None = None) -> None:
    """Send every log record to stderr in ``fmt``; calling it again replaces the previous set-up."""
    global _handler
    stream = stream or sys.stderr
    journald = under_journald(stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(journald=journald) if fmt == "json" else KeyValueFormatter(journald=journald))
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    root.setLevel(level.upper())
    # The HTTP clients log every request at INFO: batchd's own lines say what matters.
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
