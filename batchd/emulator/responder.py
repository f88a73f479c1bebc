"""Answers for the local Gemini Batch API emulator.

The emulator's HTTP layer hands every request of a batch to a :class:`Responder`. The default,
:class:`EmulatedResponder`, answers instantly and deterministically, so that batchd (and anything
else that speaks the Gemini Batch API) can be exercised end to end without a network or a key.
Another responder, e.g. one backed by a local model, can be plugged in instead; it only has to
implement the three methods of :class:`Responder`.

Rules of the emulated answers (documented in docs/emulator.md):

* **Deterministic.** The answer is a pure function of the model name and the request: a
  BLAKE2b digest of the model name, the system instruction, every part of ``contents`` and the
  sampling settings (``temperature``, ``topP``, ``topK``, ``seed``, penalties) seeds all choices
  (never Python's randomized ``hash()``). The same request gives byte-identical output in every
  process and on every run; another ``seed`` or temperature gives another answer.
  ``maxOutputTokens`` and ``stopSequences`` only cut that same answer.
* **Marked.** Plain-text answers start with ``[emulated <model>] `` (see :data:`MARKER_TEMPLATE`),
  then echo the prompt (its first and last words) and add a few filler words picked from the
  digest. In JSON mode every free string starts with ``emulated``. Every ``responseId`` starts with
  ``emu-``.
* **Token estimate.** ``ceil(characters / 4)`` per text part (characters = Unicode code points; an
  empty part counts 0), plus :data:`NON_TEXT_PART_TOKENS` (258, what Gemini charges for an image)
  per non-text part (``inlineData``, ``fileData``, ``functionCall``, ...). ``promptTokenCount``
  covers ``contents`` and ``systemInstruction``; ``candidatesTokenCount`` applies the same rule
  to the answer text(s); ``totalTokenCount`` is their sum. ``count_tokens`` uses the same rule.
* **maxOutputTokens.** An answer longer than ``maxOutputTokens * 4`` characters is cut to that
  length and gets ``finishReason: MAX_TOKENS`` (so ``candidatesTokenCount <= maxOutputTokens``);
  otherwise ``finishReason`` is ``STOP``. In JSON mode a smaller instance (only required
  properties, minimal arrays, short strings) is tried first; only if that does not fit either is
  the JSON text cut, which leaves invalid JSON, as the real service does.
* **stopSequences.** The text is cut before the first occurrence of any stop sequence
  (``finishReason: STOP``).
* **candidateCount** (1..8) gives that many different candidates, ``index`` 0..n-1;
  ``candidatesTokenCount`` is their sum. ``promptTokensDetails`` splits ``promptTokenCount`` by
  modality (TEXT; IMAGE, AUDIO, VIDEO, DOCUMENT by a part's MIME type). Thinking is not emulated (no
  ``thoughtsTokenCount``).
* **JSON mode** (``responseMimeType: application/json``): with ``responseSchema`` (OpenAPI subset,
  upper- or lower-case types, ``nullable``, ``propertyOrdering``) or ``responseJsonSchema`` (JSON
  Schema) the text is compact JSON valid against the schema; without a schema it is
  ``{"emulated":true,"text":"<plain-text answer>"}``. ``text/x.enum`` returns one enum value.
* **Embeddings.** A unit-norm vector (L2 norm 1) of ``outputDimensionality`` floats derived from
  a SHAKE-256 stream of the text's digest. Default dimension: 3072 for ``gemini-embedding-*``
  models (as the real service), 768 for any other model; requested sizes are clamped to 1..3072.

The responder never raises on odd input: unknown parts, unknown schema keywords and unresolvable
``$ref``s degrade to something reasonable.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import marshal
import math
import re
import re._constants as _re_constants  # sre internals: stable since 3.11, used to walk a pattern
import re._parser as _re_parser
import struct
import uuid
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from batchd.emulator.models import thinks
from batchd.emulator.wire import compact_json_encoder

__all__ = [
    "Responder",
    "EmulatedResponder",
    "MARKER_TEMPLATE",
    "NON_TEXT_PART_TOKENS",
    "estimate_tokens",
    "load_responder",
]

#: Prefix of every plain-text answer; ``{model}`` is the model name without ``models/``.
MARKER_TEMPLATE = "[emulated {model}] "
#: Tokens counted for each part that is not text (inline data, file data, function calls...).
NON_TEXT_PART_TOKENS = 258
#: Largest embedding size the real API offers; larger requests are clamped to it.
MAX_EMBEDDING_DIMENSION = 3072

_M64 = 0xFFFFFFFFFFFFFFFF
# Prebuilt encoders: json.dumps with non-default arguments builds a new encoder per call.
_compact_json = compact_json_encoder()
_sorted_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode
_SEP = b"\x1f"
# generationConfig fields that change *which* answer is sampled; other fields (maxOutputTokens,
# stopSequences, schemas...) only shape or cut the same answer.
_SAMPLING_KEYS = {
    "temperature": "temperature", "topP": "topP", "top_p": "topP", "topK": "topK",
    "top_k": "topK", "seed": "seed", "presencePenalty": "presencePenalty",
    "presence_penalty": "presencePenalty", "frequencyPenalty": "frequencyPenalty",
    "frequency_penalty": "frequencyPenalty",
}
# Filler vocabulary: 64 words, so one digest byte picks one word with `& 63`.
_WORDS = (
    "amber", "harbor", "signal", "meadow", "copper", "lantern", "river", "quartz",
    "willow", "ember", "falcon", "granite", "horizon", "indigo", "juniper", "kestrel",
    "lattice", "marble", "nectar", "orchid", "pebble", "quiver", "rustle", "saffron",
    "thistle", "umber", "velvet", "wander", "yonder", "zephyr", "anchor", "bramble",
    "cinder", "drift", "echo", "fjord", "glimmer", "hollow", "island", "jasper",
    "kindle", "lumen", "mosaic", "nimbus", "onyx", "prism", "quill", "ripple",
    "summit", "tundra", "upland", "vertex", "whisper", "yarrow", "zenith", "basalt",
    "cobalt", "dune", "estuary", "fern", "gale", "heron", "ivory", "jade",
)


def estimate_tokens(text: str) -> int:
    """Token estimate of one text: ceil(characters / 4); 0 for an empty string."""
    return (len(text) + 3) // 4


@runtime_checkable
class Responder(Protocol):
    """What the emulator asks for each request of a batch (REST camelCase JSON dicts)."""

    def generate(self, request: dict, model: str) -> dict:
        """Answer one GenerateContentRequest with a GenerateContentResponse dict."""
        ...

    def embed(self, request: dict, model: str) -> dict:
        """Answer one EmbedContentRequest: ``{"embedding": {"values": [...]}, "tokenCount": "N"}``."""
        ...

    def count_tokens(self, contents: list) -> int:
        """Token count of ``contents`` (a list of Content dicts; strings are accepted too)."""
        ...


def load_responder(spec: str) -> Responder:
    """Load a responder from ``"package.module:attribute"``; a class or factory is called."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"responder spec must look like 'package.module:attribute', got {spec!r}")
    target: Any = importlib.import_module(module_name)
    for name in attribute.split("."):
        target = getattr(target, name)
    # A class (which itself looks like a Responder) or a factory is called to get the instance.
    if isinstance(target, type) or (callable(target) and not isinstance(target, Responder)):
        target = target()
    responder = target
    if not isinstance(responder, Responder):
        raise TypeError(f"{spec} is not a Responder (needs generate, embed and count_tokens)")
    return responder


# --------------------------------------------------------------------------------------------
# small helpers


class _Rng:
    """64-bit LCG (Knuth's MMIX constants) using the high bits: one multiplication per draw,
    identical on every platform, and far cheaper to seed than random.Random. Plenty for
    picking enum values and filler words; this is not a statistical generator."""

    __slots__ = ("state", "active")

    def __init__(self, seed: int) -> None:
        self.state = seed & _M64
        self.active: dict[str, int] = {}  # $ref -> current recursion level (see _ref)

    def next(self) -> int:
        """32 random bits."""
        self.state = state = (self.state * 6364136223846793005 + 1442695040888963407) & _M64
        return state >> 32

    def below(self, n: int) -> int:
        """An int in [0, n)."""
        if n <= 1:
            return 0
        self.state = state = (self.state * 6364136223846793005 + 1442695040888963407) & _M64
        if n <= 0xFFFFFFFF:
            return ((state >> 32) * n) >> 32
        return state % n

    def word(self) -> str:
        self.state = state = (self.state * 6364136223846793005 + 1442695040888963407) & _M64
        return _WORDS[state >> 58]


def _get(mapping: dict, camel: str, snake: str, default: Any = None) -> Any:
    value = mapping.get(camel)
    if value is None:
        value = mapping.get(snake, default)
    return value


def _as_int(value: Any) -> int | None:
    """int64 fields arrive as JSON strings in the OpenAPI schema ("3"); accept both."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            return None


def _as_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _model_name(model: str) -> str:
    return model.rpartition("/")[2] if model else "model"


def _as_contents(contents: Any) -> list:
    """Normalize contents: a string, one Content dict or a list of Contents/strings/parts."""
    if contents is None:
        return []
    if isinstance(contents, str):
        return [{"parts": [{"text": contents}]}]
    if isinstance(contents, dict):
        return [contents] if "parts" in contents else [{"parts": [contents]}]
    return contents


def _iter_parts(content: Any) -> list:
    if isinstance(content, str):
        return [{"text": content}]
    if isinstance(content, dict):
        parts = content.get("parts")
        if parts is None:
            return [content] if content else []
        if isinstance(parts, (str, dict)):
            return [parts]
        return parts
    return []


def _modality(part: object) -> str:
    """The ``promptTokensDetails`` modality a non-text part counts under: by its MIME type (inline or file
    data), else TEXT (a function call or response is text to the model)."""
    if isinstance(part, dict):
        data = part.get("inlineData") or part.get("inline_data") or part.get("fileData") or part.get("file_data")
        mime = str(_get(data, "mimeType", "mime_type") or "") if isinstance(data, dict) else ""
        for prefix, modality in (("image/", "IMAGE"), ("audio/", "AUDIO"), ("video/", "VIDEO"),
                                 ("application/pdf", "DOCUMENT")):
            if mime.startswith(prefix):
                return modality
    return "TEXT"


def _part_hash_bytes(part: Any) -> bytes:
    """Stable bytes for a non-text part (only these, rare, pay for sorted JSON)."""
    try:
        return _sorted_json(part).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return repr(part).encode("utf-8", "surrogatepass")


def _echo(text: str) -> str:
    """First and last words of the prompt, so a reader can tell what the answer was for."""
    words = text.split(None, 12)
    if len(words) <= 12:
        echo = " ".join(words)
    else:
        tail = text.rsplit(None, 6)[-6:]
        echo = " ".join(words[:6]) + " ... " + " ".join(tail)
    if len(echo) > 96:
        echo = echo[:93] + "..."
    return echo or "(no text)"


# --------------------------------------------------------------------------------------------
# JSON instances from schemas

# A generator takes (rng, minimal) and returns one JSON value; `minimal` asks for the smallest
# instance (required properties only, minItems, short strings).
_Gen = Callable[[_Rng, bool], Any]
_RECURSION_LEVELS = 2  # a $ref nested this deep inside itself emits only its minimal instance
_MAX_RECURSION = 16  # hard stop for schemas that require infinite recursion


class _SchemaCompiler:
    """Turns a JSON Schema or Gemini OpenAPI schema into a generator closure (compiled once)."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.refs: dict[str, _Gen] = {}

    # -- dispatch
    def compile(self, schema: Any, label: str = "") -> _Gen:
        if schema is True or schema is None or not isinstance(schema, dict):
            if schema is False:
                return lambda rng, minimal: None
            return self._string({}, label)
        ref = schema.get("$ref")
        if ref is None:
            ref = schema.get("ref")
            if not (isinstance(ref, str) and ref.startswith("#")):
                ref = None
        if isinstance(ref, str):
            return self._ref(ref, label)
        if "const" in schema:
            const = schema["const"]
            return lambda rng, minimal: const
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            choices = self._typed_enum(enum, schema.get("type"))
            return lambda rng, minimal: choices[rng.below(len(choices))]
        all_of = _get(schema, "allOf", "all_of")
        if isinstance(all_of, list) and all_of:
            return self.compile(self._merge_all_of(schema, all_of), label)
        for camel, snake in (("anyOf", "any_of"), ("oneOf", "one_of")):
            branches = _get(schema, camel, snake)
            if isinstance(branches, list) and branches:
                return self._any_of(schema, branches, camel, snake, label)
        return self._typed(schema, label)

    @staticmethod
    def _typed_enum(enum: list, raw_type: Any) -> tuple:
        """Enum values that fit the declared type; numeric strings become numbers for
        INTEGER/NUMBER (the OpenAPI subset only has string enums)."""
        type_name = raw_type.lower() if isinstance(raw_type, str) else None
        if type_name in ("integer", "number"):
            numbers = []
            for value in enum:
                try:
                    number = float(value) if not isinstance(value, bool) else None
                except (TypeError, ValueError):
                    number = None
                if number is not None and (type_name == "number" or number.is_integer()):
                    numbers.append(int(number) if number.is_integer() else number)
            if numbers:
                return tuple(numbers)
        elif type_name == "string":
            strings = [v for v in enum if isinstance(v, str)]
            if strings:
                return tuple(strings)
        return tuple(enum)

    def _typed(self, schema: dict, label: str) -> _Gen:
        raw_type = schema.get("type")
        if isinstance(raw_type, str):
            types = [raw_type.lower()]
        elif isinstance(raw_type, list):
            types = [t.lower() for t in raw_type if isinstance(t, str)]
        else:
            types = []
        types = [t for t in types if t != "type_unspecified"]
        if not types:
            types = [self._infer_type(schema)]
        concrete = [t for t in types if t != "null"]
        if not concrete:
            return lambda rng, minimal: None
        gens = [self._of_type(t, schema, label) for t in concrete]
        if len(gens) == 1:
            return gens[0]
        chooser = tuple(gens)
        return lambda rng, minimal: chooser[rng.below(len(chooser))](rng, minimal)

    @staticmethod
    def _infer_type(schema: dict) -> str:
        if any(k in schema for k in ("properties", "required", "additionalProperties",
                                      "additional_properties", "propertyOrdering",
                                      "property_ordering", "minProperties", "min_properties")):
            return "object"
        if any(k in schema for k in ("items", "prefixItems", "prefix_items", "minItems",
                                      "min_items", "maxItems", "max_items")):
            return "array"
        if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum",
                                      "exclusiveMaximum", "multipleOf")):
            return "number"
        return "string"

    def _of_type(self, type_name: str, schema: dict, label: str) -> _Gen:
        if type_name == "object":
            return self._object(schema, label)
        if type_name == "array":
            return self._array(schema, label)
        if type_name == "integer":
            return self._integer(schema)
        if type_name == "number":
            return self._number(schema)
        if type_name == "boolean":
            return lambda rng, minimal: bool(rng.next() & 1)
        if type_name == "null":
            return lambda rng, minimal: None
        return self._string(schema, label)

    # -- combinators
    def _ref(self, ref: str, label: str) -> _Gen:
        refs = self.refs

        def gen(rng: _Rng, minimal: bool) -> Any:
            target = refs.get(ref)
            if target is None:
                # Placeholder first so that a recursive schema compiles in finite time.
                refs[ref] = lambda r, m: None
                target = refs[ref] = self.compile(self._resolve(ref), label)
            # Recursion is tracked per generation (on the rng, so plans stay thread-safe):
            # nested _RECURSION_LEVELS deep in itself, a ref emits its minimal instance.
            active = rng.active
            level = active.get(ref, 0)
            if level > _MAX_RECURSION:
                return None  # only reachable when the schema requires infinite recursion
            active[ref] = level + 1
            try:
                return target(rng, minimal or level >= _RECURSION_LEVELS)
            finally:
                active[ref] = level

        return gen

    def _resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}  # remote references are not fetched
        node: Any = self.root
        for token in ref[1:].split("/"):
            if not token:
                continue
            token = token.replace("%25", "%").replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                return {}
        return node

    @staticmethod
    def _merge_all_of(schema: dict, parts: list) -> dict:
        merged: dict = {k: v for k, v in schema.items() if k not in ("allOf", "all_of")}
        for part in parts:
            if not isinstance(part, dict):
                continue
            for key, value in part.items():
                if key == "properties" and isinstance(value, dict):
                    merged["properties"] = {**merged.get("properties", {}), **value}
                elif key == "required" and isinstance(value, list):
                    merged["required"] = list(dict.fromkeys([*merged.get("required", []), *value]))
                else:
                    merged.setdefault(key, value)
        return merged

    def _any_of(self, schema: dict, branches: list, camel: str, snake: str, label: str) -> _Gen:
        rest = {k: v for k, v in schema.items() if k not in (camel, snake)}
        merged = []
        for branch in branches:
            if isinstance(branch, dict) and rest:
                # Sibling keywords (e.g. pydantic's "title"/"default") apply to every branch.
                merged.append({**{k: v for k, v in rest.items() if k not in branch}, **branch})
            else:
                merged.append(branch)
        # Prefer non-null branches: an Optional field filled with a value is more useful.
        useful = [b for b in merged if not (isinstance(b, dict) and
                                            str(b.get("type", "")).lower() == "null")]
        gens = tuple(self.compile(b, label) for b in (useful or merged))
        if len(gens) == 1:
            return gens[0]
        return lambda rng, minimal: gens[rng.below(len(gens))](rng, minimal)

    # -- containers
    def _object(self, schema: dict, label: str) -> _Gen:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        required = [r for r in required if isinstance(r, str)] if isinstance(required, list) else []
        ordering = _get(schema, "propertyOrdering", "property_ordering")
        ordering = ordering if isinstance(ordering, list) else []
        names = [n for n in ordering if isinstance(n, str) and n in properties]
        names += [n for n in properties if n not in names]
        names += [n for n in required if n not in names]
        extra = _get(schema, "additionalProperties", "additional_properties")
        extra_gen = self.compile(extra if isinstance(extra, dict) else {}, "")
        fields: list[tuple[str, bool, _Gen]] = []
        required_set = set(required)
        for name in names:
            gen = self.compile(properties[name], name) if name in properties else extra_gen
            fields.append((name, name in required_set, gen))
        min_props = _as_int(_get(schema, "minProperties", "min_properties")) or 0
        max_props = _as_int(_get(schema, "maxProperties", "max_properties"))
        may_add = extra is not False and not schema.get("propertyNames")
        frozen = tuple(fields)

        # maxProperties: required properties always, optional ones only within the budget.
        optional_budget = None if max_props is None else max(max_props - len(required_set), 0)

        def gen(rng: _Rng, minimal: bool) -> dict:
            out: dict = {}
            optional_left = optional_budget
            for name, is_required, field_gen in frozen:
                if is_required:
                    out[name] = field_gen(rng, minimal)
                elif not minimal and (optional_left is None or optional_left > 0):
                    out[name] = field_gen(rng, minimal)
                    if optional_left is not None:
                        optional_left -= 1
            if len(out) < min_props:
                # minProperties: listed optional properties first, then invented ones.
                for name, _, field_gen in frozen:
                    if len(out) >= min_props:
                        break
                    if name not in out:
                        out[name] = field_gen(rng, minimal)
                index = 1
                while may_add and len(out) < min_props:
                    out.setdefault(f"emulated_{index}", extra_gen(rng, minimal))
                    index += 1
            return out

        return gen

    def _array(self, schema: dict, label: str) -> _Gen:
        items = schema.get("items")
        prefix = _get(schema, "prefixItems", "prefix_items")
        if isinstance(items, list):  # draft-4 tuple form
            prefix, items = items, _get(schema, "additionalItems", "additional_items")
        prefix_gens = tuple(self.compile(p, label) for p in prefix) if isinstance(prefix, list) else ()
        no_extra = items is False
        item_gen = self.compile(items if isinstance(items, dict) else {}, label)
        min_items = max(_as_int(_get(schema, "minItems", "min_items")) or 0, 0)
        max_items = _as_int(_get(schema, "maxItems", "max_items"))
        if no_extra:
            max_items = len(prefix_gens) if max_items is None else min(max_items, len(prefix_gens))
        unique = bool(_get(schema, "uniqueItems", "unique_items"))

        def gen(rng: _Rng, minimal: bool) -> list:
            count = min_items if minimal else max(min_items, len(prefix_gens), 1 + rng.below(3))
            if max_items is not None:
                count = min(count, max_items)
            out: list = []
            seen: set[str] = set()
            attempts = 0
            while len(out) < count and attempts < count * 16 + 16:
                attempts += 1
                index = len(out)
                source = prefix_gens[index] if index < len(prefix_gens) else item_gen
                value = source(rng, minimal)
                if unique:
                    key = _sorted_json(value)
                    if key in seen:
                        continue
                    seen.add(key)
                out.append(value)
            return out

        return gen

    # -- scalars
    def _number(self, schema: dict) -> _Gen:
        lo, hi, lo_open, hi_open = self._bounds(schema)
        step = _as_float(_get(schema, "multipleOf", "multiple_of"))
        if step is not None and step > 0:
            return self._multiples(lo, hi, lo_open, hi_open, step, integer=False)
        if lo is None and hi is None:
            lo, hi = 0.0, 100.0
        elif lo is None:
            lo = hi - 100.0
        elif hi is None:
            hi = lo + 100.0
        low, high = lo, hi

        def gen(rng: _Rng, minimal: bool) -> float:
            value = round(low + (high - low) * ((1 + rng.below(999)) / 1000), 3)
            if value < low or value > high or (lo_open and value == low) or (hi_open and value == high):
                value = (low + high) / 2
            return value

        return gen

    def _integer(self, schema: dict) -> _Gen:
        lo, hi, lo_open, hi_open = self._bounds(schema)
        step = _as_float(_get(schema, "multipleOf", "multiple_of"))
        if step is not None and step > 0:
            return self._multiples(lo, hi, lo_open, hi_open, step, integer=True)
        low = None if lo is None else (math.floor(lo) + 1 if lo_open else math.ceil(lo))
        high = None if hi is None else (math.ceil(hi) - 1 if hi_open else math.floor(hi))
        if low is None and high is None:
            low, high = 0, 100
        elif low is None:
            low = high - 100
        elif high is None:
            high = low + 100
        span = max(high - low + 1, 1)
        base = low
        return lambda rng, minimal: base + rng.below(span)

    @staticmethod
    def _multiples(lo, hi, lo_open, hi_open, step, integer) -> _Gen:
        first = math.ceil(lo / step) if lo is not None else 0
        if lo is not None and lo_open and first * step <= lo:
            first += 1
        last = math.floor(hi / step) if hi is not None else first + 100
        if hi is not None and hi_open and last * step >= hi:
            last -= 1
        if lo is None and hi is not None:
            first = last - 100
        span = max(last - first + 1, 1)

        def gen(rng: _Rng, minimal: bool) -> float | int:
            # Float steps (0.1) make k*step inexact; validators test `value / step` for being
            # whole, so try a few multiples until one passes that test (integers usually do).
            value: float = first * step
            for attempt in range(8 + 200):
                # After 8 random tries, walk the multiples in order (only odd steps get here).
                k = first + (rng.below(span) if attempt < 8 else attempt - 8)
                value = round(k * step, 12)
                if integer and not float(value).is_integer():
                    continue
                if (value / step).is_integer():
                    return int(value) if integer else value
            return int(round(value)) if integer else value

        return gen

    @staticmethod
    def _bounds(schema: dict) -> tuple[float | None, float | None, bool, bool]:
        lo = _as_float(schema.get("minimum"))
        hi = _as_float(schema.get("maximum"))
        lo_open = hi_open = False
        ex_lo = _get(schema, "exclusiveMinimum", "exclusive_minimum")
        ex_hi = _get(schema, "exclusiveMaximum", "exclusive_maximum")
        if ex_lo is True:  # draft-4 boolean form
            lo_open = lo is not None
        elif _as_float(ex_lo) is not None and (lo is None or _as_float(ex_lo) >= lo):
            lo, lo_open = _as_float(ex_lo), True
        if ex_hi is True:
            hi_open = hi is not None
        elif _as_float(ex_hi) is not None and (hi is None or _as_float(ex_hi) <= hi):
            hi, hi_open = _as_float(ex_hi), True
        return lo, hi, lo_open, hi_open

    def _string(self, schema: dict, label: str) -> _Gen:
        min_len = _as_int(_get(schema, "minLength", "min_length")) or 0
        max_len = _as_int(_get(schema, "maxLength", "max_length"))
        fmt = schema.get("format")
        fmt = fmt.lower() if isinstance(fmt, str) else ""
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            return _pattern_gen(pattern, min_len, max_len, label)
        format_gen = _FORMATS.get(fmt)
        if format_gen is not None:
            return lambda rng, minimal: format_gen(rng)
        head = f"emulated {label}" if label else "emulated"

        def gen(rng: _Rng, minimal: bool) -> str:
            text = "emulated" if minimal else f"{head} {rng.word()} {rng.word()}"
            return _sized(text, rng, min_len, max_len)

        return gen


def _date(rng: _Rng) -> str:
    return f"{2020 + rng.below(6)}-{1 + rng.below(12):02d}-{1 + rng.below(28):02d}"


def _time(rng: _Rng) -> str:
    return f"{rng.below(24):02d}:{rng.below(60):02d}:{rng.below(60):02d}Z"


_FORMATS: dict[str, Callable[[_Rng], str]] = {
    "date": _date,
    "date-time": lambda rng: f"{_date(rng)}T{_time(rng)}",
    "datetime": lambda rng: f"{_date(rng)}T{_time(rng)}",
    "time": _time,
    "email": lambda rng: f"emulated.{rng.word()}@example.com",
    "idn-email": lambda rng: f"emulated.{rng.word()}@example.com",
    "uri": lambda rng: f"https://example.com/emulated/{rng.word()}",
    "url": lambda rng: f"https://example.com/emulated/{rng.word()}",
    "iri": lambda rng: f"https://example.com/emulated/{rng.word()}",
    "uri-reference": lambda rng: f"https://example.com/emulated/{rng.word()}",
    "iri-reference": lambda rng: f"https://example.com/emulated/{rng.word()}",
    "uri-template": lambda rng: "https://example.com/emulated/{id}",
    "uuid": lambda rng: str(uuid.UUID(int=(rng.next() << 96) | (rng.next() << 64)
                                      | (rng.next() << 32) | rng.next(), version=4)),
    "hostname": lambda rng: f"emulated-{rng.word()}.example.com",
    "idn-hostname": lambda rng: f"emulated-{rng.word()}.example.com",
    "ipv4": lambda rng: f"192.0.2.{1 + rng.below(254)}",
    "ipv6": lambda rng: f"2001:db8::{1 + rng.below(0xFFFE):x}",
    "duration": lambda rng: f"PT{1 + rng.below(59)}M",
    "json-pointer": lambda rng: f"/emulated/{rng.word()}",
    "relative-json-pointer": lambda rng: "0/emulated",
    "regex": lambda rng: "^emulated$",
    "byte": lambda rng: base64.b64encode(f"emulated {rng.word()}".encode()).decode(),
}


def _pattern_gen(pattern: str, min_len: int, max_len: int | None, label: str) -> _Gen:
    """Strings for a `pattern`: "emulated ..." if it matches, else an instance of the regex."""
    try:
        regex = re.compile(pattern)
        parsed = _re_parser.parse(pattern)
    except Exception:  # noqa: BLE001 - an odd pattern must not break the emulator
        regex, parsed = None, None

    def fits(text: str) -> bool:
        return (len(text) >= min_len and (max_len is None or len(text) <= max_len)
                and (regex is None or regex.search(text) is not None))

    head = f"emulated {label}" if label else "emulated"

    def gen(rng: _Rng, minimal: bool) -> str:
        plain = _sized("emulated" if minimal else f"{head} {rng.word()}", rng, min_len, max_len)
        if fits(plain):
            return plain
        if parsed is not None:
            for attempt in range(8):
                # Later attempts allow longer repeats, for patterns that must reach minLength.
                stretch = 3 if attempt < 4 else max(3, min_len)
                try:
                    text = _from_regex(parsed, rng, minimal and attempt < 4, {}, stretch)
                except Exception:  # noqa: BLE001 - unsupported regex feature
                    break
                if fits(text):
                    return text
                padded = _sized(text, rng, min_len, max_len)  # unanchored patterns allow padding
                if fits(padded):
                    return padded
        return plain

    return gen


def _sized(text: str, rng: _Rng, min_len: int, max_len: int | None) -> str:
    """Pad with filler words up to minLength, cut to maxLength."""
    while len(text) < min_len:
        text += " " + rng.word()
    if max_len is not None and len(text) > max_len:
        text = text[:max_len]
    return text


def _from_regex(parsed: Any, rng: _Rng, minimal: bool, groups: dict, stretch: int = 3) -> str:
    """An instance of a parsed regex (literals, classes, repeats, groups, alternation)."""
    c = _re_constants
    out: list[str] = []
    for op, av in parsed:
        if op is c.LITERAL:
            out.append(chr(av))
        elif op is c.NOT_LITERAL:
            out.append("a" if av != ord("a") else "b")
        elif op is c.ANY:
            out.append("x")
        elif op is c.IN:
            out.append(_from_class(av, rng, c))
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT) or op is getattr(c, "POSSESSIVE_REPEAT", None):
            low, high, sub = av
            high = min(high, low + stretch)
            count = low if minimal else low + rng.below(high - low + 1)
            out.extend(_from_regex(sub, rng, minimal, groups, stretch) for _ in range(count))
        elif op is c.SUBPATTERN:
            group, sub = av[0], av[-1]
            text = _from_regex(sub, rng, minimal, groups, stretch)
            if group is not None:
                groups[group] = text
            out.append(text)
        elif op is getattr(c, "ATOMIC_GROUP", None):
            out.append(_from_regex(av, rng, minimal, groups, stretch))
        elif op is c.BRANCH:
            alternatives = av[1]
            out.append(_from_regex(alternatives[rng.below(len(alternatives))], rng, minimal, groups, stretch))
        elif op is c.AT:
            continue
        elif op is c.GROUPREF:
            out.append(groups.get(av, ""))
        elif op is c.CATEGORY:
            out.append(_from_class([(op, av)], rng, c))
        else:
            raise ValueError(f"unsupported regex op {op}")
    return "".join(out)


def _from_class(items: list, rng: _Rng, c: Any) -> str:
    if items and items[0][0] is c.NEGATE:
        excluded = items[1:]
        for candidate in "aZ0_- x.":
            if not _class_contains(excluded, candidate, c):
                return candidate
        raise ValueError("negated class too wide")
    op, av = items[rng.below(len(items))]
    if op is c.LITERAL:
        return chr(av)
    if op is c.RANGE:
        return chr(av[0] + rng.below(av[1] - av[0] + 1))
    if op is c.CATEGORY:
        return {
            c.CATEGORY_DIGIT: "0123456789"[rng.below(10)],
            c.CATEGORY_WORD: "abcdefghijklmnopqrstuvwxyz"[rng.below(26)],
            c.CATEGORY_SPACE: " ",
            c.CATEGORY_NOT_DIGIT: "a",
            c.CATEGORY_NOT_WORD: "-",
            c.CATEGORY_NOT_SPACE: "a",
        }.get(av, "a")
    raise ValueError(f"unsupported class item {op}")


def _class_contains(items: list, char: str, c: Any) -> bool:
    code = ord(char)
    for op, av in items:
        if op is c.LITERAL and av == code:
            return True
        if op is c.RANGE and av[0] <= code <= av[1]:
            return True
        if op is c.CATEGORY:
            pattern = {c.CATEGORY_DIGIT: r"\d", c.CATEGORY_WORD: r"\w", c.CATEGORY_SPACE: r"\s",
                       c.CATEGORY_NOT_DIGIT: r"\D", c.CATEGORY_NOT_WORD: r"\W",
                       c.CATEGORY_NOT_SPACE: r"\S"}.get(av)
            if pattern and re.fullmatch(pattern, char):
                return True
    return False


# --------------------------------------------------------------------------------------------
# the default responder


class EmulatedResponder:
    """Deterministic, instant answers; see the module docstring for the exact rules."""

    #: How many compiled schemas are kept (a batch usually repeats one schema).
    schema_cache_size = 256
    #: How many generationConfigs' settings are kept (a batch usually repeats one or a few configs).
    config_cache_size = 64

    def __init__(self, *, default_embedding_dimension: int | None = None) -> None:
        """``default_embedding_dimension`` overrides the per-model default (3072 / 768)."""
        self.default_embedding_dimension = default_embedding_dimension
        self._plans: dict[bytes | str, _Gen] = {}
        self._configs: dict[bytes, _Settings] = {}
        self._digest_start: tuple[str, Any] | None = None

    # -- Responder API
    def generate(self, request: dict, model: str) -> dict:
        """Answer one GenerateContentRequest (REST camelCase; snake_case accepted)."""
        config = request.get("generationConfig")
        if config is None:
            config = request.get("generation_config") or {}
        digest_input = self._model_digest(model).copy()
        # Prompt tokens by modality: TEXT always listed first, the others in the order they appear.
        text_tokens = 0
        other_tokens: dict[str, int] = {}
        last_text = ""
        system = request.get("systemInstruction")
        if system is None:
            system = request.get("system_instruction")
        if system is not None:
            for part in _iter_parts(system):
                text = part.get("text") if isinstance(part, dict) else part
                if isinstance(text, str):
                    text_tokens += (len(text) + 3) // 4
                    digest_input.update(b"\x1es")
                    digest_input.update(text.encode("utf-8", "surrogatepass"))
                else:
                    modality = _modality(part)
                    if modality == "TEXT":
                        text_tokens += NON_TEXT_PART_TOKENS
                    else:
                        other_tokens[modality] = other_tokens.get(modality, 0) + NON_TEXT_PART_TOKENS
                    digest_input.update(_part_hash_bytes(part))
        for content in _as_contents(request.get("contents")):
            from_user = not (isinstance(content, dict) and content.get("role") == "model")
            digest_input.update(b"\x1eu" if from_user else b"\x1em")
            for part in _iter_parts(content):
                text = part.get("text") if isinstance(part, dict) else part
                if isinstance(text, str):
                    text_tokens += (len(text) + 3) // 4
                    digest_input.update(text.encode("utf-8", "surrogatepass"))
                    digest_input.update(_SEP)
                    if from_user and text:
                        last_text = text
                else:
                    modality = _modality(part)
                    if modality == "TEXT":
                        text_tokens += NON_TEXT_PART_TOKENS
                    else:
                        other_tokens[modality] = other_tokens.get(modality, 0) + NON_TEXT_PART_TOKENS
                    digest_input.update(_part_hash_bytes(part))
        prompt_tokens = text_tokens + sum(other_tokens.values())
        settings = self._settings(config, model)
        if settings.sampling is not None:
            digest_input.update(settings.sampling)
        digest = digest_input.digest()
        name = _model_name(model)

        thoughts = _thought_tokens(settings.thinking, prompt_tokens)
        include_thoughts = thoughts and settings.include_thoughts
        stops = settings.stops
        candidates = []
        output_tokens = 0
        for index in range(settings.candidates):
            seed = digest if index == 0 else hashlib.blake2b(
                digest + bytes((index,)), digest_size=16).digest()
            if not settings.structured:
                text, finish = self._text(seed, name, last_text, settings.max_tokens)
            else:
                text, finish = self._structured(seed, name, last_text, settings)
            if stops:
                text, finish = self._apply_stops(text, finish, stops)
            tokens = (len(text) + 3) // 4
            output_tokens += tokens
            parts = [{"text": text}]
            if include_thoughts:  # a summary of the thinking comes first, marked as a thought
                parts.insert(0, {"text": f"[emulated {name} thought summary] Considered the request.", "thought": True})
            candidates.append({
                "content": {"role": "model", "parts": parts},
                "finishReason": finish,
                "index": index,
            })
        details = [{"modality": "TEXT", "tokenCount": text_tokens}]
        if other_tokens:
            details += [{"modality": modality, "tokenCount": tokens} for modality, tokens in other_tokens.items()]
        usage = {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": output_tokens,
            "totalTokenCount": prompt_tokens + output_tokens + thoughts,
            "promptTokensDetails": details,
        }
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        return {
            "candidates": candidates,
            "usageMetadata": usage,
            "modelVersion": name,
            "responseId": "emu-" + digest[:10].hex(),
        }

    def embed(self, request: dict, model: str) -> dict:
        """Answer one EmbedContentRequest with a deterministic unit-norm vector."""
        content = request.get("content")
        if content is None:
            content = request.get("contents")
        digest_input = hashlib.blake2b(model.encode("utf-8", "surrogatepass"), digest_size=32)
        task_type = _get(request, "taskType", "task_type")
        title = request.get("title")
        digest_input.update(f"\x1e{task_type or ''}\x1e{title or ''}\x1e".encode())
        tokens = 0
        for item in _as_contents(content):
            for part in _iter_parts(item):
                text = part.get("text") if isinstance(part, dict) else part
                if isinstance(text, str):
                    tokens += (len(text) + 3) // 4
                    digest_input.update(text.encode("utf-8", "surrogatepass"))
                    digest_input.update(_SEP)
                else:
                    tokens += NON_TEXT_PART_TOKENS
                    digest_input.update(_part_hash_bytes(part))
        dimension = _as_int(_get(request, "outputDimensionality", "output_dimensionality"))
        if dimension is None or dimension <= 0:
            dimension = self._default_dimension(model)
        dimension = min(dimension, MAX_EMBEDDING_DIMENSION)
        raw = struct.unpack(f"<{dimension}h", hashlib.shake_256(digest_input.digest()).digest(2 * dimension))
        norm = math.hypot(*raw) or 1.0
        scale = 1.0 / norm
        return {"embedding": {"values": [x * scale for x in raw]}, "tokenCount": str(tokens)}

    def count_tokens(self, contents: list) -> int:
        """Token estimate of ``contents``: ceil(chars/4) per text part, 258 per other part."""
        total = 0
        for content in _as_contents(contents):
            for part in _iter_parts(content):
                text = part.get("text") if isinstance(part, dict) else part
                total += (len(text) + 3) // 4 if isinstance(text, str) else NON_TEXT_PART_TOKENS
        return total

    # -- internals
    def _model_digest(self, model: str) -> Any:
        """The answer digest's start for a model (a batch asks for one model a million times)."""
        cached = self._digest_start  # one (model, digest) pair, read and replaced whole: workers share it
        if cached is None or cached[0] != model:
            cached = self._digest_start = (model, hashlib.blake2b(model.encode("utf-8", "surrogatepass"),
                                                                  digest_size=16))
        return cached[1]  # only ever copied, never updated

    def _default_dimension(self, model: str) -> int:
        if self.default_embedding_dimension:
            return self.default_embedding_dimension
        return MAX_EMBEDDING_DIMENSION if "gemini-embedding" in model else 768

    @staticmethod
    def _text(seed: bytes, name: str, prompt: str, max_tokens: int | None) -> tuple[str, str]:
        filler = " ".join([_WORDS[b & 63] for b in seed[1:7 + seed[0] % 7]])
        text = f'{MARKER_TEMPLATE.format(model=name)}re: "{_echo(prompt)}" - {filler}.'
        return _cut(text, max_tokens)

    def _structured(self, seed: bytes, name: str, prompt: str, settings: _Settings) -> tuple[str, str]:
        max_tokens = settings.max_tokens
        if settings.schema is None:
            return self._plain_json(seed, name, prompt, max_tokens)
        try:
            plan = settings.plan
            if plan is None:
                plan = settings.plan = self._plan(settings.schema)
            rng_seed = int.from_bytes(seed[:8], "little")
            value = plan(_Rng(rng_seed), False)
        except Exception:  # noqa: BLE001 - a malformed schema must not take the emulator down
            return self._plain_json(seed, name, prompt, max_tokens)
        if settings.mime == "text/x.enum":
            return _cut(value if isinstance(value, str) else _compact_json(value), max_tokens)
        text = _compact_json(value)
        if max_tokens is not None and len(text) > max_tokens * 4:
            # Before cutting (which breaks the JSON), try the smallest valid instance.
            small = plan(_Rng(rng_seed), True)
            text = _compact_json(small)
        return _cut(text, max_tokens)

    def _plain_json(self, seed: bytes, name: str, prompt: str, max_tokens: int | None) -> tuple[str, str]:
        """JSON mode without a schema, or with one that cannot be followed."""
        plain, _ = self._text(seed, name, prompt, None)
        return _cut(_compact_json({"emulated": True, "text": plain}), max_tokens)

    def _plan(self, schema: Any) -> _Gen:
        # Key order decides the output's property order, and 1, 1.0 and true are == but answer
        # differently, so two schemas share a plan only when they are alike in every way (_exact_key).
        key = _exact_key(schema)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self.schema_cache_size:
                self._plans.clear()
            plan = self._plans[key] = _SchemaCompiler(schema).compile(schema)
        return plan

    def _settings(self, config: Any, model: str) -> _Settings:
        """What ``config`` decides for ``model``'s answers, worked out once per distinct config and model
        (a batch sends one generationConfig, or a few, with every request)."""
        try:
            key = marshal.dumps((model, config), 2)  # exact, as _exact_key says
        except ValueError:  # not plain data (only a direct caller can send that): nothing to share
            return _Settings(config, _model_name(model))
        settings = self._configs.get(key)
        if settings is None:
            # Made from the key's own copy of the config, so they hold nothing a caller could change.
            settings = _Settings(marshal.loads(key)[1], _model_name(model))
            if len(self._configs) >= self.config_cache_size:
                self._configs.clear()
            self._configs[key] = settings
        return settings

    @staticmethod
    def _apply_stops(text: str, finish: str, stops: Any) -> tuple[str, str]:
        if isinstance(stops, str):
            stops = [stops]
        cut = len(text)
        for stop in stops:
            if isinstance(stop, str) and stop:
                at = text.find(stop)
                if 0 <= at < cut:
                    cut = at
        if cut < len(text):
            return text[:cut], "STOP"
        return text, finish


#: Thinking tokens relative to a dynamic budget's, by ``thinkingLevel`` (Gemini 3).
_THINKING_LEVELS = {"MINIMAL": 0.0, "LOW": 0.5, "MEDIUM": 1.0, "HIGH": 2.0}


def _thinking(model_id: str, thinking_config: Any) -> tuple[float, int | None] | None:
    """How a model thinks with ``thinking_config``: (its share of a dynamic budget's tokens, by
    ``thinkingLevel``; the positive ``thinkingBudget`` that caps them, if any), or None when it does
    not think: a budget of 0, or a model that does not think (``models.thinks``) unless it is given
    a thinking config."""
    config = thinking_config if isinstance(thinking_config, dict) else {}
    if not config and not thinks(model_id):
        return None
    budget = _as_int(_get(config, "thinkingBudget", "thinking_budget"))
    if budget == 0:
        return None
    level = _get(config, "thinkingLevel", "thinking_level")
    return _THINKING_LEVELS.get(str(level).upper(), 1.0), budget if budget is not None and budget > 0 else None


def _thought_tokens(thinking: tuple[float, int | None] | None, prompt_tokens: int) -> int:
    """How many tokens a model spends thinking (``thinking`` as _thinking tells), deterministically:
    32 plus half the prompt, scaled by ``thinkingLevel``, never more than a positive ``thinkingBudget``."""
    if thinking is None:
        return 0
    share, cap = thinking
    tokens = int((32 + prompt_tokens // 2) * share)
    return min(tokens, cap) if cap is not None else tokens


def _exact_key(value: Any) -> bytes | str:
    """A cache key that two values share only if they are alike in every way: types (1, 1.0 and true
    are == but differ), key order, every character. marshal's version 2 writes a value just so, and
    without back-references (which would depend on how objects happen to be shared); repr() is as
    exact for JSON data but about three times slower, and serves what marshal cannot write."""
    try:
        return marshal.dumps(value, 2)
    except ValueError:
        return repr(value)


class _Settings:
    """What a generationConfig decides for every answer of one model (EmulatedResponder._settings)."""

    __slots__ = ("sampling", "mime", "structured", "schema", "plan", "max_tokens", "stops", "candidates",
                 "thinking", "include_thoughts")

    def __init__(self, config: Any, name: str) -> None:
        # Sampling settings pick a different (still deterministic) answer, so that e.g. the
        # same prompt with another `seed` or temperature varies, as with a real model. Sorted,
        # so that key order (or camel vs snake case) does not matter.
        sampling = sorted(f"{_SAMPLING_KEYS[key]}={value!r}" for key, value in config.items()
                          if key in _SAMPLING_KEYS and value is not None)
        #: What the answer's digest takes in after the prompt, if anything.
        self.sampling = "\x1e".join(sampling).encode() if sampling else None
        self.mime = mime = _get(config, "responseMimeType", "response_mime_type") or "text/plain"
        self.structured = isinstance(mime, str) and (mime.startswith("application/json") or mime == "text/x.enum")
        schema = None
        if self.structured:
            schema = _get(config, "responseJsonSchema", "response_json_schema")
            if schema is None:
                schema = _get(config, "responseSchema", "response_schema")
        self.schema = schema
        self.plan: _Gen | None = None  # the schema's, once EmulatedResponder._structured compiled it
        max_tokens = _as_int(_get(config, "maxOutputTokens", "max_output_tokens"))
        self.max_tokens = None if max_tokens is not None and max_tokens <= 0 else max_tokens  # proto3: 0 is unset
        self.stops = _get(config, "stopSequences", "stop_sequences")
        self.candidates = max(1, min(_as_int(_get(config, "candidateCount", "candidate_count")) or 1, 8))
        thinking_config = _get(config, "thinkingConfig", "thinking_config")
        self.thinking = _thinking(name, thinking_config)
        # A thought summary comes only with thoughts: the flag is not read for a model that does not think.
        self.include_thoughts = self.thinking is not None and _get(thinking_config or {}, "includeThoughts",
                                                                   "include_thoughts")


def _cut(text: str, max_tokens: int | None) -> tuple[str, str]:
    """Respect maxOutputTokens under the chars/4 estimate."""
    if max_tokens is not None and max_tokens >= 0 and len(text) > max_tokens * 4:
        return text[: max_tokens * 4], "MAX_TOKENS"
    return text, "STOP"
