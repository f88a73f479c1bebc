"""The shapes of request bodies, checked the way Google's JSON front end checks them.

Google parses a request body into its protocol buffer messages before anything else looks at it.
A name no message has, or a value of the wrong type, is refused with 400 ``INVALID_ARGUMENT``, every
problem one line of the message and one ``BadRequest.fieldViolations`` entry::

    Invalid JSON payload received. Unknown name "temprature" at 'generation_config': Cannot find field.
    Invalid value at 'generation_config.temperature' (TYPE_FLOAT), "hot"

Field paths use the protocol buffer names (snake_case), ``[i]`` for list items and ``[i].value``
for the i-th entry of a map (``properties[3].value``). Either spelling of a name is accepted in a
body (``generationConfig`` or ``generation_config``), as Google's parser does.

The messages are not written by hand: they are read from google-genai's own types (pydantic
models whose fields are the API's, in snake_case), so the emulator knows every field the SDK can
send. The SDK's types serve the Gemini API and Vertex AI alike; a field only Vertex AI knows is
accepted here too (the emulator errs on the side of accepting, never refusing what Google takes).
Where a request's wire form is not one SDK type (a GenerateContentRequest is the SDK's
``GenerateContentConfig`` split between the request and its ``generation_config``), the split is
spelled out below, with the SDK's names.

Importing google-genai's types takes about a second and 25 MB, which every emulator start (one
per daemon test) would pay; so the messages are read from the SDK once, by ``python -m
batchd.reference``, into ``shapes.json`` beside this module, which the emulator loads (a test fails
when the file no longer matches the installed SDK).
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
import types as pytypes
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Union

from pathlib import Path

from batchd.emulator.errors import ApiError

if TYPE_CHECKING:
    import pydantic

#: The messages, as read from google-genai's types by :func:`read_sdk_types` (see the module).
SHAPES_FILE = Path(__file__).with_name("shapes.json")
TYPE_URL = "type.googleapis.com/google.ai.generativelanguage.v1beta."
#: At most this many problems are reported for one body (Google lists many; a flood helps nobody).
MAX_VIOLATIONS = 20


@dataclass(frozen=True)
class Scalar:
    """A protocol buffer scalar; ``name`` is how Google's errors call it (``TYPE_FLOAT``)."""

    name: str
    #: The Python types it takes without a closer look (any other value is judged by _fits).
    at_once: tuple[type, ...] = ()


STRING, BOOL, INT, FLOAT, BYTES = (Scalar("TYPE_STRING", (str,)), Scalar("TYPE_BOOL", (bool,)),
                                   Scalar("TYPE_INT32", (int,)), Scalar("TYPE_FLOAT", (int, float)),
                                   Scalar("TYPE_BYTES"))


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
    #: Either spelling of a field's name → its snake_case name and shape (one lookup per key checked).
    names: dict[str, tuple[str, Shape]] = field(default_factory=dict)
    #: Whether a value is a valid body of this message, compiled on first use (see _compile).
    valid: Callable[[Any], bool] | None = field(default=None, repr=False)

    def add(self, name: str, shape: Shape) -> None:
        self.fields[name] = shape
        self.names[name] = self.names[_camel(name)] = (name, shape)


Shape = Union[Scalar, Enum, Struct, Anything, Repeated, Map, Message]


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


# -- shapes from google-genai's types -----------------------------------------------------------------

#: GenerateContentConfig fields that are the SDK's own and never reach the wire.
_SDK_ONLY = frozenset({"http_options", "should_return_http_response", "automatic_function_calling",
                       "automatic_continuation"})
#: GenerateContentConfig fields that sit on the request itself; the SDK moves every other one
#: into the request's generation_config.
_REQUEST_LEVEL = frozenset({"system_instruction", "tools", "tool_config", "safety_settings", "cached_content",
                            "labels", "service_tier", "store", "model_armor_config"})


class _SdkReader:
    """Turns google-genai's pydantic types into messages, one per type, shared where types nest."""

    def __init__(self) -> None:
        self.messages: dict[str, Message] = {}

    def message(self, model: type[pydantic.BaseModel], *, name: str | None = None,
                extra: dict[str, Shape] | None = None) -> Message:
        name = name or model.__name__
        if name in self.messages:
            return self.messages[name]
        message = self.messages[name] = Message(name)  # before the fields: a Schema's items are a Schema
        for field_name, info in model.model_fields.items():
            message.add(field_name, self.shape(info.annotation))
        for field_name, shape in (extra or {}).items():
            message.add(field_name, shape)
        return message

    def new(self, name: str, fields: dict[str, Shape]) -> Message:
        message = self.messages[name] = Message(name)
        for field_name, shape in fields.items():
            message.add(field_name, shape)
        return message

    def shape(self, annotation: Any) -> Shape:
        import pydantic

        origin = typing.get_origin(annotation)
        if origin in (Union, pytypes.UnionType):
            options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            return self.shape(options[0]) if len(options) == 1 else Anything()
        if origin is list:
            return Repeated(self.shape(typing.get_args(annotation)[0]))
        if origin is dict:
            value = typing.get_args(annotation)[1]
            return Struct() if value is Any else Map(self.shape(value))
        if isinstance(annotation, type):
            if issubclass(annotation, pydantic.BaseModel):
                return self.message(annotation)
            if issubclass(annotation, enum.Enum):
                return Enum(annotation.__name__, frozenset(str(member.value).upper() for member in annotation))
            for python_type, scalar in ((bool, BOOL), (int, INT), (float, FLOAT), (str, STRING), (bytes, BYTES)):
                if issubclass(annotation, python_type):
                    return scalar
        return Anything()


def read_sdk_types() -> dict[str, Message]:
    """Every request message the emulator checks, read from the installed google-genai's types."""
    from google.genai import types

    sdk = _SdkReader()
    config = types.GenerateContentConfig.model_fields
    generation_config = sdk.message(
        types.GenerationConfig,
        extra={name: sdk.shape(info.annotation) for name, info in config.items()
               if name not in _SDK_ONLY | _REQUEST_LEVEL and name not in types.GenerationConfig.model_fields})
    content = sdk.message(types.Content)
    generate = sdk.new("GenerateContentRequest", {
        "model": STRING, "contents": Repeated(content), "generation_config": generation_config,
        **{name: sdk.shape(config[name].annotation) for name in sorted(_REQUEST_LEVEL) if name in config}})
    embed = sdk.new("EmbedContentRequest", {
        "model": STRING, "content": content,
        **{name: sdk.shape(info.annotation) for name, info in types.EmbedContentConfig.model_fields.items()
           if name not in _SDK_ONLY}})
    sdk.new("CountTokensRequest", {"contents": Repeated(content), "generate_content_request": generate})
    # A line of a batch's JSONL input file, less its request (checked on its own, as the batch's
    # kind says); a line that is a bare request is checked as a request.
    sdk.new("BatchRequestLine", {"key": STRING, "request": Anything(), "metadata": Struct()})
    sdk.new("CreateFileRequest", {"file": sdk.message(types.File)})
    webhook_config = sdk.message(types.WebhookConfig)
    for kind, request in (("Generate", generate), ("Embed", embed)):
        inlined = sdk.new(f"Inlined{kind}Request", {"request": request, "metadata": Struct()})
        requests = sdk.new(f"Inlined{kind}Requests", {"requests": Repeated(inlined)})
        input_config = sdk.new(f"{kind}InputConfig", {"file_name": STRING, "requests": requests})
        batch = sdk.new(f"{kind}ContentBatch", {
            "model": STRING, "name": STRING, "display_name": STRING, "input_config": input_config,
            "priority": INT, "webhook_config": webhook_config})
        sdk.new(f"Batch{kind}ContentRequest", {"batch": batch})
    return sdk.messages


# -- shapes.json --------------------------------------------------------------------------------------

def dump(messages: dict[str, Message]) -> str:
    """``messages`` as the text of shapes.json: each message's fields as JSON, in a stable order."""
    def encode(shape: Shape) -> Any:
        if isinstance(shape, Scalar):
            return shape.name
        if isinstance(shape, Enum):
            return {"enum": shape.name, "values": sorted(shape.values)}
        if isinstance(shape, Struct):
            return "google.protobuf.Struct"
        if isinstance(shape, Anything):
            return "google.protobuf.Value"
        if isinstance(shape, Repeated):
            return {"repeated": encode(shape.item)}
        if isinstance(shape, Map):
            return {"map": encode(shape.value)}
        return {"message": shape.name}

    document = {name: {field_name: encode(shape) for field_name, shape in sorted(message.fields.items())}
                for name, message in sorted(messages.items())}
    return json.dumps(document, indent=1, sort_keys=True) + "\n"


def load(text: str) -> dict[str, Message]:
    document = json.loads(text)
    messages = {name: Message(name) for name in document}
    scalars = {scalar.name: scalar for scalar in (STRING, BOOL, INT, FLOAT, BYTES)}
    scalars.update({"google.protobuf.Struct": Struct(), "google.protobuf.Value": Anything()})

    def decode(encoded: Any) -> Shape:
        if isinstance(encoded, str):
            return scalars[encoded]
        if "enum" in encoded:
            return Enum(encoded["enum"], frozenset(encoded["values"]))
        if "repeated" in encoded:
            return Repeated(decode(encoded["repeated"]))
        if "map" in encoded:
            return Map(decode(encoded["map"]))
        return messages[encoded["message"]]

    for name, fields in document.items():
        for field_name, encoded in fields.items():
            messages[name].add(field_name, decode(encoded))
    return messages


@lru_cache(maxsize=None)
def messages() -> dict[str, Message]:
    return load(SHAPES_FILE.read_text(encoding="utf-8"))


def generate_content_request() -> Message:
    return messages()["GenerateContentRequest"]


def embed_content_request() -> Message:
    return messages()["EmbedContentRequest"]


def count_tokens_request() -> Message:
    return messages()["CountTokensRequest"]


def batch_request_line() -> Message:
    return messages()["BatchRequestLine"]


def create_file_request() -> Message:
    """The JSON of an upload's start (resumable) or first part (multipart): ``{"file": File}``."""
    return messages()["CreateFileRequest"]


def batch_create_request(kind: str) -> Message:
    """The body of ``batchGenerateContent`` (``kind`` "generate") or ``asyncBatchEmbedContent`` ("embed")."""
    return messages()["BatchGenerateContentRequest" if kind == "generate" else "BatchEmbedContentRequest"]


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
    if (message.valid or _compile(message))(body):
        return  # the usual case (see _compile)
    violations = Violations()
    _check_message(body, message, path, violations)
    if violations.found:
        raise violations.error()


_INTEGER = re.compile(r"-?\d+")


def _check_message(value: Any, message: Message, path: str, out: Violations) -> None:
    if not isinstance(value, dict):
        out.add(path, f"Invalid value at '{path}' ({TYPE_URL}{message.name}), {_quoted(value)}")
        return
    for key, item in value.items():
        if out.full:
            return
        found = message.names.get(key)
        if found is None:
            where = f" at '{path}'" if path else ""
            out.add(path, f'Invalid JSON payload received. Unknown name "{key}"{where}: Cannot find field.')
            continue
        name, shape = found
        if item is None:  # null is "not set" in proto3 JSON
            continue
        if type(shape) is Scalar and type(item) in shape.at_once:  # the usual case: a string where one belongs
            continue
        _check_value(item, shape, f"{path}.{name}" if path else name, out)


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


# -- the fast path ------------------------------------------------------------------------------------
#
# Nearly every body is valid, and finding that out needs neither field paths nor a list of problems.
# So each message is compiled once into a test that only answers "valid or not", in closures that
# hold each message's fields by either spelling; a body it does not pass is walked again by
# _check_message, which finds the problems and words them. The test follows the same rules
# (_fits, the enum test, null for unset, one value for a list); where it is stricter than the walk,
# the walk decides, so only a test that passed something the walk refuses would be a bug.

#: Every type a JSON value parses to: what a google.protobuf.Value field takes without a call.
_JSON_TYPES = (dict, list, str, int, float, bool)


def _compile(message: Message) -> Callable[[Any], bool]:
    """``message.valid``, and that of every message it holds, compiled; each is set once complete."""
    compiled: dict[Message, Callable[[Any], bool]] = {}
    test = _message_test(message, compiled)
    for each, each_test in compiled.items():
        if each.valid is None:
            each.valid = each_test
    return test


def _message_test(message: Message, compiled: dict[Message, Callable[[Any], bool]]) -> Callable[[Any], bool]:
    known = message.valid or compiled.get(message)
    if known is not None:
        return known
    # Either spelling of a field → (the types taken without a call, the test of any other value).
    table: dict[str, tuple[tuple[type, ...], Callable[[Any], bool]]] = {}

    def valid(value: Any) -> bool:
        if not isinstance(value, dict):
            return False
        for key, item in value.items():
            entry = table.get(key)
            if entry is None:
                return False  # an unknown name
            if item is None or type(item) in entry[0]:  # null is "not set"; a string where one belongs
                continue
            if not entry[1](item):
                return False
        return True

    compiled[message] = valid  # before the fields: a Schema's items are a Schema
    for key, (_, shape) in message.names.items():
        table[key] = _test(shape, compiled)
    return valid


def _test(shape: Shape, compiled: dict[Message, Callable[[Any], bool]]) -> tuple[tuple[type, ...], Callable[[Any], bool]]:
    """For a value of ``shape``: the types it takes at once (no call) and the test of any other value."""
    if isinstance(shape, Message):
        return (), _message_test(shape, compiled)
    if isinstance(shape, Repeated):
        at_once, item_test = _test(shape.item, compiled)

        def valid_list(value: Any) -> bool:
            # A single value where a list is expected is taken as a list of one, as Google's parser does.
            for item in value if isinstance(value, list) else (value,):
                if item is not None and type(item) not in at_once and not item_test(item):
                    return False
            return True

        return (), valid_list
    if isinstance(shape, Map):
        at_once, value_test = _test(shape.value, compiled)

        def valid_map(value: Any) -> bool:
            if not isinstance(value, dict):
                return False
            for item in value.values():
                if item is not None and type(item) not in at_once and not value_test(item):
                    return False
            return True

        return (), valid_map
    if isinstance(shape, Struct):
        return (dict,), lambda value: isinstance(value, dict)
    if isinstance(shape, Enum):
        values, count = shape.values, len(shape.values)
        return (), lambda value: (isinstance(value, str) and value.upper() in values
                                  or isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count)
    if isinstance(shape, Scalar):
        return shape.at_once, lambda value: _fits(value, shape)
    return _JSON_TYPES, lambda value: True  # Anything
