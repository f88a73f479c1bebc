"""The analysis, documents and template tasks: manifests, requests and organized results."""

import json
from pathlib import Path

import pytest

from batchd.manifest import ManifestError, load_manifest
from batchd.testing import answered, failed
from batchd_plugins.analysis import Analysis
from batchd_plugins.documents import Documents
from batchd_plugins.template import Template, template_fields

REPO = Path(__file__).resolve().parents[1]
# Registered by hand so these tests do not depend on the plugins' entry points being installed.
TASKS = {task.name: task for task in (Analysis(), Documents(), Template())}


def manifest_for(tmp_path: Path, text: str, **files: str):
    """Load ``text`` as a TOML manifest, with ``files`` (name → content) written next to it."""
    for name, content in files.items():
        (tmp_path / name.replace("_", ".")).write_text(content)
    path = tmp_path / "job.toml"
    path.write_text(text)
    return load_manifest(path, tasks=TASKS)


def rejection(tmp_path: Path, text: str, **files: str) -> ManifestError:
    with pytest.raises(ManifestError) as error:
        manifest_for(tmp_path, text, **files)
    return error.value


JSON_CONFIG_KEYS = {"response_mime_type", "response_json_schema"}


# --- Shared template parsing --------------------------------------------------------------------------


def test_template_fields():
    assert template_fields("{a} and {b}, {a} again {{literal}} {product name}") == ["a", "b", "product name"]
    for template, problem in [("{", "malformed"), ("}", "malformed"), ("{}", "named"), ("{0}", "named"),
                              ("{a.b}", "plain name"), ("{a[0]}", "plain name")]:
        with pytest.raises(ValueError, match=problem):
            template_fields(template)


# --- analysis ---------------------------------------------------------------------------------------------


ANALYSIS_CUSTOM = """
[analysis_types.risk]
prompt = "Rate the churn risk of this customer: {text}"
response_schema = { type = "object", properties = { level = { type = "string" } } }

[analysis_types.reply]
prompt = "Draft a one-line reply to: {text}"
"""


def test_analysis_defaults_to_the_four_builtins(tmp_path):
    manifest = manifest_for(tmp_path, 'task = "analysis"\ntexts = ["Great phone, from Acme.", "Meh"]\n')
    requests = list(manifest.requests())
    assert [r.key for r in requests] == [
        "1:sentiment", "1:themes", "1:entities", "1:summary",
        "2:sentiment", "2:themes", "2:entities", "2:summary",
    ]
    assert requests[1].input == {"id": "1", "text": "Great phone, from Acme.", "analysis": "themes", "format": "json"}
    for request in requests:
        assert JSON_CONFIG_KEYS <= request.config.keys() and request.config["temperature"] == 0.0
        assert request.config["response_mime_type"] == "application/json"
        assert "Great phone, from Acme." in request.prompt or "Meh" in request.prompt
    schemas = {r.input["analysis"]: r.config["response_json_schema"] for r in requests[:4]}
    assert schemas["sentiment"]["properties"]["label"]["enum"] == ["positive", "negative", "neutral", "mixed"]
    assert schemas["themes"]["type"] == "array"
    entity = schemas["entities"]["$defs"]["Entity"]
    assert entity["properties"]["type"]["enum"] == ["person", "organization", "location", "product", "other"]
    assert schemas["summary"]["required"] == ["summary"]
    assert "named entities" in requests[2].prompt and "{context}" not in requests[2].prompt


def test_analysis_custom_types_from_an_input_file(tmp_path):
    manifest = manifest_for(
        tmp_path,
        'task = "analysis"\ninput = "feedback.csv"\nid_column = "ticket"\ncontext = "support tickets {2024}"\n'
        'analyses = ["summary", "risk", "reply", "risk"]\n' + ANALYSIS_CUSTOM,
        feedback_csv="ticket,text\nt:1,Cancelling unless fixed\nt-2,Thanks!\n",
    )
    requests = list(manifest.requests())
    # Repeats dropped; ids containing ":" keep keys unique (the analysis follows the last ":").
    assert [r.key for r in requests] == ["t:1:summary", "t:1:risk", "t:1:reply", "t-2:summary", "t-2:risk", "t-2:reply"]
    summary, risk, reply = requests[:3]
    assert "(support tickets {2024})" in summary.prompt  # braces in the context are kept literally
    assert risk.prompt == "Rate the churn risk of this customer: Cancelling unless fixed"
    assert risk.config["response_json_schema"] == {"type": "object", "properties": {"level": {"type": "string"}}}
    assert reply.prompt == "Draft a one-line reply to: Cancelling unless fixed"
    assert not JSON_CONFIG_KEYS & reply.config.keys() and reply.input["format"] == "text"


def test_analysis_default_includes_custom_types(tmp_path):
    manifest = manifest_for(tmp_path, 'task = "analysis"\ntexts = ["x"]\n' + ANALYSIS_CUSTOM)
    assert [r.input["analysis"] for r in manifest.requests()] == [
        "sentiment", "themes", "entities", "summary", "risk", "reply"
    ]


def test_analysis_organize_groups_by_item(tmp_path):
    manifest = manifest_for(
        tmp_path,
        'task = "analysis"\nanalyses = ["sentiment", "themes", "entities", "summary", "risk", "reply"]\n'
        '[[items]]\nid = "a"\ntext = "Acme support was quick."\n[[items]]\nid = "b"\ntext = "Late again."\n'
        + ANALYSIS_CUSTOM,
    )
    requests = list(manifest.requests())
    verdict = {"label": "positive", "score": 0.8, "rationale": "Praises support."}
    themes = [{"theme": "support speed", "evidence": "support was quick"}]
    entities = [{"name": "Acme", "type": "organization"}]
    results = [
        answered(requests[0], data=verdict),
        answered(requests[1], data=themes),
        answered(requests[2], data=entities),
        answered(requests[3], data={"summary": "Support was quick."}),
        answered(requests[4], data={"level": "low"}),
        answered(requests[5], text=" Thank you! \n"),
        failed(requests[6], "internal error"),
        answered(requests[7], data=[{"theme": "delays"}]),  # evidence missing
        answered(requests[8], data=[{"name": "x", "type": "animal"}]),  # not a listed type
        answered(requests[9], text="not json"),
        answered(requests[10], text="{"),  # custom schema, unparsable answer
        answered(requests[11], text=""),
    ]
    organized = dict(manifest.organize(results))
    assert list(organized) == ["a", "b"]
    assert organized["a"] == {
        "sentiment": verdict, "themes": themes, "entities": entities,
        "summary": {"summary": "Support was quick."}, "risk": {"level": "low"}, "reply": "Thank you!",
    }
    b = organized["b"]
    assert b["sentiment"] == {"error": "internal error"}
    assert b["themes"]["error"].startswith("unexpected answer (0.evidence") and b["themes"]["text"]
    assert b["entities"]["error"].startswith("unexpected answer (0.type")
    assert b["summary"] == {"error": "unexpected answer (not valid JSON)", "text": "not json"}
    assert b["risk"] == {"error": "unexpected answer (not valid JSON)", "text": "{"}
    assert b["reply"] == {"error": "empty response"}


@pytest.mark.parametrize(
    "body, field, message",
    [
        ('texts = ["x"]\nanalyses = ["mood"]', None, "unknown 'mood' (known: sentiment, themes, entities, summary)"),
        ('texts = ["x"]\nanalyses = []', "analyses", "at least 1"),
        ('texts = ["x"]\n[analysis_types.summary]\nprompt = "{text}"', None, "summary is built in"),
        ('texts = ["x"]\n[analysis_types.risk]\nprompt = "Rate the risk"', "analysis_types.risk.prompt", "{text}"),
        ('texts = ["x"]\n[analysis_types.risk]\nprompt = "{text} for {who}"', "analysis_types.risk.prompt", "{text}"),
        ('texts = ["x"]\n[analysis_types."a:b"]\nprompt = "{text}"', "analysis_types.a:b.[key]", "pattern"),
        ('texts = ["x"]\n[analysis_types.risk]\nprompt = "{text}"\nschema = {}', "analysis_types.risk.schema",
         "unknown field"),
        ('texts = ["x"]\nitems = [{text = "y"}]', None, "either items or texts"),
    ],
)
def test_analysis_manifest_errors(tmp_path, body, field, message):
    error = rejection(tmp_path, f'task = "analysis"\n{body}\n')
    assert error.field == field
    assert message in error.message


# --- documents --------------------------------------------------------------------------------------


def test_documents_inline_texts_and_tables(tmp_path):
    manifest = manifest_for(
        tmp_path,
        'task = "documents"\nprompt = "Summarize in 2 sentences ({{no field}}): {document}"\n'
        'documents = ["First doc.", {id = "memo", text = "Second doc."}]\n',
    )
    first, memo = manifest.requests()
    assert (first.key, memo.key) == ("1", "memo")
    assert first.prompt == "Summarize in 2 sentences ({no field}): First doc."
    assert memo.input == {"id": "memo", "text": "Second doc.", "format": "text"} and memo.config == {}
    organized = dict(manifest.organize([answered(first, text=" A summary.\n"), failed(memo)]))
    assert organized == {"1": "A summary.", "memo": {"error": "quota exhausted"}}


@pytest.mark.parametrize(
    "name, content, ids",
    [
        ("docs.csv", "doc,body\nd1,Alpha report\nd2,Beta report\n", ["d1", "d2"]),
        ("docs.jsonl", '{"doc": "d1", "body": "Alpha report"}\n{"doc": "d2", "body": "Beta report"}\n', ["d1", "d2"]),
        ("docs.txt", "Alpha report\n\nBeta report\n", ["1", "3"]),  # ids are line numbers
    ],
)
def test_documents_from_an_input_file(tmp_path, name, content, ids):
    columns = 'id_column = "doc"\ntext_column = "body"\n' if not name.endswith(".txt") else ""
    (tmp_path / name).write_text(content)
    manifest = manifest_for(tmp_path, f'task = "documents"\nprompt = "Summarize: {{document}}"\ninput = "{name}"\n{columns}')
    requests = list(manifest.requests())
    assert [r.key for r in requests] == ids
    assert [r.prompt for r in requests] == ["Summarize: Alpha report", "Summarize: Beta report"]


def test_documents_structured_output(tmp_path):
    manifest = manifest_for(
        tmp_path,
        'task = "documents"\nprompt = "Extract the title and date: {document}"\ndocuments = ["a", "b", "c"]\n'
        '[response_schema]\ntype = "object"\nproperties = { title = { type = "string" } }\n',
    )
    requests = list(manifest.requests())
    assert requests[0].config == {
        "response_mime_type": "application/json",
        "response_json_schema": {"type": "object", "properties": {"title": {"type": "string"}}},
    }
    assert requests[0].input["format"] == "json"
    results = [answered(requests[0], data={"title": "A"}), answered(requests[1], text="Sorry"), failed(requests[2])]
    assert dict(manifest.organize(results)) == {
        "1": {"title": "A"},
        "2": {"error": "unexpected answer (not valid JSON)", "text": "Sorry"},
        "3": {"error": "quota exhausted"},
    }


@pytest.mark.parametrize(
    "prompt, message",
    [
        ('"Summarize this"', "must contain {document}"),
        ('"Summarize {doc}"', "must contain {document}"),
        ('"Summarize {document} for {audience}"', "unknown field(s) {audience}"),
        ('"Summarize {document"', "malformed template"),
    ],
)
def test_documents_prompt_errors_name_the_field(tmp_path, prompt, message):
    error = rejection(tmp_path, f'task = "documents"\ndocuments = ["x"]\nprompt = {prompt}\n')
    assert error.field == "prompt"
    assert message in error.message


# --- template -----------------------------------------------------------------------------------------


def test_template_inline_rows(tmp_path):
    manifest = manifest_for(
        tmp_path,
        'task = "template"\ntemplate = "Blurb for {name} in a {tone} tone (row {id})."\n'
        'rows = [{id = "p1", name = "Lamp", tone = "calm"}, {name = "Mug", tone = "fun", price = 9}]\n',
    )
    p1, second = manifest.requests()
    assert (p1.key, second.key) == ("p1", "2")
    assert p1.prompt == "Blurb for Lamp in a calm tone (row p1)."
    assert second.prompt == "Blurb for Mug in a fun tone (row 2)."
    assert p1.input == {"id": "p1", "row": {"name": "Lamp", "tone": "calm"}, "format": "text"} and p1.config == {}
    organized = dict(manifest.organize([answered(p1, text="Soft light.\n"), answered(second, text="  ")]))
    assert organized == {"p1": "Soft light.", "2": {"error": "empty response"}}


def test_template_structured_output(tmp_path):
    manifest = manifest_for(
        tmp_path,
        'task = "template"\ntemplate = "Name a {thing}."\nrows = [{thing = "cat"}, {thing = 7}]\n'
        'response_schema = { type = "object", properties = { name = { type = "string" } } }\n',
    )
    cat, dog = manifest.requests()
    assert JSON_CONFIG_KEYS <= cat.config.keys() and cat.input["format"] == "json"
    assert dog.prompt == "Name a 7."  # numbers in rows are shown as written
    organized = dict(manifest.organize([answered(cat, data={"name": "Tom"}), answered(dog, text="Rex")]))
    assert organized == {"1": {"name": "Tom"}, "2": {"error": "unexpected answer (not valid JSON)", "text": "Rex"}}


@pytest.mark.parametrize(
    "body, field, message",
    [
        ('template = "Blurb for {name} in {tone}"\nrows = [{name = "A", tone = "x"}, {name = "B"}]', None,
         "rows[1] has no value for template field(s) 'tone'"),
        ('template = "The same prompt"\nrows = [{name = "A"}]', "template", "has no {column} fields"),
        ('template = "Blurb for {}"\nrows = [{name = "A"}]', "template", "named fields"),
        ('template = "Blurb for {name}"\nrows = [{name = ["A"]}]', "rows[0].name", "valid string"),
    ],
)
def test_template_manifest_errors(tmp_path, body, field, message):
    error = rejection(tmp_path, f'task = "template"\n{body}\n')
    assert error.field == field
    assert message in error.message


def test_template_over_text_lines(tmp_path):
    manifest = manifest_for(
        tmp_path, 'task = "template"\ntemplate = "Line {id}: {text}"\ninput = "lines.txt"\n', lines_txt="one\ntwo\n"
    )
    assert [r.prompt for r in manifest.requests()] == ["Line 1: one", "Line 2: two"]


def test_template_row_missing_a_field_in_an_input_file(tmp_path):
    manifest = manifest_for(
        tmp_path, 'task = "template"\ntemplate = "{text} by {author}"\ninput = "lines.txt"\n', lines_txt="one\n"
    )
    # Rows of an input file are only read as requests are built; the daemon rejects the job then.
    with pytest.raises(ValueError, match=r"row '1' has no value for template field\(s\) 'author'"):
        list(manifest.requests())


@pytest.mark.parametrize(
    "name, content",
    [
        ("rows.csv", "sku,name,tone\np1,Lamp,calm\np2,Mug,fun\n"),
        ("rows.jsonl", '{"sku": "p1", "name": "Lamp", "tone": "calm"}\n{"sku": "p2", "name": "Mug", "tone": "fun"}\n'),
    ],
)
def test_template_rows_from_an_input_file(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    manifest = manifest_for(
        tmp_path, f'task = "template"\ntemplate = "Blurb for {{name}}, {{tone}}"\ninput = "{name}"\nid_column = "sku"\n'
    )
    assert [(r.key, r.prompt) for r in manifest.requests()] == [("p1", "Blurb for Lamp, calm"), ("p2", "Blurb for Mug, fun")]


# --- The example manifests in inbox/ -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, request_count",
    [
        ("analysis.toml", 15),
        ("documents.toml", 3),
        ("template.toml", 3),
    ],
)
def test_inbox_examples_load(name, request_count):
    manifest = load_manifest(REPO / "examples" / "inbox" / name, root=REPO / "examples" / "inbox", tasks=TASKS)
    requests = list(manifest.requests())
    assert len(requests) == request_count
    assert len({r.key for r in requests}) == request_count


def test_repeats_a_task_drops_are_warned_about(tmp_path: Path):
    from batchd_plugins.translate import Translate

    path = tmp_path / "job.toml"
    path.write_text('task = "translate"\ntexts = ["Hi", "Bye", "Hi", "Hi"]\nlanguages = ["French", "French"]\n')
    manifest = load_manifest(path, tasks={"translate": Translate()})
    assert [request.key for request in manifest.requests()] == ["1:French", "2:French"]
    assert manifest.warnings[0] == "languages: 'French' given more than once; each is translated into once"
    assert manifest.warnings[1].startswith("2 repeated text(s) dropped") and "'3 (Hi)', '4 (Hi)'" in manifest.warnings[1]
    analysis = manifest_for(tmp_path, 'task = "analysis"\ntexts = ["a"]\nanalyses = ["themes", "summary", "themes"]\n')
    assert [request.key for request in analysis.requests()] == ["1:themes", "1:summary"]
    assert analysis.warnings == ["analyses: 'themes' given more than once; each is run once per text"]
