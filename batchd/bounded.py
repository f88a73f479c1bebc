"""Bounded parsing: reading text anyone can drop into the inbox (a manifest, one line of its input file)
within the ``[limits]`` (:class:`batchd.manifest.ManifestLimits`), refusing it with a :class:`ManifestError`
past one, never a crash.

Shared by :mod:`batchd.manifest` and :mod:`batchd.inputs`: a document's values counted before it is parsed
(:func:`check_value_count`), a JSON value parsed with its nesting and number bounds and no key given twice
(:func:`json_value`), what parsed checked against the limits (:func:`check_values`), and a pydantic
ValidationError turned into one ManifestError naming its field (:func:`error_from_validation`,
:func:`field_path`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

    from batchd.manifest import ManifestLimits


class ManifestError(Exception):
    """A manifest (or its input file) is invalid.

    ``str()`` reads ``PATH, line L, column C: FIELD: MESSAGE``, leaving out what is unknown.
    ``field`` is a dotted path such as ``items[2].text``.
    """

    def __init__(
        self,
        path: Path,
        message: str,
        *,
        field: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.path = path
        self.message = message
        self.field = field
        self.line = line
        self.column = column
        super().__init__(str(self))

    def capped(self, chars: int) -> ManifestError:
        """This error with its message and field cut at ``chars`` characters each (the full length said)."""
        if len(self.message) <= chars and len(self.field or "") <= chars:
            return self
        return ManifestError(self.path, cut_text(self.message, chars),
                             field=cut_text(self.field, chars) if self.field is not None else None,
                             line=self.line, column=self.column)

    def __str__(self) -> str:
        where = str(self.path)
        if self.line is not None:
            where += f", line {self.line}"
            if self.column is not None:
                where += f", column {self.column}"
        field = f"{self.field}: " if self.field else ""
        return f"{where}: {field}{self.message}"


def is_valid_text(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: no lone surrogate (which a JSON ``\\ud800`` escape, or a
    file name whose bytes are not UTF-8, decodes to)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def cut_text(text: str, chars: int) -> str:
    """``text`` cut at ``chars`` characters, its full length said: how a rejection's parts are bounded."""
    if len(text) <= chars:
        return text
    return f"{text[:chars]}… ({len(text):,} characters in all)"


#: What a document's values are counted by, once its strings (and TOML's comments) are taken out: every
#: value but the first follows a separator or opens a container, and every key comes with one.
_JSON_SEPARATORS = (",", "[", "{", ":")
_TOML_SEPARATORS = (",", "[", "{", "=", ".")  # "." for dotted keys (a table each)
_JSON_STRING = re.compile(r'"[^"]*"')
_TOML_SKIPPED = re.compile(r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"[^"\n]*"|\'[^\'\n]*\'|#[^\n]*')


def check_value_count(path: Path, text: str, limits: ManifestLimits, *, toml: bool = False,
                      line: int | None = None) -> None:
    """Refuse a document of more than ``limits.values`` values before it is parsed: a parser builds an
    object of 50 to 100 bytes for each, and ``[{},{},…]`` spells one in three characters. Counted in a
    few linear passes: escaped quotes and backslashes out, then strings (and comments), then separators
    (an upper bound: a separator the parser would refuse counts too)."""
    separators = _TOML_SEPARATORS if toml else _JSON_SEPARATORS
    if sum(map(text.count, separators)) < limits.values:
        return  # the common case: without taking strings out, already few enough
    bare = text.replace("\\\\", "").replace('\\"', "")
    bare = (_TOML_SKIPPED if toml else _JSON_STRING).sub("", bare)
    count = sum(map(bare.count, separators)) + 1
    if count > limits.values:
        hint = "" if line is not None else (": list many items in an input file (input = \"items.jsonl\"), "
                                            "which is read as a stream")
        raise ManifestError(path, f"about {count:,} values, more than {limits.values:,} ([limits] values){hint}",
                            line=line)


def json_value(path: Path, text: str, limits: ManifestLimits, *, line: int | None = None) -> Any:
    """``text`` parsed as JSON, with a key given twice refused (JSON parsers disagree on which wins)."""
    check_value_count(path, text, limits, line=line)
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise ManifestError(path, f"invalid JSON: {exc.msg}", line=line or exc.lineno,
                            column=exc.colno) from None
    except _DuplicateKey as exc:
        raise ManifestError(path, f"the key {exc.args[0]!r} is given twice", line=line) from None
    except (RecursionError, ValueError) as exc:
        raise parse_limit_error(path, exc, limits, line=line) from None


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return value


def parse_limit_error(path: Path, exc: BaseException, limits: ManifestLimits, *,
                      line: int | None = None) -> ManifestError:
    """The rejection of a document its parser gave up on: nested too deeply, a number of too many digits."""
    if isinstance(exc, RecursionError):
        return ManifestError(path, f"nested too deeply (at most {limits.nesting} levels)", line=line)
    if "digits" in str(exc):  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        return ManifestError(path, f"a number has more than {limits.integer_digits} digits", line=line)
    return ManifestError(path, f"cannot be parsed: {exc}", line=line)


def check_values(path: Path, document: Any, limits: ManifestLimits, *, line: int | None = None) -> None:
    """Refuse what parses but cannot be carried on: past a limit (nesting, list length, digits), a number
    that is not finite, and text that is not valid Unicode (a lone surrogate, which JSON's ``\\ud800``
    escapes can spell, cannot be written as UTF-8)."""
    largest = 10**limits.integer_digits
    stack: list[tuple[Any, str, int]] = [(document, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > limits.nesting:
            raise ManifestError(path, f"nested too deeply (at most {limits.nesting} levels)", field=where or None,
                                line=line)
        if isinstance(value, str):
            if not is_valid_text(value):
                raise ManifestError(path, "text that is not valid Unicode (a lone surrogate)", field=where or None,
                                    line=line)
        elif isinstance(value, int) and not isinstance(value, bool):
            if not -largest < value < largest:
                raise ManifestError(path, f"a number of more than {limits.integer_digits} digits",
                                    field=where or None, line=line)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ManifestError(path, f"{value} is not a number batchd can use (give a finite number)",
                                    field=where or None, line=line)
        elif isinstance(value, dict):
            for key, item in value.items():
                if not is_valid_text(key):
                    raise ManifestError(path, "a key that is not valid Unicode (a lone surrogate)",
                                        field=where or None, line=line)
                stack.append((item, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(value, list):
            if len(value) > limits.list_items:
                raise ManifestError(path, f"{len(value):,} entries, more than {limits.list_items:,}: list them in an "
                                          f"input file (input = \"items.jsonl\"), which is read as a stream",
                                    field=where or None, line=line)
            stack.extend((item, f"{where}[{n}]", depth + 1) for n, item in enumerate(value))


def error_from_validation(
    exc: ValidationError, path: Path, *, prefix: str = "", line: int | None = None,
    unknown_top_field: str = "unknown field",
) -> ManifestError:
    """One ManifestError for the first problem, mentioning how many more there are. ``unknown_top_field``
    describes a field given at the top level that the model does not take (a manifest names what it takes)."""
    errors = exc.errors()
    first = errors[0]
    message = _describe(first, unknown_top_field)
    if len(errors) > 1:
        others = "; ".join(f"{field_path(e['loc'], prefix) or '(item)'}: {_describe(e, unknown_top_field)}"
                           for e in errors[1:4])
        more = ", …" if len(errors) > 4 else ""
        message += f" (also {others}{more})"
    return ManifestError(path, message, field=field_path(first["loc"], prefix) or None, line=line)


def _describe(error: ErrorDetails, unknown_top_field: str) -> str:
    if error["type"] == "extra_forbidden":
        return unknown_top_field if len(error["loc"]) == 1 else "unknown field"
    if error["type"] == "missing":
        return "required field is missing"
    return error["msg"]


def field_path(loc: tuple[int | str, ...], prefix: str = "") -> str:
    """``("items", 2, "text")`` → ``items[2].text``."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path
