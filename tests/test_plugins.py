"""Plugin discovery, task registration, and the builtin tasks' requests and organized results."""

import json
import textwrap
from pathlib import Path

import pytest

from batchd.manifest import load_manifest
from batchd.plugins import PluginError, describe_plugins, get_plugin_manager, get_tasks
from batchd.testing import answered, failed

BUILTIN_TASKS = {"translate", "sentiment", "variations"}


def manifest_for(tmp_path: Path, text: str):
    path = tmp_path / "job.toml"
    path.write_text(text)
    return load_manifest(path)


# --- Discovery ------------------------------------------------------------------------------------


def test_entry_points_provide_the_builtin_tasks():
    tasks = get_tasks()
    assert BUILTIN_TASKS <= tasks.keys()
    pm = get_plugin_manager()
    assert {"translate", "sentiment", "variations"} <= {name for name, _ in pm.list_name_plugin()}
    described = {info.name: info for info in describe_plugins()}
    assert described["translate"].source == "entry point batchd" and described["translate"].version


def write_plugin(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


PLUGIN_HEADER = """
from pydantic import BaseModel, ConfigDict
from batchd import hookimpl
from batchd.task import Task, TaskRequest

class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str]
"""


#: A complete one-off plugin, shared with the discovery tests.
SUMMARIZE_PLUGIN = PLUGIN_HEADER + """
class Summarize(Task):
    name = "summarize"
    Params = Params
    def inline_items(self, params):
        return "texts", params.texts
    def requests(self, params, items):
        for item in items:
            yield TaskRequest(item.id, f"Summarize in 2 sentences: {item.text}", {"id": item.id})
    def organize(self, results):
        for result in results:
            yield result.key, result.text

@hookimpl
def register_tasks(register):
    register(Summarize())
"""


def test_hook_register_tasks_from_a_plugins_dir_file(tmp_path):
    folder = tmp_path / "plugins.d"
    write_plugin(folder, "summarize", SUMMARIZE_PLUGIN)
    tasks = get_tasks(folder)
    assert {"summarize"} | BUILTIN_TASKS <= tasks.keys()
    manifest = load_manifest(_write(tmp_path / "s.toml", 'task = "summarize"\ntexts = ["a"]\n'), tasks=tasks)
    assert [r.key for r in manifest.requests()] == ["1"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "class Translate2(Task):\n    name = 'translate'\n    Params = Params\n"
            "@hookimpl\ndef register_tasks(register):\n    register(Translate2())\n",
            "already registered by plugin 'translate'",
        ),
        ("@hookimpl\ndef register_tasks(register):\n    register('translate')\n", "not a batchd.task.Task"),
        (
            "class Loose(BaseModel):\n    texts: list[str]\n"
            "class T(Task):\n    name = 'loose'\n    Params = Loose\n"
            "@hookimpl\ndef register_tasks(register):\n    register(T())\n",
            'extra="forbid"',
        ),
        (
            "class P(Params):\n    model: str\n"
            "class T(Task):\n    name = 'clash'\n    Params = P\n"
            "@hookimpl\ndef register_tasks(register):\n    register(T())\n",
            "clash with common manifest fields",
        ),
        ("@hookimpl\ndef register_tasks(register):\n    raise RuntimeError('boom')\n", "boom"),
        ("@hookimpl\ndef register_task(register):\n    pass\n", "register_task"),
        ("raise ImportError('no such thing')\n", "failed to load"),
    ],
    ids=["duplicate", "not-a-task", "extra-allowed", "field-clash", "raises", "misspelt-hook", "import-error"],
)
def test_hook_register_tasks_errors_name_the_plugin(tmp_path, body, message):
    plugin = write_plugin(tmp_path / "plugins.d", "faulty", PLUGIN_HEADER + body)
    with pytest.raises(PluginError) as error:
        get_tasks(plugin.parent)
    assert message in str(error.value)
    assert "faulty" in str(error.value)


def test_broken_entry_point_is_named(tmp_path, monkeypatch):
    dist_info = tmp_path / "broken_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[batchd]\nbroken = batchd_no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"plugin 'broken' \(batchd_no_such_module\) failed to load"):
        get_plugin_manager.__wrapped__()  # uncached: a fresh scan of the entry points


# --- Builtin tasks ------------------------------------------------------------------------------


def test_translate_requests_and_organize(tmp_path):
    manifest = manifest_for(
        tmp_path,
        'task = "translate"\ntexts = ["Hello", "Thanks", "Hello"]\nlanguages = ["Spanish", "French"]\n'
        'source_language = "English"\n',
    )
    requests = list(manifest.requests())
    assert [r.key for r in requests] == ["1:Spanish", "1:French", "2:Spanish", "2:French"]  # repeated text once
    assert "from English into Spanish" in requests[0].prompt
    assert requests[0].config == {"temperature": 0.2}
    results = [
        answered(requests[0], " Hola \n"),
        answered(requests[1], "Bonjour"),
        failed(requests[2]),
        answered(requests[3], "Merci"),
    ]
    assert dict(manifest.organize(results)) == {
        "Hello": {"Spanish": "Hola", "French": "Bonjour"},
        "Thanks": {"Spanish": {"error": "quota exhausted"}, "French": "Merci"},
    }


def test_sentiment_requests_and_organize(tmp_path):
    manifest = manifest_for(
        tmp_path,
        'task = "sentiment"\ncontext = "coffee shop reviews"\n'
        'items = [{id = "a", text = "Lovely"}, {id = "b", text = "Cold"}, {id = "c", text = "Hm"}, {id = "d", text = "?"}]\n',
    )
    requests = list(manifest.requests())
    assert [r.key for r in requests] == ["a", "b", "c", "d"]
    assert requests[0].input == {"id": "a", "text": "Lovely"}
    assert "(coffee shop reviews)" in requests[0].prompt and "Lovely" in requests[0].prompt
    schema = requests[0].config["response_json_schema"]
    assert schema["properties"]["label"]["enum"] == ["positive", "negative", "neutral", "mixed"]
    assert (schema["properties"]["score"]["minimum"], schema["properties"]["score"]["maximum"]) == (-1, 1)
    assert requests[0].config["temperature"] == 0.0

    verdict = {"label": "positive", "score": 0.9, "rationale": "Praises the place."}
    results = [
        answered(requests[0], json.dumps(verdict), verdict),
        failed(requests[1], "internal error"),
        answered(requests[2], '{"label": "angry"}', {"label": "angry"}),
        answered(requests[3], "not json", None),
    ]
    organized = dict(manifest.organize(results))
    assert organized["a"] == verdict
    assert organized["b"] == {"error": "internal error"}
    assert organized["c"]["error"].startswith("unexpected answer") and organized["c"]["text"] == '{"label": "angry"}'
    assert "error" in organized["d"]
    assert list(organized) == ["a", "b", "c", "d"]


def test_variations_requests_and_organize(tmp_path):
    manifest = manifest_for(
        tmp_path,
        'task = "variations"\nbase_content = "Our assistant automates support."\n'
        '[[variations]]\nid = "formal"\ntone = "formal"\naudience = "executives"\nmax_output_tokens = 300\n'
        '[[variations]]\nid = "tweet"\nstyle = "tweet"\nlength = "short"\n',
    )
    formal, tweet = manifest.requests()
    assert (formal.key, tweet.key) == ("formal", "tweet")
    assert tweet.input == {"id": "tweet", "tone": "neutral", "length": "short", "audience": "general", "style": "tweet"}
    assert formal.config == {"temperature": 0.7, "max_output_tokens": 300}
    assert "Target audience: executives" in formal.prompt
    organized = dict(manifest.organize([answered(formal, "Dear board, ...\n"), answered(tweet, "")]))
    assert organized == {"formal": "Dear board, ...", "tweet": {"error": "empty response"}}


# --- Installation outside the checkout ---------------------------------------------------------------


@pytest.mark.slow
def test_builtins_load_after_a_plain_pip_install(fresh_venv, source_copy, tmp_path):
    """`pip install .` into a fresh venv outside the checkout, reusing this environment's dependencies."""
    fresh_venv.install(source_copy)
    probe = (
        "import json, batchd, batchd_plugins; from batchd.plugins import get_tasks; "
        "print(json.dumps([batchd.__file__, batchd_plugins.__file__, sorted(get_tasks())]))"
    )
    batchd_file, plugins_file, tasks = json.loads(fresh_venv.run("-c", probe, cwd=tmp_path).stdout)
    assert batchd_file.startswith(str(fresh_venv.site)) and plugins_file.startswith(str(fresh_venv.site))
    assert BUILTIN_TASKS <= set(tasks)
    # `batchd init` writes the config template shipped inside the package.
    template = fresh_venv.run("-c", "from batchd.service import config_template; print(config_template())", cwd=tmp_path)
    assert template.stdout.startswith("# batchd configuration."), template.stderr


@pytest.mark.parametrize("data", [
    {"label": "mixed", "score": -1, "rationale": ""},  # an int score comes out a float, as the model makes it
    {"label": "neutral", "score": 0.25, "rationale": "Plain.", "extra": "dropped"},
    {"label": "positive", "score": True, "rationale": "x"},  # bool is not a number here: the model decides
    {"label": "positive", "score": "0.5", "rationale": "x"},  # lax strings: the model decides
    {"label": "positive", "score": 1.5, "rationale": "x"},
    {"label": "positive", "score": float("nan"), "rationale": "x"},
    {"label": "glad", "score": 0.5, "rationale": "x"},
    {"label": "positive", "score": 0.5},
    ["positive"],
])
def test_sentiment_verdicts_of_well_formed_answers_match_the_model(tmp_path, data):
    from batchd_plugins.sentiment import Verdict

    manifest = manifest_for(tmp_path, 'task = "sentiment"\ntexts = ["t"]\n')
    [request] = manifest.requests()
    [(_, verdict)] = manifest.organize([answered(request, json.dumps(data), data)])
    try:
        expected = Verdict.model_validate(data).model_dump()
    except ValueError:
        assert verdict["error"].startswith("unexpected answer (") and verdict["text"] == json.dumps(data)
    else:
        assert verdict == expected and type(verdict["score"]) is float
