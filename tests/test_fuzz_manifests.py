"""Generated hostile manifests (hypothesis): whatever bytes are dropped, reading a manifest either
succeeds or raises ManifestError with a bounded message; it never raises anything else (which
would stop intake) and never reads a file outside the folder it is confined to."""

from __future__ import annotations

import json
import re
import string
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchd.manifest import DEFAULT_LIMITS, ManifestError, ManifestLimits, load_manifest
from batchd.plugins import get_tasks

TASKS = get_tasks(None, frozenset())
FIELDS = ["task", "texts", "items", "input", "model", "temperature", "languages", "variations", "prompt",
          "id_column", "text_column", "max_output_tokens", "system_instruction", "x"]
#: Error text adds the path and field around the capped message.
MESSAGE_BOUND = DEFAULT_LIMITS.error_chars * 2 + 500

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=50),
    st.sampled_from(["sentiment", "translate", "variations", "../../etc/passwd", "/etc/passwd",
                     "~root/x.csv", "a\x00b.csv", "x" * 300 + ".csv", "in.csv", "\ud800"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4)),
                      max_leaves=20)
documents = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


#: Files opened while a manifest is read (an audit hook cannot be removed, so it records only while on).
_opened: list[str] | None = None


def _record_open(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _opened.append(str(args[0]))


sys.addaudithook(_record_open)


def _outside(path: str, root: Path) -> bool:
    """Whether ``path`` (as opened) is outside ``root``, not counting Python's own files."""
    if path.startswith((sys.prefix, sys.base_prefix)) or path.endswith((".py", ".pyc", ".so")):
        return False
    return not Path(path).resolve().is_relative_to(root.resolve())


def _assert_bounded_outcome(path: Path, root: Path) -> None:
    global _opened
    _opened = []
    try:
        load_manifest(path, root=root, tasks=TASKS)
    except ManifestError as error:
        assert len(str(error.capped(DEFAULT_LIMITS.error_chars))) < MESSAGE_BOUND, len(str(error))
    finally:
        opened, _opened = _opened, None
    assert not [name for name in opened if _outside(name, root)], opened


@pytest.fixture(scope="module")
def inbox(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inbox")
    (folder / "in.csv").write_text("id,text\n1,hello\n")
    return folder


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=documents)
def test_generated_json_manifests_are_read_or_rejected_never_crash(inbox: Path, document):
    text = json.dumps(document, allow_nan=True, ensure_ascii=True)  # ASCII escapes: lone surrogates too
    _assert_bounded_outcome(_write(inbox, "fuzz.json", text.encode()), inbox)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2000) | st.text(alphabet=string.printable + "[]{}=\"'\\\x00é\u2028", max_size=2000)
       .map(lambda text: text.encode("utf-8", "surrogatepass")))
@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_generated_bytes_are_read_or_rejected_never_crash(inbox: Path, data: bytes, suffix: str):
    _assert_bounded_outcome(_write(inbox, "fuzz" + suffix, data), inbox)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(values, max_size=5))
def test_generated_jsonl_inputs_are_read_or_rejected_never_crash(inbox: Path, lines):
    body = "\n".join(json.dumps(line, allow_nan=True) for line in lines) + "\n"
    _write(inbox, "fuzz.jsonl", body.encode())
    _assert_bounded_outcome(_write(inbox, "fuzz.toml", b'task = "sentiment"\ninput = "fuzz.jsonl"\n'), inbox)


@pytest.mark.parametrize("depth", [100, 1000, sys.getrecursionlimit() + 10, 50_000])
def test_nesting_at_any_depth_is_rejected_not_a_crash(inbox: Path, depth: int):
    for suffix, text in ((".json", '{"task": "sentiment", "x": ' + "[" * depth + "]" * depth + "}"),
                         (".toml", 'task = "sentiment"\nx = ' + "[" * depth + "]" * depth + "\n")):
        with pytest.raises(ManifestError, match="nested too deeply"):
            load_manifest(_write(inbox, "deep" + suffix, text.encode()), root=inbox, tasks=TASKS)


def test_the_audit_hook_sees_what_a_manifest_reads(inbox: Path, tmp_path: Path):
    """The check above could fail: a read outside the inbox would be seen (here, a manifest read from
    outside it is)."""
    global _opened
    outside = _write(tmp_path, "outside.toml", b'task = "sentiment"\ninput = "in.csv"\n')
    _opened = []
    try:
        load_manifest(outside, root=inbox, base_dir=inbox, tasks=TASKS)
    finally:
        opened, _opened = _opened, None
    assert [name for name in opened if _outside(name, inbox)] == [str(outside)]
    assert str(inbox / "in.csv") in opened


def test_a_list_too_long_to_list_inline_is_rejected_before_it_is_validated(inbox: Path):
    texts = ", ".join('"a"' for _ in range(10_001))
    path = _write(inbox, "many.toml", f'task = "sentiment"\ntexts = [{texts}]\n'.encode())
    with pytest.raises(ManifestError, match=r"texts: 10,001 entries, more than 10,000: list them in an input file"):
        load_manifest(path, root=inbox, tasks=TASKS)
    texts = ", ".join('"a"' for _ in range(10_000))
    ok = load_manifest(_write(inbox, "enough.toml", f'task = "sentiment"\ntexts = [{texts}]\n'.encode()),
                       root=inbox, tasks=TASKS)
    assert sum(1 for _ in ok.requests()) == 10_000


@pytest.mark.parametrize("limits, name, text, message", [
    ({"manifest_bytes": 1024}, "big.toml", 'task = "sentiment"\ntexts = ["' + "a" * 2000 + '"]\n',
     "larger than 1,024 bytes ([limits] manifest_bytes)"),
    ({"nesting": 4}, "deep.json", '{"task": "sentiment", "texts": ["a"], "x": [[[[[1]]]]]}', "nested too deeply (at most 4"),
    ({"list_items": 3}, "long.toml", 'task = "sentiment"\ntexts = ["a", "b", "c", "d"]\n', "4 entries, more than 3"),
    ({"integer_digits": 5}, "number.toml", 'task = "sentiment"\ntexts = ["a"]\nmax_output_tokens = 123456\n',
     "more than 5 digits"),
    ({"values": 100}, "values.json", '{"task": "sentiment", "texts": ["a"], "x": [' + ",".join(["{}"] * 120) + "]}",
     "about 248 values, more than 100 ([limits] values)"),
    ({"values": 100}, "values.toml", 'task = "sentiment"\ntexts = ["a"]\nx = [' + ",".join(["{}"] * 120) + "]\n",
     "values, more than 100 ([limits] values)"),
])
def test_every_limit_is_a_setting(inbox: Path, limits: dict, name: str, text: str, message: str):
    path = _write(inbox, name, text.encode())
    try:
        load_manifest(path, root=inbox, tasks=TASKS, check_inputs=False)
    except ManifestError as error:
        assert message.split(" (")[0] not in str(error), "within the default limits"
    with pytest.raises(ManifestError, match=re.escape(message)):
        load_manifest(path, root=inbox, tasks=TASKS, limits=ManifestLimits(**limits))


@pytest.mark.parametrize("suffix, body, message", [
    (".jsonl", '{"text": "short"}\n{"text": "' + "x" * 3000 + '"}\n', "line 2: a line longer than 2,048 characters"),
    (".txt", "short\n" + "x" * 3000 + "\n", "line 2: a line longer than 2,048 characters"),
    (".csv", "id,text\n1,short\n2," + "x" * 3000 + "\n", "line 3: a line longer than 2,048 characters"),
    (".csv", 'id,text\n1,short\n2,"' + ("x" * 1000 + "\n") * 3 + '"\n', "field larger than field limit (2048)"),
    (".csv", ",".join(f"c{n}" for n in range(300)) + ",text\n", "301 columns, more than 200"),
    (".csv", "id,text\n1,short\n2," + "," * 300 + "\n", "line 3: 302 values in one row, more than 200"),
    (".csv", 'id,text\n1,"a quoted\nfield, ' + "," * 150 + '\n"' + "," * 250 + "\n", "line 4: 252 values in one row"),
    (".jsonl", '{"text": "short"}\n{"text": "x", "y": [' + ",".join(["{}"] * 300) + "]}\n",
     "line 2: about 605 values, more than 200 ([limits] values)"),
])
def test_input_lines_are_bounded_before_they_are_read_whole(inbox: Path, suffix: str, body: str, message: str):
    (inbox / f"lines{suffix}").write_text(body)
    path = _write(inbox, "lines.toml", f'task = "sentiment"\ninput = "lines{suffix}"\n'.encode())
    limits = ManifestLimits(line_chars=2048, list_items=200, values=200)
    with pytest.raises(ManifestError, match=re.escape(message)):
        load_manifest(path, root=inbox, tasks=TASKS, limits=limits)


def test_commas_inside_strings_and_quoted_fields_are_no_values(inbox: Path):
    """The counts made before parsing take quoted text out: a long text full of commas is one value."""
    limits = ManifestLimits(values=100, list_items=100)
    prose = "one, two, three, \\\"four\\\", " * 200
    for name, text in (("prose.json", '{"task": "sentiment", "texts": ["' + prose + '"]}'),
                       ("prose.toml", 'task = "sentiment"\ntexts = ["' + prose + '", \'a, b\', """c, d"""]  # x, y\n')):
        manifest = load_manifest(_write(inbox, name, text.encode()), root=inbox, tasks=TASKS, limits=limits)
        assert len(list(manifest.requests())) == (1 if name.endswith(".json") else 3)
    (inbox / "prose.csv").write_text('id,text\n1,"' + "a, b, \"\"c\"\",\n" * 300 + '"\n2,plain\n')
    manifest = load_manifest(_write(inbox, "rows.toml", b'task = "sentiment"\ninput = "prose.csv"\n'),
                             root=inbox, tasks=TASKS, limits=limits)
    assert [request.key for request in manifest.requests()] == ["1", "2"]


def test_a_long_error_is_capped_with_its_length_said(inbox: Path):
    path = _write(inbox, "wide.toml", b'task = "sentiment"\ninput = "wide.csv"\n')
    (inbox / "wide.csv").write_text(",".join(f"column{n}" for n in range(5000)) + "\n")  # no "text" column
    with pytest.raises(ManifestError) as raised:
        load_manifest(path, root=inbox, tasks=TASKS)
    full = raised.value
    cut = full.capped(500)
    assert len(full.message) > 40_000 and len(cut.message) < 600
    assert cut.message.endswith(f"… ({len(full.message):,} characters in all)")
    assert cut.message.startswith("missing column(s) 'text'") and cut.line == 1
