"""The shapes of request bodies, checked the way Google's JSON front end checks them.

Google parses a request body into its protocol buffer messages before anything else looks at it.
A name no message has, or a value of the wrong type, is refused with 400 ``INVALID_ARGUMENT``, every
problem one line of the message and one ``BadRequest.fieldViolations`` entry::

    Invalid JSON payload received. Unknown name "temprature" at 'generation_config': Cannot find field.
    Invalid value at 'generation_config.temperature' (TYPE_FLOAT), "hot"

Field paths use the protocol buffer names (snake_case), ``[i]`` for list items and ``[i].value``
for the i-th entry of a map (``properties[3].value``). Either spelling of a name is accepted in a
body (``generationConfig`` or ``generation_config``), as Google's parser does.

The messages are not written out here: they are read from google-genai's own types (pydantic
models whose fields are the API's, in snake_case), so the emulator knows every field the SDK can
send. The SDK's types serve the Gemini API and Vertex AI alike; a field only Vertex AI knows is
accepted here too (the emulator errs on the side of accepting, never refusing what Google takes).
Where a request's wire form is not one SDK type (a GenerateContentRequest is the SDK's
``GenerateContentConfig`` split between the request and its ``generation_config``), the split is
spelled out below, with the SDK's names.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
import types as pytypes
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Union

import pydantic
from google.genai import types

from batchd.emulator.errors import ApiError

TYPE_URL = "type.googleapis.com/google.ai.generativelanguage.v1beta."
#: At most this many problems are reported for one body (Google lists many; a flood helps nobody).
MAX_VIOLATIONS = 20


@dataclass(frozen=True)
class Scalar:
    """A protocol buffer scalar; ``name`` is how Google's errors call it (``TYPE_FLOAT``)."""

    name: str


STRING, BOOL, INT, FLOAT, BYTES = (Scalar("TYPE_STRING"), Scalar("TYPE_BOOL"), Scalar("TYPE_INT32"),
                                   Scalar("TYPE_FLOAT"), Scalar("TYPE_BYTES"))


@dataclass(frozen=True)
class Enum:
    name: str
    values: frozenset[str]


@dataclass(frozen=True)
class Struct:
    """``google.protobuf.Struct``: any JSON object."""


@dataclass(frozen=True)
class Anything:
    """``google.protobuf.Value``, or a type the SDK leaves open: any JSON value."""


@dataclass(frozen=True)
class Repeated:
    item: Shape


@dataclass(frozen=True)
class Map:
    value: Shape


@dataclass(eq=False)
class Message:
    name: str
    #: By protocol buffer (snake_case) name; filled after creation, as messages nest in themselves.
    fields: dict[str, Shape] = field(default_factory=dict)
    #: Either spelling of a field's name → its snake_case name.
    names: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, shape: Shape) -> None:
        self.fields[name] = shape
        self.names[name] = name
        self.names[_camel(name)] = name


Shape = Union[Scalar, Enum, Struct, Anything, Repeated, Map, Message]


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


# -- shapes from google-genai's types -----------------------------------------------------------------

_messages: dict[type, Message] = {}


def message_of(model: type[pydantic.BaseModel], *, name: str | None = None, drop: frozenset[str] = frozenset(),
               extra: dict[str, Shape] | None = None) -> Message:
    """The message an SDK type stands for: its fields, less ``drop`` (the SDK's own, never sent), plus ``extra``."""
    if not drop and not extra and model in _messages:
        return _messages[model]
    message = Message(name or model.__name__)
    if not drop and not extra:
        _messages[model] = message  # before the fields: a Schema's items are a Schema
    for field_name, info in model.model_fields.items():
        if field_name not in drop:
            message.add(field_name, _shape(info.annotation))
    for field_name, shape in (extra or {}).items():
        message.add(field_name, shape)
    return message


def _shape(annotation: Any) -> Shape:
    origin = typing.get_origin(annotation)
    if origin in (Union, pytypes.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _shape(options[0]) if len(options) == 1 else Anything()
    if origin is list:
        return Repeated(_shape(typing.get_args(annotation)[0]))
    if origin is dict:
        value = typing.get_args(annotation)[1]
        return Struct() if value is Any else Map(_shape(value))
    if isinstance(annotation, type):
        if issubclass(annotation, pydantic.BaseModel):
            return message_of(annotation)
        if issubclass(annotation, enum.Enum):
            return Enum(annotation.__name__, frozenset(str(member.value).upper() for member in annotation))
        for python_type, scalar in ((bool, BOOL), (int, INT), (float, FLOAT), (str, STRING), (bytes, BYTES)):
            if issubclass(annotation, python_type):
                return scalar
    return Anything()


#: GenerateContentConfig fields that are the SDK's own and never reach the wire.
_SDK_ONLY = frozenset({"http_options", "should_return_http_response", "automatic_function_calling",
                       "automatic_continuation"})
#: GenerateContentConfig fields that sit on the request itself; the SDK moves every other one
#: into the request's generation_config.
_REQUEST_LEVEL = frozenset({"system_instruction", "tools", "tool_config", "safety_settings", "cached_content",
                            "labels", "service_tier", "store", "model_armor_config"})


@lru_cache(maxsize=None)
def generate_content_request() -> Message:
    config = types.GenerateContentConfig.model_fields
    generation_config = message_of(
        types.GenerationConfig, name="GenerationConfig",
        extra={name: _shape(info.annotation) for name, info in config.items()
               if name not in _SDK_ONLY | _REQUEST_LEVEL and name not in types.GenerationConfig.model_fields})
    fields: dict[str, Shape] = {"model": STRING, "contents": Repeated(message_of(types.Content)),
                                "generation_config": generation_config}
    fields.update({name: _shape(config[name].annotation) for name in sorted(_REQUEST_LEVEL) if name in config})
    request = Message("GenerateContentRequest")
    for name, shape in fields.items():
        request.add(name, shape)
    return request


@lru_cache(maxsize=None)
def count_tokens_request() -> Message:
    request = Message("CountTokensRequest")
    request.add("contents", Repeated(message_of(types.Content)))
    request.add("generate_content_request", generate_content_request())
    return request


@lru_cache(maxsize=None)
def batch_request_line() -> Message:
    """A line of a batch's JSONL input file, ``{"key", "request"}``, less its request (checked on its
    own, as a GenerateContentRequest or an EmbedContentRequest). A line that is a bare request is
    checked as a request."""
    line = Message("BatchRequestLine")
    line.add("key", STRING)
    line.add("request", Anything())
    line.add("metadata", Struct())
    return line


@lru_cache(maxsize=None)
def embed_content_request() -> Message:
    config = types.EmbedContentConfig.model_fields
    request = Message("EmbedContentRequest")
    request.add("model", STRING)
    request.add("content", message_of(types.Content))
    for name, info in config.items():
        if name not in _SDK_ONLY:
            request.add(name, _shape(info.annotation))
    return request


@lru_cache(maxsize=None)
def batch_create_request(kind: str) -> Message:
    """The body of ``batchGenerateContent`` (``kind`` "generate") or ``asyncBatchEmbedContent`` ("embed")."""
    inlined = Message("InlinedRequest" if kind == "generate" else "InlinedEmbedContentRequest")
    inlined.add("request", generate_content_request() if kind == "generate" else embed_content_request())
    inlined.add("metadata", Struct())
    requests = Message("InlinedRequests")
    requests.add("requests", Repeated(inlined))
    input_config = Message("InputConfig")
    input_config.add("file_name", STRING)
    input_config.add("requests", requests)
    batch = Message("GenerateContentBatch" if kind == "generate" else "EmbedContentBatch")
    for name, shape in (("model", STRING), ("name", STRING), ("display_name", STRING), ("input_config", input_config),
                        ("priority", INT), ("webhook_config", message_of(types.WebhookConfig))):
        batch.add(name, shape)
    body = Message("BatchGenerateContentRequest" if kind == "generate" else "AsyncBatchEmbedContentRequest")
    body.add("batch", batch)
    return body


# -- checking -----------------------------------------------------------------------------------------

@dataclass
class Violations:
    found: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str, description: str) -> None:
        if len(self.found) < MAX_VIOLATIONS:
            self.found.append((path, description))

    @property
    def full(self) -> bool:
        return len(self.found) >= MAX_VIOLATIONS

    def error(self) -> ApiError:
        details = [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [
            {"field": path, "description": description} if path else {"description": description}
            for path, description in self.found]}]
        return ApiError(400, "\n".join(description for _, description in self.found), "INVALID_ARGUMENT",
                        details=details)


def check(body: Any, message: Message, path: str = "") -> None:
    """Raise Google's 400 for every unknown name and mistyped value in ``body`` (a ``message``)."""
    violations = Violations()
    _check_message(body, message, path, violations)
    if violations.found:
        raise violations.error()


def violations_of(body: Any, message: Message, path: str = "") -> Violations:
    violations = Violations()
    _check_message(body, message, path, violations)
    return violations


_INTEGER = re.compile(r"-?\d+")


def _check_message(value: Any, message: Message, path: str, out: Violations) -> None:
    if not isinstance(value, dict):
        out.add(path, f"Invalid value at '{path}' ({TYPE_URL}{message.name}), {_quoted(value)}")
        return
    for key, item in value.items():
        if out.full:
            return
        name = message.names.get(key)
        if name is None:
            where = f" at '{path}'" if path else ""
            out.add(path, f'Invalid JSON payload received. Unknown name "{key}"{where}: Cannot find field.')
            continue
        if item is not None:  # null is "not set" in proto3 JSON
            _check_value(item, message.fields[name], f"{path}.{name}" if path else name, out)


def _check_value(value: Any, shape: Shape, path: str, out: Violations) -> None:
    if isinstance(shape, Message):
        _check_message(value, shape, path, out)
    elif isinstance(shape, Repeated):
        # A single value where a list is expected is taken as a list of one, as Google's parser does.
        for index, item in enumerate(value if isinstance(value, list) else [value]):
            if item is not None and not out.full:
                _check_value(item, shape.item, f"{path}[{index}]", out)
    elif isinstance(shape, Map):
        if not isinstance(value, dict):
            out.add(path, f"Invalid value at '{path}' (map), {_quoted(value)}")
            return
        for index, item in enumerate(value.values()):
            if item is not None and not out.full:
                _check_value(item, shape.value, f"{path}[{index}].value", out)
    elif isinstance(shape, Struct):
        if not isinstance(value, dict):
            out.add(path, f"Invalid value at '{path}' (type.googleapis.com/google.protobuf.Struct), {_quoted(value)}")
    elif isinstance(shape, Enum):
        if not (isinstance(value, str) and value.upper() in shape.values
                or isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(shape.values)):
            out.add(path, f"Invalid value at '{path}' ({TYPE_URL}{shape.name}), {_quoted(value)}")
    elif isinstance(shape, Scalar) and not _fits(value, shape):
        if shape is BYTES and isinstance(value, str):
            out.add(path, f"Invalid value at '{path}' (TYPE_BYTES), Base64 decoding failed for {_quoted(value)}")
        else:
            out.add(path, f"Invalid value at '{path}' ({shape.name}), {_quoted(value)}")


def _fits(value: Any, scalar: Scalar) -> bool:
    """proto3 JSON: numbers may come as strings, integers as integral floats; booleans are only true/false."""
    if scalar is STRING:
        return isinstance(value, str)
    if scalar is BOOL:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if scalar is INT:
        return (isinstance(value, int) or isinstance(value, float) and value.is_integer()
                or isinstance(value, str) and _INTEGER.fullmatch(value) is not None)
    if scalar is FLOAT:
        if isinstance(value, (int, float)):
            return True
        try:
            float(value)
        except (TypeError, ValueError):
            return False
        return isinstance(value, str)
    if scalar is BYTES:
        return isinstance(value, str) and _is_base64(value)
    return True


def _is_base64(text: str) -> bool:
    # Google takes both alphabets, with or without padding.
    try:
        base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _quoted(value: Any) -> str:
    """A value as Google's errors quote it (JSON, cut short if long)."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 200 else text[:200] + "…"
