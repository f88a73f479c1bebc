"""Wire-format helpers: field-name normalization, timestamps, ids, int64 fields and counters.

Google's protobuf-JSON front end accepts both ``camelCase`` and ``snake_case`` field names, and
google-genai really sends both (``{"file": {"display_name": ...}}``, ``thinkingConfig:
{"thinking_budget": 0}``, ``inputConfig: {"file_name": ...}``). The emulator normalizes request
bodies to camelCase once, on the way in, so everything behind it reads one spelling.

Normalization is field-aware: names that are *data* are never renamed. Those are the keys of
``metadata`` and ``labels`` maps, function-call ``args`` and function-response ``response`` structs,
property names inside a schema's ``properties``, and everything inside a JSON Schema
(``responseJsonSchema``, ``parametersJsonSchema``), whose keywords are camelCase by definition.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

#: A JSON object key in snake_case, found on the raw bytes. A quote inside a JSON string is always
#: escaped (``\"``), so this cannot match inside a string value: no match means no snake_case key.
_SNAKE_KEY = re.compile(rb'"[a-z][a-z0-9]*_[a-z0-9_]*"\s*:')

#: Fields whose whole value is user data (a Struct or a JSON Schema) and is passed on untouched.
_OPAQUE_FIELDS = frozenset({"metadata", "labels", "args", "responseJsonSchema", "parametersJsonSchema"})

#: Fields whose value maps user-chosen names to schemas: keep the names, normalize the schemas.
_NAMED_SCHEMA_FIELDS = frozenset({"properties"})

_ID_ALPHABET = string.ascii_lowercase + string.digits


def has_snake_case_keys(raw: bytes) -> bool:
    """Cheap pre-check on a raw JSON document; False means :func:`to_camel_case` would change nothing."""
    # No underscore at all (memchr-fast) is the usual case and rules every snake_case key out.
    return b"_" in raw and _SNAKE_KEY.search(raw) is not None


@lru_cache(maxsize=4096)
def camel(name: str) -> str:
    """``max_output_tokens`` -> ``maxOutputTokens``; names without an inner ``_`` are unchanged."""
    if "_" not in name.strip("_"):
        return name
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def to_camel_case(value: Any, field: str | None = None) -> Any:
    """Rename every protobuf field name in a request body to camelCase (see module doc)."""
    if isinstance(value, dict):
        if field in _NAMED_SCHEMA_FIELDS:
            return {name: to_camel_case(schema) for name, schema in value.items()}
        normalized = {}
        for key, item in value.items():
            name = camel(key)
            if name in _OPAQUE_FIELDS or (field == "functionResponse" and name == "response"):
                normalized[name] = item
            else:
                normalized[name] = to_camel_case(item, name)
        return normalized
    if isinstance(value, list):
        return [to_camel_case(item, field) for item in value]
    return value


def get_field(mapping: dict, camel: str, snake: str, default: Any = None) -> Any:
    """``mapping[camel]``, else ``mapping[snake]``: a body handed to a Responder directly (not through
    :func:`to_camel_case`) may spell its fields either way, as google-genai does."""
    value = mapping.get(camel)
    if value is None:
        value = mapping.get(snake, default)
    return value


def as_int(value: Any) -> int | None:
    """int64 fields arrive as JSON strings (``"3"``, e.g. an OpenAPI schema's ``minItems``); accept
    both, and give None for anything that is not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            return None


def compact_json_encoder() -> Callable[[Any], str]:
    """``json.dumps(value, ensure_ascii=False, separators=(",", ":"), check_circular=False)``, as one
    encoder built once.

    ``JSONEncoder.encode`` builds a new C encoder on every call, which is more than a third of the time
    for an answer-sized value; this builds that same C encoder once and calls it as ``encode`` does (the
    text is the same). Without the C accelerator, ``encode`` itself does the work.
    """
    encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
    make_encoder = json.encoder.c_make_encoder
    if make_encoder is None:
        return encoder.encode
    # No markers: check_circular is off (a shared markers dict would outlive a failed call).
    chunks = make_encoder(None, encoder.default, json.encoder.encode_basestring, encoder.indent,
                          encoder.key_separator, encoder.item_separator, encoder.sort_keys, encoder.skipkeys,
                          encoder.allow_nan)
    join = "".join
    return lambda value: join(chunks(value, 0))


def rfc3339(timestamp: float, *, nanoseconds: bool = False) -> str:
    """Google's timestamp format: UTC with a ``Z`` suffix; 6 fractional digits (as File resources carry)
    or, with ``nanoseconds``, 9 (as batch operations carry: ``2025-12-10T18:27:01.407650525Z``)."""
    text = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    if nanoseconds:  # a float holds no more than microseconds: the rest is what a clock's nanoseconds read
        text += f"{int(timestamp * 1e9) % 1000:03d}"
    return text + "Z"


def new_id(length: int) -> str:
    """A random lowercase alphanumeric id, the shape of Google's batch (36) and file (12) ids."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def int64_counts(**counts: int) -> dict[str, str]:
    """proto3 JSON for int64 counters: decimal strings, zero-valued fields omitted."""
    return {name: str(count) for name, count in counts.items() if count}


def double_quoted(text: str) -> str:
    """``text`` with its single-quoted JSON strings rewritten as double-quoted ones (``{'a': 'it\'s'}``
    → ``{"a": "it's"}``), as Google's proto-JSON parser accepts them. Double-quoted strings are kept as
    they are; the result is for ``json.loads``, which still judges everything else."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == '"':  # a double-quoted string is copied whole, escapes included
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif char == "'":
            j, value = i + 1, []
            while j < n and text[j] != "'":
                if text[j] == "\\" and j + 1 < n:
                    # \' is a quote; every other escape means what it means in JSON
                    width = 6 if text[j + 1] == "u" else 2
                    escape = text[j:j + width]
                    value.append("'" if escape == "\\'" else json.loads(f'"{escape}"'))
                    j += width
                else:
                    value.append(text[j])
                    j += 1
            out.append(json.dumps("".join(value), ensure_ascii=False))
            i = j + 1
        else:
            out.append(char)
            i += 1
    return "".join(out)
