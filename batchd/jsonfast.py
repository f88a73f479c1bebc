"""JSON text on the hot paths: by orjson where it can, by :mod:`json` for what orjson refuses.

A batch's answers come back as hundreds of kilobytes of JSON per get, and results, emulated outputs
and request bodies are encoded and decoded line by line, in threads that hold the GIL the loop waits
for. orjson decodes in half the time and encodes in a tenth. What it refuses and :mod:`json` takes
(an integer beyond 64 bits, ``NaN``, a lone surrogate) goes through :mod:`json`, so both functions
accept exactly what :mod:`json` accepts, and an error is worded by :mod:`json`. Used by batchd and by
its emulator alike.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(data: str | bytes) -> Any:
    """``json.loads(data)``."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps(value: Any) -> str:
    """Compact JSON (no spaces, non-ASCII kept as is): ``json.dumps(value, ensure_ascii=False,
    separators=(",", ":"))``."""
    try:
        return orjson.dumps(value).decode("utf-8")
    except TypeError:  # orjson.JSONEncodeError: an integer beyond 64 bits
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
