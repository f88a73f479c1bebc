"""Structured answers: a JSON value that validates against the caller's schema.

A request in JSON mode (``responseMimeType: application/json``, or ``text/x.enum``) may carry a
``responseSchema`` (Gemini's OpenAPI subset: upper- or lower-case types, ``nullable``,
``propertyOrdering``, int64 bounds as strings) or a ``responseJsonSchema`` (JSON Schema). A program
run against the emulator parses that answer as it would the real service's (pydantic models,
``jsonschema``), so the emulator must answer with an instance of the schema, not with text that
merely looks like JSON. This module turns a schema into such instances: :func:`compile_schema`
walks the schema once and returns a :data:`Plan`, a closure that draws one value from an
:class:`Rng`. The responder (responder.py) compiles each distinct schema once, seeds the Rng from
the answer's digest, and so gives the same value for the same request every time.

What a plan supports: objects (``properties``, ``required``, ``additionalProperties``,
``min``/``maxProperties``, ``propertyOrdering``), arrays (``items``, ``prefixItems`` and draft-4
tuples, ``min``/``maxItems``, ``uniqueItems``), numbers and integers (bounds, exclusive bounds in
both drafts' forms, ``multipleOf``), strings (``min``/``maxLength``, ``format``, ``pattern``, for
which an instance of the regex is built), ``enum``, ``const``, ``allOf``, ``anyOf``/``oneOf``,
type lists and local ``$ref``s (recursive ones emit their minimal instance a few levels down).
Free strings start with ``emulated``. A plan asked for its ``minimal`` instance gives only
required properties, the fewest items and short strings: the responder tries that one before
cutting an answer that would not fit ``maxOutputTokens``.

Unknown keywords are ignored, and a schema that cannot be followed degrades to something
reasonable instead of raising (the responder falls back to plain JSON if compiling does raise).
"""

from __future__ import annotations

import base64
import json
import math
import re
import re._constants as _re_constants  # sre internals: stable since 3.11, used to walk a pattern
import re._parser as _re_parser
import uuid
from collections.abc import Callable
from typing import Any

from batchd.emulator.wire import as_int, get_field

__all__ = ["FILLER_WORDS", "Plan", "Rng", "compile_schema"]

_M64 = 0xFFFFFFFFFFFFFFFF
# Only compared, never shown: uniqueItems tells two values apart by this form (prebuilt: json.dumps
# with non-default arguments builds a new encoder per call).
_canonical_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode
#: Filler vocabulary of every emulated answer (plain text too): 64 words, so one digest byte picks
#: one word with ``& 63``.
FILLER_WORDS = (
    "amber", "harbor", "signal", "meadow", "copper", "lantern", "river", "quartz",
    "willow", "ember", "falcon", "granite", "horizon", "indigo", "juniper", "kestrel",
    "lattice", "marble", "nectar", "orchid", "pebble", "quiver", "rustle", "saffron",
    "thistle", "umber", "velvet", "wander", "yonder", "zephyr", "anchor", "bramble",
    "cinder", "drift", "echo", "fjord", "glimmer", "hollow", "island", "jasper",
    "kindle", "lumen", "mosaic", "nimbus", "onyx", "prism", "quill", "ripple",
    "summit", "tundra", "upland", "vertex", "whisper", "yarrow", "zenith", "basalt",
    "cobalt", "dune", "estuary", "fern", "gale", "heron", "ivory", "jade",
)


class Rng:
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
        return FILLER_WORDS[state >> 58]


#: A compiled schema (or part of one): called with an Rng and ``minimal``, it returns one JSON value;
#: ``minimal`` asks for the smallest instance (required properties only, minItems, short strings).
Plan = Callable[[Rng, bool], Any]
_RECURSION_LEVELS = 2  # a $ref nested this deep inside itself emits only its minimal instance
_MAX_RECURSION = 16  # hard stop for schemas that require infinite recursion


def compile_schema(schema: Any) -> Plan:
    """The plan of a JSON Schema or Gemini OpenAPI schema; ``$ref``s resolve against ``schema`` itself."""
    return _SchemaCompiler(schema).compile(schema)


class _SchemaCompiler:
    """Turns a JSON Schema or Gemini OpenAPI schema into a generator closure (compiled once)."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.refs: dict[str, Plan] = {}

    # -- dispatch
    def compile(self, schema: Any, label: str = "") -> Plan:
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
        all_of = get_field(schema, "allOf", "all_of")
        if isinstance(all_of, list) and all_of:
            return self.compile(self._merge_all_of(schema, all_of), label)
        for camel, snake in (("anyOf", "any_of"), ("oneOf", "one_of")):
            branches = get_field(schema, camel, snake)
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

    def _typed(self, schema: dict, label: str) -> Plan:
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

    def _of_type(self, type_name: str, schema: dict, label: str) -> Plan:
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
    def _ref(self, ref: str, label: str) -> Plan:
        refs = self.refs

        def gen(rng: Rng, minimal: bool) -> Any:
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

    def _any_of(self, schema: dict, branches: list, camel: str, snake: str, label: str) -> Plan:
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
    def _object(self, schema: dict, label: str) -> Plan:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        required = [r for r in required if isinstance(r, str)] if isinstance(required, list) else []
        ordering = get_field(schema, "propertyOrdering", "property_ordering")
        ordering = ordering if isinstance(ordering, list) else []
        names = [n for n in ordering if isinstance(n, str) and n in properties]
        names += [n for n in properties if n not in names]
        names += [n for n in required if n not in names]
        extra = get_field(schema, "additionalProperties", "additional_properties")
        extra_gen = self.compile(extra if isinstance(extra, dict) else {}, "")
        fields: list[tuple[str, bool, Plan]] = []
        required_set = set(required)
        for name in names:
            gen = self.compile(properties[name], name) if name in properties else extra_gen
            fields.append((name, name in required_set, gen))
        min_props = as_int(get_field(schema, "minProperties", "min_properties")) or 0
        max_props = as_int(get_field(schema, "maxProperties", "max_properties"))
        may_add = extra is not False and not schema.get("propertyNames")
        frozen = tuple(fields)

        # maxProperties: required properties always, optional ones only within the budget.
        optional_budget = None if max_props is None else max(max_props - len(required_set), 0)

        def gen(rng: Rng, minimal: bool) -> dict:
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

    def _array(self, schema: dict, label: str) -> Plan:
        items = schema.get("items")
        prefix = get_field(schema, "prefixItems", "prefix_items")
        if isinstance(items, list):  # draft-4 tuple form
            prefix, items = items, get_field(schema, "additionalItems", "additional_items")
        prefix_gens = tuple(self.compile(p, label) for p in prefix) if isinstance(prefix, list) else ()
        no_extra = items is False
        item_gen = self.compile(items if isinstance(items, dict) else {}, label)
        min_items = max(as_int(get_field(schema, "minItems", "min_items")) or 0, 0)
        max_items = as_int(get_field(schema, "maxItems", "max_items"))
        if no_extra:
            max_items = len(prefix_gens) if max_items is None else min(max_items, len(prefix_gens))
        unique = bool(get_field(schema, "uniqueItems", "unique_items"))

        def gen(rng: Rng, minimal: bool) -> list:
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
                    key = _canonical_json(value)
                    if key in seen:
                        continue
                    seen.add(key)
                out.append(value)
            return out

        return gen

    # -- scalars
    def _number(self, schema: dict) -> Plan:
        lo, hi, lo_open, hi_open = self._bounds(schema)
        step = _as_float(get_field(schema, "multipleOf", "multiple_of"))
        if step is not None and step > 0:
            return self._multiples(lo, hi, lo_open, hi_open, step, integer=False)
        if lo is None and hi is None:
            lo, hi = 0.0, 100.0
        elif lo is None:
            lo = hi - 100.0
        elif hi is None:
            hi = lo + 100.0
        low, high = lo, hi

        def gen(rng: Rng, minimal: bool) -> float:
            value = round(low + (high - low) * ((1 + rng.below(999)) / 1000), 3)
            if value < low or value > high or (lo_open and value == low) or (hi_open and value == high):
                value = (low + high) / 2
            return value

        return gen

    def _integer(self, schema: dict) -> Plan:
        lo, hi, lo_open, hi_open = self._bounds(schema)
        step = _as_float(get_field(schema, "multipleOf", "multiple_of"))
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
    def _multiples(lo, hi, lo_open, hi_open, step, integer) -> Plan:
        first = math.ceil(lo / step) if lo is not None else 0
        if lo is not None and lo_open and first * step <= lo:
            first += 1
        last = math.floor(hi / step) if hi is not None else first + 100
        if hi is not None and hi_open and last * step >= hi:
            last -= 1
        if lo is None and hi is not None:
            first = last - 100
        span = max(last - first + 1, 1)

        def gen(rng: Rng, minimal: bool) -> float | int:
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
        ex_lo = get_field(schema, "exclusiveMinimum", "exclusive_minimum")
        ex_hi = get_field(schema, "exclusiveMaximum", "exclusive_maximum")
        if ex_lo is True:  # draft-4 boolean form
            lo_open = lo is not None
        elif _as_float(ex_lo) is not None and (lo is None or _as_float(ex_lo) >= lo):
            lo, lo_open = _as_float(ex_lo), True
        if ex_hi is True:
            hi_open = hi is not None
        elif _as_float(ex_hi) is not None and (hi is None or _as_float(ex_hi) <= hi):
            hi, hi_open = _as_float(ex_hi), True
        return lo, hi, lo_open, hi_open

    def _string(self, schema: dict, label: str) -> Plan:
        min_len = as_int(get_field(schema, "minLength", "min_length")) or 0
        max_len = as_int(get_field(schema, "maxLength", "max_length"))
        fmt = schema.get("format")
        fmt = fmt.lower() if isinstance(fmt, str) else ""
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            return _pattern_gen(pattern, min_len, max_len, label)
        format_gen = _FORMATS.get(fmt)
        if format_gen is not None:
            return lambda rng, minimal: format_gen(rng)
        head = f"emulated {label}" if label else "emulated"

        def gen(rng: Rng, minimal: bool) -> str:
            text = "emulated" if minimal else f"{head} {rng.word()} {rng.word()}"
            return _sized(text, rng, min_len, max_len)

        return gen


def _date(rng: Rng) -> str:
    return f"{2020 + rng.below(6)}-{1 + rng.below(12):02d}-{1 + rng.below(28):02d}"


def _time(rng: Rng) -> str:
    return f"{rng.below(24):02d}:{rng.below(60):02d}:{rng.below(60):02d}Z"


_FORMATS: dict[str, Callable[[Rng], str]] = {
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


def _pattern_gen(pattern: str, min_len: int, max_len: int | None, label: str) -> Plan:
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

    def gen(rng: Rng, minimal: bool) -> str:
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


def _sized(text: str, rng: Rng, min_len: int, max_len: int | None) -> str:
    """Pad with filler words up to minLength, cut to maxLength."""
    while len(text) < min_len:
        text += " " + rng.word()
    if max_len is not None and len(text) > max_len:
        text = text[:max_len]
    return text


def _from_regex(parsed: Any, rng: Rng, minimal: bool, groups: dict, stretch: int = 3) -> str:
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


def _from_class(items: list, rng: Rng, c: Any) -> str:
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


def _as_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
