"""Manifests: the forms users write, input files, error messages and the JSON Schema."""

import csv
import json
import tracemalloc
from pathlib import Path

import jsonschema
import pytest

from batchd import inputs as inputs_module
from batchd.manifest import ManifestError, load_manifest, manifest_json_schema
from batchd.plugins import get_tasks

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "inbox"


@pytest.fixture
def inbox(tmp_path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(path: Path, **kwargs):
    return load_manifest(path, root=path.parent, **kwargs)


def manifest_error(path: Path, **kwargs) -> ManifestError:
    with pytest.raises(ManifestError) as error:
        load(path, **kwargs)
    return error.value


# --- The forms of the seed's use cases ---------------------------------------------------------


def test_translate_makes_one_request_per_text_and_language(inbox):
    path = write(inbox, "t.toml", 'task = "translate"\ntexts = ["Hello", "Thanks"]\nlanguages = ["Spanish", "French"]\n')
    manifest = load(path)
    requests = list(manifest.requests())
    assert [r.key for r in requests] == ["1:Spanish", "1:French", "2:Spanish", "2:French"]
    assert requests[1].input == {"text": "Hello", "language": "French"}
    assert "into French" in requests[1].prompt and "Hello" in requests[1].prompt
    assert manifest.task == "translate" and manifest.model is None


def test_sentiment_items_with_ids_and_json_manifest(inbox):
    path = write(
        inbox,
        "s.json",
        json.dumps({"task": "sentiment", "model": "gemini-2.5-pro", "items": [{"id": 7, "text": "Great!"}, {"text": "Bad."}]}),
    )
    manifest = load(path)
    assert manifest.model == "gemini-2.5-pro"
    requests = list(manifest.requests())
    assert [r.key for r in requests] == ["7", "2"]  # an int id becomes a string; a missing one, the position
    assert requests[0].input == {"id": "7", "text": "Great!"}
    assert requests[0].config["response_mime_type"] == "application/json"
    assert requests[0].config["response_json_schema"]["required"] == ["label", "score", "rationale"]


def test_sentiment_texts_get_positions_as_ids(inbox):
    path = write(inbox, "s.toml", 'task = "sentiment"\ntexts = ["a", "b", "c"]\n')
    assert [item.id for item in load(path).inputs] == ["1", "2", "3"]


def test_variations_settings_precedence(inbox):
    path = write(
        inbox,
        "v.toml",
        """
task = "variations"
base_content = "Our new AI assistant helps businesses automate customer service."
temperature = 0.5
system_instruction = "You write for a software company."

[[variations]]
id = "formal"
tone = "formal"
audience = "executives"

[[variations]]
id = "casual"
tone = "casual"
temperature = 1.1
max_output_tokens = 200
""",
    )
    formal, casual = load(path).requests()
    assert formal.key == "formal"
    assert formal.input == {"id": "formal", "tone": "formal", "length": "medium", "audience": "executives", "style": "standard"}
    # manifest settings beat the task's default temperature; a variation's own beat the manifest's
    assert formal.config == {"temperature": 0.5, "system_instruction": "You write for a software company."}
    assert casual.config["temperature"] == 1.1 and casual.config["max_output_tokens"] == 200
    assert "Tone: casual" in casual.prompt and "automate customer service" in casual.prompt


def test_shipped_examples_load(tmp_path):
    names = sorted(path.name for path in EXAMPLES.glob("*.toml"))
    assert names == ["analysis.toml", "documents.toml", "embed.toml", "reviews.toml", "sentiment.toml",
                     "template.toml", "translate.toml", "variations.toml"]
    for name in names:
        manifest = load_manifest(EXAMPLES / name, root=EXAMPLES)
        assert len(list(manifest.requests())) >= 3
    reviews = load_manifest(EXAMPLES / "reviews.toml", root=EXAMPLES)
    assert reviews.input_files() == [EXAMPLES.resolve() / "reviews.csv"]
    assert [item.id for item in reviews.inputs][:2] == ["r-1001", "r-1002"]


# --- Generation settings: thinking, media resolution, modalities, safety -----------------------


def test_thinking_media_modalities_and_safety_settings_in_any_case_become_the_wire_values(inbox):
    path = write(inbox, "s.toml", """
task = "sentiment"
texts = ["Fine."]
thinking_budget = 2048
include_thoughts = true
media_resolution = "low"
response_modalities = ["text", "Image"]
safety_settings = [
    {category = "hate_speech", threshold = "block_none"},
    {category = "HARM_CATEGORY_DANGEROUS_CONTENT", threshold = "Block_Only_High"},
]
""")
    manifest = load(path)
    assert manifest.generation_config() == {
        "thinking_config": {"thinking_budget": 2048, "include_thoughts": True},
        "media_resolution": "MEDIA_RESOLUTION_LOW",
        "response_modalities": ["TEXT", "IMAGE"],
        "safety_settings": [{"category": "HARM_CATEGORY_HATE_SPEECH", "threshold": "BLOCK_NONE"},
                            {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "threshold": "BLOCK_ONLY_HIGH"}],
    }
    [request] = manifest.requests()
    assert request.config["thinking_config"] == {"thinking_budget": 2048, "include_thoughts": True}
    assert request.config["response_mime_type"] == "application/json"  # the task's own settings stay


def test_the_enum_values_are_google_genais():
    from google.genai import types

    from batchd.task import GenerationSettings

    levels = [level.value for level in types.ThinkingLevel if level.value != "THINKING_LEVEL_UNSPECIFIED"]
    for level in levels:
        assert GenerationSettings(thinking_level=level.lower()).thinking_level == level
    assert GenerationSettings(thinking_level="high").as_config() == {"thinking_config": {"thinking_level": "HIGH"}}


@pytest.mark.parametrize(("settings", "field", "message"), [
    ('thinking_budget = 1024\nthinking_level = "low"', "thinking_level",
     "give thinking_budget or thinking_level, not both: Google refuses"),
    ("thinking_budget = 40000", "thinking_budget", "less than or equal to 32768"),
    ("thinking_budget = -2", "thinking_budget", "greater than or equal to -1"),
    ('thinking_level = "maximal"', "thinking_level", "'MINIMAL', 'LOW', 'MEDIUM', 'HIGH'"),
    ('media_resolution = "ultra"', "media_resolution", "'MEDIA_RESOLUTION_LOW', 'MEDIA_RESOLUTION_MEDIUM'"),
    ('response_modalities = ["text", "smell"]', "response_modalities[1]", "'TEXT', 'IMAGE', 'AUDIO'"),
    ("response_modalities = []", "response_modalities", "at least 1 item"),
    ('safety_settings = [{category = "rudeness", threshold = "block_none"}]', "safety_settings[0].category",
     "'HARM_CATEGORY_HARASSMENT', 'HARM_CATEGORY_HATE_SPEECH'"),
    ('safety_settings = [{category = "hate_speech", threshold = "never"}]', "safety_settings[0].threshold",
     "'BLOCK_ONLY_HIGH', 'BLOCK_NONE' or 'OFF'"),
    ('safety_settings = [{category = "hate_speech"}]', "safety_settings[0].threshold", "required field is missing"),
    ('safety_settings = [{category = "hate_speech", threshold = "off", method = "SEVERITY"}]',
     "safety_settings[0].method", "unknown field"),
    ('safety_settings = [{category = "hate_speech", threshold = "off"}, '
     '{category = "HARM_CATEGORY_HATE_SPEECH", threshold = "block_none"}]', "safety_settings",
     "HARM_CATEGORY_HATE_SPEECH is given more than once"),
])
def test_bad_generation_settings_are_named_with_the_allowed_values(inbox, settings, field, message):
    error = manifest_error(write(inbox, "s.toml", f'task = "sentiment"\ntexts = ["Fine."]\n{settings}\n'))
    assert error.field == field and message in error.message, str(error)


def test_an_items_config_is_over_the_manifests_for_its_own_requests(inbox):
    # precedence: the task's per-request config > the item's config > the manifest's > the task's defaults
    write(inbox, "in.jsonl", "\n".join([
        '{"id": "a", "text": "x"}',
        '{"id": "b", "text": "x", "config": {"temperature": 1.5, "thinking_level": "low"}}',
        '{"id": "c", "text": "x", "config": {"temperature": 1.5, "thinking_level": "low"}}',
        '{"id": "d", "text": "x"}',
    ]) + "\n")
    manifest = load(write(inbox, "s.toml", 'task = "sentiment"\ninput = "in.jsonl"\ntemperature = 0.5\n'
                                           "thinking_budget = 64\ninclude_thoughts = true\n"))
    a, b, c, d = manifest.requests()
    assert a.config["temperature"] == d.config["temperature"] == 0.5
    assert a.config["thinking_config"] == {"thinking_budget": 64, "include_thoughts": True}
    # the item's thinking fields replace the manifest's thinking_config whole: a level is no budget
    assert b.config["temperature"] == 1.5 and b.config["thinking_config"] == {"thinking_level": "LOW"}
    assert b.config["response_mime_type"] == "application/json"
    assert b.config is c.config  # items with equal settings share one config, encoded once
    assert d.config == a.config


def test_inline_items_variations_and_template_rows_take_a_config_table(inbox):
    sentiment = load(write(inbox, "s.toml", 'task = "sentiment"\n'
                                            'items = [{text = "x", config = {thinking_budget = 0}}, {text = "y"}]\n'))
    first, second = sentiment.requests()
    assert first.config["thinking_config"] == {"thinking_budget": 0} and "thinking_config" not in second.config
    variations = load(write(inbox, "v.toml", """
task = "variations"
base_content = "Our water bottle keeps drinks cold."
[[variations]]
temperature = 0.9
config = {temperature = 0.1, media_resolution = "high"}
"""))
    [variation] = variations.requests()
    # the variation's own temperature is the task's per-request setting: it wins over the config table
    assert variation.config["temperature"] == 0.9 and variation.config["media_resolution"] == "MEDIA_RESOLUTION_HIGH"
    template = load(write(inbox, "t.toml", 'task = "template"\ntemplate = "About {name}"\n'
                                           'rows = [{name = "tea", config = {seed = 7}}]\n'))
    [row] = template.requests()
    assert row.prompt == "About tea" and row.config == {"seed": 7}


def test_a_bad_item_config_names_the_file_line_and_field(inbox):
    write(inbox, "in.jsonl", '{"text": "x"}\n{"text": "y", "config": {"thinking_budget": 8, "thinking_level": "high"}}\n')
    error = manifest_error(write(inbox, "s.toml", 'task = "sentiment"\ninput = "in.jsonl"\n'))
    assert (error.path, error.line, error.field) == (inbox / "in.jsonl", 2, "config.thinking_level")
    assert "not both" in error.message
    error = manifest_error(write(inbox, "s2.toml", 'task = "sentiment"\n'
                                                   'items = [{text = "x"}, {text = "y", config = {temprature = 1}}]\n'))
    assert (error.field, error.message) == ("items[1].config.temprature", "unknown field")


@pytest.mark.slow  # 20,000 lines under tracemalloc
def test_item_configs_are_streamed_not_kept(inbox):
    configs = ('{"temperature": 0.1}', '{"thinking_budget": 8, "safety_settings": '
               '[{"category": "hate_speech", "threshold": "off"}]}')
    with (inbox / "big.jsonl").open("w") as out:
        for n in range(20_000):
            out.write(f'{{"id": "r{n}", "text": "item {n}", "config": {configs[n % 2]}}}\n')
    manifest = load(write(inbox, "s.toml", 'task = "sentiment"\ninput = "big.jsonl"\n'), check_inputs=False)

    tracemalloc.start()
    try:
        count = sum(1 for _ in manifest.requests())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 20_000
    assert peak < 2_000_000, f"peak {peak} bytes"


# --- Input files -------------------------------------------------------------------------------


def test_csv_input_with_configured_columns(inbox):
    write(inbox, "data/reviews.csv", 'review_id,stars,body\nr1,5,"Love it, really"\nr2,1,"Broke in a day"\n')
    path = write(inbox, "r.toml", 'task = "sentiment"\ninput = "data/reviews.csv"\nid_column = "review_id"\ntext_column = "body"\n')
    items = list(load(path).inputs)
    assert [(item.id, item.text) for item in items] == [("r1", "Love it, really"), ("r2", "Broke in a day")]


def test_an_input_stream_can_be_closed_on_another_thread(inbox):
    """A build given up on is closed by whichever thread lets it go, not the one that read it."""
    import threading

    write(inbox, "data/reviews.csv", "id,text\nr1,good\nr2,bad\n")
    path = write(inbox, "r.toml", 'task = "sentiment"\ninput = "data/reviews.csv"\n')
    stream = iter(load(path).inputs)
    assert next(stream).id == "r1"
    errors = []

    def close() -> None:
        try:
            stream.close()
        except Exception as error:  # noqa: BLE001 - the assertion reports it
            errors.append(error)

    closer = threading.Thread(target=close)
    closer.start()
    closer.join()
    assert errors == []


def test_csv_without_id_column_uses_row_numbers(inbox):
    write(inbox, "in.csv", 'text\n"first"\n\n"second, with a\nline break"\nthird\n')
    path = write(inbox, "r.toml", 'task = "sentiment"\ninput = "in.csv"\n')
    items = list(load(path).inputs)
    assert [item.id for item in items] == ["1", "2", "3"]
    assert items[1].text == "second, with a\nline break"


def test_tsv_input(inbox):
    write(inbox, "in.tsv", "id\ttext\na\tone\nb\ttwo\n")
    path = write(inbox, "r.toml", 'task = "translate"\ninput = "in.tsv"\nlanguages = ["German"]\n')
    assert [r.key for r in load(path).requests()] == ["a:German", "b:German"]


def test_jsonl_input_objects_and_strings(inbox):
    lines = [json.dumps({"uid": "x", "body": "hello", "extra": 1}), "", json.dumps("just text")]
    write(inbox, "in.jsonl", "\n".join(lines) + "\n")
    path = write(inbox, "r.toml", 'task = "sentiment"\ninput = "in.jsonl"\nid_column = "uid"\ntext_column = "body"\n')
    assert [(i.id, i.text) for i in load(path).inputs] == [("x", "hello"), ("3", "just text")]


def test_txt_input_one_item_per_line(inbox):
    write(inbox, "in.txt", "Hello, how are you?\n\nThank you for your help.\n")
    path = write(inbox, "t.toml", 'task = "translate"\ninput = "in.txt"\nlanguages = ["Spanish"]\n')
    assert [r.key for r in load(path).requests()] == ["1:Spanish", "3:Spanish"]


def test_csv_variations_input(inbox):
    write(inbox, "v.csv", "id,tone,audience,temperature\nshort,casual,teens,0.9\nplain,,,\n")
    path = write(inbox, "v.toml", 'task = "variations"\nbase_content = "Hi"\ninput = "v.csv"\n')
    short, plain = load(path).requests()
    assert short.config["temperature"] == 0.9 and short.input["audience"] == "teens"
    assert plain.input["tone"] == "neutral"  # empty cells take the defaults


def test_claimed_manifest_finds_inputs_in_its_job_folder(inbox, tmp_path):
    write(inbox, "data/in.txt", "one\ntwo\n")
    original = write(inbox, "sub/t.toml", 'task = "translate"\ninput = "../data/in.txt"\nlanguages = ["French"]\n')
    manifest = load_manifest(original, root=inbox, check_inputs=False)
    job = tmp_path / "state" / "jobs" / "1"
    (job / "inputs").mkdir(parents=True)
    for path in manifest.input_files():
        (job / "inputs" / path.name).write_bytes(path.read_bytes())
    claimed = job / "manifest.toml"
    original.rename(claimed)
    (inbox / "data" / "in.txt").unlink()
    reloaded = load_manifest(claimed, input_dir=job / "inputs")
    assert reloaded.input_files() == [(job / "inputs" / "in.txt").resolve()]
    assert len(list(reloaded.requests())) == 2


@pytest.mark.slow
def test_big_csv_is_streamed(inbox):
    rows = 100_000
    text = "A review long enough to make the file much bigger than the memory allowed to read it. " * 4
    with (inbox / "big.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows([f"r{n}", text] for n in range(rows))
    file_size = (inbox / "big.csv").stat().st_size
    path = write(inbox, "big.toml", 'task = "sentiment"\ninput = "big.csv"\n')
    manifest = load(path, check_inputs=False)

    tracemalloc.start()
    try:
        count = sum(1 for _ in manifest.inputs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == rows
    assert file_size > 30_000_000
    assert peak < 2_000_000, f"peak {peak} bytes for a {file_size} byte input"


# --- Errors --------------------------------------------------------------------------------------


def test_toml_syntax_error_names_line_and_column(inbox):
    path = write(inbox, "bad.toml", 'task = "translate"\ntexts = ["a",\nlanguages = ["x"]\n')
    error = manifest_error(path)
    assert error.path == path and error.line == 3 and error.column is not None
    assert str(error).startswith(f"{path}, line 3, column")
    assert "invalid TOML" in str(error)


def test_truncated_toml_names_the_last_line(inbox):
    path = write(inbox, "cut.toml", 'task = "translate"\ntexts = ["a", "b"')
    error = manifest_error(path)
    assert error.line == 2


def test_json_syntax_error_names_line_and_column(inbox):
    path = write(inbox, "bad.json", '{\n  "task": "sentiment",\n  "texts": ["a" "b"]\n}\n')
    error = manifest_error(path)
    assert (error.line, error.column) == (3, 17)
    assert "line 3, column 17" in str(error) and "invalid JSON" in str(error)


def test_field_error_names_the_dotted_field(inbox):
    path = write(inbox, "s.toml", 'task = "sentiment"\n[[items]]\ntext = "ok"\n[[items]]\ntext = "fine"\n[[items]]\ntext = 3\n')
    error = manifest_error(path)
    assert error.field == "items[2].text"
    assert "items[2].text: " in str(error)


def test_missing_and_invalid_common_fields(inbox):
    error = manifest_error(write(inbox, "t.toml", 'task = "translate"\ntexts = ["a"]\n'))
    assert error.field == "languages" and "required" in error.message
    error = manifest_error(write(inbox, "t2.toml", 'task = "translate"\ntexts = ["a"]\nlanguages = ["x"]\ntemperature = 5\n'))
    assert error.field == "temperature"


def test_unknown_field_is_named(inbox):
    path = write(inbox, "t.toml", 'task = "translate"\ntexts = ["a"]\nlanguages = ["x"]\nlanguage = "y"\n')
    error = manifest_error(path)
    assert error.field == "language" and "unknown field" in error.message and "languages" in error.message


def test_unknown_or_missing_task_lists_known_tasks(inbox):
    for text in ('task = "translat"\n', 'texts = ["a"]\n'):
        error = manifest_error(write(inbox, "x.toml", text))
        assert error.field == "task"
        assert "sentiment, template, translate, variations" in error.message


@pytest.mark.parametrize(
    "text, message",
    [
        ('task = "sentiment"\ntexts = []\n', "at least 1 item"),
        ('task = "sentiment"\n', "no items"),
        ('task = "sentiment"\ntexts = ["  "]\n', "must not be empty"),
        ('task = "sentiment"\ntexts = ["a"]\ninput = "in.txt"\n', "either input or texts"),
        ('task = "sentiment"\ntexts = ["a"]\nitems = [{text = "b"}]\n', "either items or texts"),
    ],
)
def test_empty_or_ambiguous_inputs(inbox, text, message):
    write(inbox, "in.txt", "x\n")
    assert message in str(manifest_error(write(inbox, "s.toml", text)))


def test_input_file_without_items(inbox):
    write(inbox, "empty.csv", "id,text\n")
    error = manifest_error(write(inbox, "s.toml", 'task = "sentiment"\ninput = "empty.csv"\n'))
    assert error.path == inbox / "empty.csv" and "no input items" in error.message


def test_duplicate_ids_inline_and_in_files(inbox):
    error = manifest_error(write(inbox, "s.toml", 'task = "sentiment"\nitems = [{id = "a", text = "x"}, {id = "a", text = "y"}]\n'))
    assert error.field == "items[1].id" and "duplicate id 'a'" in error.message and "items[0]" in error.message
    # an explicit id may not collide with another item's positional id either
    error = manifest_error(write(inbox, "s2.toml", 'task = "sentiment"\nitems = [{text = "x"}, {id = 1, text = "y"}]\n'))
    assert "duplicate id '1'" in error.message
    write(inbox, "dup.csv", "id,text\nr1,x\nr2,y\nr1,z\n")
    error = manifest_error(write(inbox, "s3.toml", 'task = "sentiment"\ninput = "dup.csv"\n'))
    assert (error.path, error.line, error.field) == (inbox / "dup.csv", 4, "id")
    assert "first used at line 2" in error.message


def test_bad_row_in_input_file_names_file_line_and_field(inbox):
    write(inbox, "in.csv", 'id,text\na,fine\nb,""\n')
    error = manifest_error(write(inbox, "s.toml", 'task = "sentiment"\ninput = "in.csv"\n'))
    assert (error.path, error.line, error.field) == (inbox / "in.csv", 3, "text")
    write(inbox, "in.jsonl", '{"text": "ok"}\n{"text": \n')
    error = manifest_error(write(inbox, "s.toml", 'task = "sentiment"\ninput = "in.jsonl"\n'))
    assert (error.path, error.line) == (inbox / "in.jsonl", 2) and "invalid JSON" in error.message


def test_missing_csv_column_is_named(inbox):
    write(inbox, "in.csv", "id,body\na,x\n")
    error = manifest_error(write(inbox, "s.toml", 'task = "sentiment"\ninput = "in.csv"\n'))
    assert "missing column(s) 'text'" in error.message and "'body'" in error.message
    error = manifest_error(write(inbox, "s.toml", 'task = "sentiment"\ninput = "in.csv"\ntext_column = "body"\nid_column = "key"\n'))
    assert "'key'" in error.message


@pytest.mark.parametrize("reference", ["../outside.csv", "/etc/passwd.csv", "link/outside.csv"])
def test_input_may_not_escape_the_inbox(inbox, reference):
    outside = write(inbox.parent, "outside.csv", "text\nx\n")
    (inbox / "link").symlink_to(outside.parent)
    error = manifest_error(write(inbox, "s.toml", f'task = "sentiment"\ninput = "{reference}"\n'))
    assert error.field == "input" and "outside the inbox" in error.message


def test_an_input_that_is_no_regular_file_is_named_so_and_a_manifest_that_is_none_is_refused_unread(inbox):
    import os

    os.mkfifo(inbox / "in.csv")
    error = manifest_error(write(inbox, "s.toml", 'task = "sentiment"\ninput = "in.csv"\n'))
    assert error.field == "input" and "is not a regular file" in error.message  # it said "not found"
    os.mkfifo(inbox / "pipe.toml")
    with pytest.raises(ManifestError, match="not a regular file"):  # opened without blocking, then refused
        load_manifest(inbox / "pipe.toml")


def test_input_in_a_subfolder_of_the_root(inbox):
    write(inbox, "shared/in.txt", "a\n")
    path = write(inbox, "team/s.toml", 'task = "sentiment"\ninput = "../shared/in.txt"\n')
    assert load_manifest(path, root=inbox).input_files() == [(inbox / "shared" / "in.txt").resolve()]
    with pytest.raises(ManifestError, match="outside the inbox"):
        load_manifest(path)  # by default the manifest's own folder is the root


def test_missing_input_file_is_named(inbox):
    error = manifest_error(write(inbox, "s.toml", 'task = "sentiment"\ninput = "nope.csv"\n'))
    assert error.field == "input" and str(inbox / "nope.csv") in error.message


def test_unsupported_file_types(inbox):
    assert "unsupported manifest type" in str(manifest_error(write(inbox, "m.yaml", "task: x\n")))
    write(inbox, "in.xlsx", "")
    error = manifest_error(write(inbox, "s.toml", 'task = "sentiment"\ninput = "in.xlsx"\n'))
    assert "unsupported input type" in error.message


# --- JSON Schema ------------------------------------------------------------------------------------


def test_schema_has_one_alternative_per_task():
    schema = manifest_json_schema()
    assert schema["discriminator"]["propertyName"] == "task"
    assert set(schema["discriminator"]["mapping"]) == set(get_tasks())
    translate = schema["$defs"]["TranslateManifest"]
    assert translate["properties"]["task"]["const"] == "translate"
    assert {"languages", "texts", "temperature", "input", "model"} <= translate["properties"].keys()
    assert translate["additionalProperties"] is False
    json.dumps(schema)  # serializable for `batchd schema`


def test_schema_accepts_the_examples_and_rejects_typos():
    import tomllib

    validator = jsonschema.Draft202012Validator(manifest_json_schema())
    for path in EXAMPLES.glob("*.toml"):
        validator.validate(tomllib.loads(path.read_text()))
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({"task": "translate", "texts": ["a"], "languages": ["x"], "langauge": "y"})


def _csv_rows(inbox, name: str, ids: list[str], bad_text_at: int | None = None) -> Path:
    rows = "".join(f'{item_id},{"" if n == bad_text_at else "text " + str(n)}\n' for n, item_id in enumerate(ids))
    return write(inbox, name, "id,text\n" + rows)


def _items_then_error(path: Path) -> tuple[list[str], ManifestError]:
    manifest = load(path, check_inputs=False)
    seen = []
    with pytest.raises(ManifestError) as error:
        for item in manifest.inputs:
            seen.append(item.id)
    return seen, error.value


@pytest.mark.parametrize("first, again", [(3, 900), (700, 701), (0, 255), (255, 256)])
def test_a_duplicate_anywhere_in_a_big_file_is_found_after_the_items_before_it(inbox, first, again):
    # Rows are validated in batches; duplicates across and within batches are reported as row by row.
    ids = [f"r{n}" for n in range(1000)]
    ids[again] = ids[first]
    _csv_rows(inbox, "dup.csv", ids)
    seen, error = _items_then_error(write(inbox, "s.toml", 'task = "sentiment"\ninput = "dup.csv"\n'))
    assert seen == ids[:again]
    assert (error.line, error.field) == (again + 2, "id")
    assert f"duplicate id {ids[first]!r} (first used at line {first + 2})" in error.message


@pytest.mark.parametrize("first, again", [(3, 900), (150, 151), (50, 99), (99, 100)])
def test_a_duplicate_is_found_when_the_ids_seen_move_from_memory_to_a_temporary_database(
        inbox, monkeypatch, first, again):
    # The first SEEN_IN_MEMORY ids are held in a dict, the rest in SQLite: a duplicate on either side
    # of the move, or across it, names where its id was first used.
    monkeypatch.setattr(inputs_module, "SEEN_IN_MEMORY", 100)
    ids = [f"r{n}" for n in range(1000)]
    ids[again] = ids[first]
    _csv_rows(inbox, "dup.csv", ids)
    seen, error = _items_then_error(write(inbox, "s.toml", 'task = "sentiment"\ninput = "dup.csv"\n'))
    assert seen == ids[:again]
    assert f"duplicate id {ids[first]!r} (first used at line {first + 2})" in error.message


def test_the_first_problem_of_a_batch_is_the_one_reported(inbox):
    ids = [f"r{n}" for n in range(600)]
    ids[520] = ids[10]  # a duplicate after a bad row of the same batch: the bad row is reported
    _csv_rows(inbox, "a.csv", ids, bad_text_at=515)
    seen, error = _items_then_error(write(inbox, "a.toml", 'task = "sentiment"\ninput = "a.csv"\n'))
    assert seen == ids[:515] and (error.line, error.field) == (517, "text")
    ids = [f"r{n}" for n in range(600)]
    ids[515] = ids[10]  # and a bad row after a duplicate: the duplicate is
    _csv_rows(inbox, "b.csv", ids, bad_text_at=520)
    seen, error = _items_then_error(write(inbox, "b.toml", 'task = "sentiment"\ninput = "b.csv"\n'))
    assert seen == ids[:515] and (error.line, error.field) == (517, "id") and "duplicate id 'r10'" in error.message


def test_items_before_an_unreadable_line_come_first(inbox):
    lines = [json.dumps({"id": f"j{n}", "text": f"t{n}"}) for n in range(300)] + ['{"text": ']
    write(inbox, "in.jsonl", "\n".join(lines) + "\n")
    seen, error = _items_then_error(write(inbox, "s.toml", 'task = "sentiment"\ninput = "in.jsonl"\n'))
    assert seen == [f"j{n}" for n in range(300)]
    assert error.line == 301 and "invalid JSON" in error.message
